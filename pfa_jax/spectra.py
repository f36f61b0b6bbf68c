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
    cold ``analyze``), two-stage ``dsyevd_2stage`` for C >=
    :data:`TWO_STAGE_MIN_C`: measured 15.7 s against 27-30 s for
    ``scipy.linalg.eigh`` (evr/evd/ev) at C = 4096 on a loaded 2-core
    machine, 3.0 s against 5.2-5.5 s for one-stage ``evd`` on a quiet one;
    same eigenvalues to 2e-14. It is slower below ~1000 units. A symmetric
    C-order matrix is its own column-major transpose, so it is passed without
    a layout copy. Where NumPy links another BLAS: ``numpy.linalg.eigvalsh``.
  * BLAS threads (:func:`solver_threads`): one below
    :data:`TWO_STAGE_MIN_C`; above, as many as there are idle cores right
    now. The tridiagonalisation makes many small synchronised BLAS calls, and
    OpenBLAS's spinning threads collapse when the cores are shared: on the
    2-core machine at load 6-10, two threads were 20-40x slower at C = 512
    and 4.8x slower at C = 4096 (95.6 s against 19.9 s). On the quiet
    machine two threads take C = 4096 from 3.0-3.4 s to 2.0-2.1 s and gain
    nothing at C = 512. :data:`SOLVER_THREADS` (an int) overrides the rule.
  * Leading dimension: from :data:`TWO_STAGE_MIN_C` units on, where C is a
    multiple of :data:`PAD_MULTIPLE` (64), the matrix LAPACK works on has rows :data:`LDA_PAD`
    float64s longer than it is wide (:func:`square`: a view of a
    [C, C + 8] buffer). The reduction to a band walks columns whose stride,
    a multiple of 512 bytes, maps them to a few cache sets. Padded,
    ``dsyevd_2stage`` took 0.91x the time at C = 4096 and 0.93x at
    C = 2048, and 1.01x at C = 3000 (7 alternating pairs each,
    ``benchmarks/results/eig_lda_pad_c*.json``). :func:`eigvalsh` takes a
    matrix in place when its layout allows (:func:`openblas.lapack_layout`)
    and otherwise copies it into a :func:`square`.
  * A covariance whose largest entry leaves [2^-400, 2^400] is scaled by a
    power of two first: the spectrum is scale-free, and at 2^1017 the
    largest eigenvalues themselves overflow (NaN spectrum before).
  * No JAX here: the ``python -m pfa_jax.analyze`` path never imports it.
"""

from collections.abc import Mapping

import numpy as np

from pfa_jax import openblas

SOLVER_THREADS: int | None = None  # None: solver_threads()'s rule
TWO_STAGE_MIN_C = 1024
LDA_PAD = 8  # float64s added to each row where lda() pads:
PAD_MULTIPLE = 64  # at C >= TWO_STAGE_MIN_C, multiples of this
_SAFE = (2.0**-400, 2.0**400)  # spectrum() rescales outside


def solver_threads(n: int) -> int:
  """BLAS threads for an ``n x n`` eigenvalue problem (see the decisions)."""
  if SOLVER_THREADS is not None:
    return SOLVER_THREADS
  return 1 if n < TWO_STAGE_MIN_C else openblas.free_cores()


def lda(n: int) -> int:
  """The leading dimension (row length) LAPACK gets for ``n`` units."""
  return n + LDA_PAD if n >= TWO_STAGE_MIN_C and n % PAD_MULTIPLE == 0 else n


def square(n: int, buffer: np.ndarray | None = None) -> np.ndarray | None:
  """An uninitialised float64 [n, n] matrix with rows :func:`lda` long.

  With ``buffer`` (a C-contiguous, writeable, aligned array of any dtype)
  the matrix is a view of its memory, or None where it does not fit; the
  padded rows are given up before the buffer is.
  """
  if buffer is None:
    return np.empty((n, lda(n)))[:, :n]
  if not (buffer.flags.c_contiguous and buffer.flags.writeable):
    return None
  flat = buffer.reshape(-1).view(np.uint8)
  if flat.ctypes.data % 8:
    return None
  for row in (lda(n), n):  # padded rows if they fit, else unpadded
    if flat.size >= 8 * n * row:
      return flat[: 8 * n * row].view(np.float64).reshape(n, row)[:, :n]
  return None


def eigvalsh(c: np.ndarray, *, overwrite: bool = False) -> np.ndarray:
  """Ascending eigenvalues of a symmetric float64 matrix (see decisions).

  With ``overwrite`` ``c`` is destroyed instead of copied where its layout
  lets LAPACK take it in place (unit column stride, rows at least n long).
  """
  n = c.shape[0]
  if overwrite and openblas.lapack_layout(c):
    a = c
  else:
    a = square(n)
    a[...] = c
  with openblas.threads(solver_threads(n)):
    w = openblas.eigvalsh_upper(a, two_stage=n >= TWO_STAGE_MIN_C)
    if w is None:
      w = np.linalg.eigvalsh(a)
  return w


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
  hi, lo = float(c.max()), float(c.min())  # NaN propagates to both
  if not (np.isfinite(hi) and np.isfinite(lo)):
    raise ValueError(f'{_name(name)}: covariance contains NaN or Inf.')
  mine = overwrite and c is cov  # LAPACK may destroy c
  amax = max(hi, -lo)
  if amax > 0.0 and not _SAFE[0] <= amax <= _SAFE[1]:
    # The spectrum is scale-free: a power of two (exact) keeps the largest
    # eigenvalues representable (LAPACK's own scaling would hand them back
    # as inf, and inf / inf = NaN).
    c, mine = np.ldexp(c, -int(np.frexp(amax)[1])), True
  lam = eigvalsh(c, overwrite=mine)
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
