"""Host memory: keep freed buffers mapped, so CPU steps do not page-fault.

XLA:CPU allocates every execution's temporary and output buffers with
``malloc`` and frees them after. glibc serves large blocks, and every block
on a non-main arena (XLA's worker threads each get one), from fresh
``mmap``s that go back to the kernel on ``free``, so each training step
touches its whole working set as new pages: for ResNet-56 at batch 128,
134,732 page faults (552 MB zeroed) per step (``benchmarks/native_levers.py``).
:func:`retain_freed_memory` sets glibc's ``mallopt`` so that freed memory
stays in the process for reuse: one arena, no ``mmap`` chunks, no trimming.

Decisions:
  * Called at the edges (``pfa_jax.main``, the experiment runners, the
    benchmarks) before the first JAX computation, since ``M_ARENA_MAX``
    only affects threads that have not yet allocated. Library users call it
    first thing (README, "CPU performance").
  * The cost: the process's resident memory does not shrink after a peak.
    ``PFA_JAX_RETAIN_MEMORY=0`` turns it off.
  * glibc only (``mallopt`` with these parameters); elsewhere it does
    nothing and returns False. ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``
    (set before the process starts) is an alternative with a similar effect
    here: 2 MiB pages make the faults 512x fewer.
"""

import ctypes
import functools
import os
import platform

# glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_SETTINGS = (
  (_M_ARENA_MAX, 1),
  (_M_MMAP_MAX, 0),
  (_M_TRIM_THRESHOLD, 2**31 - 1),
)


@functools.cache
def retain_freed_memory() -> bool:
  """Makes glibc keep freed memory for reuse; True if it was applied.

  Idempotent. Does nothing (False) off Linux/glibc or with
  ``PFA_JAX_RETAIN_MEMORY=0``.
  """
  if os.environ.get('PFA_JAX_RETAIN_MEMORY', '1') == '0':
    return False
  if platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc':
    return False
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  return all(mallopt(param, value) == 1 for param, value in _SETTINGS)
