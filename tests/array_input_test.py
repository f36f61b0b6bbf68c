"""Tests for the npz input source (pfa_jax.array_input), with no TensorFlow.

The TFDS source is the reference: the same examples written to an ``.npz``
must give the same host slices, class subsets, counts and eval batches.
"""

import json
import os
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
import tensorflow_datasets as tfds
from absl.testing import absltest
from absl.testing import parameterized

from configs import common
from pfa_jax import array_input
from pfa_jax import datasets
from pfa_jax import input_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_npz(d, x_train, y_train, x_test, y_test, dataset='cifar10'):
  path = os.path.join(d, f'{dataset}_arrays.npz')
  np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
  return path


def _random_npz(d, n_train=96, n_test=40, seed=0):
  rng = np.random.default_rng(seed)
  img = lambda n: rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)  # noqa: E731
  lab = lambda n: rng.integers(0, 10, n).astype(np.int64)  # noqa: E731
  return _write_npz(d, img(n_train), lab(n_train), img(n_test), lab(n_test))


def _config(source, data_dir, **input_kw):
  """The project's CIFAR-10 input defaults with small batches, seed 3."""
  config = common.base('cifar10', 'simple_cnn')
  config.seed = 3
  small = dict(batch_size=16, eval_batch_size=16, shuffle_buffer=100)
  config.input.update({**small, 'source': source, 'data_dir': data_dir})
  config.input.update(input_kw)
  return config


