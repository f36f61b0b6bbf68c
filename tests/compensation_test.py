"""Least-squares compensation tests: exactness on duplicated channels, the
offset case against a float64 numpy least-squares fit, and the plan hook."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized
from flax import traverse_util

from pfa_jax import methods
from pfa_jax import models
from pfa_jax import plan as plan_lib
from pfa_jax import slicing
from pfa_jax.methods import cf
from pfa_jax.methods import compensation
from pfa_jax.models import layers
from pfa_jax.models import structure


class _Affine(nn.Module):
  """Two linear ConvBN groups (no ReLU), so x_r = α x_k + β stays exact.

  Group 'a' is read by conv 'b/conv' (no bias: the offset goes into b's BN
  mean); group 'b' is read by the dense 'head' after a channel-last flatten
  (bias; the flatten repeats each channel at every position).
  """

  widths: tuple[int, ...] = (6, 5)
  padding: str = 'VALID'
  num_classes: int = 3

  def structure(self):
    return structure.Structure(
      (
        structure.Group('a', 0, ('a',), ('b/conv',)),
        structure.Group('b', 1, ('b',), ('head',)),
      )
    )

  @nn.compact
  def __call__(self, x, train=False):
    x = layers.ConvBN(self.widths[0], relu=False, conv_impl='xla', name='a')(
      x, train
    )
    x = layers.ConvBN(
      self.widths[1],
      padding=self.padding,
      relu=False,
      conv_impl='xla',
      name='b',
    )(x, train)
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(self.num_classes, name='head')(x)


def _perturb_stats(variables, seed):
  k1, k2 = jax.random.split(jax.random.key(seed))
  bs = variables['batch_stats']
  flat = traverse_util.flatten_dict(bs, sep='/')
  out = {}
  for i, (k, v) in enumerate(sorted(flat.items())):
    r = jax.random.normal(jax.random.fold_in(k1, i), v.shape)
    out[k] = 0.3 * r if k.endswith('mean') else 1.0 + 0.5 * jnp.abs(r)
  variables = dict(variables)
  variables['batch_stats'] = traverse_util.unflatten_dict(out, sep='/')
  del k2
  return variables


def _duplicate(variables, producer, r, k, alpha, beta=0.0):
  """Channel r := α · channel k + β after the producer's BN (same kernel)."""
  p = traverse_util.flatten_dict(variables['params'], sep='/')
  s = traverse_util.flatten_dict(variables['batch_stats'], sep='/')
  p = {n: np.array(v) for n, v in p.items()}
  s = {n: np.array(v) for n, v in s.items()}
  kern = p[f'{producer}/conv/kernel']
  kern[..., r] = kern[..., k]
  p[f'{producer}/bn/scale'][r] = alpha * p[f'{producer}/bn/scale'][k]
  p[f'{producer}/bn/bias'][r] = alpha * p[f'{producer}/bn/bias'][k] + beta
  s[f'{producer}/bn/mean'][r] = s[f'{producer}/bn/mean'][k]
  s[f'{producer}/bn/var'][r] = s[f'{producer}/bn/var'][k]
  out = dict(variables)
  out['params'] = traverse_util.unflatten_dict(p, sep='/')
  out['batch_stats'] = traverse_util.unflatten_dict(s, sep='/')
  return out


def _batches(shape, n_batches, seed, n=8):
  rng = np.random.default_rng(seed)
  return [
    {
      'image': rng.normal(size=(n, *shape)).astype(np.float32),
      'label': np.zeros(n, np.int32),
      'mask': np.ones(n, bool),
    }
    for _ in range(n_batches)
  ]


def _max_rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


