"""ResNets: CIFAR (option A shortcuts) and ImageNet (option B projections).

CIFAR ResNet-(6n+2) (METHODS §2; He et al. 2016 §4.2): a 3x3x16 stem, three
stages of n basic blocks with widths 16/32/64, global average pooling and a
dense classifier. Stage transitions use the parameter-free "option A"
shortcut: subsample by 2 and copy channels into a zero-padded stream.
ResNet-56 is n = 9.

ImageNet ResNet-34: a 7x7/2 stem and 3x3/2 max-pool, stages of (3, 4, 6, 3)
basic blocks with widths 64/128/256/512, "option B" 1x1 projection shortcuts
(with BN) at stage transitions, global average pooling, dense classifier.

Prunable groups (in ``widths`` order):

* ``stage{s}_block{b}/conv1``: each block's inner conv (the FP/CF convention);
* ``stream{s}``: stage s's residual stream. Its producers are every module
  writing into the stage's residual adds (stem or projection, and each
  block's ``conv2``), so it is one keep-set.

Pruning only inner groups is the "inner" mode; naming stream groups too is
"inner+stream". The option-A shortcut's channel map is data: the int32 leaf
``consts/stage{s}_block0/channel_map`` (``-1`` = zero channel), initialised
to :func:`option_a_map` and rewritten by the slicer and masker, so a sliced
stream stays exactly the same function and masked variants share one
compiled program.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from pfa_jax.models import layers
from pfa_jax.models import structure


def option_a_map(c_in: int, c_out: int) -> tuple[int, ...]:
  """Output channel j copies input j - (c_out - c_in) // 2, or is zero."""
  pad = (c_out - c_in) // 2
  return tuple(j - pad if 0 <= j - pad < c_in else -1 for j in range(c_out))


class ResNet(nn.Module):
  """Basic-block ResNet; see the module docstring for the two variants.

  Attributes:
    stage_sizes: blocks per stage, e.g. (9, 9, 9) for ResNet-56.
    stage_widths: unpruned stream widths, e.g. (16, 32, 64).
    widths: one width per group (inner convs, then streams); ``None`` means
      unpruned.
    variant: 'cifar' (3x3 stem, option A) or 'imagenet' (7x7 stem, option B).
  """

  num_classes: int = 10
  stage_sizes: tuple[int, ...] = (9, 9, 9)
  stage_widths: tuple[int, ...] = (16, 32, 64)
  widths: tuple[int, ...] | None = None
  variant: str = 'cifar'
  tap: str = 'post_act'
  conv_impl: str = 'auto'
  # Inference with each conv's BN folded in (layers.ConvBN.fold_bn).
  fold_bn: bool = False

  # -- structure -------------------------------------------------------------
  def _blocks(self):
    return [(s, b) for s, n in enumerate(self.stage_sizes) for b in range(n)]

  def default_widths(self) -> tuple[int, ...]:
    inner = tuple(self.stage_widths[s] for s, _ in self._blocks())
    return inner + tuple(self.stage_widths)

  def _widths(self):
    w = self.default_widths() if self.widths is None else self.widths
    if len(w) != len(self.default_widths()):
      raise ValueError(
        f'ResNet with stage_sizes {self.stage_sizes} needs '
        f'{len(self.default_widths())} widths, got {len(w)}.'
      )
    return w

  def structure(self) -> structure.Structure:
    blocks = self._blocks()
    num_stages = len(self.stage_sizes)
    groups = []
    for i, (s, b) in enumerate(blocks):
      p = f'stage{s + 1}_block{b}'
      groups.append(
        structure.Group(
          name=f'{p}/conv1',
          index=i,
          producers=(f'{p}/conv1',),
          consumers=(f'{p}/conv2/conv',),
        )
      )
    index_maps = []
    for s in range(num_stages):
      producers = ['stem'] if s == 0 else []
      if s > 0 and self.variant == 'imagenet':
        producers.append(f'stage{s + 1}_block0/proj')
      producers += [
        f'stage{s + 1}_block{b}/conv2' for b in range(self.stage_sizes[s])
      ]
      # Block 0 of stages 2+ reads the previous stream (it is the transition).
      first = 0 if s == 0 else 1
      consumers = [
        f'stage{s + 1}_block{b}/conv1/conv'
        for b in range(first, self.stage_sizes[s])
      ]
      if s + 1 < num_stages:
        consumers.append(f'stage{s + 2}_block0/conv1/conv')
        if self.variant == 'imagenet':
          consumers.append(f'stage{s + 2}_block0/proj/conv')
        else:
          index_maps.append(
            structure.IndexMap(
              f'stage{s + 2}_block0/channel_map',
              f'stream{s + 1}',
              f'stream{s + 2}',
            )
          )
      else:
        consumers.append('fc')
      groups.append(
        structure.Group(
          name=f'stream{s + 1}',
          index=len(blocks) + s,
          producers=tuple(producers),
          consumers=tuple(consumers),
          stream=True,
        )
      )
    return structure.Structure(tuple(groups), tuple(index_maps), head='fc')

  # -- forward ---------------------------------------------------------------
  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.variant not in ('cifar', 'imagenet'):
      raise ValueError(f'Unknown ResNet variant {self.variant!r}.')
    w = self._widths()
    num_blocks = len(self._blocks())
    streams = w[num_blocks:]
    conv = dict(tap=self.tap, conv_impl=self.conv_impl, fold_bn=self.fold_bn)
    # Only group response points sow (the stem and the stream writers are
    # no group's): each stage's stream response is its output's, which the
    # last block's conv2 computes anyway when the tap is 'post_act'.
    reuse = self.tap == 'post_act'
    if self.variant == 'cifar':
      x = layers.ConvBN(streams[0], name='stem', respond=False, **conv)(
        x, train
      )
    else:
      x = layers.ConvBN(
        streams[0], (7, 7), strides=(2, 2), name='stem', respond=False, **conv
      )(x, train)
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
    i = 0
    for s, n in enumerate(self.stage_sizes):
      for b in range(n):
        block = f'stage{s + 1}_block{b}'
        x = BasicBlock(
          inner=w[i],
          out=streams[s],
          stride=2 if (s > 0 and b == 0) else 1,
          shortcut='option_a' if self.variant == 'cifar' else 'proj',
          respond_out=reuse and b == n - 1,
          name=block,
          **conv,
        )(x, train)
        i += 1
      response = layers.sown_response(self, f'{block}/conv2') if reuse else None
      x = layers.Tap(name=f'stream{s + 1}')(x, response)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name='fc')(x)


