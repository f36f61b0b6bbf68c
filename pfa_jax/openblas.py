"""The host BLAS/LAPACK calls NumPy does not expose, from NumPy's own OpenBLAS.

The host path of PFA (``python -m pfa_jax.analyze``, :mod:`pfa_jax.spectra`)
needs three routines NumPy has but does not export: SSYRK (``x^T x`` at half
a GEMM's FLOPs), LAPACK's eigenvalue-only ``dsyevd`` / ``dsyevd_2stage``, and
the BLAS thread count. NumPy's wheels link one OpenBLAS (ILP64, symbols
``scipy_<name>64_``), already loaded by ``import numpy``; this module binds
those symbols with :mod:`ctypes`.

Decision: not SciPy. ``import scipy.linalg`` costs ~0.22 s of a cold process
(measured with ``-X importtime``: it pulls ``numpy.f2py`` and SciPy's array-API
layer), a third of the ``analyze`` target (issue 12, section 0). Where NumPy
links another BLAS (a source build, MKL), :func:`available` is False and the
callers use plain NumPy: ``x.T @ x`` and ``numpy.linalg.eigvalsh``, the same
results at more cost.
"""

import contextlib
import ctypes
import functools
import glob
import os

import numpy as np

_ROW_MAJOR, _COL_MAJOR, _UPPER, _TRANS = 101, 102, 121, 112
_I64 = ctypes.c_int64
_PTR = ctypes.c_void_p


class _Lib:
  """The bound symbols of one ILP64 OpenBLAS."""

  def __init__(self, lib: ctypes.CDLL):
    self.cdll = lib  # every other symbol (benchmarks/eig_levers.py)
    self.ssyrk = lib.scipy_cblas_ssyrk64_
    self.ssyrk.restype = None
    self.ssyrk.argtypes = [ctypes.c_int] * 3 + [_I64, _I64, ctypes.c_float]
    self.ssyrk.argtypes += [_PTR, _I64, ctypes.c_float, _PTR, _I64]
    self.dsyevd = lib.scipy_LAPACKE_dsyevd64_
    self.dsyevd_2stage = lib.scipy_LAPACKE_dsyevd_2stage64_
    for fn in (self.dsyevd, self.dsyevd_2stage):
      fn.restype = _I64
      fn.argtypes = [ctypes.c_int, ctypes.c_char, ctypes.c_char, _I64, _PTR]
      fn.argtypes += [_I64, _PTR]
    self.get_threads = lib.scipy_openblas_get_num_threads64_
    self.get_threads.restype = ctypes.c_int
    self.set_threads = lib.scipy_openblas_set_num_threads64_
    self.set_threads.argtypes = [ctypes.c_int]
    self.set_threads.restype = None


@functools.cache
def _lib() -> _Lib | None:
  libdir = os.path.join(
    os.path.dirname(os.path.dirname(np.__file__)), 'numpy.libs'
  )
  for path in sorted(glob.glob(os.path.join(libdir, '*openblas64*.so*'))):
    try:
      return _Lib(ctypes.CDLL(path))
    except (OSError, AttributeError):
      continue
  return None


def available() -> bool:
  """Whether NumPy's bundled OpenBLAS (and so this module's fast path) is here."""
  return _lib() is not None


@contextlib.contextmanager
def threads(n: int | None):
  """Runs the block with ``n`` OpenBLAS threads (``None``: unchanged)."""
  lib = _lib()
  if lib is None or n is None:
    yield
    return
  before = lib.get_threads()
  lib.set_threads(int(n))
  try:
    yield
  finally:
    lib.set_threads(before)


def free_cores() -> int:
  """Cores no other runnable task wants right now (at least 1).

  An instantaneous count (``procs_running`` of ``/proc/stat``, which includes
  the caller), not the load average: the 1-minute average still shows a
  process that ended seconds ago.
  """
  cpus = len(os.sched_getaffinity(0))
  try:
    with open('/proc/stat') as f:
      running = next(
        int(line.split()[1]) for line in f if line.startswith('procs_running')
      )
  except (OSError, StopIteration, ValueError):
    running = 1 + int(os.getloadavg()[0])
  return max(1, min(cpus, cpus - (running - 1)))


def syrk_upper(z: np.ndarray) -> np.ndarray:
  """``z^T z`` of a C-order float32 (M, C) matrix; only the upper triangle.

  Returns a C-order float32 [C, C] array whose upper triangle (diagonal
  included) holds the product; the strict lower triangle is 0, or the
  mirror where NumPy has another BLAS.
  """
  z = np.ascontiguousarray(z, np.float32)
  m, c = z.shape
  lib = _lib()
  if lib is None:
    return z.T @ z
  g = np.zeros((c, c), np.float32)  # calloc: the lower triangle stays 0
  lib.ssyrk(
    _ROW_MAJOR,
    _UPPER,
    _TRANS,
    c,
    m,
    1.0,
    z.ctypes.data,
    c,
    0.0,
    g.ctypes.data,
    c,
  )
  return g


def eigvalsh_upper(a: np.ndarray, *, two_stage: bool) -> np.ndarray | None:
  """Ascending eigenvalues of the symmetric matrix in ``a``'s upper triangle.

  ``a`` is a float64 [C, C] array with unit column stride and any row stride
  of at least C (a view of a padded [C, LDA] buffer); LAPACK destroys it.
  A C-order upper triangle is the column-major lower one, so no layout copy
  is made, and the row stride is LAPACK's leading dimension.
  Returns None where the library is absent (the caller falls back).

  Raises:
    ValueError: for another dtype, shape or layout.
    numpy.linalg.LinAlgError: if LAPACK reports a failure.
  """
  lib = _lib()
  if lib is None:
    return None
  if not lapack_layout(a):
    raise ValueError(
      'eigvalsh_upper needs a float64 square matrix with unit column stride '
      f'and a row stride of at least its size, got {a.dtype} {a.shape} with '
      f'strides {a.strides}.'
    )
  n = a.shape[0]
  w = np.empty(n, np.float64)
  fn = lib.dsyevd_2stage if two_stage else lib.dsyevd
  lda = max(1, a.strides[0] // 8)
  info = fn(_COL_MAJOR, b'N', b'L', n, a.ctypes.data, lda, w.ctypes.data)
  if info != 0:
    name = 'dsyevd_2stage' if two_stage else 'dsyevd'
    raise np.linalg.LinAlgError(f'LAPACK {name} failed (info={info}).')
  return w


def lapack_layout(a: np.ndarray) -> bool:
  """Whether :func:`eigvalsh_upper` can take ``a`` in place (see there)."""
  if a.dtype != np.float64 or a.ndim != 2 or a.shape[0] != a.shape[1]:
    return False
  rows, cols = a.strides
  return (
    a.flags.writeable
    and a.flags.aligned
    and cols == 8
    and rows % 8 == 0
    and rows >= 8 * a.shape[0]
  )
