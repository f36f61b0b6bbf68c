"""Tests for pfa_jax.openblas (NumPy's OpenBLAS through ctypes)."""

import contextlib
import os
from unittest import mock

import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

from pfa_jax import analysis
from pfa_jax import openblas


def _needs_lib(test):
  if not openblas.available():
    test.skipTest("NumPy here does not bundle OpenBLAS's 64-bit symbols")


class OpenblasTest(parameterized.TestCase):
  @parameterized.parameters(True, False)
  def test_syrk_upper_matches_float64(self, native):
    if native:
      _needs_lib(self)
    rng = np.random.default_rng(0)
    z = rng.standard_normal((300, 70)).astype(np.float32)
    ref = z.astype(np.float64).T @ z.astype(np.float64)
    patch = mock.patch.object(openblas, '_lib', return_value=None)
    with patch if not native else contextlib.nullcontext():
      g = openblas.syrk_upper(z)
    self.assertEqual(
      (g.dtype, g.shape, g.flags.c_contiguous), (np.float32, (70, 70), True)
    )
    iu = np.triu_indices(70)
    np.testing.assert_allclose(g[iu], ref[iu], rtol=1e-5, atol=1e-4)
    if native:  # the strict lower triangle is left at zero
      np.testing.assert_array_equal(np.tril(g, -1), 0)

  @parameterized.parameters(True, False)
  def test_eigvalsh_reads_only_the_upper_triangle(self, two_stage):
    _needs_lib(self)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((80, 40))
    a = x.T @ x
    ref = np.linalg.eigvalsh(a)
    b = np.triu(a) + np.tril(np.full_like(a, np.nan), -1)
    w = openblas.eigvalsh_upper(b, two_stage=two_stage)
    np.testing.assert_allclose(w, ref, rtol=1e-10, atol=1e-10)

  @parameterized.parameters(True, False)
  def test_eigvalsh_takes_rows_longer_than_the_matrix(self, two_stage):
    """A view of a padded [n, n + 7] buffer: LAPACK gets the row length as
    its leading dimension, reads the upper triangle only and leaves the
    padding alone."""
    _needs_lib(self)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((90, 40))
    a = x.T @ x
    ref = np.linalg.eigvalsh(a)
    buf = np.full((40, 47), np.nan)
    view = buf[:, :40]
    view[...] = np.triu(a) + np.tril(np.full_like(a, np.nan), -1)
    self.assertTrue(openblas.lapack_layout(view))
    w = openblas.eigvalsh_upper(view, two_stage=two_stage)
    np.testing.assert_allclose(w, ref, rtol=1e-10, atol=1e-10)
    self.assertTrue(np.isnan(buf[:, 40:]).all())

  def test_eigvalsh_rejects_layouts_lapack_cannot_take(self):
    _needs_lib(self)
    a = np.eye(4)
    short_rows = np.lib.stride_tricks.as_strided(np.zeros(20), (4, 4), (24, 8))
    unaligned = np.zeros(8 * 16 + 8, np.uint8)[1:129].view(np.float64)
    readonly = np.eye(4)
    readonly.flags.writeable = False
    bad = (
      np.asfortranarray(a[:, ::-1]),  # column stride != 8
      a.astype(np.float32),
      np.ones((3, 4)),
      short_rows,  # rows overlap: leading dimension 3 < 4
      unaligned.reshape(4, 4),
      readonly,
    )
    for b in bad:
      self.assertFalse(openblas.lapack_layout(b))
      with self.assertRaisesRegex(ValueError, 'unit column stride'):
        openblas.eigvalsh_upper(b, two_stage=False)

  def test_threads_sets_and_restores(self):
    _needs_lib(self)
    lib = openblas._lib()
    before = lib.get_threads()
    with openblas.threads(1):
      self.assertEqual(lib.get_threads(), 1)
    self.assertEqual(lib.get_threads(), before)
    with openblas.threads(None):
      self.assertEqual(lib.get_threads(), before)

  def test_free_cores_is_within_the_affinity(self):
    n = openblas.free_cores()
    self.assertBetween(n, 1, len(os.sched_getaffinity(0)))

  def test_covariance_overwrite_is_in_place_and_equal(self):
    rng = np.random.default_rng(2)
    x = (50.0 + rng.standard_normal((500, 250))).astype(np.float32)
    ref = analysis.covariance(x.copy())
    y = x.copy()
    got = analysis.covariance(y, overwrite=True)
    np.testing.assert_array_equal(got, ref)
    self.assertTrue(np.shares_memory(got, y))  # M >= 2C: y's memory reused
    self.assertFalse(
      np.shares_memory(analysis.covariance(x[:499]), x)
    )  # M < 2C
    np.testing.assert_allclose(
      ref, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-4, atol=1e-5
    )

  def test_analyze_overwrite_gives_the_same_result(self):
    rng = np.random.default_rng(3)
    resp = {
      'a': rng.random((64, 12), np.float32),
      'b': rng.random((64, 2, 2, 5)),
    }
    ref = analysis.analyze({k: v.copy() for k, v in resp.items()})
    got = analysis.analyze(resp, overwrite_responses=True)
    self.assertEqual(got, ref)


if __name__ == '__main__':
  absltest.main()
