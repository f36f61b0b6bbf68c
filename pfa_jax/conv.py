"""A 2-D convolution that trains fast on the XLA:CPU backend.

`conv_general_dilated` is a drop-in replacement for `lax.conv_general_dilated`
(same signature, same function) that can be handed to
`flax.linen.Conv(conv_general_dilated=...)`. For the cases our models use
(NHWC input, HWIO kernel, any strides, 'SAME'/'VALID'/explicit padding, no
dilation, one feature group) it routes through a `jax.custom_vjp`:

* Weight gradient: an im2col matrix product, computed in batch chunks inside a
  `lax.scan` so that each chunk's patch matrix stays in the last-level cache.
  XLA:CPU's own weight-gradient convolution runs 3-10x slower than the
  forward pass on CIFAR-sized layers; memory bandwidth on small CPU hosts is
  low (~2 GB/s here), so one whole-batch im2col would be slow as well.
* Forward and input gradient: XLA's convolution (Eigen), except on small
  output maps (`SMALL_MAP_FWD` = 2x2 for the forward, `SMALL_MAP` = 4x4 for
  the input gradient), where XLA's convolution is pathological (a 3x3 conv on a 2x2 map with 512 channels takes seconds)
  and an im2col GEMM is used instead.

With the batch explicitly sharded (jit + `NamedSharding` on an Explicit mesh,
`jax.make_mesh`'s default) the weight gradient is one whole-batch GEMM per
device (`lax.scan` cannot scan a sharded axis) with a replicated result; a
sharded kernel leaves the weight gradient to XLA.

Anything else (dilation, groups, batch groups, other layouts, non-float or
mixed dtypes, `preferred_element_type`) falls back to `lax.conv_general_dilated`.

`get_conv(impl)` picks an implementation by name: 'xla', 'fast', 'onednn'
(`pfa_jax.onednn`: oneDNN primitives through XLA's FFI, this module's path
where the kernel is not available) or 'auto': on the CPU backend 'onednn'
when its kernel is available and there is one device, else 'fast'; 'xla' on
GPU/TPU. With several devices (data parallelism on an Auto mesh) XLA's
partitioner would replicate the oneDNN custom call, so 'fast' stays.
Measured (benchmarks/results/train_throughput.json): 'onednn' trains and
evaluates SimpleCNN, VGG-16 and ResNet-56 faster than 'fast'.

Example:
  >>> import flax.linen as nn
  >>> layer = nn.Conv(8, (3, 3), conv_general_dilated=get_conv('auto'))
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

# Output maps with at most this many pixels use an im2col GEMM for the input
# gradient (4x4 and smaller) and, up to SMALL_MAP_FWD, in the forward pass
# (2x2 and smaller: at 4x4x512 XLA's forward is faster, conv_layers.json).
SMALL_MAP = 16
SMALL_MAP_FWD = 4
# Target size of one chunk's patch matrix in the weight gradient. Fits the
# last-level cache (32 MiB L3 shared here) with room for the operands.
CHUNK_BYTES = 4 * 2**20

_NHWC_SPECS = lax.conv_dimension_numbers(
  (1, 1, 1, 1), (1, 1, 1, 1), ('NHWC', 'HWIO', 'NHWC')
)

Padding = tuple[tuple[int, int], ...]


def _im2col(
  x: jax.Array,  # [N, H, W, C]
  window: tuple[int, int],
  strides: tuple[int, int],
  pads: Padding,
) -> jax.Array:
  """Patches [N, Ho, Wo, KH*KW*C], ordered (kh, kw, c) like a HWIO kernel."""
  kh, kw = window
  sh, sw = strides
  (pt, pb), (pl, pr) = pads
  if any(pads[0] + pads[1]):
    x = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  n, h, w, c = x.shape
  ho = (h - kh) // sh + 1
  wo = (w - kw) // sw + 1
  cols = [
    lax.slice(
      x,
      (0, i, j, 0),
      (n, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, c),
      (1, sh, sw, 1),
    )
    for i in range(kh)
    for j in range(kw)
  ]
  return cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)


def _out_hw(
  x_shape: Sequence[int],
  window: tuple[int, int],
  strides: tuple[int, int],
  pads: Padding,
) -> tuple[int, int]:
  ho = (x_shape[1] + sum(pads[0]) - window[0]) // strides[0] + 1
  wo = (x_shape[2] + sum(pads[1]) - window[1]) // strides[1] + 1
  return ho, wo


def _lax_conv(x, w, strides, pads, precision):
  return lax.conv_general_dilated(
    x, w, strides, pads, dimension_numbers=_NHWC_SPECS, precision=precision
  )


def _gemm_conv(x, w, strides, pads, precision):
  """Forward conv as one im2col GEMM over the whole batch."""
  kh, kw, cin, cout = w.shape
  patches = _im2col(x, (kh, kw), strides, pads)  # [N, Ho, Wo, K]
  return lax.dot_general(
    patches,
    w.reshape(kh * kw * cin, cout),
    (((3,), (0,)), ((), ())),
    precision=precision,
  )


def _chunk_size(n: int, rows_per_item: int, k: int, itemsize: int) -> int:
  """Largest divisor of n whose patch matrix fits in CHUNK_BYTES (>= 1)."""
  best = 1
  for b in range(1, n + 1):
    if n % b == 0 and b * rows_per_item * k * itemsize <= CHUNK_BYTES:
      best = b
  return best


def _sharding_spec(x: jax.Array):
  """x's PartitionSpec in its type (explicit sharding), or None."""
  return getattr(getattr(jax.typeof(x), 'sharding', None), 'spec', None)


