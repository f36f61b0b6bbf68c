"""oneDNN 2-D convolutions on the CPU, through XLA's FFI.

`conv_general_dilated` is a drop-in for `lax.conv_general_dilated` whose
float32 NHWC/HWIO convolutions (any strides, explicit or 'SAME'/'VALID'
padding, no dilation, one group) run oneDNN's forward, backward-data and
backward-weights primitives (`pfa_jax/native/onednn_conv.cc`) inside a
`jax.custom_vjp`. It is `conv_impl='onednn'` (`pfa_jax.conv.get_conv`).
Everything else (other dtypes, layouts, dilation, groups), and every call
when the kernel is not available, goes to `pfa_jax.conv.conv_general_dilated`.

Decisions:
  * The library is the CPU-only, GNU-OpenMP build of oneDNN 3.2 from the
    `onednn-cpu-gomp` / `onednn-devel-cpu-gomp` wheels. The newer `onednn`
    2026.x wheel is the SYCL build: its libdnnl needs libsycl, TBB and
    Intel's compiler runtimes (`dpcpp-cpp-rt`, `intel-opencl-rt`, hundreds
    of MB) that a CPU-only project does not want.
  * Threads: oneDNN's OpenMP team size is `THREADS` (environment
    `PFA_JAX_ONEDNN_THREADS`; default: OpenMP's own, i.e. `OMP_NUM_THREADS`
    or all cores). Every call (and every `pfa_jax.fused_bn` call) runs on
    one dedicated "team thread", one at a time: XLA running two independent
    convolutions at once (a layer's two gradients) does not start two teams
    on the same cores, and libgomp, which keeps one spinning worker pool per
    thread that opens a parallel region, keeps one pool instead of one per
    XLA worker thread (`set_team_thread`).
  * Except small inference calls (session 19, `call_threads`): a folded
    call (`conv_bias_act`) of at most `INLINE_MFLOPS` = 3 MFLOP
    (environment `PFA_JAX_ONEDNN_INLINE_MFLOPS`; 0 turns it off) with
    weights of at most `INLINE_MAX_WEIGHT_BYTES` = 256 KiB runs
    single-threaded on the calling thread. The hand-off to the team thread
    and back costs ~18 us a call on this VM, more than a second core saves
    on such a layer. Lone batch-1 calls, single-threaded over team:
    0.34-0.57x up to 3 MFLOP, 0.43-0.97x at 4.7, 0.92-2.29x from 18.9
    (`benchmarks/conv_levers.py --part inline`, `conv_inline.json`; a lone
    call also wakes an idle team, so these overstate the gain inside a
    network); a pruned ResNet-56's batch-1 forward takes 0.44-0.96x the
    time (`benchmarks/pruned_speedup.py --inline-ab`; DECISIONS.md). A
    single-threaded call opens no OpenMP team, so no spinning pool is left
    on XLA's threads, and oneDNN primitives are cached per thread count.
  * Plain weights on small outputs (session 19, `plain_weights`): a folded
    oneDNN call of at most `PLAIN_PIXELS` = 64 output pixels (N Ho Wo;
    `PFA_JAX_ONEDNN_PLAIN_PIXELS`) is created for the HWIO weights as they
    are, skipping the per-call reorder into oneDNN's blocked layout, which
    dominates such a layer: the full VGG-16's batch-1 forward 0.69-0.88x
    the time in two runs (`benchmarks/pruned_speedup.py --plain-ab`;
    DECISIONS.md). Larger outputs keep the blocked weights (all plain:
    VGG-16 at batch 128 ~1.2x slower, ad hoc).
  * Small maps stay here. `pfa_jax.conv` is faster on VGG-16-CIFAR's 2x2
    maps alone (forward 385 against 284 GFLOP/s, `benchmarks/conv_levers.py
    --part layers`, `conv_layers.json`), but routing them there made the
    whole VGG-16 step slower (train -3.2%, eval -4.2%,
    `benchmarks/native_levers.py`, `native_levers.json`). The switch
    `PFA_JAX_ONEDNN_SMALL_MAP=4` keeps that experiment runnable.
  * Narrow outputs (1-8 channels, a pruned network's) run a packed forward
    (`pack_factor`): oneDNN fills 16 lanes with output channels, so P
    adjacent output columns become one column of P*C channels.
  * Channel tails (session 18, `tail_split`): a folded inference forward
    of 16 m + t outputs (t <= 8) on the narrow kernel's row path runs
    oneDNN on the first 16 m channels and the narrow kernel on the last t,
    which merges both into the output pixel by pixel. oneDNN's partial last
    vector of 16 channels costs a whole one and more: 0.78-1.00x the
    layer's time on oneDNN alone, 0.84-0.86x for tails 1-4 at 32 x 32
    (`benchmarks/conv_levers.py --part tail_split`, `conv_tail_split.json`;
    tail 12: 0.98x, so not split). Training's convolutions are untouched.
  * vmap: `vmap_method='broadcast_all'`; the kernel loops over the leading
    (vmapped) dimensions, one convolution each (`pfa_jax.batched`).
  * Sharding: with an operand explicitly sharded in its type (jit +
    `NamedSharding` on an Explicit mesh) the call falls back to
    `pfa_jax.conv` (XLA's partitioner cannot split a custom call). On
    `pfa_jax.sharding`'s Auto mesh the partitioner sees an opaque custom call
    and replicates its operands: correct, but without data parallelism, so
    `get_conv('auto')` picks this module only when there is one device.
    (`custom_partitioning` would split it, but has no vmap rule.)
  * Built on first use like `pfa_jax.native.syrk` (`python -m pfa_jax.native`
    builds it ahead of time); no compiler, no wheel or `PFA_JAX_ONEDNN=0`
    -> `available()` is False and the reason is in `status()`.
"""

