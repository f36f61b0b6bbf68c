"""Covariance (tree) -> normalised eigenvalue spectrum (tree).

The PFA spectrum of a layer is the set of eigenvalues of its response
covariance, with negatives (round-off) clipped to 0, sorted in descending order
and normalised to sum to 1 (METHODS.md section 1, "Spectrum"). It is computed
on the host in float64 with LAPACK, eigenvalues only.

Decisions:
  * A zero covariance (every unit dead/constant) gives the Dirac
    ``[1, 0, ..., 0]``: all the information fits in one unit, so every recipe
    keeps exactly one unit. A uniform spectrum would make PFA-KL keep every
    dead unit.
  * Driver: for C >= :data:`TWO_STAGE_MIN_C`, LAPACK's two-stage
    ``dsyevd_2stage`` (eigenvalues only) from the OpenBLAS that SciPy ships,
    through its LAPACKE symbol; measured 15.7 s against 27-30 s for
    ``scipy.linalg.eigh`` (evr/evd/ev) at C = 4096 on this loaded 2-core
    machine, same eigenvalues to 2e-14. It is slower below ~1000 units, and
    absent from other BLAS builds: then ``scipy.linalg.eigh(eigvals_only)``.
    A symmetric C-order matrix is its own column-major transpose, so it is
    passed without a layout copy.
  * BLAS threads are pinned to one with ``threadpoolctl`` for every width
    (:data:`SOLVER_THREADS`): the tridiagonalisation makes many small
    synchronised BLAS calls. On the shared 2-core machine two threads were
    20-40x slower at C = 512 and 4.8x slower at C = 4096 (95.6 s against
    19.9 s wall for the two-stage driver at load 6-10); when idle they gain
    little at C = 512. A quiet many-core machine may prefer more.
  * No JAX here: the ``python -m pfa_jax.analyze`` path never imports it.
"""

import ctypes
import functools
import glob
import os
from collections.abc import Mapping

import numpy as np
import scipy
import scipy.linalg
import threadpoolctl

SOLVER_THREADS = 1
TWO_STAGE_MIN_C = 1024


@functools.cache
def _dsyevd_2stage():
  """LAPACKE_dsyevd_2stage of SciPy's bundled OpenBLAS, or None."""
  libdir = os.path.join(
    os.path.dirname(os.path.dirname(scipy.__file__)), 'scipy.libs'
  )
  for path in sorted(glob.glob(os.path.join(libdir, '*openblas*.so*'))):
    try:
      lib = ctypes.CDLL(path)
    except OSError:
      continue
    for prefix in ('scipy_', ''):
      fn = getattr(lib, f'{prefix}LAPACKE_dsyevd_2stage', None)
      if fn is not None and 'openblas64' not in path:  # 32-bit ints only
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_int, ctypes.c_char, ctypes.c_char]
        fn.argtypes += [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
        fn.argtypes += [ctypes.c_void_p]
        return fn
  return None


def eigvalsh(c: np.ndarray, *, overwrite: bool = False) -> np.ndarray:
  """Ascending eigenvalues of a symmetric float64 matrix (see decisions)."""
  n = c.shape[0]
  threads = threadpoolctl.threadpool_limits(SOLVER_THREADS, user_api='blas')
  fn = _dsyevd_2stage() if n >= TWO_STAGE_MIN_C else None
  with threads:
    if fn is not None:
      a = c if overwrite and c.flags.c_contiguous else np.array(c, order='C')
      w = np.empty(n, np.float64)
      # LAPACK_COL_MAJOR = 102; the lower triangle of a^T is a's upper.
      info = fn(102, b'N', b'L', n, a.ctypes.data, n, w.ctypes.data)
      if info == 0:
        return w
      if a is c:  # destroyed: nothing to retry on
        raise np.linalg.LinAlgError(f'dsyevd_2stage failed (info={info}).')
    return scipy.linalg.eigh(
      c, eigvals_only=True, check_finite=False, overwrite_a=overwrite
    )


def _name(name: str | None) -> str:
  return f'layer {name!r}' if name is not None else 'layer'


def spectrum(
  cov, *, name: str | None = None, overwrite: bool = False
) -> np.ndarray:
  """Returns the normalised, descending, non-negative eigenvalues of ``cov``.

  Args:
    cov: [C, C] symmetric covariance matrix (any float dtype, host or
      device array).
    name: layer name for error messages.
    overwrite: allow LAPACK to destroy ``cov`` (a float64 array the caller
      no longer needs), saving a [C, C] copy.

  Returns:
    float64 NumPy array lambda of length C, descending, lambda >= 0 and
    sum(lambda) == 1. A zero matrix gives ``[1, 0, ..., 0]``.

  Raises:
    ValueError: if ``cov`` is not square 2-D or has NaN/Inf values.

  References:
    Suau et al., PFA, WACV 2020, Sec. 3 (spectral energy of the responses).
  """
  c = np.asarray(cov, np.float64)
  if c.ndim != 2 or c.shape[0] != c.shape[1] or c.shape[0] < 1:
    raise ValueError(
      f'{_name(name)}: covariance must be a square [C, C] matrix, '
      f'got shape {c.shape}.'
    )
  if not np.all(np.isfinite(c)):
    raise ValueError(f'{_name(name)}: covariance contains NaN or Inf.')
  lam = eigvalsh(c, overwrite=overwrite and c is cov)
  lam = np.clip(lam[::-1], 0.0, None)
  total = lam.sum()
  if not total > 0.0:
    lam = np.zeros_like(lam)
    lam[0] = 1.0
    return lam
  return lam / total


def spectra(covs: Mapping[str, object]) -> dict[str, np.ndarray]:
  """Applies :func:`spectrum` to each layer of a covariance tree."""
  return {k: spectrum(v, name=k) for k, v in covs.items()}