def _batch_sharded(x: jax.Array) -> bool:
  spec = _sharding_spec(x)
  return bool(spec) and spec[0] is not None


def _weight_grad(x, w, g, strides, pads, precision):
  """dL/dW [KH, KW, Cin, Cout] as chunked im2col(x)^T @ g."""
  n, _, _, cin = x.shape
  kh, kw, _, cout = w.shape
  _, ho, wo, _ = g.shape
  k = kh * kw * cin
  dims = (((0,), (0,)), ((), ()))
  out_sharding = None
  if _batch_sharded(x) or _batch_sharded(g):
    # Explicitly sharded batch (jit + NamedSharding on an Explicit mesh).
    if any(_sharding_spec(w) or ()):  # sharded kernel: leave it to XLA
      w_aval = jax.ShapeDtypeStruct(
        w.shape, w.dtype, sharding=jax.typeof(w).sharding
      )
      conv_t = jax.linear_transpose(
        lambda w_: _lax_conv(x, w_, strides, pads, precision), w_aval
      )
      return conv_t(g)[0]
    # lax.scan cannot scan over a sharded axis: one chunk, which the
    # partitioner splits over the devices; the summed result is replicated.
    b = n
    mesh = jax.typeof(x).sharding.mesh
    out_sharding = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec()
    )
  else:
    b = _chunk_size(n, ho * wo, k, x.dtype.itemsize)

  def chunk_grad(xc, gc):
    patches = _im2col(xc, (kh, kw), strides, pads).reshape(-1, k)
    return lax.dot_general(
      patches,
      gc.reshape(-1, cout),
      dims,
      precision=precision,
      preferred_element_type=jnp.float32,
      out_sharding=out_sharding,
    )

  if b == n:
    dw = chunk_grad(x, g)
  else:
    xs = x.reshape((n // b, b) + x.shape[1:])
    gs = g.reshape((n // b, b) + g.shape[1:])

    def body(acc, xg):
      return acc + chunk_grad(*xg), None

    dw, _ = lax.scan(body, jnp.zeros((k, cout), jnp.float32), (xs, gs))
  return dw.astype(x.dtype).reshape(kh, kw, cin, cout)


def _input_grad(x_aval, w, g, strides, pads, precision, small):
  """dL/dx [N, H, W, Cin]."""
  kh, kw, cin, cout = w.shape
  if small:
    # GEMM to patch space, then col2im (the transpose of the im2col slices).
    dpatches = lax.dot_general(
      g,
      w.reshape(kh * kw * cin, cout),
      (((3,), (1,)), ((), ())),
      precision=precision,
    )  # [N, Ho, Wo, K]
    im2col_t = jax.linear_transpose(
      lambda x: _im2col(x, (kh, kw), strides, pads), x_aval
    )
    return im2col_t(dpatches)[0]
  conv_t = jax.linear_transpose(
    lambda x: _lax_conv(x, w, strides, pads, precision), x_aval
  )
  return conv_t(g)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _fast_conv(x, w, strides, pads, precision):
  ho, wo = _out_hw(x.shape, w.shape[:2], strides, pads)
  if ho * wo <= SMALL_MAP_FWD:
    return _gemm_conv(x, w, strides, pads, precision)
  return _lax_conv(x, w, strides, pads, precision)


def _fast_conv_fwd(x, w, strides, pads, precision):
  return _fast_conv(x, w, strides, pads, precision), (x, w)


def _fast_conv_bwd(strides, pads, precision, res, g):
  x, w = res
  small = g.shape[1] * g.shape[2] <= SMALL_MAP
  x_aval = jax.ShapeDtypeStruct(x.shape, x.dtype)
  dx = _input_grad(x_aval, w, g, strides, pads, precision, small)
  dw = _weight_grad(x, w, g, strides, pads, precision)
  return dx, dw


_fast_conv.defvjp(_fast_conv_fwd, _fast_conv_bwd)


def _is_nhwc(dimension_numbers: Any, lhs_shape, rhs_shape) -> bool:
  try:
    dn = lax.conv_dimension_numbers(lhs_shape, rhs_shape, dimension_numbers)
  except (TypeError, ValueError):
    return False
  return dn == _NHWC_SPECS


def _all_ones(dilation: Sequence[int] | None) -> bool:
  return dilation is None or all(d == 1 for d in dilation)


def conv_general_dilated(
  lhs: jax.typing.ArrayLike,
  rhs: jax.typing.ArrayLike,
  window_strides: Sequence[int],
  padding: str | Sequence[tuple[int, int]],
  lhs_dilation: Sequence[int] | None = None,
  rhs_dilation: Sequence[int] | None = None,
  dimension_numbers: Any = None,
  feature_group_count: int = 1,
  batch_group_count: int = 1,
  precision: Any = None,
  preferred_element_type: Any = None,
) -> jax.Array:
  """Drop-in for `lax.conv_general_dilated`, fast on CPU for NHWC/HWIO.

  Computes the same function as `lax.conv_general_dilated` (see its docs for
  the arguments). NHWC input / HWIO kernel / NHWC output convolutions without
  dilation or grouping use a custom VJP (see the module docstring); everything
  else is passed to `lax.conv_general_dilated` unchanged.

  Args:
    lhs: input, [N, H, W, Cin] on the fast path.
    rhs: kernel, [KH, KW, Cin, Cout] on the fast path.
    window_strides: 2 spatial strides.
    padding: 'SAME', 'SAME_LOWER', 'VALID' or 2 (low, high) pairs.
    lhs_dilation: input dilation; fast path only when None or all ones.
    rhs_dilation: kernel dilation; fast path only when None or all ones.
    dimension_numbers: as in lax; fast path only for NHWC/HWIO/NHWC (in any
      of lax's spellings, e.g. flax's `ConvDimensionNumbers`).
    feature_group_count: fast path only when 1.
    batch_group_count: fast path only when 1.
    precision: passed to the underlying convolutions and dot products.
    preferred_element_type: fast path only when None.

  Returns:
    The convolution output, [N, Ho, Wo, Cout] on the fast path.
  """
  lhs = jnp.asarray(lhs)
  rhs = jnp.asarray(rhs)
  fast = (
    lhs.ndim == 4
    and rhs.ndim == 4
    and _is_nhwc(dimension_numbers, lhs.shape, rhs.shape)
    and _all_ones(lhs_dilation)
    and _all_ones(rhs_dilation)
    and feature_group_count == 1
    and batch_group_count == 1
    and preferred_element_type is None
    and lhs.dtype == rhs.dtype
    and jnp.issubdtype(lhs.dtype, jnp.floating)
  )
  if fast:
    strides = tuple(int(s) for s in (window_strides or (1, 1)))
    if isinstance(padding, str):
      pads = lax.padtype_to_pads(
        lhs.shape[1:3], rhs.shape[:2], strides, padding
      )
    else:
      pads = padding
    pads = tuple((int(lo), int(hi)) for lo, hi in pads)
    fast = len(strides) == 2 and len(pads) == 2 and min(sum(pads, ())) >= 0
  if not fast:
    return lax.conv_general_dilated(
      lhs,
      rhs,
      window_strides,
      padding,
      lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count,
      batch_group_count=batch_group_count,
      precision=precision,
      preferred_element_type=preferred_element_type,
    )
  if isinstance(precision, list):
    precision = tuple(precision)
  return _fast_conv(lhs, rhs, strides, pads, precision)


CONV_IMPLS = ('xla', 'fast', 'onednn', 'auto')


def get_conv(impl: str) -> Callable[..., jax.Array]:
  """Returns a `conv_general_dilated`-compatible function by name.

  Args:
    impl: 'xla' (`lax.conv_general_dilated`), 'fast' (this module's
      `conv_general_dilated`), 'onednn' (`pfa_jax.onednn`'s on the CPU
      backend, 'xla' elsewhere) or 'auto' (on the CPU backend 'onednn' if
      its kernel is available and `jax.device_count() == 1`, else 'fast';
      'xla' on GPU/TPU). The backend is `jax.default_backend()` at call
      time.

  Returns:
    A plain function with `lax.conv_general_dilated`'s signature, usable as
    `flax.linen.Conv(conv_general_dilated=...)`.

  Raises:
    ValueError: if `impl` is not one of `CONV_IMPLS`.
  """
  impl = resolve(impl)
  if impl == 'xla':
    return lax.conv_general_dilated
  if impl == 'fast':
    return conv_general_dilated
  from pfa_jax import onednn  # noqa: PLC0415  (imports this module)

  return onednn.conv_general_dilated


def resolve(impl: str) -> str:
  """The implementation `get_conv(impl)` runs now: 'xla', 'fast' or 'onednn'."""
  if impl not in CONV_IMPLS:
    raise ValueError(
      f'Unknown conv impl {impl!r}; expected one of {CONV_IMPLS}.'
    )
  cpu = jax.default_backend() == 'cpu'
  if impl == 'auto':
    impl = 'fast' if cpu else 'xla'
    if impl == 'fast' and jax.device_count() == 1:
      from pfa_jax import onednn  # noqa: PLC0415  (imports this module)

      impl = 'onednn' if onednn.available() else 'fast'
  if impl == 'onednn' and not cpu:
    impl = 'xla'
  return impl
