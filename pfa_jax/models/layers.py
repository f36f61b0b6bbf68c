"""Building blocks shared by the models, with PFA response taps.

PFA analyses, for each prunable layer, a per-sample response vector: the
spatial max of a conv layer's output map, or a dense layer's raw output
(METHODS §1). Layers *sow* that vector into the ``'responses'`` collection
when, and only when, the caller makes it mutable, so training pays nothing.

Which tensor counts as the output is the ``tap`` field:

* ``'post_act'`` (default): after BN and ReLU, the tensor the next layer reads;
* ``'post_bn'``: after BN, before the nonlinearity;
* ``'pre_bn'``: the raw conv/dense output.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from pfa_jax import conv
from pfa_jax import dropout as dropout_lib
from pfa_jax import fused_bn
from pfa_jax import onednn
from pfa_jax.conv import CONV_IMPLS

TAPS = ('pre_bn', 'post_bn', 'post_act')
BN_EPS = 1e-5  # every ConvBN / DenseBN batch norm's epsilon
RESPONSES = 'responses'


def spatial_max(x: jax.Array) -> jax.Array:
  """[N, H, W, C] -> [N, C]; [N, C] passes through."""
  return jnp.max(x, axis=tuple(range(1, x.ndim - 1))) if x.ndim > 2 else x


def sow_response(module: nn.Module, x: jax.Array, name: str = 'out') -> None:
  """Records ``spatial_max(x)`` if the 'responses' collection is mutable."""
  if module.is_mutable_collection(RESPONSES):
    module.sow(RESPONSES, name, spatial_max(x))


def conv_fn(impl: str):
  """The ``conv_general_dilated`` to give ``nn.Conv`` for ``impl``."""
  if impl not in CONV_IMPLS:
    raise ValueError(f'conv_impl must be one of {CONV_IMPLS}, got {impl!r}.')
  if impl == 'xla':
    return None  # flax's default: lax.conv_general_dilated
  return conv.get_conv(impl)


class Dropout(nn.Dropout):
  """``nn.Dropout``, as one native pass when ``native`` (:mod:`pfa_jax.dropout`).

  Same rng collection and distribution as ``nn.Dropout``; the native mask
  is a different stream. ``broadcast_dims`` and non-float32 inputs take
  flax's path.
  """

  native: bool = False

  @nn.compact
  def __call__(self, inputs, deterministic=None, rng=None):
    off = nn.merge_param('deterministic', self.deterministic, deterministic)
    if (
      not self.native
      or self.broadcast_dims
      or off
      or self.rate == 0.0
      or self.rate >= 1.0
      or not dropout_lib.eligible(inputs)
    ):
      return super().__call__(inputs, deterministic, rng)
    if rng is None:
      rng = self.make_rng(self.rng_collection)
    return dropout_lib.dropout(inputs, rng, self.rate)


class BatchNorm(nn.BatchNorm):
  """``nn.BatchNorm``, then ``+ residual`` and ReLU, fused when ``native``.

  The same variables and function as ``nn.BatchNorm`` followed by the add
  and the activation. With ``native=True`` (the ``conv_impl='onednn'``
  path) and eligible operands, all three run as one kernel per direction
  (:mod:`pfa_jax.fused_bn`); otherwise as flax's BN and two ``jnp`` ops. A
  ``mask`` (BN recalibration, :mod:`pfa_jax.recalibrate`, which finds this
  layer as an ``nn.BatchNorm``) always takes flax's path.
  """

  relu: bool = False
  native: bool = False

  @nn.compact
  def __call__(
    self,
    x,
    use_running_average=None,
    *,
    mask=None,
    residual=None,
    with_max=False,
  ):
    """``act(bn(x) + residual)``; with ``with_max`` also its spatial max.

    ``with_max`` (inference, ``x`` with spatial axes) returns
    ``(y, spatial_max(y))``, computed in the same pass on the native path.
    """
    use_ra = nn.merge_param(
      'use_running_average', self.use_running_average, use_running_average
    )
    fused = (
      self.native
      and mask is None
      and self.axis in (-1, x.ndim - 1)
      and self.use_scale
      and self.use_bias
      and self.axis_name is None
      and self.dtype in (None, jnp.float32)
      and self.param_dtype == jnp.float32
      and fused_bn.eligible(x, residual)  # float32, unsharded, kernel built
    )
    if not fused:
      y = super().__call__(x, use_running_average, mask=mask)
      if residual is not None:
        y = y + residual
      y = nn.relu(y) if self.relu else y
      # A residual chain computed by XLA on the oneDNN path: keep it in
      # memory, or XLA:CPU re-computes it inside every later block's
      # fusions (onednn.materialize).
      if self.native and residual is not None:
        y = onednn.materialize(y)
      return (y, spatial_max(y)) if with_max else y
    shape = x.shape[-1:]
    ra_mean = self.variable(
      'batch_stats', 'mean', jnp.zeros, shape, jnp.float32
    )
    ra_var = self.variable('batch_stats', 'var', jnp.ones, shape, jnp.float32)
    scale = self.param('scale', self.scale_init, shape, self.param_dtype)
    bias = self.param('bias', self.bias_init, shape, self.param_dtype)
    kw = dict(relu=self.relu, eps=self.epsilon)
    if use_ra:
      stats = (ra_mean.value, ra_var.value)
      if with_max and x.ndim >= 3:
        return fused_bn.infer_with_max(
          x, scale, bias, *stats, residual=residual, **kw
        )
      y = fused_bn.infer(x, scale, bias, *stats, residual=residual, **kw)
    else:
      y, mean, var = fused_bn.train(x, scale, bias, residual=residual, **kw)
      if not self.is_initializing():
        m = self.momentum
        ra_mean.value = m * ra_mean.value + (1 - m) * mean
        ra_var.value = m * ra_var.value + (1 - m) * var
    return (y, spatial_max(y)) if with_max else y


class ConvBN(nn.Module):
  """Conv, optional BN, optional ReLU; sows its PFA response.

  Params: ``conv/kernel`` [kh, kw, I, O] (``conv/bias`` without BN), and
  ``bn/scale``, ``bn/bias`` with ``batch_stats`` ``bn/mean``, ``bn/var``.
  Every leaf has the output channels on its last axis. ``respond=False``
  (a layer that is no group's response point, e.g. a residual block's
  conv2) sows nothing, so collecting statistics skips its spatial max.
  """

  features: int
  kernel_size: tuple[int, int] = (3, 3)
  strides: tuple[int, int] = (1, 1)
  padding: str = 'SAME'
  use_bn: bool = True
  relu: bool = True
  tap: str = 'post_act'
  conv_impl: str = 'auto'
  respond: bool = True
  # Inference with BN folded into the conv, one native call (`_folded`). Off
  # by default: the conv then never calls its nn.Conv, which tools that
  # intercept nn.Conv calls (costs.count, methods.compensation) rely on.
  fold_bn: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False, residual=None):
    folded = self._folded(x, train, residual)
    if folded is not None:
      return folded
    y = nn.Conv(
      self.features,
      self.kernel_size,
      strides=self.strides,
      padding=self.padding,
      use_bias=not self.use_bn,
      kernel_init=nn.initializers.kaiming_normal(),
      conv_general_dilated=conv_fn(self.conv_impl),
      name='conv',
    )(x)
    native = conv.resolve(self.conv_impl) == 'onednn'
    return _bn_act(self, y, train, residual=residual, native=native)

  def _folded(self, x, train, residual):
    """Inference with BN folded into the conv, as one native call, or None.

    ``relu(conv(x, k * s) + (bias - mean * s) [+ residual])`` with ``s =
    scale / sqrt(var + eps)``: the same function as conv -> BN -> add ->
    ReLU (to float32 rounding), but the output map is written once
    (`pfa_jax.onednn.conv_bias_act`). Only with ``fold_bn``, on the oneDNN
    path, at inference, and when no response is being collected from this
    layer.
    """
    if (
      not self.fold_bn
      or train
      or not self.use_bn
      or self.is_initializing()
      or conv.resolve(self.conv_impl) != 'onednn'
      or (self.respond and self.is_mutable_collection(RESPONSES))
    ):
      return None
    params = self.variables.get('params', {})
    stats = self.variables.get('batch_stats', {})
    if 'conv' not in params or 'bn' not in params or 'bn' not in stats:
      return None
    kernel = params['conv']['kernel']
    if not onednn.fusable(x, kernel, self.strides, self.padding):
      return None
    bn, mv = params['bn'], stats['bn']
    s = bn['scale'] * jax.lax.rsqrt(mv['var'] + BN_EPS)
    return onednn.conv_bias_act(
      x,
      kernel * s,
      bn['bias'] - mv['mean'] * s,
      self.strides,
      self.padding,
      residual=residual,
      relu=self.relu,
    )


class DenseBN(nn.Module):
  """Dense, optional BN, optional ReLU; sows its PFA response (``respond``)."""

  features: int
  use_bn: bool = True
  relu: bool = True
  tap: str = 'post_act'
  respond: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False):
    y = nn.Dense(self.features, use_bias=not self.use_bn, name='dense')(x)
    return _bn_act(self, y, train)


def _bn_act(module, y, train, *, residual=None, native=False):
  """BN, ``+ residual``, ReLU, with the module's tap; BN fused if ``native``."""
  if module.tap not in TAPS:
    raise ValueError(f'tap must be one of {TAPS}, got {module.tap!r}.')
  collect = module.respond and module.is_mutable_collection(RESPONSES)

  def sow(v):
    if collect:
      module.sow(RESPONSES, 'out', spatial_max(v))

  if module.tap == 'pre_bn':
    sow(y)
  if not module.use_bn:
    y = y if residual is None else y + residual
    if module.tap == 'post_bn':
      sow(y)
    y = nn.relu(y) if module.relu else y
    if module.tap == 'post_act':
      sow(y)
    return y
  split = module.tap == 'post_bn' and collect
  bn = BatchNorm(
    use_running_average=not train,
    momentum=0.9,
    epsilon=BN_EPS,
    relu=module.relu and not split,
    native=native,
    name='bn',
  )
  if split:  # the tap needs BN's output before the add and the activation
    y = bn(y)
    sow(y)
    y = y if residual is None else y + residual
    return nn.relu(y) if module.relu else y
  if module.tap == 'post_act' and collect and not train and y.ndim >= 3:
    # The response from BN's own pass, while the map is in cache.
    y, response = bn(y, residual=residual, with_max=True)
    module.sow(RESPONSES, 'out', response)
    return y
  y = bn(y, residual=residual)
  if module.tap == 'post_act':
    sow(y)
  return y


class Tap(nn.Module):
  """Parameter-free tap: sows the response of a tensor it passes through.

  ``response``, when the caller already holds ``spatial_max(x)`` (a layer
  that sowed the same tensor), is sown instead of reading ``x`` again.
  """

  @nn.compact
  def __call__(self, x, response=None):
    if response is None:
      sow_response(self, x)
    elif self.is_mutable_collection(RESPONSES):
      self.sow(RESPONSES, 'out', response)
    return x


def sown_response(module: nn.Module, path: str) -> jax.Array | None:
  """What the submodule ``path`` ('a/b') of ``module`` last sowed, or None."""
  if not module.is_mutable_collection(RESPONSES):
    return None
  node = module.variables.get(RESPONSES, {})
  for key in path.split('/'):
    node = node.get(key, {})
  return node['out'][-1] if 'out' in node else None
