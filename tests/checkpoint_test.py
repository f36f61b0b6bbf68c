"""Tests for pfa_jax.checkpoint (arch round-trip, mismatch, corruption)."""

import os
import shutil
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl.testing import absltest

from pfa_jax import checkpoint
from pfa_jax import input_pipeline
from pfa_jax import train


class _TinyCNN(nn.Module):
  """Test-only model: per-layer widths are a field, like the real models."""

  num_classes: int = 10
  widths: tuple[int, ...] = (4, 6)
  use_bn: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False):
    for w in self.widths:
      x = nn.Conv(w, (3, 3))(x)
      if self.use_bn:
        x = nn.BatchNorm(use_running_average=not train)(x)
      x = nn.relu(x)
    return nn.Dense(self.num_classes)(x.mean((1, 2)))


def _model_fn(arch):
  kw = dict(arch['kwargs'])
  kw['widths'] = tuple(kw['widths'])
  assert arch['name'] == 'tiny', arch
  return _TinyCNN(**kw)


def _arch(widths, use_bn=True, num_classes=10):
  return {
    'name': 'tiny',
    'kwargs': {
      'num_classes': num_classes,
      'widths': list(widths),
      'use_bn': use_bn,
    },
  }


def _state(widths=(3, 7), use_bn=True):
  model = _TinyCNN(widths=widths, use_bn=use_bn)
  config = ml_collections.ConfigDict(
    {
      'optim': {
        'name': 'sgd',
        'lr': 0.1,
        'momentum': 0.9,
        'nesterov': False,
        'weight_decay': 1e-4,
        'schedule': 'constant',
        'boundaries': [],
        'decay_factor': 0.1,
        'warmup_epochs': 0.0,
        'bn_l1': 0.0,
      },
      'num_epochs': 1.0,
    }
  )
  lr_fn = train.create_learning_rate_fn(config, steps_per_epoch=10)
  state = jax.jit(  # jit: eager init compiles op by op (slow).
    lambda rng: train.create_train_state(
      rng, config, model, (8, 8, 3), lr_fn=lr_fn
    )
  )(jax.random.key(0))
  # Make the values non-trivial (BN stats included).
  state = state.replace(
    step=jnp.asarray(5, jnp.int32),
    batch_stats=jax.tree.map(lambda x: x + 0.5, state.batch_stats),
  )
  return model, state


def _save(workdir, state, arch, step=5, input_shape=None):
  mngr = checkpoint.create_manager(os.path.join(workdir, 'ckpt'))
  checkpoint.save(mngr, step, state, arch, input_shape=input_shape)
  mngr.wait_until_finished()
  mngr.close()
  return os.path.join(workdir, 'ckpt', str(step))


