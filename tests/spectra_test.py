"""Tests for pfa_jax.spectra."""

from unittest import mock

import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

from pfa_jax import openblas
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

  @parameterized.product(
    c=(7, spectra.TWO_STAGE_MIN_C + 3), openblas_path=(True, False)
  )
  def test_drivers_match_numpy(self, c, openblas_path):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((c + 50, c)) * np.linspace(0.1, 3.0, c)
    cov = np.cov(x, rowvar=False)
    ref = np.linalg.eigvalsh(cov)[::-1]
    ref = ref / ref.sum()
    kept = cov.copy()
    if openblas_path and not openblas.available():
      self.skipTest("NumPy here does not bundle OpenBLAS's LAPACKE")
    calls = []
    real = openblas.eigvalsh_upper

    def spy(a, *, two_stage):
      calls.append(two_stage)
      return real(a, two_stage=two_stage) if openblas_path else None

    with mock.patch.object(openblas, 'eigvalsh_upper', spy):
      lam = spectra.spectrum(cov)
      np.testing.assert_array_equal(cov, kept)  # input untouched
      np.testing.assert_allclose(lam, ref, rtol=1e-9, atol=1e-14)
      lam2 = spectra.spectrum(cov, overwrite=True)
    np.testing.assert_allclose(lam2, ref, rtol=1e-9, atol=1e-14)
    self.assertEqual(calls, [c >= spectra.TWO_STAGE_MIN_C] * 2)
    if openblas_path:  # overwrite=True let LAPACK use the caller's matrix
      self.assertFalse(np.array_equal(cov, kept))

  @parameterized.parameters(-1000, -450, 0, 450, 1017)
  def test_extreme_scales(self, k):
    """The spectrum is scale-free, also where the eigenvalues overflow
    (2^1017: unscaled, LAPACK returns inf and the spectrum was NaN)."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((60, 30))
    a = x.T @ x
    ref = np.linalg.eigvalsh(a)
    for n_min in (spectra.TWO_STAGE_MIN_C, 8):  # one stage, two stages
      with mock.patch.object(spectra, 'TWO_STAGE_MIN_C', n_min):
        lam = spectra.spectrum(np.ldexp(a, k))
        lam2 = spectra.spectrum(np.ldexp(a, k), overwrite=True)
      np.testing.assert_allclose(lam, ref[::-1] / ref.sum(), atol=1e-12)
      np.testing.assert_array_equal(lam2, lam)

  def test_square_pads_rows_from_the_two_stage_size(self):
    big = spectra.TWO_STAGE_MIN_C
    self.assertEqual(spectra.lda(big - 64), big - 64)
    self.assertEqual(spectra.lda(big), big + spectra.LDA_PAD)
    self.assertEqual(spectra.lda(4096), 4096 + spectra.LDA_PAD)
    self.assertEqual(spectra.lda(3000), 3000)  # not a multiple of 64
    a = spectra.square(big)
    self.assertEqual((a.shape, a.strides), ((big, big), (8 * (big + 8), 8)))
    self.assertEqual(spectra.square(5).strides, (40, 8))

  def test_square_in_a_buffer(self):
    # lda(5) = 13
    with mock.patch.multiple(spectra, TWO_STAGE_MIN_C=4, PAD_MULTIPLE=1):
      padded = np.zeros(8 * 5 * 13, np.uint8)
      a = spectra.square(5, padded)
      self.assertEqual((a.shape, a.strides, a.dtype), ((5, 5), (104, 8), 'f8'))
      self.assertTrue(np.shares_memory(a, padded))
      # too short for padded rows: unpadded; too short for those: None
      self.assertEqual(spectra.square(5, padded[:-1]).strides, (40, 8))
      self.assertEqual(spectra.square(5, np.zeros(25)).strides, (40, 8))
      self.assertIsNone(spectra.square(5, np.zeros(24)))
      readonly = np.zeros(200)
      readonly.flags.writeable = False
      self.assertIsNone(spectra.square(5, readonly))
      self.assertIsNone(spectra.square(5, np.zeros((200, 2))[:, 0]))
      self.assertIsNone(spectra.square(5, np.zeros(1000, np.uint8)[1:]))

  @parameterized.parameters(True, False)
  def test_eigvalsh_hands_lapack_padded_rows(self, overwrite):
    """In place where the layout allows it, else a copy with padded rows."""
    if not openblas.available():
      self.skipTest("NumPy here does not bundle OpenBLAS's LAPACKE")
    rng = np.random.default_rng(6)
    x = rng.standard_normal((50, 20))
    cov = x.T @ x
    ref = np.linalg.eigvalsh(cov)
    seen = []
    real = openblas.eigvalsh_upper

    def spy(a, *, two_stage):
      seen.append(a)
      return real(a, two_stage=two_stage)

    with (
      mock.patch.multiple(spectra, TWO_STAGE_MIN_C=8, PAD_MULTIPLE=1),
      mock.patch.object(openblas, 'eigvalsh_upper', spy),
    ):
      mine = spectra.square(20)
      mine[...] = cov
      w = spectra.eigvalsh(mine, overwrite=overwrite)
      w2 = spectra.eigvalsh(np.array(cov), overwrite=overwrite)  # C order
    np.testing.assert_allclose(w, ref, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(w2, ref, rtol=1e-10, atol=1e-10)
    self.assertEqual(seen[0] is mine, overwrite)
    self.assertTrue(all(a.strides == (8 * 28, 8) for a in seen[:1]))
    self.assertEqual(seen[1].strides, (160, 8) if overwrite else (224, 8))

  def test_solver_threads_rule(self):
    big = spectra.TWO_STAGE_MIN_C
    self.assertEqual(spectra.solver_threads(big - 1), 1)
    with mock.patch.object(openblas, 'free_cores', return_value=2):
      self.assertEqual(spectra.solver_threads(big), 2)
    with mock.patch.object(spectra, 'SOLVER_THREADS', 3):
      self.assertEqual(spectra.solver_threads(big - 1), 3)

  def test_tree(self):
    out = spectra.spectra({'a': np.eye(2), 'b': np.diag([3.0, 1.0])})
    np.testing.assert_allclose(out['a'], [0.5, 0.5])
    np.testing.assert_allclose(out['b'], [0.75, 0.25])


if __name__ == '__main__':
  absltest.main()