class LsFoldTest(parameterized.TestCase):
  @parameterized.parameters(0.0, 1e-3, 0.1)
  def test_matches_ridge_regression_on_samples(self, ridge):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 7)) @ rng.normal(size=(7, 7)) + 3.0
    keep = np.array([0, 2, 3, 6])
    removed = np.array([1, 4, 5])
    fold = compensation.ls_fold(np.cov(x.T), x.mean(0), keep, ridge)
    # Reference: ridge regression with intercept on the raw samples, solved as
    # an augmented least-squares system in float64.
    xk, xr = x[:, keep], x[:, removed]
    m = x.shape[0]
    xkc, xrc = xk - xk.mean(0), xr - xr.mean(0)
    lam = ridge * np.trace(np.cov(xk.T)) / len(keep) * (m - 1)
    a = np.vstack([xkc, np.sqrt(lam) * np.eye(len(keep))])
    y = np.vstack([xrc, np.zeros((len(keep), len(removed)))])
    bt = np.linalg.lstsq(a, y, rcond=None)[0]
    np.testing.assert_allclose(fold.matrix, bt.T, atol=1e-10)
    np.testing.assert_allclose(
      fold.offset, xr.mean(0) - xk.mean(0) @ bt, atol=1e-10
    )
    if ridge == 0:  # the plain intercept fit, solved another way
      ones = np.hstack([xk, np.ones((m, 1))])
      coef = np.linalg.lstsq(ones, xr, rcond=None)[0]
      np.testing.assert_allclose(fold.matrix, coef[:-1].T, atol=1e-9)
      np.testing.assert_allclose(fold.offset, coef[-1], atol=1e-9)

  @parameterized.parameters(0.0, 1e-3)
  def test_without_intercept_matches_regression_through_the_origin(self, ridge):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(150, 6)) @ rng.normal(size=(6, 6)) + 2.0
    keep, removed = np.array([0, 1, 4]), np.array([2, 3, 5])
    m = x.shape[0]
    fold = compensation.ls_fold(
      np.cov(x.T), x.mean(0), keep, ridge, intercept=False, count=m
    )
    self.assertIsNone(fold.offset)
    # Reference: ridge regression without an intercept column on the raw
    # samples, as an augmented float64 least-squares system.
    xk, xr = x[:, keep], x[:, removed]
    lam = ridge * np.trace(xk.T @ xk) / len(keep)
    a = np.vstack([xk, np.sqrt(lam) * np.eye(len(keep))])
    y = np.vstack([xr, np.zeros((len(keep), len(removed)))])
    bt = np.linalg.lstsq(a, y, rcond=None)[0]
    np.testing.assert_allclose(fold.matrix, bt.T, atol=1e-10)
    # The explained share is of the second moment, from the residual.
    resid = xr - xk @ fold.matrix.T
    np.testing.assert_allclose(
      compensation.explained(np.cov(x.T), keep, fold, x.mean(0), m),
      1 - np.sum(resid**2) / np.sum(xr**2),
      atol=1e-10,
    )

  def test_singular_kept_covariance(self):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 3))
    x = np.hstack([x, x[:, :1], np.zeros((50, 1))])  # duplicate + dead
    fold = compensation.ls_fold(np.cov(x.T), x.mean(0), [0, 1, 2, 3, 4], 0.0)
    self.assertEqual(fold.matrix.shape, (0, 5))
    fold = compensation.ls_fold(np.cov(x.T), x.mean(0), [1, 2, 3, 4], 0.0)
    pred = x[:, [1, 2, 3, 4]] @ fold.matrix.T + fold.offset
    np.testing.assert_allclose(pred[:, 0], x[:, 0], atol=1e-10)
    self.assertTrue(np.all(np.isfinite(fold.matrix)))

  def test_errors(self):
    cov, mean = np.eye(4), np.zeros(4)
    with self.assertRaisesRegex(ValueError, 'sorted'):
      compensation.ls_fold(cov, mean, [2, 1])
    with self.assertRaisesRegex(ValueError, r'\[0, 4\)'):
      compensation.ls_fold(cov, mean, [0, 4])
    with self.assertRaisesRegex(ValueError, 'ridge'):
      compensation.ls_fold(cov, mean, [0], ridge=-1.0)
    with self.assertRaisesRegex(ValueError, r'\[C, C\]'):
      compensation.ls_fold(np.eye(3), mean, [0])