def _equal_trees(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(
    np.array_equal(np.asarray(x), np.asarray(y))
    for x, y in zip(la, lb, strict=True)
  )


class RestoreModelTest(absltest.TestCase):
  def test_arch_round_trip_with_non_default_widths(self):
    _, state = _state(widths=(3, 7))
    with tempfile.TemporaryDirectory() as workdir:
      _save(workdir, state, _arch((3, 7)))
      model, variables, arch, step = checkpoint.restore_model(
        workdir, model_fn=_model_fn
      )
    self.assertEqual(step, 5)
    self.assertEqual(arch, _arch((3, 7)))
    self.assertEqual(model.widths, (3, 7))
    self.assertTrue(_equal_trees(variables['params'], state.params))
    self.assertTrue(_equal_trees(variables['batch_stats'], state.batch_stats))
    # The restored variables run in the rebuilt model.
    logits = jax.jit(model.apply)(variables, jnp.ones((2, 8, 8, 3)))
    self.assertEqual(logits.shape, (2, 10))

  def test_model_without_batch_stats(self):
    _, state = _state(widths=(2,), use_bn=False)
    with tempfile.TemporaryDirectory() as workdir:
      _save(workdir, state, _arch((2,), use_bn=False))
      model, variables, _, _ = checkpoint.restore_model(
        os.path.join(workdir, 'ckpt'), model_fn=_model_fn
      )
    self.assertEqual(variables['batch_stats'], {})
    self.assertTrue(_equal_trees(variables['params'], state.params))
    self.assertFalse(model.use_bn)

  def test_restore_state_into_abstract_target(self):
    _, state = _state()
    with tempfile.TemporaryDirectory() as workdir:
      _save(workdir, state, _arch((3, 7)), step=7)
      mngr = checkpoint.create_manager(os.path.join(workdir, 'ckpt'))
      self.assertEqual(mngr.latest_step(), 7)
      self.assertEqual(checkpoint.restore_arch(mngr, 7), _arch((3, 7)))
      repl = input_pipeline.replicated()
      abstract = checkpoint.abstract_with_sharding(
        jax.eval_shape(lambda: state), repl
      )
      restored = checkpoint.restore_state(mngr, 7, abstract)
      mngr.close()
    self.assertIsInstance(restored, train.TrainState)
    self.assertTrue(_equal_trees(restored, state))
    self.assertEqual(restored.params['Dense_0']['kernel'].sharding, repl)

  def test_no_checkpoint(self):
    with tempfile.TemporaryDirectory() as workdir:
      with self.assertRaises(FileNotFoundError):
        checkpoint.restore_model(
          os.path.join(workdir, 'nothing'), model_fn=_model_fn
        )
      os.makedirs(os.path.join(workdir, 'ckpt'))
      with self.assertRaisesRegex(FileNotFoundError, 'No checkpoint'):
        checkpoint.restore_model(workdir, model_fn=_model_fn)


class ArchTest(absltest.TestCase):
  def test_mismatch_names_both(self):
    with self.assertRaisesRegex(
      checkpoint.ArchMismatchError,
      r'(?s)checkpoint:.*\[3, 7\].*requested:.*\[4, 6\]',
    ):
      checkpoint.check_arch(_arch((3, 7)), _arch((4, 6)), where='/w/ckpt')

  def test_tuples_and_lists_match(self):
    arch = _arch((3, 7))
    arch['kwargs']['widths'] = (3, 7)
    checkpoint.check_arch(arch, _arch((3, 7)), where='x')

  def test_malformed_arch(self):
    with self.assertRaisesRegex(ValueError, 'kwargs'):
      checkpoint.normalize_arch({'name': 'tiny'})


class CorruptTest(absltest.TestCase):
  def _corrupt_files(self, root, truncate):
    for dirpath, _, files in os.walk(root):
      for name in files:
        path = os.path.join(dirpath, name)
        if truncate:
          with open(path, 'r+b') as f:
            f.truncate(os.path.getsize(path) // 3)
        else:
          with open(path, 'wb') as f:
            f.write(b'\x00garbage\xff' * 7)

  def test_garbage_state_raises_clear_error(self):
    _, state = _state()
    with tempfile.TemporaryDirectory() as workdir:
      step_dir = _save(workdir, state, _arch((3, 7)))
      self._corrupt_files(os.path.join(step_dir, 'state'), truncate=False)
      with self.assertRaisesRegex(
        checkpoint.CorruptCheckpointError, f'(?s){step_dir}.*Delete'
      ):
        checkpoint.restore_model(workdir, model_fn=_model_fn)

  def test_truncated_state_raises_clear_error(self):
    _, state = _state()
    with tempfile.TemporaryDirectory() as workdir:
      step_dir = _save(workdir, state, _arch((3, 7)))
      self._corrupt_files(os.path.join(step_dir, 'state'), truncate=True)
      with self.assertRaisesRegex(checkpoint.CorruptCheckpointError, step_dir):
        checkpoint.restore_model(workdir, model_fn=_model_fn)

  def test_garbage_arch_raises_clear_error(self):
    _, state = _state()
    with tempfile.TemporaryDirectory() as workdir:
      step_dir = _save(workdir, state, _arch((3, 7)))
      self._corrupt_files(os.path.join(step_dir, 'arch'), truncate=False)
      with self.assertRaisesRegex(checkpoint.CorruptCheckpointError, step_dir):
        checkpoint.restore_model(workdir, model_fn=_model_fn)


def _data_files(step_dir):
  """The state's array data files (zstd chunks in the OCDBT store)."""
  out = []
  for dirpath, _, files in os.walk(os.path.join(step_dir, 'state')):
    if os.path.basename(dirpath) == 'd':
      out += [os.path.join(dirpath, f) for f in files]
  return out


class IntegrityTest(absltest.TestCase):
  def _assert_short(self, err):
    # One clear message, not a chained orbax traceback.
    self.assertIsNone(err.__cause__)
    self.assertTrue(err.__suppress_context__ or err.__context__ is None)
    self.assertLess(len(str(err)), 700)

  def test_flipped_bytes_raise_named_error(self):
    _, state = _state()
    with tempfile.TemporaryDirectory() as workdir:
      step_dir = _save(workdir, state, _arch((3, 7)))
      files = _data_files(step_dir)
      self.assertNotEmpty(files)
      for path in files:
        with open(path, 'r+b') as f:
          data = bytearray(f.read())
          data[len(data) // 2] ^= 0xFF
          f.seek(0)
          f.write(bytes(data))
      with self.assertRaisesRegex(
        checkpoint.CorruptCheckpointError, rf'{step_dir} \(step 5\)'
      ) as cm:
        checkpoint.restore_model(workdir, model_fn=_model_fn)
    self._assert_short(cm.exception)

  def test_silently_replaced_arrays_fail_the_checksum(self):
    # Readable arrays with other values (what orbax cannot notice): the
    # state files of another checkpoint of the same shapes.
    _, state = _state()
    params = dict(state.params)
    params['Conv_0'] = {
      **params['Conv_0'],
      'kernel': params['Conv_0']['kernel'] + 1.0,
    }
    other = state.replace(params=params)
    with tempfile.TemporaryDirectory() as workdir:
      step_dir = _save(os.path.join(workdir, 'a'), state, _arch((3, 7)))
      other_dir = _save(os.path.join(workdir, 'b'), other, _arch((3, 7)))
      shutil.rmtree(os.path.join(step_dir, 'state'))
      shutil.copytree(
        os.path.join(other_dir, 'state'), os.path.join(step_dir, 'state')
      )
      with self.assertRaisesRegex(
        checkpoint.CorruptCheckpointError,
        r'(?s)step 5.*sha256 \(changed: params/Conv_0/kernel\)',
      ) as cm:
        checkpoint.restore_model(os.path.join(workdir, 'a'), model_fn=_model_fn)
    self._assert_short(cm.exception)
    self.assertNotIn('opt_state', str(cm.exception))  # Only changed leaves.

  def test_digest_depends_on_every_leaf_and_its_path(self):
    _, state = _state()
    d = checkpoint.digest(state)
    self.assertIn('params/Dense_0/kernel', d['leaves'])
    self.assertIn('opt_state/1/0/trace/Dense_0/kernel', d['leaves'])
    bumped = state.replace(step=state.step + 1)
    self.assertNotEqual(checkpoint.digest(bumped)['sha256'], d['sha256'])
    swapped = {'a': np.zeros(2), 'b': np.ones(2)}
    renamed = {'a': np.ones(2), 'b': np.zeros(2)}
    self.assertNotEqual(
      checkpoint.digest(swapped)['sha256'], checkpoint.digest(renamed)['sha256']
    )

  def test_arch_json_vs_stored_shapes_names_the_leaf(self):
    _, state = _state(widths=(3, 7))
    with tempfile.TemporaryDirectory() as workdir:
      # The arch JSON claims conv 2 has 8 filters; the arrays have 7.
      _save(workdir, state, _arch((3, 8)), input_shape=(8, 8, 3))
      with self.assertRaisesRegex(
        checkpoint.ArchMismatchError,
        r'params/BatchNorm_1/bias with shape \[7\].*gives \[8\]',
      ):
        checkpoint.restore_model(workdir, model_fn=_model_fn)
      # Without a saved input shape, one passed in does the same check.
      other = os.path.join(workdir, 'other')
      _save(other, state, _arch((3, 8)))
      with self.assertRaisesRegex(
        checkpoint.ArchMismatchError, 'params/BatchNorm_1/bias'
      ):
        checkpoint.restore_model(
          other, model_fn=_model_fn, input_shape=(8, 8, 3)
        )

  def test_resume_into_other_shapes_names_the_leaf(self):
    _, state = _state(widths=(3, 7))
    _, wider = _state(widths=(3, 9))
    with tempfile.TemporaryDirectory() as workdir:
      _save(workdir, state, _arch((3, 7)))
      mngr = checkpoint.create_manager(os.path.join(workdir, 'ckpt'))
      abstract = checkpoint.abstract_with_sharding(
        jax.eval_shape(lambda: wider), input_pipeline.replicated()
      )
      with self.assertRaisesRegex(
        checkpoint.ArchMismatchError, r'params/BatchNorm_1/bias.*\[7\]'
      ):
        checkpoint.restore_state(mngr, 5, abstract)
      mngr.close()


if __name__ == '__main__':
  absltest.main()
