"""The host BLAS/LAPACK calls NumPy does not expose, from NumPy's own OpenBLAS.

The host path of PFA (``python -m pfa_jax.analyze``, :mod:`pfa_jax.spectra`)
needs routines NumPy has but does not export: SSYRK (``x^T x`` at half a
GEMM's FLOPs), LAPACK's eigenvalue-only ``dsyevd`` and the stages of
``dsyevd_2stage`` (called one by one: the first uses every core, the rest
one), and the BLAS thread count. NumPy's wheels link one OpenBLAS (ILP64, symbols
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
    self.dsyevd.restype = _I64
    self.dsyevd.argtypes = [ctypes.c_int, ctypes.c_char, ctypes.c_char, _I64]
    self.dsyevd.argtypes += [_PTR, _I64, _PTR]
    # The stages of dsyevd_2stage (Fortran: every argument by reference,
    # hidden string lengths last), so that callers see where the solver
    # stops using every core.
    self.ilaenv2stage = lib.scipy_ilaenv2stage_64_
    self.ilaenv2stage.restype = _I64
    self.dsytrd_sy2sb = lib.scipy_dsytrd_sy2sb_64_
    self.dsytrd_sb2st = lib.scipy_dsytrd_sb2st_64_
    self.dsterf = lib.scipy_dsterf_64_
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


def eigvalsh_upper(a: np.ndarray) -> np.ndarray | None:
  """Ascending eigenvalues of the symmetric matrix in ``a``'s upper triangle.

  LAPACK's one-stage ``dsyevd``, eigenvalues only. ``a`` is a C-order
  float64 [C, C] array; LAPACK destroys it. A C-order upper triangle is the
  column-major lower one, so no layout copy is made. Returns None where the
  library is absent (the caller falls back).

  Raises:
    numpy.linalg.LinAlgError: if LAPACK reports a failure.
  """
  lib = _lib()
  if lib is None:
    return None
  _check_square64(a)
  n = a.shape[0]
  w = np.empty(n, np.float64)
  info = lib.dsyevd(_COL_MAJOR, b'N', b'L', n, a.ctypes.data, n, w.ctypes.data)
  _check_info('dsyevd', info)
  return w


def band_width(n: int) -> int:
  """LAPACK's own band width for ``dsyevd_2stage`` at size ``n``."""
  lib = _lib()
  if lib is None:
    raise RuntimeError("band_width needs NumPy's bundled OpenBLAS.")
  name = b'DSYTRD_2STAGE'
  return int(
    lib.ilaenv2stage(
      _ref(1), name, b'N', _ref(n), _ref(-1), _ref(-1), _ref(-1),
      _I64(len(name)), _I64(1)
    )
  )  # fmt: skip


def band_reduce_upper(a: np.ndarray, kd: int | None = None) -> np.ndarray:
  """Stage 1 of ``dsyevd_2stage``: ``a``'s upper triangle to a band matrix.

  LAPACK ``dsytrd_sy2sb``: blocked Householder reflections, BLAS-3, so it
  uses every OpenBLAS thread. ``a`` (C-order float64 [n, n], destroyed) is
  read as the column-major lower triangle. Returns the [n, kd + 1] band
  (LAPACK's lower band storage, one column per row of this array) for
  :func:`band_eigvalsh`. ``kd`` defaults to :func:`band_width`.
  """
  lib = _lib()
  if lib is None:
    raise RuntimeError("band_reduce_upper needs NumPy's bundled OpenBLAS.")
  _check_square64(a)
  n = a.shape[0]
  kd = band_width(n) if kd is None else int(kd)
  ab, tau, q, info = np.zeros((n, kd + 1)), np.empty(n), np.zeros(1), _I64(0)
  head = (b'L', _ref(n), _ref(kd), _ptr(a), _ref(n), _ptr(ab), _ref(kd + 1))
  head += (_ptr(tau),)
  tail = (ctypes.byref(info), _I64(1))
  lib.dsytrd_sy2sb(*head, _ptr(q), _ref(-1), *tail)  # workspace query
  work = _workspace(q)
  lib.dsytrd_sy2sb(*head, _ptr(work), _ref(work.size), *tail)
  _check_info('dsytrd_sy2sb', info.value)
  return ab


def band_eigvalsh(ab: np.ndarray) -> np.ndarray:
  """Stage 2 of ``dsyevd_2stage``: ascending eigenvalues of the band matrix.

  LAPACK ``dsytrd_sb2st`` (bulge chasing to tridiagonal) then ``dsterf``
  (Pal-Walker-Kahan QR, eigenvalues only); both single-threaded in this
  OpenBLAS. ``ab`` is :func:`band_reduce_upper`'s result (destroyed).
  """
  lib = _lib()
  if lib is None:
    raise RuntimeError("band_eigvalsh needs NumPy's bundled OpenBLAS.")
  n, ldab = ab.shape
  d, e, info = np.empty(n), np.empty(max(n - 1, 1)), _I64(0)
  head = (b'Y', b'N', b'L', _ref(n), _ref(ldab - 1), _ptr(ab), _ref(ldab))
  head += (_ptr(d), _ptr(e))
  tail = (ctypes.byref(info), _I64(1), _I64(1), _I64(1))
  qh, qw = np.zeros(1), np.zeros(1)
  lib.dsytrd_sb2st(*head, _ptr(qh), _ref(-1), _ptr(qw), _ref(-1), *tail)
  hous, work = _workspace(qh), _workspace(qw)
  lib.dsytrd_sb2st(
    *head, _ptr(hous), _ref(hous.size), _ptr(work), _ref(work.size), *tail
  )
  _check_info('dsytrd_sb2st', info.value)
  lib.dsterf(_ref(n), _ptr(d), _ptr(e), ctypes.byref(info))
  _check_info('dsterf', info.value)
  return d  # dsterf sorts ascending


def _workspace(query: np.ndarray) -> np.ndarray:
  """The float64 workspace a LAPACK size query (lwork = -1) asked for."""
  return np.empty(max(1, int(query[0])))


def _ref(v: int):
  return ctypes.byref(_I64(v))


def _ptr(a: np.ndarray):
  return ctypes.c_void_p(a.ctypes.data)


def _check_square64(a: np.ndarray):
  if (
    a.dtype != np.float64
    or not a.flags.c_contiguous
    or a.ndim != 2
    or a.shape[0] != a.shape[1]
  ):
    raise ValueError('LAPACK here needs a C-order float64 square matrix.')


def _check_info(name: str, info: int):
  if info != 0:
    raise np.linalg.LinAlgError(f'LAPACK {name} failed (info={info}).')
