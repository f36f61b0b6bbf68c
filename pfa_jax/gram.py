"""The packed streaming Gram update behind :mod:`pfa_jax.stats`.

``gram`` [C, C] holds the current group of batches' ``sum y y^T`` in its
upper triangle (diagonal included) and the folded groups in its strict lower
triangle plus ``diag`` [C]; see :class:`pfa_jax.stats.CovState`.
:func:`gram_add` adds ``y^T y`` to the upper triangle and, when ``fold`` is
set, moves the upper triangle into the lower one.

Decision: on CPU the product is BLAS xSYRK (half a GEMM's FLOPs). XLA:CPU's
own dot reached ~26 GFLOP/s here against OpenBLAS's ~70-110. The preferred
route is the in-place FFI kernel of :mod:`pfa_jax.native` (``gram``/``diag``
alias the outputs: no copy when the caller donates the state); without a
compiler it is :func:`jax.pure_callback` into SciPy's ``ssyrk`` (one more
[C, C] copy per batch). Other backends use ``dot_general`` + XLA ops.
"""

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg.blas
from jax import lax

from pfa_jax import native

# Below this many units a single-threaded SSYRK costs < 1 ms per batch of
# 256; wider layers keep BLAS's threads (the 4096-unit stream needs them).
SERIAL_BLAS_BELOW = 2048


@contextlib.contextmanager
def blas_threads_for(widths):
  """Runs a statistics loop with the BLAS threads its widths call for.

  After each SSYRK, OpenBLAS's idle threads spin on the cores, and the
  convolutions of the next forward pass run beside them (measured, VGG-16
  statistics pass on 2 cores: +18-23% over the plain forward pass with
  OpenBLAS's threads, -13% with one). When every layer is narrower than
  ``SERIAL_BLAS_BELOW`` the loop runs SSYRK on the calling thread; otherwise
  BLAS keeps its own setting. A host-side setting: use it around the loop,
  never inside jit.
  """
  import threadpoolctl  # noqa: PLC0415  (host-only dependency)

  serial = max(widths, default=0) < SERIAL_BLAS_BELOW
  with threadpoolctl.threadpool_limits(
    limits=1 if serial else None, user_api='blas'
  ):
    yield


def _syrk_host(g, d, y, fold):
  """Host BLAS: ``upper(g) += y^T y``, then folds upper into lower if asked."""
  g, d, y = np.asarray(g), np.asarray(d), np.asarray(y)
  # C-order upper == Fortran-order lower of the transpose: no layout copies.
  out = np.array(g.T, order='F')
  blas = scipy.linalg.blas
  syrk = blas.dsyrk if g.dtype == np.float64 else blas.ssyrk
  if y.shape[0]:
    out = syrk(1.0, y.T, beta=1.0, c=out, trans=0, lower=1, overwrite_c=1)
  out = out.T  # C-contiguous view
  d = np.array(d)
  if bool(fold):
    d += np.diagonal(out)
    for i in range(0, out.shape[0], 256):  # lower += upper^T, upper = 0
      blk = out[i : i + 256, i:]
      out[i:, i : i + 256] += np.triu(blk, 1).T
      blk[...] = np.tril(blk, -1)
  return out, d


def _gram_add_blas(g, d, y, fold, axis_name=None):
  y = jnp.asarray(y, g.dtype)
  shapes = (
    jax.ShapeDtypeStruct(g.shape, g.dtype),
    jax.ShapeDtypeStruct(d.shape, d.dtype),
  )
  target = native.syrk(g.dtype)
  if target is not None:  # in place: gram and diag alias the outputs
    name, fn = target
    out = jax.ffi.ffi_call(
      name, shapes, input_output_aliases={0: 0, 1: 1}, vmap_method='sequential'
    )(g, d, y, fold, fn=np.int64(fn))
  else:
    out = jax.pure_callback(
      _syrk_host, shapes, g, d, y, fold, vmap_method='sequential'
    )
  if axis_name is not None:
    # Inside shard_map the per-shard result varies over the mapped axis.
    out = lax.pcast(out, axis_name, to='varying')
  return out


def fold_xla(g, d, p, fold):
  """Packed ``upper(g) += upper(p)``, then the fold, with XLA ops."""
  lo = jnp.triu(g) + jnp.triu(p)
  hi = jnp.tril(g, -1)
  d = jnp.where(fold, d + jnp.diagonal(lo), d)
  return jnp.where(fold, hi + jnp.triu(lo, 1).T, hi + lo), d


def _gram_add_xla(g, d, y, fold, precision, axis_name=None):
  del axis_name
  p = lax.dot_general(y, y, (((0,), (0,)), ((), ())), precision=precision)
  return fold_xla(g, d, p, fold)


def gram_add(
  g: jax.Array,
  d: jax.Array,
  y: jax.Array,
  fold: jax.Array,
  precision=lax.Precision.HIGHEST,
  *,
  axis_name: str | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Packed Gram update ``(gram, gram_diag)``; BLAS SSYRK on CPU, else XLA."""
  return lax.platform_dependent(
    g,
    d,
    y,
    fold,
    cpu=functools.partial(_gram_add_blas, axis_name=axis_name),
    default=functools.partial(
      _gram_add_xla, precision=precision, axis_name=axis_name
    ),
  )
