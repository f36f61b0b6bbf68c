"""Tests for pfa_jax.select against a naive re-summing reference."""

import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

from pfa_jax import select


def _naive_order(cov):
  """Literal METHODS.md rule, recomputing every sum each step (O(r C^2))."""
  cov = np.asarray(cov, np.float64)
  c = cov.shape[0]
  var = np.diag(cov)
  dead = [i for i in range(c) if var[i] == 0 or var[i] <= 1e-8 * var.max()]
  alive = [i for i in range(c) if i not in dead]
  order = list(dead)
  while len(alive) > 1:
    best = None
    for f in alive:
      rs = [abs(cov[f, g]) / np.sqrt(var[f] * var[g]) for g in alive if g != f]
      key = (round(sum(rs), 9), round(max(rs), 12), f)
      if best is None or key > best[0]:
        best = (key, f)
    order.append(best[1])
    alive.remove(best[1])
  return np.array(order + alive)


def _cov(x):
  return np.cov(np.asarray(x, np.float64), rowvar=False)


class SelectTest(parameterized.TestCase):
  @parameterized.parameters((0, 5), (1, 17), (2, 33), (3, 64), (4, 64), (5, 48))
  def test_incremental_matches_naive(self, seed, c):
    rng = np.random.default_rng(seed)
    r = max(2, c // 3)
    x = rng.standard_normal((200, r)) @ rng.standard_normal((r, c))
    x += 0.5 * rng.standard_normal((200, c))
    cov = _cov(x)
    order = select.removal_order(cov)
    np.testing.assert_array_equal(order, _naive_order(cov))
    self.assertCountEqual(order.tolist(), range(c))

  def test_exact_duplicate_removed_before_original(self):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((100, 5))
    x = np.concatenate([x, x[:, [1]]], axis=1)  # unit 5 duplicates unit 1
    order = select.removal_order(_cov(x))
    self.assertEqual(order[0], 5)
    self.assertIn(1, select.keep_indices(order, 5))
    # Also with the duplicate at the lower index.
    x2 = np.concatenate([x[:, [5]], x[:, :5]], axis=1)  # 0 duplicates 2
    self.assertEqual(select.removal_order(_cov(x2))[0], 2)

  def test_dead_units_first_and_no_nan(self):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((50, 6))
    x[:, 4] = 3.0  # constant
    x[:, 1] = 0.0  # zero
    x[:, 2] *= 1e-6  # variance 1e-12 relative: inactive
    order = select.removal_order(_cov(x))
    np.testing.assert_array_equal(order[:3], [1, 2, 4])
    self.assertCountEqual(order.tolist(), range(6))

  def test_all_dead_and_single_unit(self):
    np.testing.assert_array_equal(
      select.removal_order(np.zeros((3, 3))), [0, 1, 2]
    )
    np.testing.assert_array_equal(select.removal_order(np.ones((1, 1))), [0])

  @staticmethod
  def _corr(n, entries):
    r = np.eye(n)
    for (i, j), v in entries.items():
      r[i, j] = r[j, i] = v
    return r

  def test_tie_broken_by_largest_single_correlation(self):
    # s = [1.0, 0.6, 0.5, 1.0, 0.9]: 0 and 3 tie on s (0.5 + 0.5 vs
    # 0.1 + 0.9); the largest single |R| is 0.5 for 0 and 0.9 for 3.
    r = self._corr(5, {(0, 1): 0.5, (0, 2): 0.5, (3, 1): 0.1, (3, 4): 0.9})
    self.assertEqual(select.removal_order(r)[0], 3)
    # Swap 0 and 3: now the max-|R| winner has the SMALLER index, so this
    # is decided by max |R|, not by the larger-index fallback.
    perm = [3, 1, 2, 0, 4]
    self.assertEqual(select.removal_order(r[np.ix_(perm, perm)])[0], 0)
    # Negative correlations count by magnitude.
    self.assertEqual(select.removal_order(-r + 2 * np.eye(5))[0], 3)

  def test_tie_falls_back_to_larger_index(self):
    # A ring: every filter has s = 1.0 and max |R| = 0.5.
    r = self._corr(4, {(0, 1): 0.5, (1, 2): 0.5, (2, 3): 0.5, (3, 0): 0.5})
    order = select.removal_order(r)
    self.assertEqual(order[0], 3)
    # Then s = [0.5, 1.0, 0.5] over {0, 1, 2} -> 1 (no tie); then 0 and 2
    # are uncorrelated (s = 0, max |R| = 0): tie again -> 2.
    np.testing.assert_array_equal(order, [3, 1, 2, 0])

  def test_keep_sets_and_key_mismatch(self):
    orders = {'a': np.array([2, 0, 3, 1]), 'b': np.array([0])}
    keep = select.keep_sets(orders, {'a': 2, 'b': 1})
    np.testing.assert_array_equal(keep['a'], [1, 3])
    np.testing.assert_array_equal(keep['b'], [0])
    with self.assertRaisesRegex(ValueError, r"missing \['b'\].*extra \['c'\]"):
      select.keep_sets(orders, {'a': 2, 'c': 1})
    with self.assertRaisesRegex(ValueError, r"'a'.*keep 5 of 4"):
      select.keep_sets(orders, {'a': 5, 'b': 1})

  def test_nan_raises_naming_layer(self):
    cov = np.eye(3)
    cov[1, 1] = np.nan
    with self.assertRaisesRegex(ValueError, r"'conv3'.*NaN"):
      select.removal_orders({'conv3': cov})

  def test_random_keep_sets_deterministic(self):
    full = {'a': 10, 'b': 64}
    widths = {'a': 3, 'b': 20}
    k1 = select.random_keep_sets(full, widths, 7)
    k2 = select.random_keep_sets(full, widths, 7)
    k3 = select.random_keep_sets(full, widths, 8)
    k4 = select.random_keep_sets({'b': 64}, {'b': 20}, 7)
    for k in full:
      np.testing.assert_array_equal(k1[k], k2[k])
      self.assertLen(k1[k], widths[k])
      self.assertTrue(np.all(np.diff(k1[k]) > 0))
      self.assertTrue(np.all(k1[k] < full[k]))
    np.testing.assert_array_equal(k1['b'], k4['b'])
    self.assertFalse(np.array_equal(k1['b'], k3['b']))
    g1 = select.random_keep_sets(full, widths, np.random.default_rng(3))
    g2 = select.random_keep_sets(full, widths, np.random.default_rng(3))
    np.testing.assert_array_equal(g1['b'], g2['b'])


if __name__ == '__main__':
  absltest.main()