class ExactnessTest(parameterized.TestCase):
  """resnet8's inner group of stage 2: channel 5 := α · channel 2 post-ReLU."""

  group = 'stage2_block0/conv1'
  shape = (8, 8, 3)

  def _setup(self, alpha):
    model = models.get_model('resnet8', num_classes=4, width_mult=0.5)
    variables = models.init(model, jax.random.key(0), self.shape)
    variables = _perturb_stats(variables, 1)
    variables = _duplicate(variables, self.group, 5, 2, alpha)
    return model, variables

  def _logits(self, model, variables, x):
    return np.asarray(jax.jit(model.apply)(variables, x))

  @parameterized.parameters(1.0, 2.5)
  def test_ls_exact_cf_only_for_alpha_one_none_inexact(self, alpha):
    model, variables = self._setup(alpha)
    width = model.widths[model.structure().group(self.group).index]
    keep = np.delete(np.arange(width), 5)
    train = _batches(self.shape, 2, seed=2)
    x = _batches(self.shape, 1, seed=3)[0]['image']  # unseen images
    full = self._logits(model, variables, x)

    ls = compensation.compensate(
      model, variables, {self.group: keep}, train, ridge=0.0
    )
    fold = ls.folds[self.group]
    want_b = np.zeros((1, width - 1))
    want_b[0, 2] = alpha  # channel 2 is column 2 of the kept set
    np.testing.assert_allclose(fold.matrix, want_b, atol=1e-3)
    pm, pv = slicing.prune(model, variables, ls)
    self.assertLess(_max_rel(self._logits(pm, pv, x), full), 1e-4)

    cf_plan = plan_lib.Plan(
      keep={self.group: keep},
      folds={self.group: plan_lib.Fold(cf.fold_matrix(keep, {5: 2}))},
    )
    pm, pv = slicing.prune(model, variables, cf_plan)
    err = _max_rel(self._logits(pm, pv, x), full)
    if alpha == 1.0:
      self.assertLess(err, 1e-5)
    else:
      self.assertGreater(err, 1e-3)

    pm, pv = slicing.prune(model, variables, {self.group: keep})
    self.assertGreater(_max_rel(self._logits(pm, pv, x), full), 1e-3)

  def test_stream_groups(self):
    model, variables = self._setup(1.0)
    plan = {self.group: np.arange(15), 'stream2': np.arange(15)}
    with self.assertRaisesRegex(ValueError, "'stream2' is a residual stream"):
      compensation.compensate(
        model, variables, plan, _batches(self.shape, 1, 0), ['stream2']
      )
    out = compensation.compensate(
      model, variables, plan, _batches(self.shape, 1, 0)
    )
    self.assertEqual(sorted(out.folds), [self.group])
    self.assertEqual(
      out.report['compensation_detail']['skipped_streams'], ['stream2']
    )


class OffsetTest(parameterized.TestCase):
  """x_r = α x_k + β in both groups of _Affine: offsets into BN mean / bias."""

  shape = (7, 7, 2)

  def _setup(self, padding='VALID'):
    model = _Affine(padding=padding)
    variables = models.init(model, jax.random.key(4), self.shape)
    variables = _perturb_stats(variables, 5)
    variables = _duplicate(variables, 'a', 4, 1, 1.7, 0.6)
    variables = _duplicate(variables, 'b', 0, 3, 0.4, -1.1)
    return model, variables

  def test_matches_numpy_lstsq_and_is_exact(self):
    model, variables = self._setup()
    train = _batches(self.shape, 3, seed=6)
    keep = {'a': np.array([0, 1, 2, 3, 5]), 'b': np.array([1, 2, 3, 4])}
    plan = compensation.compensate(model, variables, keep, train, ridge=0.0)
    # Reference: float64 least squares with intercept on the captured inputs.
    for name, cons, width in (('a', 'b/conv', 6), ('b', 'head', 5)):
      xs = []
      for batch in train:
        ins, _ = compensation.capture(
          model, variables, batch['image'], inputs_of=[cons]
        )
        xs.append(np.asarray(ins[cons], np.float64).reshape(-1, width))
      x = np.concatenate(xs)
      k = keep[name]
      r = np.setdiff1d(np.arange(width), k)
      coef = np.linalg.lstsq(
        np.hstack([x[:, k], np.ones((len(x), 1))]), x[:, r], rcond=None
      )[0]
      fold = plan.folds[name]
      np.testing.assert_allclose(fold.matrix, coef[:-1].T, atol=2e-4)
      np.testing.assert_allclose(fold.offset, coef[-1], atol=2e-4)
    x = _batches(self.shape, 1, seed=7)[0]['image']
    full = model.apply(variables, x)
    pm, pv = slicing.prune(model, variables, plan)
    self.assertLess(_max_rel(pm.apply(pv, x), full), 1e-4)
    # A fold without its offset is not exact: the offset fold is exercised.
    no_offset = plan_lib.Plan(
      keep=plan.keep,
      folds={n: plan_lib.Fold(f.matrix) for n, f in plan.folds.items()},
    )
    pm, pv = slicing.prune(model, variables, no_offset)
    self.assertGreater(_max_rel(pm.apply(pv, x), full), 1e-2)

  def test_sequential_equals_one_shot_when_folds_are_exact(self):
    model, variables = self._setup()
    train = _batches(self.shape, 2, seed=8)
    keep = {'a': np.array([0, 1, 2, 3, 5]), 'b': np.array([1, 2, 3, 4])}
    one = compensation.compensate(model, variables, keep, train, ridge=0.0)
    seq = compensation.compensate(
      model, variables, keep, train, ridge=0.0, sequential=True
    )
    self.assertEqual(
      seq.report['compensation_detail']['statistics'], 'sequential'
    )
    for n in keep:
      np.testing.assert_allclose(
        seq.folds[n].matrix, one.folds[n].matrix, atol=1e-3
      )
      np.testing.assert_allclose(
        seq.folds[n].offset, one.folds[n].offset, atol=1e-3
      )

  def test_zero_padding_error_is_confined_to_the_border(self):
    model, variables = self._setup('SAME')
    train = _batches(self.shape, 2, seed=9)
    keep = {'a': np.array([0, 1, 2, 3, 5])}
    plan = compensation.compensate(model, variables, keep, train, ridge=0.0)
    x = _batches(self.shape, 1, seed=10)[0]['image']
    pm, pv = slicing.prune(model, variables, plan)
    _, full = compensation.capture(model, variables, x, outputs_of=['b'])
    _, got = compensation.capture(pm, pv, x, outputs_of=['b'])
    err = np.abs(np.asarray(got['b']) - np.asarray(full['b']))
    scale = np.max(np.abs(np.asarray(full['b'])))
    interior = err[:, 1:-1, 1:-1, :]
    self.assertLess(interior.max() / scale, 1e-4)
    self.assertGreater(err.max() / scale, 1e-3)  # c != 0 at the border


