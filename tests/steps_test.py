"""Tests for pfa_jax.steps: 'consts', masked training, extra loss, distillation."""

import os
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl.testing import absltest

from pfa_jax import checkpoint
from pfa_jax import steps
from pfa_jax import train

PERM = np.array([2, 0, 1, -1], np.int32)  # -1: a zero channel


class _ConstsNet(nn.Module):
  """Reads its channels through an index map held in 'consts'."""

  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    cmap = self.variable('consts', 'channel_map', lambda: jnp.asarray(PERM))
    x = nn.Conv(3, (3, 3), strides=4)(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    x = nn.relu(x)
    m = cmap.value
    x = jnp.where(m >= 0, jnp.take(x, jnp.maximum(m, 0), axis=-1), 0.0)
    return nn.Dense(self.num_classes)(x.mean((1, 2)))


def _config():
  return ml_collections.ConfigDict(
    {
      'seed': 0,
      'model': {'name': 'consts', 'kw': {}},
      'input': {
        'dataset': 'cifar10',
        'data_dir': '',
        'batch_size': 16,
        'eval_batch_size': 32,
        'train_subset': 0,
        'eval_subset': 0,
        'classes': [],
        'augment': False,
        'shuffle_buffer': 64,
        'image_size': 32,
      },
      'num_epochs': 1.0,
      'optim': {
        'name': 'sgd',
        'lr': 0.1,
        'momentum': 0.9,
        'nesterov': False,
        'weight_decay': 5e-4,
        'schedule': 'constant',
        'boundaries': [],
        'decay_factor': 0.1,
        'warmup_epochs': 0.0,
        'bn_l1': 0.0,
      },
      'log_every_steps': 2,
      'eval_every_epochs': 0.0,
      'ckpt_every_steps': 2,
      'keep_ckpts': 2,
    }
  )


def _state(model, variables, config):
  lr_fn = train.create_learning_rate_fn(config, steps_per_epoch=4)
  state = jax.jit(
    lambda v: steps.create_train_state(
      jax.random.key(0), config, model, (8, 8, 3), lr_fn=lr_fn, variables=v
    )
  )(variables)
  return state, lr_fn


def _batch(n=8, size=8, seed=0):
  rng = np.random.default_rng(seed)
  return {
    'image': rng.normal(size=(n, size, size, 3)).astype(np.float32),
    'label': rng.integers(0, 10, n).astype(np.int32),
    'mask': np.ones(n, bool),
  }


class ConstsTest(absltest.TestCase):
  def test_train_checkpoint_restore_keeps_consts(self):
    model = _ConstsNet()
    variables = jax.jit(model.init)(
      {'params': jax.random.key(1)}, jnp.zeros((1, 32, 32, 3))
    )
    self.assertIn('consts', variables)
    arch = {'name': 'consts', 'kwargs': {'num_classes': 10}}
    with tempfile.TemporaryDirectory() as workdir:
      with tfds.testing.mock_data(num_examples=64):
        result = train.train_and_evaluate(
          _config(), workdir, init=(model, variables, arch)
        )
      restored_model, restored, _, step = checkpoint.restore_model(
        workdir, model_fn=lambda a: _ConstsNet(**a['kwargs'])
      )
    self.assertEqual(step, 4)
    for v in (result.variables, restored):
      np.testing.assert_array_equal(v['consts']['channel_map'], PERM)
    # The params did train, and the restored ones are the trained ones.
    before = variables['params']['Dense_0']['kernel']
    after = restored['params']['Dense_0']['kernel']
    self.assertFalse(np.array_equal(before, after))
    np.testing.assert_array_equal(
      after, result.variables['params']['Dense_0']['kernel']
    )
    logits = jax.jit(restored_model.apply)(restored, jnp.ones((2, 32, 32, 3)))
    self.assertEqual(logits.shape, (2, 10))

  def test_step_passes_consts_unchanged(self):
    model = _ConstsNet()
    variables = jax.jit(model.init)(
      {'params': jax.random.key(1)}, jnp.zeros((1, 8, 8, 3))
    )
    # A map that really reorders: the step must use it, not a default.
    other = {**variables, 'consts': {'channel_map': jnp.array([1, 1, 1, 1])}}
    config = _config()
    s1, lr_fn = _state(model, variables, config)
    s2, _ = _state(model, other, config)
    fn = jax.jit(
      lambda s, b: steps.train_step(s, b, jax.random.key(0), lr_fn=lr_fn)
    )
    n1, m1 = fn(s1, _batch())
    n2, m2 = fn(s2, _batch())
    np.testing.assert_array_equal(n1.extra_vars['consts']['channel_map'], PERM)
    np.testing.assert_array_equal(
      n2.extra_vars['consts']['channel_map'], [1, 1, 1, 1]
    )
    self.assertNotAlmostEqual(float(m1['loss']), float(m2['loss']), places=5)
    self.assertEqual(
      set(steps.variables_of(n1)), {'params', 'batch_stats', 'consts'}
    )


class HooksTest(absltest.TestCase):
  def test_param_mask_stays_applied(self):
    model = _ConstsNet()
    variables = jax.jit(model.init)(
      {'params': jax.random.key(1)}, jnp.zeros((1, 8, 8, 3))
    )
    config = _config()
    state, lr_fn = _state(model, variables, config)
    kernel = variables['params']['Conv_0']['kernel']
    col = np.ones(kernel.shape, np.float32)
    col[..., 1] = 0.0  # Filter 1 of the conv is pruned.
    mask = jax.tree.map(lambda _: None, variables['params'])
    mask['Conv_0']['kernel'] = col
    fn = jax.jit(
      lambda s, b, m: steps.train_step(
        s, b, jax.random.key(0), lr_fn=lr_fn, param_mask=m
      )
    )
    state = state.replace(params=steps.apply_mask(state.params, mask))
    for i in range(3):
      state, _ = fn(state, _batch(seed=i), mask)
      k = np.asarray(state.params['Conv_0']['kernel'])
      np.testing.assert_array_equal(k[..., 1], 0.0)
      self.assertTrue(np.all(k[..., 0] != kernel[..., 0]))  # Others train.
    # Unmasked leaves (None) moved freely.
    self.assertFalse(
      np.array_equal(
        state.params['Dense_0']['kernel'],
        variables['params']['Dense_0']['kernel'],
      )
    )

  def test_extra_loss_gradient_reaches_params(self):
    model = _ConstsNet()
    variables = jax.jit(model.init)(
      {'params': jax.random.key(1)}, jnp.zeros((1, 8, 8, 3))
    )
    config = _config()
    config.optim.update(momentum=0.0, weight_decay=0.0, lr=0.5)
    state, lr_fn = _state(model, variables, config)
    lam = 3.0

    def extra(params):
      return lam * jnp.sum(params['Dense_0']['bias'] ** 2)

    batch = _batch()
    plain = jax.jit(
      lambda s: steps.train_step(s, batch, jax.random.key(0), lr_fn=lr_fn)
    )(state)[0]
    with_extra, m = jax.jit(
      lambda s: steps.train_step(
        s, batch, jax.random.key(0), lr_fn=lr_fn, extra_loss=extra
      )
    )(state)
    # Plain SGD: the extra term adds -lr * 2 * lam * b to the bias update.
    b0 = np.asarray(variables['params']['Dense_0']['bias'], np.float64)
    np.testing.assert_allclose(
      np.asarray(with_extra.params['Dense_0']['bias'], np.float64)
      - np.asarray(plain.params['Dense_0']['bias'], np.float64),
      -0.5 * 2 * lam * b0,
      rtol=1e-4,
      atol=1e-6,
    )
    self.assertAlmostEqual(
      float(m['extra_loss']), lam * float(np.sum(b0**2)), places=5
    )
    np.testing.assert_allclose(
      float(m['loss']), float(m['ce']) + float(m['extra_loss']), rtol=1e-6
    )


def _np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


class DistillTest(absltest.TestCase):
  def test_kd_loss_matches_numpy(self):
    student, teacher = _ConstsNet(), _ConstsNet()
    sv = jax.jit(student.init)(
      {'params': jax.random.key(1)}, jnp.zeros((1, 8, 8, 3))
    )
    tv = jax.jit(teacher.init)(
      {'params': jax.random.key(7)}, jnp.zeros((1, 8, 8, 3))
    )
    tv['params'] = jax.tree.map(lambda x: 3 * x, tv['params'])
    config = _config()
    state, lr_fn = _state(student, sv, config)
    batch = _batch(n=8)
    batch['mask'][-3:] = False  # Padded examples must not count.
    w, t = 0.7, 4.0
    _, m = jax.jit(
      lambda s, tvars: steps.train_step(
        s,
        batch,
        jax.random.key(0),
        lr_fn=lr_fn,
        teacher_apply=teacher.apply,
        teacher_variables=tvars,
        distill_weight=w,
        distill_temperature=t,
      )
    )(state, tv)
    # Reference: student logits in train mode (batch stats), teacher eval.
    s_logits = np.asarray(
      jax.jit(
        lambda v, x: student.apply(v, x, train=True, mutable=['batch_stats'])[0]
      )(sv, batch['image']),
      np.float64,
    )
    t_logits = np.asarray(
      jax.jit(teacher.apply)(tv, batch['image']), np.float64
    )
    keep = batch['mask']
    labels = batch['label']
    ce = -_np_log_softmax(s_logits)[np.arange(8), labels]
    lt, ls = _np_log_softmax(t_logits / t), _np_log_softmax(s_logits / t)
    kl = t * t * np.sum(np.exp(lt) * (lt - ls), -1)
    want_ce, want_kd = ce[keep].mean(), kl[keep].mean()
    self.assertGreater(want_kd, 1e-3)  # The test would catch a zero KD.
    np.testing.assert_allclose(float(m['ce']), want_ce, rtol=1e-5)
    np.testing.assert_allclose(float(m['kd']), want_kd, rtol=1e-4)
    np.testing.assert_allclose(
      float(m['loss']), (1 - w) * want_ce + w * want_kd, rtol=1e-4
    )

  def test_distill_config_is_checked_and_recorded(self):
    config = _config()
    self.assertEqual(train.distill_settings(config), (0.0, 4.0))
    config.distill = ml_collections.ConfigDict(
      {'weight': 1.5, 'temperature': 4.0}
    )
    with self.assertRaisesRegex(ValueError, r'distill\.weight.*1\.5'):
      train.distill_settings(config)
    config.distill.weight = 0.5
    model = _ConstsNet()
    with self.assertRaisesRegex(ValueError, 'teacher'):
      train.train_and_evaluate(
        config, os.path.join(tempfile.mkdtemp(), 'w'), init=(model, None, {})
      )

  def test_distilled_fine_tune_records_settings(self):
    model = _ConstsNet()
    variables = jax.jit(model.init)(
      {'params': jax.random.key(1)}, jnp.zeros((1, 32, 32, 3))
    )
    config = _config()
    config.distill = ml_collections.ConfigDict(
      {'weight': 0.5, 'temperature': 2.0}
    )
    arch = {'name': 'consts', 'kwargs': {'num_classes': 10}}
    with tempfile.TemporaryDirectory() as workdir:
      with tfds.testing.mock_data(num_examples=64):
        result = train.train_and_evaluate(
          config,
          workdir,
          init=(model, variables, arch),
          teacher=(model, variables),
        )
      rows = [
        r
        for r in train.metrics.read_jsonl(
          os.path.join(workdir, 'metrics.jsonl')
        )
        if 'train_kd' in r
      ]
    self.assertEqual(result.metrics['distill_weight'], 0.5)
    self.assertEqual(result.metrics['distill_temperature'], 2.0)
    self.assertLen(rows, 2)  # steps 2 and 4
    self.assertTrue(all(np.isfinite(r['train_kd']) for r in rows))


if __name__ == '__main__':
  absltest.main()