import ctypes
import functools
import importlib.metadata
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pfa_jax import conv
from pfa_jax import native

_SRCS = tuple(
  os.path.join(os.path.dirname(native.__file__), f)
  for f in (
    'onednn_conv.cc',
    'bn_act.cc',
    'dropout.cc',
    'pool.cc',
    'narrow_conv.cc',
  )
)
_DISTS = ('onednn-devel-cpu-gomp', 'onednn-cpu-gomp')
_FWD, _BWD_DATA, _BWD_WEIGHTS = (
  'pfa_jax_dnnl_conv_fwd',
  'pfa_jax_dnnl_conv_bwd_data',
  'pfa_jax_dnnl_conv_bwd_weights',
)
_MATERIALIZE = 'pfa_jax_materialize'
_NARROW = 'pfa_jax_narrow_conv_fwd'
_FUSED = {  # (kernel, with a residual) -> target
  ('dnnl', False): 'pfa_jax_dnnl_conv_fwd_bias',
  ('dnnl', True): 'pfa_jax_dnnl_conv_fwd_bias_res',
  ('narrow', False): 'pfa_jax_narrow_conv_fwd_bias',
  ('narrow', True): 'pfa_jax_narrow_conv_fwd_bias_res',
  ('split', False): 'pfa_jax_split_conv_fwd_bias',
  ('split', True): 'pfa_jax_split_conv_fwd_bias_res',
}
_SYMBOLS = {
  _FWD: 'PfaDnnlConvFwd',
  _BWD_DATA: 'PfaDnnlConvBwdData',
  _BWD_WEIGHTS: 'PfaDnnlConvBwdWeights',
  _MATERIALIZE: 'PfaMaterialize',
  _NARROW: 'PfaNarrowConvFwd',
  _FUSED['dnnl', False]: 'PfaDnnlConvFwdBias',
  _FUSED['dnnl', True]: 'PfaDnnlConvFwdBiasRes',
  _FUSED['narrow', False]: 'PfaNarrowConvFwdBias',
  _FUSED['narrow', True]: 'PfaNarrowConvFwdBiasRes',
  _FUSED['split', False]: 'PfaSplitConvFwdBias',
  _FUSED['split', True]: 'PfaSplitConvFwdBiasRes',
  # Batch norm + residual + ReLU (pfa_jax.fused_bn), in the same library so
  # that it shares the convolutions' one-team-at-a-time lock.
  'pfa_jax_bn_train_fwd': 'PfaBnTrainFwd',
  'pfa_jax_bn_train_fwd_res': 'PfaBnTrainFwdRes',
  'pfa_jax_bn_train_bwd': 'PfaBnTrainBwd',
  'pfa_jax_bn_train_bwd_res': 'PfaBnTrainBwdRes',
  'pfa_jax_bn_infer': 'PfaBnInfer',
  'pfa_jax_bn_infer_res': 'PfaBnInferRes',
  'pfa_jax_bn_infer_max': 'PfaBnInferMax',
  'pfa_jax_bn_infer_max_res': 'PfaBnInferMaxRes',
  'pfa_jax_dropout': 'PfaDropout',
  'pfa_jax_max_pool2_fwd': 'PfaMaxPool2Fwd',
  'pfa_jax_max_pool2_bwd': 'PfaMaxPool2Bwd',
}


