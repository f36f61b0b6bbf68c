"""VGG-16 for CIFAR (torch "cifar.torch") and for ImageNet (fully conv).

CIFAR (METHODS §2): 13 conv-BN-ReLU layers 64,64,M,128,128,M,256x3,M,512x3,M,
512x3,M with cifar.torch's dropout (0.3 after conv1, 0.4 after every other
conv not followed by pooling), then dropout 0.5, fc1 512 (BN, ReLU),
dropout 0.5, fc2 to the classes. PFA analyses 14 groups: conv1..conv13, fc1.

ImageNet (the paper's fully convolutional variant): the same 13 convs (no BN
by default, as in the original VGG), then fc6 as a 7x7 VALID conv of 4096,
fc7 as a 1x1 conv of 4096 (each ReLU + dropout 0.5), fc8 as a 1x1 conv to the
classes and a spatial mean. Groups: conv1..conv13, fc6, fc7.
"""

import flax.linen as nn
import jax.numpy as jnp

from pfa_jax import conv as conv_lib
from pfa_jax import pool
from pfa_jax.models import layers
from pfa_jax.models import structure

CONV_WIDTHS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
_POOL_AFTER = (1, 3, 6, 9, 12)  # 0-based conv indices followed by max-pool
_CIFAR_DROPOUT = {0: 0.3}  # others not before a pool: 0.4


def _conv_names():
  return [f'conv{i + 1}' for i in range(13)]


class VGG16(nn.Module):
  """VGG-16. ``widths``: 13 conv widths + hidden classifier widths."""

  num_classes: int = 10
  widths: tuple[int, ...] = CONV_WIDTHS + (512,)
  variant: str = 'cifar'  # 'cifar' | 'imagenet'
  use_bn: bool = True
  tap: str = 'post_act'
  conv_impl: str = 'auto'
  # Inference with each conv's BN folded in (layers.ConvBN.fold_bn).
  fold_bn: bool = False
  # Scales every dropout rate; 0 turns dropout off (short CPU schedules).
  dropout: float = 1.0

  def _drop(self, rate, x, train):
    rate = rate * self.dropout
    if not rate:
      return x
    native = conv_lib.resolve(self.conv_impl) == 'onednn'
    return layers.Dropout(rate, deterministic=not train, native=native)(x)

  def _head_names(self):
    return ('fc1',) if self.variant == 'cifar' else ('fc6', 'fc7')

  def structure(self) -> structure.Structure:
    heads = self._head_names()
    names = _conv_names() + list(heads)
    if self.variant == 'cifar':
      readers = [f'{n}/conv' for n in names[1:13]] + ['fc1/dense', 'fc2']
    else:
      readers = [f'{n}/conv' for n in names[1:]] + ['fc8/conv']
    groups = tuple(
      structure.Group(name=n, index=i, producers=(n,), consumers=(readers[i],))
      for i, n in enumerate(names)
    )
    return structure.Structure(
      groups, head='fc2' if self.variant == 'cifar' else 'fc8'
    )

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.variant not in ('cifar', 'imagenet'):
      raise ValueError(f'Unknown VGG variant {self.variant!r}.')
    want = 13 + len(self._head_names())
    if len(self.widths) != want:
      raise ValueError(f'VGG16 ({self.variant}) needs {want} widths.')
    for i, name in enumerate(_conv_names()):
      x = layers.ConvBN(
        self.widths[i],
        use_bn=self.use_bn,
        tap=self.tap,
        conv_impl=self.conv_impl,
        fold_bn=self.fold_bn,
        name=name,
      )(x, train)
      if i in _POOL_AFTER:
        if conv_lib.resolve(self.conv_impl) == 'onednn':
          x = pool.max_pool_2x2(x)
        else:
          x = nn.max_pool(x, (2, 2), strides=(2, 2))
      elif self.variant == 'cifar':
        x = self._drop(_CIFAR_DROPOUT.get(i, 0.4), x, train)
    if self.variant == 'cifar':
      return self._cifar_head(x, train)
    return self._imagenet_head(x, train)

  def _cifar_head(self, x, train):
    x = x.reshape((x.shape[0], -1))  # channel-last flatten
    x = self._drop(0.5, x, train)
    x = layers.DenseBN(
      self.widths[13], use_bn=self.use_bn, tap=self.tap, name='fc1'
    )(x, train)
    x = self._drop(0.5, x, train)
    return nn.Dense(self.num_classes, name='fc2')(x)

  def _imagenet_head(self, x, train):
    for i, (name, k) in enumerate((('fc6', (7, 7)), ('fc7', (1, 1)))):
      x = layers.ConvBN(
        self.widths[13 + i],
        k,
        padding='VALID',
        use_bn=self.use_bn,
        tap=self.tap,
        conv_impl=self.conv_impl,
        fold_bn=self.fold_bn,
        name=name,
      )(x, train)
      x = self._drop(0.5, x, train)
    x = layers.ConvBN(
      self.num_classes,
      (1, 1),
      use_bn=False,
      relu=False,
      conv_impl=self.conv_impl,
      name='fc8',
    )(x, train)
    return jnp.mean(x, axis=(1, 2))
