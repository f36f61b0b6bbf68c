"""SimpleCNN: the paper's ablation net (All-CNN-C with BN; METHODS §2).

conv1-3: 3x3x96 (conv3 stride 2), dropout 0.5; conv4-6: 3x3x192 (conv6
stride 2), dropout 0.5; conv7 3x3x192 VALID, conv8 1x1x192, conv9
1x1xclasses; global average pooling. BN + ReLU follow every conv but the
last. Prunable groups: conv1..conv8 (conv9 emits the logits).
"""

import flax.linen as nn
import jax.numpy as jnp

from pfa_jax import conv as conv_lib
from pfa_jax.models import layers
from pfa_jax.models import structure

DEFAULT_WIDTHS = (96, 96, 96, 192, 192, 192, 192, 192)
_KERNELS = ((3, 3),) * 7 + ((1, 1),)
_STRIDES = {2: (2, 2), 5: (2, 2)}  # 0-based conv index -> stride
_DROPOUT_AFTER = (2, 5)


class SimpleCNN(nn.Module):
  """All-CNN-C with BN. ``widths`` holds conv1..conv8's filter counts."""

  num_classes: int = 10
  widths: tuple[int, ...] = DEFAULT_WIDTHS
  dropout: float = 0.5
  tap: str = 'post_act'
  conv_impl: str = 'auto'
  # Inference with each conv's BN folded in (layers.ConvBN.fold_bn).
  fold_bn: bool = False

  def structure(self) -> structure.Structure:
    names = [f'conv{i + 1}' for i in range(9)]
    groups = tuple(
      structure.Group(
        name=names[i],
        index=i,
        producers=(names[i],),
        consumers=(f'{names[i + 1]}/conv',),
      )
      for i in range(8)
    )
    return structure.Structure(groups, head='conv9')

  @nn.compact
  def __call__(self, x, train: bool = False):
    if len(self.widths) != 8:
      raise ValueError(f'SimpleCNN needs 8 widths, got {len(self.widths)}.')
    for i, (w, k) in enumerate(zip(self.widths, _KERNELS)):
      x = layers.ConvBN(
        w,
        k,
        strides=_STRIDES.get(i, (1, 1)),
        padding='VALID' if i == 6 else 'SAME',
        tap=self.tap,
        conv_impl=self.conv_impl,
        fold_bn=self.fold_bn,
        name=f'conv{i + 1}',
      )(x, train)
      if i in _DROPOUT_AFTER:
        x = layers.Dropout(
          self.dropout,
          deterministic=not train,
          native=conv_lib.resolve(self.conv_impl) == 'onednn',
        )(x)
    x = layers.ConvBN(
      self.num_classes,
      (1, 1),
      use_bn=False,
      relu=False,
      conv_impl=self.conv_impl,
      respond=False,  # the logits: no group's response
      name='conv9',
    )(x, train)
    return jnp.mean(x, axis=(1, 2))