def _env_int(name: str, default: int) -> int:
  """The integer in environment variable ``name`` (``default`` if unset)."""
  value = os.environ.get(name, str(default))
  try:
    return int(value)
  except ValueError:
    raise ValueError(f'{name} must be an integer, got {value!r}.') from None


THREADS = _env_int('PFA_JAX_ONEDNN_THREADS', 0)
PACK_MAX = 8  # widest output `pack_factor` packs (PFA_JAX_ONEDNN_PACK_MAX)
# Widest output `forward_algo` gives the narrow kernel
# (PFA_JAX_ONEDNN_NARROW_MAX); its channel path takes at most 8.
NARROW_MAX = 15
TAIL_MAX = 8  # widest channel tail `tail_split` gives the narrow kernel
# Folded inference calls of at most this many MFLOP run single-threaded on
# the calling thread (`call_threads`; PFA_JAX_ONEDNN_INLINE_MFLOPS).
INLINE_MFLOPS = 3.0
INLINE_MAX_WEIGHT_BYTES = 256 * 1024  # ... and weights of at most this size
# oneDNN folded calls of at most this many output pixels (N Ho Wo) read
# their weights unreordered (`plain_weights`; PFA_JAX_ONEDNN_PLAIN_PIXELS).
PLAIN_PIXELS = 64
_CHANNEL_PATH_MAX = 8
TEAM_THREAD = os.environ.get('PFA_JAX_ONEDNN_TEAM_THREAD', '1') != '0'
_status = {'built': False, 'reason': 'not tried'}


def status() -> dict:
  """Whether the oneDNN kernel is in use, and why not."""
  return dict(_status)


def _paths() -> tuple[str, str]:
  """(include dir, lib dir) of oneDNN: `$PFA_JAX_ONEDNN_ROOT` or the wheels."""
  root = os.environ.get('PFA_JAX_ONEDNN_ROOT')
  if root:
    return os.path.join(root, 'include'), os.path.join(root, 'lib')
  found = {}
  for dist, name in zip(_DISTS, ('dnnl.hpp', 'libdnnl.so.3'), strict=True):
    try:
      files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError as e:
      raise OSError(f'oneDNN wheel {dist!r} not installed') from e
    hits = [f for f in files if f.name == name and 'oneapi' not in str(f)]
    if not hits:
      raise OSError(f'{name} not found in the {dist!r} wheel')
    found[name] = os.path.dirname(os.path.realpath(hits[0].locate()))
  return found['dnnl.hpp'], found['libdnnl.so.3']


def _load() -> ctypes.CDLL:
  """The built, registered library; raises the one attempt's error."""
  lib, error = _attempt()
  if error is not None:
    raise error
  return lib


@functools.cache
def _attempt() -> tuple[ctypes.CDLL | None, Exception | None]:
  """Builds and registers the kernels once per process: a failed build
  (minutes of compiling) is not retried on every later call."""
  try:
    return _build_and_register(), None
  except (OSError, AttributeError) as e:
    return None, e


def _build_and_register() -> ctypes.CDLL:
  if os.environ.get('PFA_JAX_ONEDNN', '1') == '0':
    raise OSError('disabled by PFA_JAX_ONEDNN=0')
  inc, lib_dir = _paths()
  flags = (
    '-O3',
    '-march=native',
    '-fopenmp',
    '-I',
    inc,
    '-L',
    lib_dir,
    '-l:libdnnl.so.3',
  )
  flags += (f'-Wl,-rpath,{lib_dir}',)
  lib = ctypes.cdll.LoadLibrary(native.build(_SRCS, 'libpfa_onednn', flags))
  for name, sym in _SYMBOLS.items():
    jax.ffi.register_ffi_target(
      name, jax.ffi.pycapsule(getattr(lib, sym)), platform='cpu'
    )
  lib.PfaDnnlCacheSize.restype = ctypes.c_int64
  lib.PfaNarrowConvAvailable.restype = ctypes.c_int
  lib.PfaSetTeamThread(int(TEAM_THREAD))
  return lib


