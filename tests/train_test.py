"""Tests for pfa_jax.train (tiny model; synthetic arrays or tfds mock data)."""

import json
import math
import os
import tempfile
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl.testing import absltest
from absl.testing import parameterized

from pfa_jax import checkpoint
from pfa_jax import input_pipeline
from pfa_jax import metrics
from pfa_jax import train


class _TinyCNN(nn.Module):
  """Test-only model with the project's model contract."""

  num_classes: int = 10
  widths: tuple[int, ...] = (4, 6)
  use_bn: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False):
    for w in self.widths:
      x = nn.Conv(w, (3, 3), strides=2)(x)
      if self.use_bn:
        x = nn.BatchNorm(use_running_average=not train)(x)
      x = nn.relu(x)
    x = nn.Dropout(0.1, deterministic=not train)(x.mean((1, 2)))
    return nn.Dense(self.num_classes)(x)


def _init(widths=(4, 6), use_bn=True, size=32, num_classes=10):
  model = _TinyCNN(num_classes=num_classes, widths=widths, use_bn=use_bn)
  variables = jax.jit(model.init)(  # Eager init compiles op by op (slow).
    {'params': jax.random.key(1)}, jnp.zeros((1, size, size, 3))
  )
  arch = {
    'name': 'tiny',
    'kwargs': {
      'num_classes': num_classes,
      'widths': list(widths),
      'use_bn': use_bn,
    },
  }
  return model, variables, arch


def _config(**optim):
  config = ml_collections.ConfigDict(
    {
      'seed': 0,
      'model': {'name': 'tiny', 'kw': {}},
      'input': {
        'dataset': 'cifar10',
        'data_dir': '',
        'batch_size': 16,
        'eval_batch_size': 24,
        'train_subset': 0,
        'eval_subset': 0,
        'classes': [],
        'augment': True,
        'shuffle_buffer': 64,
        'image_size': 32,
      },
      'num_epochs': 2.0,
      'optim': {
        'name': 'sgd',
        'lr': 0.1,
        'momentum': 0.9,
        'nesterov': True,
        'weight_decay': 5e-4,
        'schedule': 'cosine',
        'boundaries': [],
        'decay_factor': 0.1,
        'warmup_epochs': 0.5,
        'bn_l1': 1e-4,
      },
      'log_every_steps': 2,
      'eval_every_epochs': 1.0,
      'ckpt_every_steps': 3,
      'keep_ckpts': 2,
    }
  )
  config.optim.update(optim)
  return config


class _Killed(Exception):
  pass


def _killed_after(num_batches):
  """Wraps get_datasets so the train iterator dies after num_batches."""
  real = input_pipeline.get_datasets

  def get_datasets(config, *, start_step=0):
    train_iter, eval_iter_fn, info = real(config, start_step=start_step)

    def dying():
      for i, batch in enumerate(train_iter):
        if i == num_batches:
          raise _Killed()
        yield batch

    return dying(), eval_iter_fn, info

  return get_datasets


class ScheduleTest(parameterized.TestCase):
  def test_constant(self):
    lr_fn = train.learning_rate_schedule(
      base_lr=0.3, schedule='constant', num_steps=100
    )
    for step in (0, 50, 99):
      self.assertAlmostEqual(float(lr_fn(step)), 0.3, places=6)

  def test_step(self):
    lr_fn = train.learning_rate_schedule(
      base_lr=0.1,
      schedule='step',
      num_steps=100,
      boundaries=(30, 60),
      decay_factor=0.2,
    )
    for step, want in [(0, 0.1), (29, 0.1), (30, 0.02), (59, 0.02)]:
      self.assertAlmostEqual(float(lr_fn(step)), want, places=6)
    self.assertAlmostEqual(float(lr_fn(60)), 0.1 * 0.2**2, places=6)

  def test_cosine_with_warmup(self):
    base, total, warm = 0.4, 100, 10
    lr_fn = train.learning_rate_schedule(
      base_lr=base, schedule='cosine', num_steps=total, warmup_steps=warm
    )
    for step in (0, 4, 9):
      self.assertAlmostEqual(
        float(lr_fn(step)), base * (step + 1) / warm, places=6
      )
    for step in (10, 37, 55, 99, 100):
      t = (step - warm) / (total - warm)
      want = base * 0.5 * (1 + math.cos(math.pi * t))
      self.assertAlmostEqual(float(lr_fn(step)), want, places=6)

  def test_from_config_epochs_to_steps(self):
    config = _config(
      schedule='step', boundaries=[1.0, 1.5], decay_factor=0.1, warmup_epochs=0
    )
    lr_fn = train.create_learning_rate_fn(config, steps_per_epoch=10)
    self.assertAlmostEqual(float(lr_fn(9)), 0.1, places=6)
    self.assertAlmostEqual(float(lr_fn(10)), 0.01, places=6)
    self.assertAlmostEqual(float(lr_fn(15)), 0.001, places=6)

  def test_unknown_schedule(self):
    with self.assertRaisesRegex(ValueError, 'poly'):
      train.learning_rate_schedule(base_lr=1, schedule='poly', num_steps=1)