class BasicBlock(nn.Module):
  """conv1-BN-ReLU, conv2-BN, + shortcut, ReLU; conv1 sows its response."""

  inner: int
  out: int
  stride: int = 1
  shortcut: str = 'option_a'  # or 'proj' (used only when stride > 1)
  respond_out: bool = False  # conv2 sows the block output's response
  tap: str = 'post_act'
  conv_impl: str = 'auto'
  # Inference with each conv's BN folded in (layers.ConvBN.fold_bn).
  fold_bn: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv = dict(tap=self.tap, conv_impl=self.conv_impl, fold_bn=self.fold_bn)
    strides = (self.stride, self.stride)
    h = layers.ConvBN(self.inner, strides=strides, name='conv1', **conv)(
      x, train
    )
    if self.stride == 1:
      shortcut = x
    elif self.shortcut == 'option_a':
      c_in = x.shape[-1]
      channel_map = self.variable(
        structure.CONSTS,
        'channel_map',
        lambda: jnp.asarray(option_a_map(c_in, self.out), jnp.int32),
      ).value
      shortcut = _option_a(x, channel_map)
    else:
      shortcut = layers.ConvBN(
        self.out,
        (1, 1),
        strides=strides,
        relu=False,
        name='proj',
        respond=False,
        **conv,
      )(x, train)
    # conv2's BN, the residual add and the ReLU are one layer: one fused
    # kernel on the oneDNN path (layers.BatchNorm).
    return layers.ConvBN(
      self.out, name='conv2', respond=self.respond_out, **conv
    )(h, train, residual=shortcut)


def _option_a(x, channel_map):
  """Subsample by 2 and copy channels by ``channel_map``; -1 is a zero channel.

  The copy is a matmul with the one-hot [c_in, c_out] matrix of the map:
  exact in floating point (one product by 1.0 per output, the rest add
  zeros), and its gradient is the transposed matmul. A ``take`` along the
  channel axis computes the same thing, but its gradient is a scatter-add
  that cost XLA:CPU 25-39 ms per ResNet-56 step. ``channel_map`` is an array
  (traced under jit), so one compiled program serves every map of the same
  length.
  """
  x = x[:, ::2, ::2, :]
  one_hot = channel_map[None, :] == jnp.arange(x.shape[-1])[:, None]
  return jnp.einsum(
    'nhwi,io->nhwo',
    x,
    one_hot.astype(x.dtype),
    precision=jax.lax.Precision.HIGHEST,
  )