def available() -> bool:
  """True when the oneDNN kernel is built and registered (builds it once)."""
  try:
    _load()
  except (OSError, AttributeError) as e:
    _status.update(built=False, reason=str(e))
    return False
  _status.update(built=True, reason='')
  return True


def set_team_thread(on: bool) -> None:
  """Runs the kernels on one team thread (True, the default) or inline.

  See ``TeamThread`` in ``pfa_jax/native/onednn_conv.cc``; the switch is for
  benchmarks and tests (environment ``PFA_JAX_ONEDNN_TEAM_THREAD=0``).
  """
  if available():
    _load().PfaSetTeamThread(int(bool(on)))


def cache_size() -> int:
  """Number of oneDNN primitives cached in the kernel (0 if unavailable)."""
  return int(_load().PfaDnnlCacheSize()) if available() else 0


def _call(target, out_shape, a, b, strides, pads):
  flat_pads = np.array([p for lo_hi in pads for p in lo_hi], np.int64)
  return jax.ffi.ffi_call(
    target,
    jax.ShapeDtypeStruct(out_shape, jnp.float32),
    vmap_method='broadcast_all',
  )(
    a,
    b,
    strides=np.array(strides, np.int64),
    pads=flat_pads,
    threads=np.int64(THREADS),
  )


