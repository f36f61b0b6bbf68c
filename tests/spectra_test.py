"""Tests for pfa_jax.spectra."""

import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

from pfa_jax import spectra


class SpectraTest(parameterized.TestCase):
  def test_matches_known_eigenvalues(self):
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((5, 5)))
    eig = np.array([0.5, 4.0, 0.0, 2.0, 1.5])
    cov = (q * eig) @ q.T
    lam = spectra.spectrum(cov)
    np.testing.assert_allclose(lam, np.sort(eig)[::-1] / eig.sum(), atol=1e-12)

  def test_normalised_descending_nonnegative(self):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 20))  # rank <= 5: round-off negatives
    lam = spectra.spectrum(np.cov(x, rowvar=False))
    self.assertTrue(np.all(lam >= 0))
    self.assertTrue(np.all(np.diff(lam) <= 0))
    self.assertAlmostEqual(lam.sum(), 1.0, places=12)
    self.assertLess(lam[5:].max(), 1e-12)

  @parameterized.parameters(1, 4)
  def test_zero_matrix_gives_dirac(self, c):
    lam = spectra.spectrum(np.zeros((c, c)))
    expected = np.zeros(c)
    expected[0] = 1.0
    np.testing.assert_array_equal(lam, expected)

  def test_nan_raises_naming_layer(self):
    cov = np.eye(3)
    cov[0, 1] = np.inf
    with self.assertRaisesRegex(ValueError, r"'conv7'.*NaN or Inf"):
      spectra.spectra({'conv7': cov})

  def test_non_square_raises(self):
    with self.assertRaisesRegex(ValueError, r"'fc'.*square"):
      spectra.spectrum(np.ones((2, 3)), name='fc')

  def test_tree(self):
    out = spectra.spectra({'a': np.eye(2), 'b': np.diag([3.0, 1.0])})
    np.testing.assert_allclose(out['a'], [0.5, 0.5])
    np.testing.assert_allclose(out['b'], [0.75, 0.25])


if __name__ == '__main__':
  absltest.main()