class SameExamplesAsTfdsTest(parameterized.TestCase):
  """The npz source against the TFDS source on the same examples."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls._dir = tempfile.TemporaryDirectory()
    cls.mock = tfds.testing.mock_data(num_examples=53)
    cls.mock.__enter__()
    datasets.load_arrays.cache_clear()
    raw = {
      s: datasets.load_arrays(
        'cifar10',
        s,
        data_dir=None,
        subset=0,
        classes=(),
        drop_remainder=False,
        process_index=0,
        process_count=1,
      )
      for s in ('train', 'eval')
    }
    _write_npz(cls._dir.name, *raw['train'], *raw['eval'])

  @classmethod
  def tearDownClass(cls):
    cls.mock.__exit__(None, None, None)
    cls._dir.cleanup()
    datasets.load_arrays.cache_clear()
    super().tearDownClass()

  @parameterized.product(
    split=('train', 'eval'), subset=(0, 30), classes=((), (7, 2, 5))
  )
  def test_subsets_and_class_subsets_match(self, split, subset, classes):
    kw = dict(
      subset=subset,
      classes=classes,
      drop_remainder=False,
      process_index=0,
      process_count=1,
    )
    want = datasets.load_arrays('cifar10', split, data_dir=None, **kw)
    got = array_input.load_arrays(
      'cifar10', split, data_dir=self._dir.name, **kw
    )
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])

  @parameterized.product(n=(53, 30, 8), count=(1, 3, 4), drop=(False, True))
  def test_host_slices_are_tfds_even_splits(self, n, count, drop):
    # TFDS's own split arithmetic (mock data does not honour split strings).
    info = {'train': tfds.core.SplitInfo('train', [n], 0)}
    for index, spec in enumerate(
      tfds.even_splits('train', n=count, drop_remainder=drop)
    ):
      (want,) = tfds.core.ReadInstruction.from_spec(spec).to_absolute(info)
      got = array_input.host_slice(n, index, count, drop)
      self.assertEqual(
        (got.start, got.stop),
        (want.from_ or 0, n if want.to is None else want.to),
      )

  def test_eval_batches_and_info_match(self):
    outs = {}
    for src in ('tfds', 'npz'):
      config = _config(src, self._dir.name if src == 'npz' else '')
      _, eval_fn, info = input_pipeline.get_datasets(config)
      stats = input_pipeline.get_split_iter(
        config, 'train', augment=False, batch_size=16
      )
      outs[src] = (info, list(eval_fn()), list(stats))
    self.assertEqual(outs['npz'][0], outs['tfds'][0])
    for i in (1, 2):
      self.assertEqual(len(outs['npz'][i]), len(outs['tfds'][i]))
      for a, b in zip(outs['npz'][i], outs['tfds'][i], strict=True):
        np.testing.assert_allclose(a['image'], b['image'], rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(a['label'], b['label'])
        np.testing.assert_array_equal(a['mask'], b['mask'])


class BatchesTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(1)
    self.images = rng.integers(0, 256, (50, 32, 32, 3), dtype=np.uint8)
    self.ids = np.arange(50, dtype=np.int32)  # labels = example ids

  def _train(self, start_step=0, n=10, augment=True, seed=0):
    it = array_input.train_batches(
      self.images,
      self.ids,
      mean=(0.0, 0.0, 0.0),
      std=(1.0, 1.0, 1.0),
      augment=augment,
      batch_size=8,
      seed=seed,
      steps_per_epoch=6,
      start_step=start_step,
    )
    return [next(it) for _ in range(n)]

  def test_resume_at_any_step_yields_the_same_batches(self):
    full = self._train(n=14)
    for start in (1, 5, 6, 9):
      for a, b in zip(
        self._train(start_step=start, n=14 - start), full[start:]
      ):
        np.testing.assert_array_equal(a['image'], b['image'])
        np.testing.assert_array_equal(a['label'], b['label'])
    other = self._train(n=1, seed=1)[0]
    self.assertFalse(np.array_equal(other['label'], full[0]['label']))

  def test_each_epoch_is_a_new_permutation_without_repeats(self):
    batches = self._train(n=12)
    epochs = [
      np.concatenate([b['label'] for b in batches[e * 6 : (e + 1) * 6]])
      for e in (0, 1)
    ]
    for ids in epochs:
      self.assertLen(set(ids.tolist()), 48)  # 6 x 8 distinct, remainder dropped
    self.assertFalse(np.array_equal(epochs[0], epochs[1]))
    self.assertTrue(all(b['mask'].all() for b in batches))

  def test_no_augment_is_normalisation_in_float64(self):
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    got = array_input.preprocess(self.images, None, mean=mean, std=std)
    want = (self.images / 255.0 - np.array(mean)) / np.array(std)
    self.assertEqual(got.dtype, np.float32)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)

  def test_augment_is_a_crop_of_the_padded_image_and_maybe_a_flip(self):
    out = array_input.preprocess(
      self.images,
      np.random.default_rng(5),
      mean=(0.0, 0.0, 0.0),
      std=(1.0, 1.0, 1.0),
    )
    crops = np.rint(out * 255.0).astype(np.uint8)
    found = []
    for img, crop in zip(self.images, crops, strict=True):
      padded = np.pad(img, ((4, 4), (4, 4), (0, 0)))
      hits = [
        (oy, ox, flip)
        for oy in range(9)
        for ox in range(9)
        for flip in (False, True)
        if np.array_equal(
          crop,
          padded[oy : oy + 32, ox : ox + 32][:, ::-1]
          if flip
          else padded[oy : oy + 32, ox : ox + 32],
        )
      ]
      self.assertNotEmpty(hits)
      found.append(hits[0])
    self.assertGreater(len({(y, x) for y, x, _ in found}), 10)
    self.assertEqual({f for _, _, f in found}, {False, True})

  def _eval(self, **kw):
    return list(
      array_input.eval_batches(
        self.images,
        self.ids,
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        batch_size=16,
        **kw,
      )
    )

  def test_eval_pass_counts_each_example_once_and_pads(self):
    batches = self._eval(num_batches=5)
    self.assertLen(batches, 5)
    seen = np.concatenate([b['label'][b['mask']] for b in batches])
    np.testing.assert_array_equal(seen, self.ids)
    self.assertEqual(
      [int(b['mask'].sum()) for b in batches], [16, 16, 16, 2, 0]
    )
    truncated = self._eval(num_batches=2, shuffle_seed=4)
    ids = np.concatenate([b['label'] for b in truncated])
    self.assertLen(set(ids.tolist()), 32)
    self.assertFalse(np.array_equal(ids, self.ids[:32]))


class ErrorsTest(absltest.TestCase):
  def test_missing_data_dir_and_file_say_how_to_build_it(self):
    with self.assertRaisesRegex(ValueError, 'input.data_dir.*export-npz'):
      array_input.load_arrays('cifar10', 'train', data_dir='')
    with tempfile.TemporaryDirectory() as d:
      with self.assertRaisesRegex(
        FileNotFoundError, 'cifar100_arrays.npz.*export-npz'
      ):
        array_input.load_arrays('cifar100', 'train', data_dir=d)

  def test_malformed_files_name_the_array_at_fault(self):
    x = np.zeros((4, 32, 32, 3), np.uint8)
    y = np.zeros(4, np.int64)
    cases = [
      ((x, y, x, y[:3]), 'y_test must be 4 integer labels'),
      ((x.astype(np.float32), y, x, y), 'x_train must be uint8'),
      ((x, y + 10, x, y), 'label 10, outside 0..9'),
    ]
    for arrays, message in cases:
      with self.subTest(message), tempfile.TemporaryDirectory() as d:
        _write_npz(d, *arrays)
        with self.assertRaisesRegex(ValueError, message):
          array_input.load_arrays('cifar10', 'train', data_dir=d)
    with tempfile.TemporaryDirectory() as d:
      np.savez(os.path.join(d, 'cifar10_arrays.npz'), x_train=x)
      with self.assertRaisesRegex(ValueError, "no array 'y_train'"):
        array_input.load_arrays('cifar10', 'train', data_dir=d)

  def test_imagenet_unknown_split_and_unknown_source(self):
    with self.assertRaisesRegex(ValueError, "not 'imagenet2012'"):
      array_input.load_arrays('imagenet2012', 'train', data_dir='/x')
    with tempfile.TemporaryDirectory() as d:
      _random_npz(d)
      with self.assertRaisesRegex(ValueError, "Unknown split 'validation2'"):
        array_input.load_arrays('cifar10', 'validation2', data_dir=d)
    with self.assertRaisesRegex(
      ValueError, "input.source must be one of.*'hdf5'"
    ):
      input_pipeline.get_datasets(_config('hdf5', ''))


_NO_TF_RUN = textwrap.dedent(
  """
  import json, runpy, sys
  for name in ('tensorflow', 'tensorflow_datasets'):
    sys.modules[name] = None  # as on a machine without them
  workdir, data_dir = sys.argv[1:]
  sys.argv = [
    'main', '--config', 'configs/simple_cnn_cifar10.py:runlocal',
    '--workdir', workdir, '--config.job=train', '--config.num_epochs=1',
    '--config.input.source=npz', '--config.input.data_dir=' + data_dir,
  ]
  try:
    runpy.run_module('pfa_jax.main', run_name='__main__')
  except SystemExit as e:
    assert not e.code, e.code
  from pfa_jax import clu_compat
  try:
    clu_compat.metric_writers.SummaryWriter(workdir)
    refused = ''
  except ImportError as e:
    refused = str(e)
  print(json.dumps({
    'tensorboard': clu_compat.TENSORBOARD,
    'refused': refused,
    'tf_modules': [k for k, v in sys.modules.items()
                   if k.startswith('tensorflow') and v is not None],
  }))
  """
)


class NoTensorflowTest(absltest.TestCase):
  def test_training_job_runs_and_writes_its_files_without_tensorflow(self):
    with tempfile.TemporaryDirectory() as d:
      _random_npz(d, n_train=128, n_test=40)
      workdir = os.path.join(d, 'run')
      p = subprocess.run(
        [sys.executable, '-c', _NO_TF_RUN, workdir, d],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
      )
      self.assertEqual(p.returncode, 0, p.stderr[-3000:])
      out = json.loads(p.stdout.strip().splitlines()[-1])
      train_dir = os.path.join(workdir, 'train')
      files = os.listdir(train_dir)
      with open(os.path.join(train_dir, 'result.json')) as f:
        result = json.load(f)
      with open(os.path.join(train_dir, 'metrics.jsonl')) as f:
        rows = [json.loads(line) for line in f]
    self.assertFalse(out['tensorboard'])
    self.assertIn('need TensorFlow', out['refused'])
    self.assertEqual(out['tf_modules'], [])
    self.assertContainsSubset(
      {'config.json', 'result.json', 'metrics.jsonl'}, files
    )
    self.assertFalse([f for f in files if f.startswith('events.out')])
    self.assertEqual(result['num_eval_examples'], 40)
    self.assertEqual(result['steps'], 2)  # 128 examples, batch 64
    self.assertTrue(any('eval_accuracy' in r for r in rows))


if __name__ == '__main__':
  absltest.main()