class OptimalityTest(absltest.TestCase):
  """Without exact duplicates, ls (ridge 0) minimises the consumer's output
  error on the statistics' images over every linear fold: no fold, CF's
  indicator fold and a perturbed ls fold all do worse."""

  def test_ls_beats_other_folds_on_the_fitted_images(self):
    shape = (7, 7, 2)
    model = _Affine()
    variables = _perturb_stats(models.init(model, jax.random.key(8), shape), 9)
    train = _batches(shape, 2, seed=11)
    keep = np.array([0, 2, 3, 5])
    ls = compensation.compensate(model, variables, {'a': keep}, train, [], 0.0)
    self.assertEqual(ls.folds, {})  # groups=[]: nothing compensated
    ls = compensation.compensate(
      model, variables, {'a': keep}, train, ['a'], ridge=0.0
    )

    def err(plan):
      pm, pv = slicing.prune(model, variables, plan)
      total = 0.0
      for b in train:
        _, want = compensation.capture(
          model, variables, b['image'], outputs_of=['b/conv']
        )
        _, got = compensation.capture(pm, pv, b['image'], outputs_of=['b/conv'])
        total += float(jnp.sum((got['b/conv'] - want['b/conv']) ** 2))
      return total

    fold = ls.folds['a']
    wiggle = plan_lib.Fold(fold.matrix + 0.05, fold.offset)
    cf_fold = plan_lib.Fold(cf.fold_matrix(keep, {1: 0, 4: 5}))
    e_ls = err(ls)
    self.assertLess(e_ls, err({'a': keep}))
    for other in (wiggle, cf_fold):
      plan = plan_lib.Plan(keep={'a': keep}, folds={'a': other})
      self.assertLess(e_ls, err(plan))
    info = ls.report['compensation_detail']['groups']['a']
    self.assertEqual(info['samples'], 2 * 8 * 49)
    self.assertTrue(0.0 <= info['explained_variance'] <= 1.0)

  def test_registry_hook(self):
    shape = (8, 8, 3)
    model = models.get_model('resnet8', num_classes=3, width_mult=0.5)
    variables = models.init(model, jax.random.key(0), shape)
    out = methods.prune(
      'l1',
      model,
      variables,
      batches=_batches(shape, 1, seed=12),
      recipe='keep:0.5',
      groups='inner+stream',
      compensation='ls',
    )
    comp = out.plan.report['compensation_detail']
    self.assertEqual(comp['kind'], 'ls')
    self.assertEqual(comp['skipped_streams'], ['stream1', 'stream2', 'stream3'])
    self.assertEqual(
      sorted(out.plan.folds),
      ['stage1_block0/conv1', 'stage2_block0/conv1', 'stage3_block0/conv1'],
    )


if __name__ == '__main__':
  absltest.main()
