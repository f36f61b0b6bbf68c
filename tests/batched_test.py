"""Tests for pfa_jax.batched: K vmapped masked variants vs single runs.

References: each variant's own single masked run (``steps.train_step`` with
``param_mask``) and the physically sliced network trained alone
(``slicing.prune`` + ``steps.train_step``) on the same batches, dropout
off; BN running statistics of removed channels against their closed form
(batch mean and variance are exactly 0, so they decay by the momentum).
"""

import jax
import ml_collections
import numpy as np
from absl.testing import absltest
from flax import traverse_util

from pfa_jax import batched
from pfa_jax import models
from pfa_jax import optim
from pfa_jax import sampling
from pfa_jax import slicing
from pfa_jax import steps

_SHAPE = (16, 16, 3)
_STEPS = 3
_BN_MOMENTUM = 0.9  # layers.ConvBN


def _config():
  return ml_collections.ConfigDict(
    {
      'optim': {
        'name': 'sgd',
        'lr': 0.05,
        'momentum': 0.9,
        'nesterov': True,
        'weight_decay': 5e-4,
        'bn_l1': 0.0,
      }
    }
  )


def _batches(n, batch=16, seed=0):
  rng = np.random.default_rng(seed)
  return [
    {
      'image': rng.normal(size=(batch, *_SHAPE)).astype(np.float32),
      'label': rng.integers(0, 10, size=batch).astype(np.int32),
      'mask': np.ones(batch, np.float32),
    }
    for _ in range(n)
  ]


def _single_run(model, variables, mask, batches, lr_fn, rng):
  state = steps.create_train_state(
    rng, _config(), model, _SHAPE, lr_fn=lr_fn, variables=variables
  )
  step = jax.jit(
    lambda s, b, r, m: steps.train_step(s, b, r, lr_fn=lr_fn, param_mask=m)
  )
  for b in batches:
    state, _ = step(state, b, rng, mask)
  return jax.device_get(steps.variables_of(state))


def _flat(tree):
  return traverse_util.flatten_dict(tree, sep='/')


def _assert_close(test, a, b, what, rtol=2e-4, atol=2e-5):
  fa, fb = _flat(a), _flat(b)
  test.assertEqual(set(fa), set(fb), what)
  for k in fa:
    np.testing.assert_allclose(
      np.asarray(fa[k]),
      np.asarray(fb[k]),
      rtol=rtol,
      atol=atol,
      err_msg=f'{what}: {k}',
    )


def _plans(model, k, seed):
  full = models.widths_of(model)
  plans = []
  for i in range(k):
    w = sampling.sample_widths(
      model, _SHAPE, 0.35 + 0.1 * i, seed=seed + i, check=False
    )
    plans.append(sampling.random_keep(full, w, seed + 100 + i))
  return plans


