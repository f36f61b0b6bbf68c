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
from pfa_jax.conv import CONV_IMPLS

TAPS = ('pre_bn', 'post_bn', 'post_act')
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


class ConvBN(nn.Module):
  """Conv, optional BN, optional ReLU; sows its PFA response.

  Params: ``conv/kernel`` [kh, kw, I, O] (``conv/bias`` without BN), and
  ``bn/scale``, ``bn/bias`` with ``batch_stats`` ``bn/mean``, ``bn/var``.
  Every leaf has the output channels on its last axis.
  """

  features: int
  kernel_size: tuple[int, int] = (3, 3)
  strides: tuple[int, int] = (1, 1)
  padding: str = 'SAME'
  use_bn: bool = True
  relu: bool = True
  tap: str = 'post_act'
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x, train: bool = False):
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
    return _bn_act(self, y, train)


class DenseBN(nn.Module):
  """Dense, optional BN, optional ReLU; sows its PFA response."""

  features: int
  use_bn: bool = True
  relu: bool = True
  tap: str = 'post_act'

  @nn.compact
  def __call__(self, x, train: bool = False):
    y = nn.Dense(self.features, use_bias=not self.use_bn, name='dense')(x)
    return _bn_act(self, y, train)


def _bn_act(module, y, train):
  if module.tap not in TAPS:
    raise ValueError(f'tap must be one of {TAPS}, got {module.tap!r}.')
  if module.tap == 'pre_bn':
    sow_response(module, y)
  if module.use_bn:
    y = nn.BatchNorm(
      use_running_average=not train, momentum=0.9, epsilon=1e-5, name='bn'
    )(y)
  if module.tap == 'post_bn':
    sow_response(module, y)
  if module.relu:
    y = nn.relu(y)
  if module.tap == 'post_act':
    sow_response(module, y)
  return y


class Tap(nn.Module):
  """Parameter-free tap: sows the response of a tensor it passes through."""

  @nn.compact
  def __call__(self, x):
    sow_response(self, x)
    return x
