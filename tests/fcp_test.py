"""FCP tests: correlation and pairs vs naive references, the regulariser's
gradient vs finite differences, the fold vs np.polyfit, and exactness on
exactly collinear filters through the method registry."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized
from flax import traverse_util

from pfa_jax import methods
from pfa_jax import models
from pfa_jax import slicing
from pfa_jax.methods import fcp


def _naive_pairs(r, n):
  """Repeatedly take the most correlated pair of still-unused filters."""
  o = r.shape[0]
  free = set(range(o))
  out = []
  for _ in range(n):
    best = max(
      ((r[a, b], -a, -b) for a in free for b in free if a < b),
    )
    a, b = -best[1], -best[2]
    out.append((a, b))
    free -= {a, b}
  return out


class CorrelationTest(parameterized.TestCase):
  def test_filter_correlation_matches_corrcoef(self):
    rng = np.random.default_rng(0)
    k = rng.normal(size=(3, 3, 4, 6))
    k[..., 5] = 0.0  # zero-variance filter: correlation 0, no NaN
    want = np.corrcoef(k.reshape(-1, 6)[:, :5].T)
    got = fcp.filter_correlation(k)
    np.testing.assert_allclose(got[:5, :5], want, atol=1e-12)
    np.testing.assert_array_equal(got[5, :5], 0.0)
    self.assertEqual(got[5, 5], 1.0)

  @parameterized.parameters(0, 1, 2)
  def test_pairs_are_disjoint_and_most_correlated(self, seed):
    rng = np.random.default_rng(seed)
    o = 11
    r = np.corrcoef(rng.normal(size=(o, 5)))
    for n in range(o // 2 + 1):
      got = fcp.select_pairs(r, n)
      self.assertEqual(got, _naive_pairs(r, n))
      flat = [i for p in got for i in p]
      self.assertLen(set(flat), 2 * n)

  def test_scores_choose_the_kept_member(self):
    r = np.eye(4)
    r[0, 3] = r[3, 0] = 0.9
    r[1, 2] = r[2, 1] = 0.8
    got = fcp.select_pairs(r, 2, scores=np.array([1.0, 5.0, 2.0, 3.0]))
    self.assertEqual(got, [(3, 0), (1, 2)])
    with self.assertRaisesRegex(ValueError, r'\[0, 2\]'):
      fcp.select_pairs(r, 3)


class RegularizerTest(absltest.TestCase):
  def test_value_and_gradient(self):
    rng = np.random.default_rng(3)
    k = rng.normal(size=(3, 3, 2, 5)).astype(np.float32)
    pairs = [(0, 3), (1, 4)]
    lam = 0.7
    r = np.corrcoef(k.reshape(-1, 5).astype(np.float64).T)
    want = lam * ((1 - r[0, 3]) + (1 - r[1, 4]))
    self.assertAlmostEqual(
      float(fcp.pair_regularizer(k, pairs, lam)), want, places=5
    )
    grad = np.asarray(
      jax.grad(fcp.pair_regularizer)(jnp.asarray(k), pairs, lam)
    )

    def f(x):  # float64 reference of the same function
      c = np.corrcoef(x.reshape(-1, 5).T)
      return lam * ((1 - c[0, 3]) + (1 - c[1, 4]))

    h = 1e-5
    num = np.zeros_like(k, np.float64)
    base = k.astype(np.float64)
    for idx in np.ndindex(k.shape):
      e = np.zeros_like(base)
      e[idx] = h
      num[idx] = (f(base + e) - f(base - e)) / (2 * h)
    np.testing.assert_allclose(grad, num, atol=2e-4)
    self.assertGreater(np.abs(num).max(), 1e-2)  # the check is not vacuous
    np.testing.assert_array_equal(grad[..., 2], 0.0)  # unpaired filter

  def test_regularizer_sums_groups(self):
    model = models.get_model('vgg16_cifar', num_classes=3, width_mult=1 / 16)
    variables = models.init(model, jax.random.key(0), (32, 32, 3))
    pairs = {'conv2': [(0, 1)], 'conv5': [(2, 3), (0, 1)]}
    got = fcp.regularizer(model, pairs, 0.5)(variables['params'])
    flat = traverse_util.flatten_dict(variables['params'], sep='/')
    want = sum(
      fcp.pair_regularizer(flat[f'{n}/conv/kernel'], p, 0.5)
      for n, p in pairs.items()
    )
    self.assertAlmostEqual(float(got), float(want), places=5)
    self.assertGreater(float(got), 0.0)
    # A round: pairs from the weights, then the same pairs are dropped.
    pairs = fcp.round_pairs(model, variables, ['conv2', 'conv5'], 2)
    for n in ('conv2', 'conv5'):
      r = fcp.filter_correlation(flat[f'{n}/conv/kernel'])
      self.assertEqual(pairs[n], [list(p) for p in fcp.select_pairs(r, 2)])
    rng = np.random.default_rng(0)
    batches = [{'image': rng.normal(size=(2, 32, 32, 3)).astype(np.float32)}]
    out = methods.prune(
      'fcp',
      model,
      variables,
      batches=batches,
      recipe='keep:1.0',
      groups=['conv2', 'conv5'],
      pairs=pairs,
    )
    for n in ('conv2', 'conv5'):
      dropped = set(range(model.widths[1 if n == 'conv2' else 4]))
      dropped -= set(out.keep[n].tolist())
      self.assertLen(dropped, 2)
      self.assertTrue(all(len(dropped & set(p)) == 1 for p in pairs[n]))
    with self.assertRaisesRegex(ValueError, "'conv2': pairs must be disjoint"):
      methods.prune(
        'fcp',
        model,
        variables,
        batches=batches,
        recipe='keep:1.0',
        groups=['conv2'],
        pairs={'conv2': [[0, 1], [1, 2]]},
      )


class FoldTest(absltest.TestCase):
  def test_fold_pair_matches_polyfit(self):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(300, 4)) @ rng.normal(size=(4, 4)) + 2.0
    a, b = fcp.fold_pair(np.cov(x.T), x.mean(0), keep=1, drop=3)
    want_a, want_b = np.polyfit(x[:, 1], x[:, 3], 1)
    self.assertAlmostEqual(a, want_a, places=10)
    self.assertAlmostEqual(b, want_b, places=10)
    a, b = fcp.fold_pair(np.zeros((2, 2)), np.array([0.5, 1.5]), 0, 1)
    self.assertEqual((a, b), (0.0, 1.5))  # constant partner: the mean

  def test_fold_pair_through_the_origin(self):
    rng = np.random.default_rng(6)
    x = rng.normal(size=(80, 3)) + 1.5
    a, b = fcp.fold_pair(
      np.cov(x.T), x.mean(0), 0, 2, intercept=False, count=80
    )
    self.assertIsNone(b)
    self.assertAlmostEqual(a, x[:, 0] @ x[:, 2] / (x[:, 0] @ x[:, 0]), 12)
    fold = fcp.pair_fold(
      np.cov(x.T), x.mean(0), [0, 1], [(0, 2)], intercept=False, count=80
    )
    self.assertIsNone(fold.offset)
    np.testing.assert_allclose(fold.matrix, [[a, 0.0]])

  def test_pair_fold_layout(self):
    cov = np.array([[2.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 3.0]])
    fold = fcp.pair_fold(cov, np.array([1.0, 0.0, 2.0]), [0, 1], [(0, 2)])
    np.testing.assert_allclose(fold.matrix, [[0.5, 0.0]])
    np.testing.assert_allclose(fold.offset, [2.0 - 0.5 * 1.0])


class ExactnessTest(parameterized.TestCase):
  """conv3 of a narrow VGG: filter 6 := α · filter 2 (kernel, BN, stats)."""

  @parameterized.parameters(0.5, 2.0)
  def test_fold_is_exact_for_collinear_filters(self, alpha):
    model = models.get_model('vgg16_cifar', num_classes=4, width_mult=1 / 16)
    variables = models.init(model, jax.random.key(1), (32, 32, 3))
    p = {
      k: np.array(v)
      for k, v in traverse_util.flatten_dict(
        variables['params'], sep='/'
      ).items()
    }
    s = {
      k: np.array(v)
      for k, v in traverse_util.flatten_dict(
        variables['batch_stats'], sep='/'
      ).items()
    }
    rng = np.random.default_rng(5)
    s['conv3/bn/mean'] = rng.normal(size=s['conv3/bn/mean'].shape) * 0.2
    s['conv3/bn/var'] = 1.0 + rng.uniform(size=s['conv3/bn/var'].shape)
    p['conv3/bn/bias'] = rng.normal(size=p['conv3/bn/bias'].shape) * 0.3
    eps = 1e-5  # flax BN epsilon in pfa_jax.models.layers
    p['conv3/conv/kernel'][..., 6] = alpha * p['conv3/conv/kernel'][..., 2]
    p['conv3/bn/scale'][6] = alpha * p['conv3/bn/scale'][2]
    p['conv3/bn/bias'][6] = alpha * p['conv3/bn/bias'][2]
    s['conv3/bn/mean'][6] = alpha * s['conv3/bn/mean'][2]
    # (αz − αm) / sqrt(v6 + eps) = (z − m) / sqrt(v + eps) exactly:
    s['conv3/bn/var'][6] = alpha**2 * (s['conv3/bn/var'][2] + eps) - eps
    variables = {
      **variables,
      'params': traverse_util.unflatten_dict(p, sep='/'),
      'batch_stats': traverse_util.unflatten_dict(s, sep='/'),
    }
    self.assertAlmostEqual(
      fcp.filter_correlation(p['conv3/conv/kernel'])[2, 6], 1.0, places=6
    )
    rng = np.random.default_rng(6)
    batches = [
      {
        'image': rng.normal(size=(4, 32, 32, 3)).astype(np.float32),
        'label': np.zeros(4, np.int32),
        'mask': np.ones(4, bool),
      }
    ]
    width = model.widths[2]
    out = methods.prune(
      'fcp',
      model,
      variables,
      batches=batches,
      recipe={'conv3': width - 1},
      groups=['conv3'],
    )
    (pair,) = out.plan.report['pairs']['conv3']
    self.assertEqual(sorted(pair), [2, 6])
    # The smaller-variance member goes: 6 for α < 1, 2 for α > 1.
    self.assertEqual(pair[1], 6 if alpha < 1 else 2)
    x = rng.normal(size=(3, 32, 32, 3)).astype(np.float32)
    full = np.asarray(model.apply(variables, x))
    got = np.asarray(out.model.apply(out.variables, x))
    self.assertLess(np.abs(got - full).max() / np.abs(full).max(), 1e-4)
    # Without the fold the same keep-set is not exact.
    pm, pv = slicing.prune(model, variables, out.plan.keep)
    err = np.abs(np.asarray(pm.apply(pv, x)) - full).max()
    self.assertGreater(err / np.abs(full).max(), 1e-3)


if __name__ == '__main__':
  absltest.main()