class BatchedEquivalenceTest(absltest.TestCase):
  def test_four_variants_equal_single_masked_and_sliced_runs(self):
    model = models.get_model(
      'simple_cnn',
      num_classes=10,
      widths=(6, 6, 8, 8, 8, 10, 10, 8),
      dropout=0.0,
      conv_impl='xla',
    )
    dense = models.init(model, jax.random.key(0), _SHAPE)
    lr_fn = optim.learning_rate_schedule(
      base_lr=0.05, schedule='constant', num_steps=_STEPS
    )
    plans = _plans(model, 4, seed=1)
    inits = ['selection', 'scratch', 'selection', 'scratch']
    variants = [
      batched.variant(
        model,
        dense,
        p,
        init=i,
        rng=jax.random.key(10 + j),
        input_shape=_SHAPE,
      )
      for j, (p, i) in enumerate(zip(plans, inits))
    ]
    batches = _batches(_STEPS)
    rng = jax.random.key(7)
    states, curves = batched.train(
      _config(),
      model,
      [v for v, _ in variants],
      [m for _, m in variants],
      batches,
      num_steps=_STEPS,
      lr_fn=lr_fn,
      rng=rng,
    )
    self.assertEqual(curves['loss'].shape, (_STEPS, 4))
    self.assertTrue(np.all(np.isfinite(curves['loss'])))
    # Every variant went through one compiled program.
    self.assertEqual(batched._cached_step(lr_fn, True)._cache_size(), 1)
    finals = batched.variables_of(states)
    report = []
    for j, ((v0, mask), plan, final) in enumerate(zip(variants, plans, finals)):
      # Scratch init is the sliced network's own init, scattered.
      small0_model, small0 = slicing.prune(model, v0, plan)
      if inits[j] == 'scratch':
        ref = models.init(
          models.with_widths(model, {n: len(k) for n, k in plan.items()}),
          jax.random.key(10 + j),
          _SHAPE,
        )
        _assert_close(self, small0['params'], ref['params'], 'scratch init')
      # (a) its own single masked run.
      single = _single_run(model, v0, mask, batches, lr_fn, rng)
      _assert_close(self, final['params'], single['params'], f'v{j} single')
      _assert_close(
        self, final['batch_stats'], single['batch_stats'], f'v{j} bn single'
      )
      # (b) the sliced network trained alone.
      sliced = _single_run(small0_model, small0, None, batches, lr_fn, rng)
      _, final_small = slicing.prune(model, final, plan)
      _assert_close(
        self, final_small['params'], sliced['params'], f'v{j} sliced'
      )
      _assert_close(
        self,
        final_small['batch_stats'],
        sliced['batch_stats'],
        f'v{j} sliced bn',
      )
      # Removed entries stay exactly zero.
      for k, m in _flat(mask).items():
        p = np.asarray(_flat(final['params'])[k])
        self.assertTrue(np.all(p[np.asarray(m) == 0] == 0), k)
      # Removed channels' BN running stats decay by momentum ** steps.
      bn0, bn1 = _flat(v0['batch_stats']), _flat(final['batch_stats'])
      for name, keep in plan.items():
        removed = np.setdiff1d(np.arange(model.widths[int(name[4:]) - 1]), keep)
        if not removed.size:
          continue
        for stat in ('mean', 'var'):
          key = f'{name}/bn/{stat}'
          np.testing.assert_allclose(
            np.asarray(bn1[key])[removed],
            np.asarray(bn0[key])[removed] * _BN_MOMENTUM**_STEPS,
            rtol=1e-6,
            atol=1e-7,
          )
        report.append(removed.size)
    self.assertNotEmpty(report)

  def test_resnet_stream_variants_share_one_program(self):
    model = models.get_model(
      'resnet8', num_classes=10, widths=None, conv_impl='xla'
    )
    dense = models.init(model, jax.random.key(0), _SHAPE)
    full = models.widths_of(model)
    lr_fn = optim.learning_rate_schedule(
      base_lr=0.05, schedule='constant', num_steps=2
    )
    plans = []
    for i in range(2):
      w = sampling.sample_widths(model, _SHAPE, 0.5, seed=i, check=False)
      plans.append(sampling.random_keep(full, w, i))
    self.assertNotEqual(list(plans[0]['stream1']), list(plans[1]['stream1']))
    variants = [batched.variant(model, dense, p) for p in plans]
    consts = [_flat(v['consts']) for v, _ in variants]
    key = 'stage2_block0/channel_map'
    self.assertFalse(np.array_equal(consts[0][key], consts[1][key]))
    batches = _batches(2, batch=8, seed=3)
    rng = jax.random.key(1)
    states, _ = batched.train(
      _config(),
      model,
      [v for v, _ in variants],
      [m for _, m in variants],
      batches,
      num_steps=2,
      lr_fn=lr_fn,
      rng=rng,
    )
    self.assertEqual(batched._cached_step(lr_fn, True)._cache_size(), 1)
    for (v0, _), plan, final in zip(
      variants, plans, batched.variables_of(states)
    ):
      small_model, small0 = slicing.prune(model, v0, plan)
      sliced = _single_run(small_model, small0, None, batches, lr_fn, rng)
      _, final_small = slicing.prune(model, final, plan)
      _assert_close(self, final_small['params'], sliced['params'], 'resnet')

  def test_errors(self):
    model = models.get_model('simple_cnn', num_classes=10, width_mult=0.1)
    dense = models.init(model, jax.random.key(0), (32, 32, 3))
    with self.assertRaisesRegex(ValueError, 'init must be one of'):
      batched.variant(model, dense, {}, init='magic')
    with self.assertRaisesRegex(ValueError, 'needs rng and input_shape'):
      batched.variant(model, dense, {'conv1': [0, 1]}, init='scratch')
    with self.assertRaisesRegex(ValueError, 'at least one'):
      batched.stack([])


if __name__ == '__main__':
  absltest.main()