class OptimizerTest(parameterized.TestCase):
  def test_first_update_is_coupled_decay_plus_bn_l1(self):
    config = _config(
      lr=0.5, momentum=0.9, nesterov=False, weight_decay=0.01, bn_l1=0.1
    )
    config.optim.warmup_epochs = 0
    config.optim.schedule = 'constant'
    tx = train.create_optimizer(config, lambda step: 0.5)
    params = {
      'BatchNorm_0': {'scale': jnp.array([2.0, -3.0]), 'bias': jnp.ones(2)},
      'Conv_0': {'kernel': jnp.array([1.0, -1.0])},
    }
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(
      updates['BatchNorm_0']['scale'],
      -0.5 * (1 + 0.01 * np.array([2.0, -3.0]) + 0.1 * np.array([1, -1])),
      rtol=1e-6,
    )
    np.testing.assert_allclose(
      updates['BatchNorm_0']['bias'], -0.5 * (1 + 0.01), rtol=1e-6
    )
    np.testing.assert_allclose(
      updates['Conv_0']['kernel'],
      -0.5 * (1 + 0.01 * np.array([1.0, -1.0])),
      rtol=1e-6,
    )


class StepTest(parameterized.TestCase):
  def test_few_steps_reduce_loss_on_fixed_batch(self):
    model, variables, _ = _init(size=8)
    config = _config(weight_decay=0.0, bn_l1=0.0, lr=0.05, schedule='constant')
    lr_fn = train.create_learning_rate_fn(config, steps_per_epoch=10)
    state = train.create_train_state(
      jax.random.key(0),
      config,
      model,
      (8, 8, 3),
      lr_fn=lr_fn,
      variables=variables,
    )
    rng = np.random.default_rng(0)
    batch = {
      'image': rng.normal(size=(16, 8, 8, 3)).astype(np.float32),
      'label': rng.integers(0, 10, 16).astype(np.int32),
      'mask': np.ones(16, bool),
    }
    step_fn = jax.jit(
      lambda s, b: train.train_step(s, b, jax.random.key(0), lr_fn=lr_fn)
    )
    losses = []
    for _ in range(25):
      state, m = step_fn(state, batch)
      losses.append(float(m['loss']))
    self.assertLess(losses[-1], 0.7 * losses[0])
    self.assertEqual(int(state.step), 25)

  def test_model_without_batch_stats(self):
    model, variables, _ = _init(use_bn=False, size=8)
    self.assertNotIn('batch_stats', variables)
    config = _config()
    lr_fn = train.create_learning_rate_fn(config, steps_per_epoch=10)
    state = train.create_train_state(
      jax.random.key(0),
      config,
      model,
      (8, 8, 3),
      lr_fn=lr_fn,
      variables=variables,
    )
    batch = {
      'image': np.ones((8, 8, 8, 3), np.float32),
      'label': np.zeros(8, np.int32),
      'mask': np.ones(8, bool),
    }
    state, m = jax.jit(
      lambda s, b: train.train_step(s, b, jax.random.key(0), lr_fn=lr_fn)
    )(state, batch)
    self.assertTrue(np.isfinite(float(m['loss'])))
    self.assertEqual(state.batch_stats, {})

  def test_masked_eval_counts_each_example_once(self):
    model, variables, _ = _init(size=8)
    config = _config()
    lr_fn = train.create_learning_rate_fn(config, steps_per_epoch=10)
    state = train.create_train_state(
      jax.random.key(0),
      config,
      model,
      (8, 8, 3),
      lr_fn=lr_fn,
      variables=variables,
    )
    rng = np.random.default_rng(0)
    n = 37
    images = rng.normal(size=(n, 8, 8, 3)).astype(np.float32)
    labels = rng.integers(0, 10, n).astype(np.int32)
    batches = [
      input_pipeline.pad_batch(
        {'image': images[i : i + 16], 'label': labels[i : i + 16]}, 16
      )
      for i in range(0, n, 16)
    ]
    mesh = input_pipeline.make_mesh()
    summary = train.evaluate(
      jax.jit(train.eval_step),
      state,
      input_pipeline.shard_batches(iter(batches), mesh),
    )
    logits = np.asarray(jax.jit(model.apply)(variables, images), np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    self.assertEqual(summary['count'], n)
    self.assertAlmostEqual(
      summary['accuracy'], np.mean(logits.argmax(-1) == labels), places=6
    )
    self.assertAlmostEqual(
      summary['loss'], -np.mean(logp[np.arange(n), labels]), places=4
    )


class TrainAndEvaluateTest(parameterized.TestCase):
  def test_kill_and_resume_is_bit_exact_and_writes_files(self):
    model, variables, arch = _init(widths=(3, 5))
    init = (model, variables, arch)
    config = _config()
    config.eval_every_epochs = 0  # Only at the end: keeps the test fast.
    with tempfile.TemporaryDirectory() as root:
      full_dir, resumed_dir = os.path.join(root, 'a'), os.path.join(root, 'b')
      with tfds.testing.mock_data(num_examples=64):
        full = train.train_and_evaluate(config, full_dir, init=init)
        with mock.patch.object(
          input_pipeline, 'get_datasets', _killed_after(6)
        ):
          with self.assertRaises(_Killed):
            train.train_and_evaluate(config, resumed_dir, init=init)
        mngr = checkpoint.create_manager(os.path.join(resumed_dir, 'ckpt'))
        killed_at = mngr.latest_step()
        mngr.close()
        resumed = train.train_and_evaluate(config, resumed_dir, init=init)

      self.assertEqual(killed_at, 3)
      self.assertEqual(resumed.metrics['start_step'], 3)
      self.assertEqual(full.metrics['steps'], 8)
      leaves_a = jax.tree_util.tree_leaves_with_path(full.variables)
      leaves_b = jax.tree.leaves(resumed.variables)
      self.assertLen(leaves_b, len(leaves_a))
      for (path, a), b in zip(leaves_a, leaves_b, strict=True):
        self.assertTrue(
          np.array_equal(np.asarray(a), np.asarray(b)),
          jax.tree_util.keystr(path),
        )
      self.assertEqual(
        full.metrics['eval_accuracy'], resumed.metrics['eval_accuracy']
      )
      self.assertEqual(full.metrics['num_eval_examples'], 64)
      self.assertEqual(full.arch, checkpoint.normalize_arch(arch))

      with open(os.path.join(full_dir, 'config.json')) as f:
        self.assertEqual(json.load(f)['optim']['lr'], 0.1)
      lines = metrics.read_jsonl(os.path.join(full_dir, 'metrics.jsonl'))
      train_lines = [x for x in lines if 'train_loss' in x]
      self.assertEqual([x['step'] for x in train_lines], [2, 4, 6, 8])
      self.assertTrue(any('eval_accuracy' in x for x in lines))

  def test_non_finite_loss_raises_with_step(self):
    model, variables, arch = _init(widths=(2, 2))
    config = _config(lr=1e30, warmup_epochs=0, schedule='constant')
    config.log_every_steps = 100
    config.ckpt_every_steps = 100
    config.eval_every_epochs = 0
    with tempfile.TemporaryDirectory() as workdir:
      with tfds.testing.mock_data(num_examples=64):
        with self.assertRaisesRegex(FloatingPointError, r'at step \d+'):
          train.train_and_evaluate(
            config, workdir, init=(model, variables, arch)
          )
      self.assertEqual(os.listdir(os.path.join(workdir, 'ckpt')), [])

  def test_other_model_in_workdir_raises_naming_both(self):
    model, variables, arch = _init(widths=(3, 5))
    _, _, other_arch = _init(widths=(4, 6))
    config = _config()
    lr_fn = train.create_learning_rate_fn(config, steps_per_epoch=4)
    state = train.create_train_state(
      jax.random.key(0),
      config,
      model,
      (32, 32, 3),
      lr_fn=lr_fn,
      variables=variables,
    )
    with tempfile.TemporaryDirectory() as workdir:
      mngr = checkpoint.create_manager(os.path.join(workdir, 'ckpt'))
      checkpoint.save(mngr, 3, state, arch)
      mngr.wait_until_finished()
      mngr.close()
      other = _TinyCNN(widths=(4, 6))
      with tfds.testing.mock_data(num_examples=64):
        with self.assertRaisesRegex(
          checkpoint.ArchMismatchError, r'(?s)\[3, 5\].*\[4, 6\]'
        ):
          train.train_and_evaluate(
            config, workdir, init=(other, None, other_arch)
          )


if __name__ == '__main__':
  absltest.main()
