"""Tests for pfa_jax.input_pipeline (synthetic arrays and tfds mock data)."""

import tempfile
from unittest import mock

import flax.linen as nn
import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl.testing import absltest
from absl.testing import parameterized

from configs import common
from pfa_jax import input_pipeline

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _dataset(n=50, size=8, num_classes=10, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
  labels = rng.integers(0, num_classes, n).astype(np.int64)
  ds = tf.data.Dataset.from_tensor_slices({'image': images, 'label': labels})
  return ds, images, labels


def _train(ds, *, seed=0, start_step=0, n=10, augment=True, spe=6):
  it = input_pipeline.train_batches(
    ds,
    preprocess_fn=input_pipeline.cifar_preprocess(
      mean=MEAN, std=STD, augment=augment
    ),
    batch_size=8,
    seed=seed,
    steps_per_epoch=spe,
    shuffle_buffer=50,
    start_step=start_step,
  )
  return [next(it) for _ in range(n)]


def _equal(a, b):
  return all(np.array_equal(a[k], b[k]) for k in ('image', 'label', 'mask'))


def _config(**input_kw):
  """The project's CIFAR-10 input defaults with small batches, seed 3."""
  config = common.base('cifar10', 'simple_cnn')
  config.seed = 3
  small = dict(batch_size=16, eval_batch_size=16, shuffle_buffer=100)
  config.input.update({**small, **input_kw})
  return config


class TrainBatchesTest(parameterized.TestCase):
  def test_same_seed_same_batches_other_seed_differs(self):
    ds, _, _ = _dataset()
    a, b, c = _train(ds), _train(ds), _train(ds, seed=1)
    self.assertTrue(all(_equal(x, y) for x, y in zip(a, b, strict=True)))
    self.assertFalse(_equal(a[0], c[0]))

  def test_batch_format(self):
    ds, _, _ = _dataset()
    (batch,) = _train(ds, n=1)
    self.assertEqual(batch['image'].shape, (8, 8, 8, 3))
    self.assertEqual(batch['image'].dtype, np.float32)
    self.assertEqual(batch['label'].dtype, np.int32)
    self.assertTrue(batch['mask'].all())

  @parameterized.parameters(1, 6, 9, 13)
  def test_start_step_resumes_exactly(self, start):
    ds, _, _ = _dataset()
    full = _train(ds, n=16)
    resumed = _train(ds, start_step=start, n=16 - start)
    self.assertTrue(
      all(_equal(x, y) for x, y in zip(full[start:], resumed, strict=True))
    )

  def test_epochs_are_reshuffled_and_cover_distinct_examples(self):
    ds, _, labels = _dataset(n=48)
    batches = _train(ds, augment=False, n=12)
    epoch0 = np.concatenate([b['label'] for b in batches[:6]])
    epoch1 = np.concatenate([b['label'] for b in batches[6:]])
    np.testing.assert_array_equal(np.sort(epoch0), np.sort(labels))
    np.testing.assert_array_equal(np.sort(epoch1), np.sort(labels))
    self.assertFalse(np.array_equal(epoch0, epoch1))

  def test_no_augment_is_normalisation(self):
    ds, images, _ = _dataset(n=8)
    it = input_pipeline.train_batches(
      ds,
      preprocess_fn=input_pipeline.cifar_preprocess(
        mean=MEAN, std=STD, augment=False
      ),
      batch_size=8,
      seed=0,
      steps_per_epoch=1,
      shuffle_buffer=1,
      shuffle=False,
    )
    expected = (images / 255.0 - np.array(MEAN)) / np.array(STD)
    np.testing.assert_allclose(next(it)['image'], expected, atol=1e-5)

  def test_augment_is_crop_and_flip(self):
    ds, images, _ = _dataset(n=8)
    (batch,) = _train(ds, n=1, spe=1)
    raw = np.round((batch['image'] * STD + np.array(MEAN)) * 255.0)
    for img in raw:  # Each augmented image is a shifted (maybe flipped) input.
      found = False
      padded = np.pad(images, [(0, 0), (4, 4), (4, 4), (0, 0)])
      for src in padded:
        for flip in (False, True):
          cand = src[:, ::-1] if flip else src
          for y in range(9):
            for x in range(9):
              if np.array_equal(cand[y : y + 8, x : x + 8], img):
                found = True
      self.assertTrue(found)


class EvalBatchesTest(absltest.TestCase):
  def test_padding_counts_each_example_once(self):
    ds, _, labels = _dataset(n=37)
    batches = list(
      input_pipeline.eval_batches(
        ds,
        preprocess_fn=input_pipeline.cifar_preprocess(
          mean=MEAN, std=STD, augment=False
        ),
        batch_size=16,
      )
    )
    self.assertLen(batches, 3)
    for b in batches:
      self.assertEqual(b['image'].shape[0], 16)
    mask = np.concatenate([b['mask'] for b in batches])
    got = np.concatenate([b['label'] for b in batches])[mask]
    np.testing.assert_array_equal(got, labels)
    self.assertEqual(mask.sum(), 37)

  def test_num_batches_pads_with_masked_batches(self):
    ds, _, _ = _dataset(n=10)
    batches = list(
      input_pipeline.eval_batches(
        ds,
        preprocess_fn=input_pipeline.cifar_preprocess(
          mean=MEAN, std=STD, augment=False
        ),
        batch_size=8,
        num_batches=4,
      )
    )
    self.assertEqual([int(b['mask'].sum()) for b in batches], [8, 2, 0, 0])

  def test_pad_batch(self):
    batch = {'image': np.ones([3, 2, 2, 1]), 'label': np.arange(3)}
    out = input_pipeline.pad_batch(batch, 5)
    np.testing.assert_array_equal(out['mask'], [1, 1, 1, 0, 0])
    np.testing.assert_array_equal(out['label'], [0, 1, 2, 0, 0])
    self.assertEqual(out['image'].shape, (5, 2, 2, 1))


class ClassesTest(absltest.TestCase):
  def test_select_classes_remaps_and_filters(self):
    ds, _, labels = _dataset(n=60)
    out = input_pipeline.select_classes(ds, [7, 2, 5], 10)
    got = np.array([int(ex['label']) for ex in out])
    keep = np.isin(labels, [7, 2, 5])
    expected = np.array([{7: 0, 2: 1, 5: 2}[int(c)] for c in labels[keep]])
    np.testing.assert_array_equal(got, expected)

  def test_empty_classes_is_identity(self):
    ds, _, labels = _dataset(n=20)
    out = input_pipeline.select_classes(ds, [], 10)
    np.testing.assert_array_equal([int(e['label']) for e in out], labels)

  def test_unknown_ids_raise_naming_them(self):
    ds, _, _ = _dataset(n=4)
    with self.assertRaisesRegex(ValueError, r'\[-1, 10, 12\]'):
      input_pipeline.select_classes(ds, [3, 12, -1, 10], 10)
    with self.assertRaisesRegex(ValueError, 'Repeated'):
      input_pipeline.check_classes([1, 1], 10)


class TfdsTest(absltest.TestCase):
  def test_get_datasets_with_mock_data(self):
    with tfds.testing.mock_data(num_examples=64):
      train_iter, eval_iter_fn, info = input_pipeline.get_datasets(_config())
      batch = next(train_iter)
      evals = list(eval_iter_fn())
    self.assertEqual(info.num_train_examples, 64)
    self.assertEqual(info.num_eval_examples, 64)
    self.assertEqual(info.num_classes, 10)
    self.assertEqual(info.steps_per_epoch, 4)
    self.assertEqual(info.image_shape, (32, 32, 3))
    self.assertEqual(batch['image'].shape, (16, 32, 32, 3))
    self.assertLen(evals, info.num_eval_batches)
    self.assertEqual(sum(int(b['mask'].sum()) for b in evals), 64)

  def test_class_subset_and_split_iter_with_mock_data(self):
    config = _config(classes=[4, 1])
    with tfds.testing.mock_data(num_examples=80):
      _, eval_iter_fn, info = input_pipeline.get_datasets(config)
      labels = np.concatenate([b['label'][b['mask']] for b in eval_iter_fn()])
      stat = list(
        input_pipeline.get_split_iter(
          config, 'train', augment=False, batch_size=8, num_batches=3
        )
      )
      all_raw = tfds.load('cifar10', split='test')
      raw = np.array([int(e['label']) for e in all_raw])
    self.assertEqual(info.num_classes, 2)
    self.assertEqual(info.num_eval_examples, int(np.isin(raw, [4, 1]).sum()))
    expected = np.array([{4: 0, 1: 1}[c] for c in raw if c in (4, 1)])
    np.testing.assert_array_equal(labels, expected)
    self.assertLen(stat, 3)
    self.assertTrue(all(set(b['label'][b['mask']]) <= {0, 1} for b in stat))

  def test_missing_dataset_error_says_how_to_fix(self):
    with tempfile.TemporaryDirectory() as d:
      with self.assertRaisesRegex(FileNotFoundError, 'TFDS_DATA_DIR'):
        input_pipeline.load_examples('cifar10', 'train', data_dir=d)

  def test_unknown_dataset(self):
    with self.assertRaisesRegex(ValueError, 'mnist'):
      input_pipeline.get_spec('mnist')


class ImagenetPreprocessTest(absltest.TestCase):
  def test_train_and_eval_shapes(self):
    rng = np.random.default_rng(0)
    jpeg = tf.io.encode_jpeg(
      tf.constant(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8))
    )
    for augment in (True, False):
      fn = input_pipeline.imagenet_preprocess(
        mean=MEAN, std=STD, augment=augment, image_size=16
      )
      out = fn({'image': jpeg, 'label': tf.constant(3)}, tf.constant([1, 2]))
      self.assertEqual(tuple(out['image'].shape), (16, 16, 3))
      self.assertEqual(out['image'].dtype, tf.float32)


