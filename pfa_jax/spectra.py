"""Covariance (tree) -> normalised eigenvalue spectrum (tree).

The PFA spectrum of a layer is the set of eigenvalues of its response
covariance, with negatives (round-off) clipped to 0, sorted in descending order
and normalised to sum to 1 (METHODS.md section 1, "Spectrum"). It is computed
on the host in float64 with LAPACK (``scipy.linalg.eigh(eigvals_only=True)``),
which is an order of magnitude faster than ``jnp.linalg.eigh`` on CPU for
wide layers.

Decision for a zero covariance (every unit dead/constant): the spectrum is the
Dirac ``[1, 0, ..., 0]``. All the information in the layer fits in one unit,
so every recipe (energy for any tau, KL, targets) keeps exactly one unit,
consistently. A uniform spectrum would instead make PFA-KL keep every dead
unit.

Performance note: for C <= 1024, LAPACK runs with one OpenBLAS thread (then
restored). The tridiagonalisation makes many small, synchronised BLAS calls;
on a loaded machine multi-threaded OpenBLAS was measured 20-40x slower for
C = 512 (0.6-12 s vs 0.025 s) and gains nothing when idle at this size.
"""

import contextlib
import ctypes
import functools
import glob
import os
from collections.abc import Mapping

import jax
import numpy as np
import scipy
import scipy.linalg

_SINGLE_THREAD_MAX_C = 1024


@functools.cache
def _scipy_openblas():
  """Returns (set_fn, get_fn) of SciPy's bundled OpenBLAS, or None."""
  libdir = os.path.join(
    os.path.dirname(os.path.dirname(scipy.__file__)), 'scipy.libs'
  )
  for path in sorted(glob.glob(os.path.join(libdir, '*openblas*.so*'))):
    try:
      lib = ctypes.CDLL(path)
    except OSError:
      continue
    for suffix in ('', '64_'):
      try:
        set_fn = getattr(lib, f'scipy_openblas_set_num_threads{suffix}')
        get_fn = getattr(lib, f'scipy_openblas_get_num_threads{suffix}')
      except AttributeError:
        continue
      set_fn.argtypes, set_fn.restype = [ctypes.c_int], None
      get_fn.argtypes, get_fn.restype = [], ctypes.c_int
      return set_fn, get_fn
  return None


@contextlib.contextmanager
def _blas_threads(num_threads: int):
  """Temporarily sets SciPy's OpenBLAS thread count (no-op if unknown)."""
  fns = _scipy_openblas()
  if fns is None:
    yield
    return
  set_fn, get_fn = fns
  old = get_fn()
  set_fn(num_threads)
  try:
    yield
  finally:
    set_fn(old)


def _name(name: str | None) -> str:
  return f'layer {name!r}' if name is not None else 'layer'


def spectrum(
  cov: jax.typing.ArrayLike, *, name: str | None = None
) -> np.ndarray:
  """Returns the normalised, descending, non-negative eigenvalues of ``cov``.

  Args:
    cov: [C, C] symmetric covariance matrix (any float dtype).
    name: layer name for error messages.

  Returns:
    float64 NumPy array lambda of length C, descending, lambda >= 0 and
    sum(lambda) == 1. A zero matrix gives ``[1, 0, ..., 0]``.

  Raises:
    ValueError: if ``cov`` is not square 2-D or has NaN/Inf values.

  References:
    Suau et al., PFA, WACV 2020, Sec. 3 (spectral energy of the responses).
  """
  c = np.asarray(jax.device_get(cov), np.float64)
  if c.ndim != 2 or c.shape[0] != c.shape[1] or c.shape[0] < 1:
    raise ValueError(
      f'{_name(name)}: covariance must be a square [C, C] matrix, '
      f'got shape {c.shape}.'
    )
  if not np.all(np.isfinite(c)):
    raise ValueError(f'{_name(name)}: covariance contains NaN or Inf.')
  threads = contextlib.nullcontext()
  if c.shape[0] <= _SINGLE_THREAD_MAX_C:
    threads = _blas_threads(1)
  with threads:
    lam = scipy.linalg.eigh(c, eigvals_only=True, check_finite=False)
  lam = np.clip(lam[::-1], 0.0, None)
  total = lam.sum()
  if not total > 0.0:
    lam = np.zeros_like(lam)
    lam[0] = 1.0
    return lam
  return lam / total


def spectra(covs: Mapping[str, jax.typing.ArrayLike]) -> dict[str, np.ndarray]:
  """Applies :func:`spectrum` to each layer of a covariance tree."""
  return {k: spectrum(v, name=k) for k, v in covs.items()}
