"""A user's own CIFAR CNN, written in plain flax: the CLI's worked example.

Nothing here comes from pfa_jax but :func:`pfa_jax.discover.cached`, which
reads the channel structure (two concatenated branches, a residual stream,
separate BN modules, pooling, a dense head) from the jaxpr. Train and
compress it like a registered model, by its import path:

  python -m pfa_jax.main --config configs/simple_cnn_cifar10.py:runlocal \\
    --workdir /tmp/own --config.model.name=experiments.user_model:BranchyCNN \\
    --config.job=all

Checkpoints name the class by that path, so ``job=compress`` or
``job=evaluate`` in a new process restores it by importing this module.

:class:`NeXtCNN` is a second example: ResNeXt bottlenecks, whose 3x3 convs
have 8 fixed groups, so the channels they read and write are pruned in
balanced blocks (``--config.model.name=experiments.user_model:NeXtCNN``).
"""

import functools

import flax.linen as nn
import jax.numpy as jnp

from pfa_jax import discover


class BranchyCNN(nn.Module):
  """Stem, two concatenated branches, one residual block, a dense head."""

  # stem, branch a, branch b, residual stream, block's inner conv, conv c,
  # fc1: the prunable widths, one per channel group.
  widths: tuple[int, ...] = (32, 32, 16, 64, 64, 128, 128)
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    w = self.widths
    conv = functools.partial(nn.Conv, kernel_size=(3, 3), use_bias=False)
    bn = functools.partial(
      nn.BatchNorm, use_running_average=not train, momentum=0.9
    )
    h = nn.relu(bn(name='stem_bn')(conv(w[0], name='stem')(x)))
    a = nn.relu(bn(name='a_bn')(conv(w[1], name='a')(h)))
    b = nn.relu(bn(name='b_bn')(conv(w[2], kernel_size=(1, 1), name='b')(h)))
    h = nn.max_pool(jnp.concatenate([a, b], axis=-1), (2, 2), (2, 2))
    s = bn(name='down_bn')(conv(w[3], name='down')(h))
    r = nn.relu(bn(name='inner_bn')(conv(w[4], name='inner')(nn.relu(s))))
    s = nn.relu(s + bn(name='back_bn')(conv(w[3], name='back')(r)))
    h = nn.max_pool(s, (2, 2), (2, 2))
    h = nn.relu(bn(name='c_bn')(conv(w[5], name='c')(h)))
    h = jnp.mean(h, axis=(1, 2))
    h = nn.relu(nn.Dense(w[6], name='fc1')(h))
    return nn.Dense(self.num_classes, name='out')(h)

  def structure(self):
    return discover.cached(self, (1, 32, 32, 3)).structure


class NeXtCNN(nn.Module):
  """Stem, two ResNeXt bottlenecks (3x3 convs of ``cardinality`` groups)."""

  # stem, block 1's 1x1 and grouped 3x3, the residual stream, block 2's
  # 1x1 and grouped 3x3.
  widths: tuple[int, ...] = (32, 64, 64, 128, 64, 64)
  num_classes: int = 10
  cardinality: int = 8

  @nn.compact
  def __call__(self, x, train: bool = False):
    w = self.widths
    conv = functools.partial(nn.Conv, use_bias=False)
    bn = functools.partial(
      nn.BatchNorm, use_running_average=not train, momentum=0.9
    )

    def bottleneck(h, i, inner, grouped, shortcut):
      y = nn.relu(bn(name=f'a{i}_bn')(conv(inner, (1, 1), name=f'a{i}')(h)))
      y = conv(grouped, (3, 3), feature_group_count=self.cardinality,
               name=f'g{i}')(y)  # fmt: skip
      y = nn.relu(bn(name=f'g{i}_bn')(y))
      y = bn(name=f'c{i}_bn')(conv(w[3], (1, 1), name=f'c{i}')(y))
      return nn.relu(shortcut + y)

    h = nn.relu(bn(name='stem_bn')(conv(w[0], (3, 3), name='stem')(x)))
    proj = bn(name='proj_bn')(conv(w[3], (1, 1), name='proj')(h))
    h = bottleneck(h, 1, w[1], w[2], proj)
    h = nn.max_pool(h, (2, 2), (2, 2))
    h = bottleneck(h, 2, w[4], w[5], h)
    h = jnp.mean(nn.max_pool(h, (2, 2), (2, 2)), axis=(1, 2))
    return nn.Dense(self.num_classes, name='out')(h)

  def structure(self):
    return discover.cached(self, (1, 32, 32, 3)).structure