def pack_factor(x_shape, w_shape, strides, pads) -> int:
  """Adjacent output columns one packed forward computes together (1: none).

  oneDNN vectorises a convolution over 16 output channels, so a layer with
  fewer (a pruned network's) costs about what a 16-channel one does. With
  stride 1 across the width, P adjacent output columns of C channels are
  one output column of P*C channels of a convolution with stride P and a
  kernel P + kw - 1 wide (`pack_kernel`), whose output is the original's
  after a free reshape. It does (P + kw - 1) / (P kw) of the FLOPs of a
  16-lane layer per output column. P is the largest of 2, 4, 8 with
  P * C <= 16 that divides the output width and leaves at least 8 packed
  columns, for kw >= 3 and C <= `PACK_MAX` (environment
  `PFA_JAX_ONEDNN_PACK_MAX`; 0 turns packing off). Forward only: the
  gradients run the original layer's primitives. Measured
  (`benchmarks/conv_levers.py --part pack`, `conv_pack.json`, batch 128):
  forward 1.2-1.7x on 32x32 maps of 1-8 channels, 1.2-1.3x on 16x16 ones.
  Fewer than 8 packed columns was slower in a run of the same script before
  that rule (0.5-0.84x with P = 8 on 8x8 and 16x16 maps; not kept).
  """
  _, kw, _, c = w_shape
  if strides[1] != 1 or kw < 3 or c > pack_max():
    return 1
  _, wo = conv._out_hw(x_shape, w_shape[:2], strides, pads)
  fits = [p for p in (2, 4, 8) if p * c <= 16 and wo % p == 0 and wo // p >= 8]
  return max(fits, default=1)


def pack_max() -> int:
  """Widest output packed by `pack_factor` (read when a conv is traced)."""
  return _env_int('PFA_JAX_ONEDNN_PACK_MAX', PACK_MAX)


def pack_kernel(w: jax.Array, p: int) -> jax.Array:
  """[kh, kw, I, O] -> [kh, kw + p - 1, I, p * O] for `pack_factor` p.

  Output lane (j, o) of the packed layer is output column v * p + j: its
  taps are the original's shifted j columns right.
  """
  kh, kw, ci, co = w.shape
  shifted = [
    jnp.pad(w, ((0, 0), (j, p - 1 - j), (0, 0), (0, 0))) for j in range(p)
  ]
  return jnp.stack(shifted, axis=3).reshape(kh, kw + p - 1, ci, p * co)


def narrow_max() -> int:
  """Widest output `forward_algo` gives the narrow kernel (read at trace time)."""
  return min(_env_int('PFA_JAX_ONEDNN_NARROW_MAX', NARROW_MAX), 16)


def narrow_available() -> bool:
  """True when the narrow-output kernel was built (it needs AVX-512)."""
  return available() and bool(_load().PfaNarrowConvAvailable())


def forward_algo(x_shape, w_shape, strides, pads) -> int:
  """How `conv_general_dilated`'s forward runs: 0 = narrow kernel, else P.

  0: outputs of at most `narrow_max` channels (environment
  `PFA_JAX_ONEDNN_NARROW_MAX`, default 15; 0 turns it off) run
  `native/narrow_conv.cc`, which vectorises over 16 output pixels of a row
  (the row path: stride 1 across the width, >= 16 output columns, from 4
  input channels) or, for at most 8 outputs, over the input channels (the
  channel path, from 8 input channels) instead of oneDNN's 16
  output-channel lanes. It beat oneDNN's plain and packed forwards on every
  <= 8-output pruned-network layer measured (`benchmarks/conv_levers.py
  --part narrow_kernel`, `conv_narrow_kernel.json`, batch 128), and oneDNN's
  forward on 9-15 outputs at 16x16 and 32x32 (`--part narrow_wide`,
  `conv_narrow_wide.json`); with fewer input channels it did not (4 -> 4 on
  8x8: 0.64x), nor at 16 outputs. Otherwise P = `pack_factor` (1: oneDNN's
  plain forward). The gradients are always oneDNN's.
  """
  c, o = w_shape[2], w_shape[3]
  if o <= narrow_max() and narrow_available():
    rows = _row_path(x_shape, w_shape, strides, pads)
    if (rows and c >= 4) or (o <= _CHANNEL_PATH_MAX and c >= 8):
      return 0
  return pack_factor(x_shape, w_shape, strides, pads)


def _row_path(x_shape, w_shape, strides, pads) -> bool:
  """The narrow kernel's row path applies (``RowPath`` in narrow_conv.cc):
  stride 1 across the width, >= 16 output columns, kernel height <= 16."""
  _, wo = conv._out_hw(x_shape, w_shape[:2], strides, pads)
  return strides[1] == 1 and wo >= 16 and w_shape[0] <= 16


def tail_split(x_shape, w_shape, strides, pads) -> int:
  """Output channels `conv_bias_act` gives the narrow kernel beside oneDNN.

  oneDNN computes output channels in vectors of 16, and a partial last
  vector costs a whole one. For a folded forward of
  16 m + t outputs (m >= 1, 1 <= t <= `tail_max`) on the narrow kernel's row
  path from at least 4 inputs, oneDNN computes the first 16 m channels and
  the narrow kernel the last t, merging the two per pixel (the `split`
  target; `native/narrow_conv.cc`, ``PfaNarrowTailMerge``). Returns t, or 0
  where the layer runs whole (read at trace time; environment
  `PFA_JAX_ONEDNN_TAIL_MAX`, default `TAIL_MAX` = 8, 0 turns it off). A
  56 -> 52 layer at 32 x 32, batch 128: 41 ms whole, 35 ms split; tails
  1-8: 0.78-1.00x the whole layer's time, a tail of 12: 0.98x
  (`benchmarks/conv_levers.py --part tail_split`, `conv_tail_split.json`).
  """
  c, o = w_shape[2], w_shape[3]
  t = o % 16
  if o < 16 or not 0 < t <= tail_max() or c < 4 or not narrow_available():
    return 0
  return t if _row_path(x_shape, w_shape, strides, pads) else 0


def tail_max() -> int:
  """Widest channel tail `tail_split` splits off (read at trace time)."""
  return min(_env_int('PFA_JAX_ONEDNN_TAIL_MAX', TAIL_MAX), 15)


def _narrow(x, w, strides, pads):
  n, _, _, _ = x.shape
  ho, wo = conv._out_hw(x.shape, w.shape[:2], strides, pads)
  return _call(_NARROW, (n, ho, wo, w.shape[3]), x, w, strides, pads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x, w, strides, pads, pack):
  """oneDNN's forward; ``pack`` > 1 runs it packed (`pack_factor`), 0 runs
  the narrow kernel (`forward_algo`)."""
  n, _, _, _ = x.shape
  ho, wo = conv._out_hw(x.shape, w.shape[:2], strides, pads)
  co = w.shape[3]
  if pack == 0:
    return _narrow(x, w, strides, pads)
  if pack > 1:
    y = _call(
      _FWD,
      (n, ho, wo // pack, pack * co),
      x,
      pack_kernel(w, pack),
      (strides[0], pack),
      pads,
    )
    return y.reshape(n, ho, wo, co)
  return _call(_FWD, (n, ho, wo, co), x, w, strides, pads)


def _conv_fwd(x, w, strides, pads, pack):
  return _conv(x, w, strides, pads, pack), (x, w)


def _conv_bwd(strides, pads, pack, res, g):
  del pack  # the gradients are the plain layer's
  x, w = res
  dx = _call(_BWD_DATA, x.shape, g, w, strides, pads)
  dw = _call(_BWD_WEIGHTS, w.shape, x, g, strides, pads)
  return dx, dw


_conv.defvjp(_conv_fwd, _conv_bwd)


@jax.custom_vjp
def _materialize(x):
  return jax.ffi.ffi_call(
    _MATERIALIZE,
    jax.ShapeDtypeStruct(x.shape, x.dtype),
    input_output_aliases={0: 0},
    vmap_method='broadcast_all',
  )(x)


_materialize.defvjp(
  lambda x: (_materialize(x), None), lambda _, g: (_materialize(g),)
)


def materialize(x: jax.Array) -> jax.Array:
  """The identity, and a fusion boundary for XLA:CPU (and its gradient).

  XLA:CPU fuses cheap elementwise producers into every consumer, duplicating
  them: in a ResNet, each block's BN + add + ReLU is re-computed inside every
  later block's fusions, forward and backward, so a stage re-reads O(n^2)
  conv outputs (measured: 1.4x the elementwise time of ResNet-56's training
  step). ``optimization_barrier`` does not stop it: XLA:CPU expands barriers
  before fusion. A no-op FFI call whose output aliases its input does: its
  operand must exist in memory, and nothing is copied. Where the kernel is
  not built, or ``x`` is sharded in its type (a custom call cannot be
  partitioned), this is the plain identity.
  """
  if (
    x.dtype != jnp.float32
    or any(conv._sharding_spec(x) or ())
    or not available()
  ):
    return x
  return _materialize(x)


def small_map() -> int:
  """Output maps of at most this many pixels go to `pfa_jax.conv`.

  Read when a convolution is traced (environment `PFA_JAX_ONEDNN_SMALL_MAP`,
  default 0: every eligible call goes to oneDNN).
  """
  return _env_int('PFA_JAX_ONEDNN_SMALL_MAP', 0)


def _eligible(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers, **kw):
  return (
    lhs.ndim == 4
    and rhs.ndim == 4
    and lhs.dtype == jnp.float32
    and rhs.dtype == jnp.float32
    and conv._is_nhwc(dimension_numbers, lhs.shape, rhs.shape)
    and conv._all_ones(lhs_dilation)
    and conv._all_ones(rhs_dilation)
    and kw['feature_group_count'] == 1
    and kw['batch_group_count'] == 1
    and kw['preferred_element_type'] is None
    and not any(conv._sharding_spec(lhs) or ())
    and not any(conv._sharding_spec(rhs) or ())
    and min(lhs.shape[:3] + rhs.shape) > 0
    and available()
  )


def _native_geometry(lhs, rhs, window_strides, padding):
  """(strides, pads) of an eligible call, pads None where it stays on XLA."""
  strides = tuple(int(s) for s in (window_strides or (1, 1)))
  if isinstance(padding, str):
    pads = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
  else:
    pads = padding
  pads = tuple((int(lo), int(hi)) for lo, hi in pads)
  ho, wo = conv._out_hw(lhs.shape, rhs.shape[:2], strides, pads)
  if (
    len(strides) != 2
    or min(sum(pads, ())) < 0
    or min(ho, wo) <= 0
    or ho * wo <= small_map()
  ):
    return strides, None
  return strides, pads


def inline_mflops() -> float:
  """`INLINE_MFLOPS`, or ``PFA_JAX_ONEDNN_INLINE_MFLOPS`` (trace time)."""
  name = 'PFA_JAX_ONEDNN_INLINE_MFLOPS'
  value = os.environ.get(name)
  if value is None:
    return INLINE_MFLOPS
  try:
    out = float(value)
  except ValueError:
    out = math.nan
  if not out >= 0.0:  # NaN too
    raise ValueError(f'{name} must be a number >= 0, got {value!r}.')
  return out


def call_threads(x_shape, w_shape, out_hw) -> int:
  """The ``threads`` attribute of a folded inference call (`conv_bias_act`).

  1 (run on the calling thread, one core) for a call of at most
  `inline_mflops` MFLOP (2 N Ho Wo kh kw C O; environment
  ``PFA_JAX_ONEDNN_INLINE_MFLOPS``, 0 turns it off) whose weights take at
  most `INLINE_MAX_WEIGHT_BYTES`, else `THREADS`. A multi-threaded call is
  handed to the team thread and back, ~18 us on this VM, and opens an
  OpenMP team: on a batch-1 forward of a pruned ResNet-56 (tens of us a
  layer) that overhead is most of the time (`benchmarks/pruned_speedup.py
  --inline-ab`). A layer with heavy weights and little work (VGG-16's 2 x 2
  maps: 1.5 MB for 3 MFLOP) streams its weights faster on two cores, hence
  the weight cap; the 1.03-1.15x VGG-16 2x took with those calls inline is
  within this VM's batch-1 noise, so the cap rests on that mechanism, not
  on a measured gain (DECISIONS.md). Under vmap the shapes are one
  variant's, so a vmapped call's total can exceed the threshold.
  """
  n, _, _, c = x_shape
  kh, kw, _, o = w_shape
  flops = 2.0 * n * out_hw[0] * out_hw[1] * kh * kw * c * o
  small = kh * kw * c * o * 4 <= INLINE_MAX_WEIGHT_BYTES
  return 1 if small and flops <= inline_mflops() * 1e6 else THREADS


def plain_pixels() -> int:
  """`PLAIN_PIXELS`, or ``PFA_JAX_ONEDNN_PLAIN_PIXELS`` (trace time)."""
  value = _env_int('PFA_JAX_ONEDNN_PLAIN_PIXELS', PLAIN_PIXELS)
  if value < 0:
    raise ValueError(f'PFA_JAX_ONEDNN_PLAIN_PIXELS must be >= 0, got {value}.')
  return value


def plain_weights(n: int, out_hw) -> bool:
  """Whether a folded oneDNN call reads its HWIO weights as they are.

  oneDNN's convolutions want their weights in a blocked layout, and a
  weight argument of the jitted forward (the folded kernel changes with the
  variables) is reordered into it on every call: 4.7 MB for a 256 -> 512
  layer. On a small output (at most `plain_pixels` = N Ho Wo pixels,
  environment ``PFA_JAX_ONEDNN_PLAIN_PIXELS``; 0 turns it off) that copy
  costs more than the convolution, so the primitive is created for the
  plain HWIO weights instead (oneDNN still picks its brgemm kernel, with the
  same outputs). On larger ones the blocked kernel wins: with every call on
  plain weights VGG-16's batch-128 forward took ~1.2x the time (ad hoc).
  """
  return n * out_hw[0] * out_hw[1] <= plain_pixels()


def _bias_act_reference(x, w, b, residual, strides, pads, relu):
  y = lax.conv_general_dilated(
    x, w, strides, pads, dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )
  y = y + b
  if residual is not None:
    y = y + residual
  return jnp.maximum(y, 0) if relu else y


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _bias_act(x, w, b, residual, strides, pads, relu):
  if forward_algo(x.shape, w.shape, strides, pads) == 0:
    kernel = 'narrow'
  elif tail_split(x.shape, w.shape, strides, pads):
    kernel = 'split'
  else:
    kernel = 'dnnl'
  n, _, _, _ = x.shape
  ho, wo = conv._out_hw(x.shape, w.shape[:2], strides, pads)
  operands = (x, w, b) if residual is None else (x, w, b, residual)
  # The narrow kernel reads HWIO weights itself: no such attribute.
  plain = (
    {} if kernel == 'narrow' else {'plain_weights': plain_weights(n, (ho, wo))}
  )
  return jax.ffi.ffi_call(
    _FUSED[kernel, residual is not None],
    jax.ShapeDtypeStruct((n, ho, wo, w.shape[3]), jnp.float32),
    vmap_method='broadcast_all',
    # oneDNN's sum post-op adds into dst, so its output overwrites the
    # residual (XLA copies it first where the residual is still needed); the
    # narrow kernel reads the residual as an input.
    input_output_aliases={3: 0}
    if residual is not None and kernel != 'narrow'
    else None,
  )(
    *operands,
    strides=np.array(strides, np.int64),
    pads=np.array([p for lo_hi in pads for p in lo_hi], np.int64),
    relu=bool(relu),
    threads=np.int64(call_threads(x.shape, w.shape, (ho, wo))),
    **plain,
  )


def _bias_act_fwd(x, w, b, residual, strides, pads, relu):
  return _bias_act(x, w, b, residual, strides, pads, relu), (x, w, b, residual)


def _bias_act_bwd(strides, pads, relu, res, g):
  # Gradients of an inference-mode layer are rare (saliency, Taylor
  # scores): lax's composition, not a native kernel.
  _, vjp = jax.vjp(
    functools.partial(
      _bias_act_reference, strides=strides, pads=pads, relu=relu
    ),
    *res,
  )
  return vjp(g)


_bias_act.defvjp(_bias_act_fwd, _bias_act_bwd)


def fusable(x: jax.Array, w: jax.Array, strides, padding) -> bool:
  """Whether `conv_bias_act` runs ``x``, ``w`` as one native call."""
  ok = _eligible(
    x,
    w,
    None,
    None,
    ('NHWC', 'HWIO', 'NHWC'),
    feature_group_count=1,
    batch_group_count=1,
    preferred_element_type=None,
  )
  return ok and _native_geometry(x, w, strides, padding)[1] is not None


def conv_bias_act(
  x: jax.Array,
  w: jax.Array,
  b: jax.Array,
  strides: Sequence[int],
  padding: str | Sequence[tuple[int, int]],
  *,
  residual: jax.Array | None = None,
  relu: bool = False,
) -> jax.Array:
  """``relu(conv(x, w) + b + residual)`` (NHWC / HWIO, float32) in one call.

  A convolution with its batch norm folded in (`pfa_jax.models.layers.ConvBN`
  at inference): oneDNN's inference forward with a bias, the residual as a
  sum post-op (the output buffer aliases the residual) and the ReLU as an
  eltwise one, so the output map is
  written once instead of written, re-read and re-written by a separate
  batch-norm pass; outputs of <= `narrow_max` channels run the narrow
  kernel with the same epilogue (`forward_algo`). Differentiable (the
  gradients are lax's). Where `fusable` is False, the same function in lax.
  """
  if not fusable(x, w, strides, padding) or (
    residual is not None
    and (
      residual.dtype != jnp.float32 or any(conv._sharding_spec(residual) or ())
    )
  ):
    if isinstance(padding, str):
      padding = lax.padtype_to_pads(x.shape[1:3], w.shape[:2], strides, padding)
    return _bias_act_reference(x, w, b, residual, tuple(strides), padding, relu)
  strides, pads = _native_geometry(x, w, strides, padding)
  return _bias_act(x, w, b, residual, strides, pads, bool(relu))


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
  """Drop-in for `lax.conv_general_dilated`: oneDNN for float32 NHWC/HWIO.

  Same arguments and function as `lax.conv_general_dilated`. Eligible calls
  (module docstring) run oneDNN in float32 whatever `precision` says (its
  float32 convolutions have no reduced-precision mode); all others go to
  `pfa_jax.conv.conv_general_dilated` unchanged.

  Returns:
    The convolution output, [N, Ho, Wo, Cout] on the oneDNN path.
  """
  lhs = jnp.asarray(lhs)
  rhs = jnp.asarray(rhs)
  kw = dict(
    feature_group_count=feature_group_count,
    batch_group_count=batch_group_count,
    preferred_element_type=preferred_element_type,
  )
  args = (lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation)
  if _eligible(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers, **kw):
    strides, pads = _native_geometry(lhs, rhs, window_strides, padding)
    if pads is not None:
      algo = forward_algo(lhs.shape, rhs.shape, strides, pads)
      return _conv(lhs, rhs, strides, pads, algo)
  return conv.conv_general_dilated(
    *args,
    dimension_numbers=dimension_numbers,
    precision=precision,
    **kw,
  )
