"""Tests for pfa_jax.recipes."""

import math

import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

from pfa_jax import recipes


def _random_spectrum(rng, c):
  lam = np.sort(rng.exponential(size=c) ** 3)[::-1]
  return lam / lam.sum()


class EnergyTest(parameterized.TestCase):
  def test_hand_case(self):
    lam = np.array([0.5, 0.3, 0.15, 0.05])
    self.assertEqual(recipes.energy(lam, 0.5), 1)
    self.assertEqual(recipes.energy(lam, 0.51), 2)
    self.assertEqual(recipes.energy(lam, 0.8), 2)
    self.assertEqual(recipes.energy(lam, 0.9), 3)
    self.assertEqual(recipes.energy(lam, 1.0), 4)

  def test_tau_one_returns_rank_not_c_plus_one(self):
    lam = np.array([0.1] * 10 + [0.0] * 5)  # cumsum ends at 1 - O(eps)
    self.assertEqual(recipes.energy(lam, 1.0), 10)
    lam = np.full(7, 1 / 7)
    self.assertEqual(recipes.energy(lam, 1.0), 7)

  def test_monotone_in_tau(self):
    rng = np.random.default_rng(0)
    tree = {f'l{i}': _random_spectrum(rng, c) for i, c in enumerate([3, 64])}
    taus = np.linspace(0.01, 1.0, 200)
    for name in tree:
      widths = [recipes.energy(tree, t)[name] for t in taus]
      self.assertTrue(np.all(np.diff(widths) >= 0))
      self.assertGreaterEqual(min(widths), 1)

  @parameterized.parameters(0.0, -0.1, 1.0001, float('nan'))
  def test_bad_tau_raises(self, tau):
    with self.assertRaisesRegex(ValueError, 'tau must be in'):
      recipes.energy({'a': np.array([1.0])}, tau)


class KLTest(parameterized.TestCase):
  @parameterized.parameters(2, 16, 512)
  def test_white_keeps_all(self, c):
    self.assertEqual(recipes.kl(np.full(c, 1 / c)), c)

  @parameterized.parameters(1, 2, 16, 512)
  def test_rank_one_keeps_one(self, c):
    lam = np.zeros(c)
    lam[0] = 1.0
    self.assertEqual(recipes.kl({'x': lam}), {'x': 1})

  def test_hand_computed(self):
    lam = np.array([0.5, 0.25, 0.25, 0.0])
    # KL = 0.5 log 2 + 2 * 0.25 log 1 = 0.5 log 2; log C = 2 log 2.
    self.assertAlmostEqual(recipes.kl_gamma(lam), 0.75)
    self.assertEqual(recipes.kl(lam), 3)  # ceil(0.75 * 4) = 3
    lam = np.array([0.7, 0.2, 0.1])
    kl = sum(p * math.log(p * 3) for p in lam)
    gamma = 1 - kl / math.log(3)
    self.assertAlmostEqual(gamma, 0.72985, places=4)  # by hand
    self.assertAlmostEqual(recipes.kl_gamma(lam), gamma, places=12)
    self.assertEqual(recipes.kl(lam), 3)  # ceil(2.19)


class ToTargetTest(parameterized.TestCase):
  @parameterized.parameters(0, 1, 2, 3)
  def test_matches_brute_force_over_breakpoints(self, seed):
    rng = np.random.default_rng(seed)
    cs = [4, 9, 16, 33]
    tree = {f'l{i}': _random_spectrum(rng, c) for i, c in enumerate(cs)}
    weights = {f'l{i}': i + 1 for i in range(len(cs))}

    def cost_fn(widths):
      return sum(weights[k] * w for k, w in widths.items())

    def brute_width(lam, tau):  # independent: first index reaching tau
      cum = np.cumsum(lam)
      hit = np.flatnonzero(cum >= tau - 1e-10)
      return int(hit[0]) + 1 if hit.size else lam.size

    # Independent candidate set: all cumulative energies (and 1).
    taus = np.unique(
      np.concatenate([np.cumsum(v) for v in tree.values()] + [[1.0]])
    )
    taus = taus[taus <= 1.0]
    costs = [
      cost_fn({k: brute_width(v, t) for k, v in tree.items()}) for t in taus
    ]
    lo, hi = min(costs), max(costs)
    for target in np.linspace(lo, hi - 1, 7):
      tau, widths = recipes.to_target(tree, cost_fn, target)
      self.assertLessEqual(cost_fn(widths), target)
      feasible = [t for t, c in zip(taus, costs, strict=True) if c <= target]
      self.assertAlmostEqual(tau, max(feasible), places=12)
      nxt = taus[taus > tau + 1e-12]
      self.assertGreater(
        cost_fn({k: brute_width(v, nxt[0]) for k, v in tree.items()}), target
      )
      self.assertEqual(widths, recipes.energy(tree, tau))

  def test_full_network_fits_returns_one(self):
    tree = {'a': np.array([0.6, 0.4]), 'b': np.array([1.0, 0.0])}
    tau, widths = recipes.to_target(tree, lambda w: sum(w.values()), 100)
    self.assertEqual(tau, 1.0)
    self.assertEqual(widths, {'a': 2, 'b': 1})

  def test_target_below_minimum_raises(self):
    tree = {'a': np.array([0.6, 0.4]), 'b': np.array([0.5, 0.5])}
    with self.assertRaisesRegex(ValueError, r'target 1.5.*cost 2'):
      recipes.to_target(tree, lambda w: sum(w.values()), 1.5)


class RegistryTest(absltest.TestCase):
  def test_registry_and_min_width(self):
    tree = {'a': np.array([1.0, 0.0, 0.0]), 'b': np.full(4, 0.25)}
    for name, kw in [
      ('energy', {'tau': 0.01}),
      ('kl', {}),
      ('fraction', {'gamma': 0.1}),
    ]:
      widths = recipes.get_recipe(name)(tree, **kw)
      self.assertEqual(set(widths), set(tree))
      self.assertTrue(all(w >= 1 for w in widths.values()))
    self.assertEqual(recipes.fraction(tree, 0.5), {'a': 2, 'b': 2})

  def test_unknown_recipe_raises(self):
    with self.assertRaisesRegex(ValueError, r"'nope'.*energy"):
      recipes.get_recipe('nope')


if __name__ == '__main__':
  absltest.main()