class ShardTest(absltest.TestCase):
  def test_shard_batches_over_data_axis(self):
    mesh = input_pipeline.make_mesh()
    n = jax.device_count()
    batches = [
      {
        'image': np.full([2 * n, 4, 4, 3], i, np.float32),
        'label': np.arange(2 * n),
      }
      for i in range(3)
    ]
    out = list(input_pipeline.shard_batches(iter(batches), mesh))
    self.assertLen(out, 3)
    for i, b in enumerate(out):
      self.assertEqual(
        b['image'].sharding.spec, jax.sharding.PartitionSpec('data')
      )
      self.assertLen(b['image'].addressable_shards, n)
      np.testing.assert_array_equal(np.asarray(b['image']), batches[i]['image'])

  def test_batch_size_must_split_over_devices(self):
    with self.assertRaisesRegex(ValueError, 'divisible'):
      input_pipeline.host_batch_size(jax.device_count() + 1)


class _Tiny(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    return nn.Dense(10)(x.mean((1, 2)))


class LoadOnceTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    input_pipeline.load_arrays.cache_clear()

  def test_second_evaluation_does_not_load_again(self):
    from pfa_jax import train  # noqa: PLC0415

    model = _Tiny()
    variables = jax.jit(model.init)(jax.random.key(0), np.zeros((1, 32, 32, 3)))
    config = _config(eval_subset=40, eval_batch_size=16)
    with tfds.testing.mock_data(num_examples=64):
      with mock.patch.object(tfds, 'load', wraps=tfds.load) as load:
        first = train.evaluate_model(config, model, variables)
        self.assertEqual(load.call_count, 1)
        second = train.evaluate_model(config, model, variables)
        self.assertEqual(load.call_count, 1)
        # Another subset is another entry: loaded once more.
        config.input.eval_subset = 24
        third = train.evaluate_model(config, model, variables)
        self.assertEqual(load.call_count, 2)
    self.assertEqual(first, second)
    self.assertEqual(first['count'], 40)
    self.assertEqual(third['count'], 24)

  def test_train_and_eval_splits_are_reused_by_get_datasets(self):
    config = _config()
    with tfds.testing.mock_data(num_examples=64):
      with mock.patch.object(tfds, 'load', wraps=tfds.load) as load:
        _, _, a = input_pipeline.get_datasets(config)
        calls = load.call_count
        _, _, b = input_pipeline.get_datasets(config, start_step=3)
        self.assertEqual(load.call_count, calls)
    self.assertEqual(a, b)

  def test_other_mock_context_is_not_served_from_the_cache(self):
    def labels():
      it = input_pipeline.get_split_iter(
        _config(), 'test', augment=False, batch_size=16
      )
      return np.concatenate([b['label'][b['mask']] for b in it])

    with tfds.testing.mock_data(num_examples=32):
      a = labels()
    with tfds.testing.mock_data(num_examples=48):
      b = labels()
    self.assertLen(a, 32)
    self.assertLen(b, 48)


if __name__ == '__main__':
  absltest.main()
