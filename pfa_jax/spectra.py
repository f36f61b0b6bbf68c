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
  * Driver: LAPACK's eigenvalue-only ``dsyevd`` from the OpenBLAS NumPy
    ships (:mod:`pfa_jax.openblas`; no SciPy, whose import is ~0.22 s of a
    cold ``analyze``), the two-stage ``dsyevd_2stage`` algorithm for C >=
    :data:`TWO_STAGE_MIN_C`: measured 15.7 s against 27-30 s for
    ``scipy.linalg.eigh`` (evr/evd/ev) at C = 4096 on a loaded 2-core
    machine, 3.0 s against 5.2-5.5 s for one-stage ``evd`` on a quiet one;
    same eigenvalues to 2e-14. It is slower below ~1000 units. A symmetric
    C-order matrix is its own column-major transpose, so it is passed without
    a layout copy. Where NumPy links another BLAS: ``numpy.linalg.eigvalsh``.
  * The two stages are called one by one (``dsytrd_sy2sb``, then
    ``dsytrd_sb2st`` + ``dsterf``; the same routines, band width and
    eigenvalues as ``dsyevd_2stage``) because only the first is
    multi-threaded: at C = 4096 the second leaves a core idle for ~0.55 s.
    ``alongside`` fills it (``analyze`` runs the selection's removal loop
    there); below :data:`TWO_STAGE_MIN_C` the whole single-threaded solve
    is the window. Without the LAPACK driver's scaling, the matrix is
    scaled by a power of two (exact) when its largest entry leaves
    [2^-400, 2^400].
  * Band width (:func:`band_width`): LAPACK's own (32) below
    :data:`WIDE_BAND_MIN_C`, 48 from there: at C = 4096 and 5120 it took
    4-9% off the solve (a wider band makes the BLAS-3 first stage faster
    and the serial second one slower; ``benchmarks/eig_levers.py``); at
    C = 2048 and 3072 it gained nothing, and 64 was no better than 48.
  * BLAS threads (:func:`solver_threads`): one below
    :data:`TWO_STAGE_MIN_C`; above, as many as there are idle cores right
    now. The tridiagonalisation makes many small synchronised BLAS calls, and
    OpenBLAS's spinning threads collapse when the cores are shared: on the
    2-core machine at load 6-10, two threads were 20-40x slower at C = 512
    and 4.8x slower at C = 4096 (95.6 s against 19.9 s). On the quiet
    machine two threads take C = 4096 from 3.0-3.4 s to 2.0-2.1 s and gain
    nothing at C = 512. :data:`SOLVER_THREADS` (an int) overrides the rule.
  * No JAX here: the ``python -m pfa_jax.analyze`` path never imports it.
"""

import functools
from collections.abc import Callable, Mapping
from concurrent import futures

import numpy as np

from pfa_jax import openblas

SOLVER_THREADS: int | None = None  # None: solver_threads()'s rule
TWO_STAGE_MIN_C = 1024
WIDE_BAND_MIN_C, WIDE_BAND = 4096, 48  # band width 48 from C = 4096
_SAFE = (2.0**-400, 2.0**400)  # LAPACK's drivers rescale outside ~2^+-480


def solver_threads(n: int) -> int:
  """BLAS threads for an ``n x n`` eigenvalue problem (see the decisions)."""
  if SOLVER_THREADS is not None:
    return SOLVER_THREADS
  return 1 if n < TWO_STAGE_MIN_C else openblas.free_cores()


def band_width(n: int) -> int:
  """The two-stage solver's band width at size ``n`` (see the decisions)."""
  if n >= WIDE_BAND_MIN_C:
    return max(WIDE_BAND, openblas.band_width(n))
  return openblas.band_width(n)


def eigvalsh(
  c: np.ndarray,
  *,
  overwrite: bool = False,
  alongside: Callable[[], object] | None = None,
) -> np.ndarray:
  """Ascending eigenvalues of a symmetric float64 matrix (see decisions).

  Args:
    c: [C, C] symmetric float64 matrix (only its upper triangle is read on
      the OpenBLAS path).
    overwrite: with a C-order ``c``, let LAPACK destroy it instead of a copy.
    alongside: a function of no arguments run on a second thread while the
      solver is single-threaded; its result is dropped, its exception
      raised here, and this returns after it has.

  Returns:
    float64 [C] eigenvalues, ascending.
  """
  a = c if overwrite and c.flags.c_contiguous else np.array(c, order='C')
  w, shift = _eigvalsh(a, max(float(a.max()), -float(a.min())), alongside)
  return np.ldexp(w, shift) if shift else w


def _eigvalsh(a: np.ndarray, amax: float, alongside) -> tuple[np.ndarray, int]:
  """Eigenvalues of ``a * 2**-shift`` and ``shift``.

  ``a``: C-order, destroyed; ``amax``: its largest |entry|.
  """
  n = a.shape[0]
  if not openblas.available():
    return _beside(lambda: np.linalg.eigvalsh(a), alongside), 0
  shift = 0  # a * 2**-shift has its largest |entry| in [0.5, 1)
  if 0.0 < amax and not _SAFE[0] <= amax <= _SAFE[1]:
    shift = int(np.frexp(amax)[1])
    np.ldexp(a, -shift, out=a)
  if n >= TWO_STAGE_MIN_C:
    with openblas.threads(solver_threads(n)):
      band = openblas.band_reduce_upper(a, band_width(n))
    solve = functools.partial(openblas.band_eigvalsh, band)
  else:
    solve = functools.partial(openblas.eigvalsh_upper, a)
  with openblas.threads(1):
    w = _beside(solve, alongside)
  return w, shift


def _beside(fn: Callable[[], np.ndarray], other: Callable[[], object] | None):
  """``fn()``, with ``other()`` on a second thread meanwhile."""
  if other is None:
    return fn()
  with futures.ThreadPoolExecutor(1) as pool:
    pending = pool.submit(other)
    try:
      out = fn()
    finally:
      pending.result()  # waits; raises other's exception
  return out


def _name(name: str | None) -> str:
  return f'layer {name!r}' if name is not None else 'layer'


def spectrum(
  cov,
  *,
  name: str | None = None,
  overwrite: bool = False,
  alongside: Callable[[], object] | None = None,
) -> np.ndarray:
  """Returns the normalised, descending, non-negative eigenvalues of ``cov``.

  Args:
    cov: [C, C] symmetric covariance matrix (any float dtype, host or
      device array).
    name: layer name for error messages.
    overwrite: allow LAPACK to destroy ``cov`` (a float64 array the caller
      no longer needs), saving a [C, C] copy.
    alongside: run on a second thread while the eigensolver is
      single-threaded (see :func:`eigvalsh`).

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
  hi, lo = float(c.max()), float(c.min())  # NaN propagates to both
  if not (np.isfinite(hi) and np.isfinite(lo)):
    raise ValueError(f'{_name(name)}: covariance contains NaN or Inf.')
  mine = overwrite and c is cov and c.flags.c_contiguous
  a = c if mine else np.array(c, order='C')
  lam, _ = _eigvalsh(a, max(hi, -lo), alongside)  # scale drops out below
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
