"""Optional native CPU kernels, built on first use, with a pure fallback.

:func:`build` compiles a kernel's source into a cached shared library; the
oneDNN convolutions (``onednn_conv.cc``) are loaded by :mod:`pfa_jax.onednn`.

:func:`syrk` returns the XLA FFI target of ``syrk_ffi.cc`` (an in-place,
BLAS xSYRK streaming Gram update for :mod:`pfa_jax.stats`), or None when it
cannot be had; callers then use :func:`jax.pure_callback` (one more copy of
the [C, C] matrix per batch) or plain XLA.

Decisions:
  * Built with the system C++ compiler (``$CXX`` or ``g++``) against the FFI
    headers jaxlib ships, at first use, into ``$PFA_JAX_NATIVE_DIR`` (default
    ``~/.cache/pfa_jax``), keyed by a hash of the source and the jaxlib
    version; ``python -m pfa_jax.native`` builds it ahead of time. Nothing is
    linked: the BLAS routine is the one SciPy exports
    (``scipy.linalg.cython_blas``), passed as a function-pointer attribute.
  * No compiler, a failed build or ``PFA_JAX_NATIVE=0`` -> None, silently
    (the reason is in :func:`status`).
  * A failed build is tried once per process: :func:`build` raises the
    first attempt's error again for the same sources and flags, rather than
    running the compiler (seconds) on every later call.
"""

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence

import jax
import jaxlib
import numpy as np

_SRC = os.path.join(os.path.dirname(__file__), 'syrk_ffi.cc')
_TARGETS = {
  np.dtype(np.float32): 'PfaSyrkF32',
  np.dtype(np.float64): 'PfaSyrkF64',
}
_BLAS = {np.dtype(np.float32): 'ssyrk', np.dtype(np.float64): 'dsyrk'}
_status = {'built': False, 'reason': 'not tried'}
# Output path -> the OSError message of this process's failed build of it.
_failed: dict[str, str] = {}


def status() -> dict:
  """Whether the native library is in use, and why not."""
  return dict(_status)


def _cache_dir() -> str:
  return os.environ.get('PFA_JAX_NATIVE_DIR') or os.path.join(
    os.path.expanduser('~'), '.cache', 'pfa_jax'
  )


def build(
  src: str | Sequence[str], stem: str, flags: tuple[str, ...] = ()
) -> str:
  """Compiles ``src`` (one or more C++ files) into a cached shared library.

  Args:
    src: the C++ source file, or several linked into one library.
    stem: the library's file name prefix.
    flags: extra compiler/linker arguments (include dirs, libraries); part
      of the cache key with the sources and the jaxlib version, and with the
      CPU's name and feature flags when they include ``-march=native``.

  Returns:
    The library's path.

  Raises:
    OSError: no compiler, or the build failed (its stderr in the message);
      a build that failed once in this process fails again at once.
  """
  srcs = (src,) if isinstance(src, str) else tuple(src)
  key = jaxlib.__version__.encode() + ' '.join(flags).encode()
  for path in srcs:
    with open(path, 'rb') as f:
      key += f.read()
  if '-march=native' in flags:
    key += _cpu_fingerprint()
  key = hashlib.sha256(key).hexdigest()
  out = os.path.join(_cache_dir(), f'{stem}_{key[:16]}.so')
  if os.path.exists(out):
    return out
  if out in _failed:
    raise OSError(_failed[out])
  try:
    return _compile(srcs, flags, out)
  except OSError as e:
    _failed[out] = str(e)
    raise


def _compile(srcs: tuple[str, ...], flags: tuple[str, ...], out: str) -> str:
  cxx = os.environ.get('CXX') or shutil.which('g++') or shutil.which('c++')
  if not cxx:
    raise OSError('no C++ compiler (set CXX or install g++)')
  os.makedirs(os.path.dirname(out), exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix='.so', dir=os.path.dirname(out))
  os.close(fd)
  cmd = [cxx, '-O2', '-std=c++17', '-shared', '-fPIC', '-w']
  cmd += ['-I', jax.ffi.include_dir(), *srcs, '-o', tmp, *flags]
  try:
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    os.replace(tmp, out)  # atomic: concurrent builders agree
  except subprocess.CalledProcessError as e:
    raise OSError(f'{" ".join(cmd)} failed:\n{e.stderr[-2000:]}') from e
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return out


def _cpu_fingerprint() -> bytes:
  """The CPU's model name and feature flags (a ``-march=native`` build's key)."""
  try:
    with open('/proc/cpuinfo', 'rb') as f:
      lines = f.read().splitlines()
  except OSError:
    import platform  # noqa: PLC0415

    return platform.processor().encode()
  wanted = (b'model name', b'flags', b'Features', b'CPU part')
  return b'\n'.join(sorted({ln for ln in lines if ln.startswith(wanted)}))


def _capsule_pointer(capsule) -> int:
  get_name = ctypes.pythonapi.PyCapsule_GetName
  get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
  get_ptr = ctypes.pythonapi.PyCapsule_GetPointer
  get_ptr.restype = ctypes.c_void_p
  get_ptr.argtypes = [ctypes.py_object, ctypes.c_char_p]
  return int(get_ptr(capsule, get_name(capsule)))


@functools.cache
def _load():
  if os.environ.get('PFA_JAX_NATIVE', '1') == '0':
    raise OSError('disabled by PFA_JAX_NATIVE=0')
  from scipy.linalg import cython_blas  # noqa: PLC0415

  lib = ctypes.cdll.LoadLibrary(build(_SRC, 'libpfa_syrk'))
  targets = {}
  for dtype, sym in _TARGETS.items():
    name = f'pfa_jax_{sym}'
    jax.ffi.register_ffi_target(
      name, jax.ffi.pycapsule(getattr(lib, sym)), platform='cpu'
    )
    fn = _capsule_pointer(cython_blas.__pyx_capi__[_BLAS[dtype]])
    targets[dtype] = (name, fn)
  return targets


def syrk(dtype) -> tuple[str, int] | None:
  """(FFI target name, BLAS function pointer) for ``dtype``, or None."""
  try:
    targets = _load()
  except (OSError, AttributeError, KeyError) as e:
    _status.update(built=False, reason=str(e))
    return None
  _status.update(built=True, reason='')
  return targets.get(np.dtype(dtype))
