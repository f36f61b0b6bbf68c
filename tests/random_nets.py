"""Random Flax CNNs, and their channel structure derived from their recipe.

A net is a *spec*: a tuple of ops, each reading earlier tensors by index
(tensor 0 is the image), interpreted by :class:`RandomNet`. The ops are the
wirings users write: convs with or without bias and with BN before or after
the ReLU, depthwise convs, grouped convs of 2 or 3 fixed groups, residual
adds into a stream and projection
shortcuts, channel concatenations, separate BN modules (also over a
concatenation), pooling, transposed convs, per-position Dense layers,
squeeze-excitation gates, blocks with a layer scale, root-level parameters,
GroupNorm per channel or over 2 groups (pinned), and a head that averages
or flattens, with or without a hidden dense layer.

:func:`expected` derives the structure from the spec alone, by bookkeeping of
which op writes and reads which ``widths`` entry: an independent account of
what :mod:`pfa_jax.discover` finds in the jaxpr.
"""

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from pfa_jax import discover

SIZE = 8  # input images are SIZE x SIZE x 3
POSTS = ('none', 'relu', 'bn_relu', 'relu_bn')


def _post(y, post, name, train):
  bn = lambda: nn.BatchNorm(use_running_average=not train, name=name)  # noqa: E731
  if post == 'relu':
    return nn.relu(y)
  if post == 'bn_relu':
    return nn.relu(bn()(y))
  if post == 'relu_bn':
    return bn()(nn.relu(y))
  if post == 'bn':
    return bn()(y)
  return y


class _ScaledBlock(nn.Module):
  """A residual branch with a layer scale, as users nest them: its module
  holds two groups' layers and the stream's scale."""

  inner: int

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Conv(self.inner, (3, 3))(x))
    y = nn.Conv(x.shape[-1], (1, 1))(h)
    return x + self.param('gain', nn.initializers.ones, (x.shape[-1],)) * y


class RandomNet(nn.Module):
  """Interprets a spec (module docstring)."""

  spec: tuple
  widths: tuple[int, ...]
  num_classes: int = 3

  @nn.compact
  def __call__(self, x, train: bool = False):
    w, ts = self.widths, [x]
    for i, (kind, *a) in enumerate(self.spec):
      if kind == 'conv':
        src, g, k, stride, bias, post = a
        y = nn.Conv(
          w[g], (k, k), strides=stride, use_bias=bias, name=f'conv{i}'
        )(ts[src])
        y = _post(y, post, f'bn{i}', train)
      elif kind == 'up':  # a transposed conv doubling the map, then a ReLU
        src, g = a
        y = nn.ConvTranspose(w[g], (3, 3), strides=(2, 2), name=f'up{i}')
        y = nn.relu(y(ts[src]))
      elif kind == 'dense4d':  # a Dense on every position: a 1x1 conv
        src, g, relu = a
        y = nn.Dense(w[g], name=f'dense{i}')(ts[src])
        y = nn.relu(y) if relu else y
      elif kind == 'gconv':  # fixed groups: blocks of the widths it touches
        src, g, groups, post = a
        y = nn.Conv(w[g], (3, 3), feature_group_count=groups, name=f'gconv{i}')(
          ts[src]
        )
        y = _post(y, post, f'bn{i}', train)
      elif kind == 'dw':
        src, post = a
        c = ts[src].shape[-1]
        y = nn.Conv(c, (3, 3), feature_group_count=c, name=f'dw{i}')(ts[src])
        y = _post(y, post, f'bn{i}', train)
      elif kind == 'add':
        y = ts[a[0]] + ts[a[1]]
        y = nn.relu(y) if a[2] else y
      elif kind == 'cat':
        y = jnp.concatenate([ts[a[0]], ts[a[1]]], axis=-1)
      elif kind == 'bn':
        y = _post(ts[a[0]], 'bn_relu' if a[1] else 'bn', f'bn{i}', train)
      elif kind == 'pool':
        pool = nn.max_pool if a[1] == 'max' else nn.avg_pool
        y = pool(ts[a[0]], (2, 2), strides=(2, 2))
      elif kind == 'se':
        src, g = a
        h = ts[src]
        s = nn.relu(nn.Dense(w[g], name=f'se_down{i}')(jnp.mean(h, (1, 2))))
        s = nn.sigmoid(nn.Dense(h.shape[-1], name=f'se_up{i}')(s))
        y = h * s[:, None, None, :]
      elif kind == 'block':
        src, g = a
        y = _ScaledBlock(w[g], name=f'block{i}')(ts[src])
      elif kind == 'gain':  # a per-channel parameter at the model's root
        c = ts[a[0]].shape[-1]
        y = ts[a[0]] * self.param(f'gain{i}', nn.initializers.ones, (c,))
      elif kind == 'gn':  # per channel, or over groups of them (pinned)
        groups, size = (a[1], None) if a[1] else (None, 1)
        y = nn.GroupNorm(groups, group_size=size, name=f'gn{i}')(ts[a[0]])
      elif kind == 'head':
        src, how, hidden = a
        h = ts[src]
        if how == 'mean':
          h = jnp.mean(h, (1, 2))
        else:
          h = h.reshape((h.shape[0], -1))
        if hidden >= 0:
          h = nn.relu(nn.Dense(w[hidden], name='fc')(h))
        return nn.Dense(self.num_classes, name='out')(h)
      else:
        raise ValueError(f'unknown op {kind!r}')
      ts.append(y)
    raise ValueError('a spec ends with a head')

  def structure(self):
    return discover.cached(self, (1, SIZE, SIZE, 3)).structure


@dataclasses.dataclass
class _Tensor:
  size: int  # spatial
  parts: tuple[int, ...]  # the widths entry of each concatenated part
  writer: str | None = None  # the conv or BN whose raw output this is


def spec(seed: int, n_ops: int = 7) -> tuple[tuple, tuple[int, ...]]:
  """A random (spec, widths): each widths entry sets one group."""
  rng = np.random.default_rng(seed)
  ops: list[tuple] = []
  ts = [_Tensor(SIZE, ())]
  widths: list[int] = []

  def new_width():
    widths.append(int(rng.choice([1, 2, 3, 4, 5, 6], p=[0.1] + [0.18] * 5)))
    return len(widths) - 1

  def pick(ok):
    cands = [i for i, t in enumerate(ts) if ok(t)]
    if not cands:
      return None
    recent = cands[-3:]  # mostly the latest tensors, sometimes older ones
    return int(rng.choice(recent if rng.random() < 0.7 else cands))

  def conv(src, g, k=None, stride=1, post=None, bias=None):
    k = int(rng.choice([1, 3])) if k is None else k
    post = str(rng.choice(POSTS)) if post is None else post
    bias = bool(rng.random() < 0.5) if bias is None else bias
    ops.append(('conv', src, g, k, stride, bias, post))
    ts.append(_Tensor(-(-ts[src].size // stride), (g,)))
    return len(ts) - 1

  conv(0, new_width())
  grouped = lambda t: bool(t.parts)  # noqa: E731
  single = lambda t: len(t.parts) == 1  # noqa: E731
  while len(ops) < n_ops:
    kind = str(
      rng.choice(
        [
          'conv',
          'res',
          'proj',
          'dense4d',
          'dw',
          'cat',
          'bn',
          'pool',
          'se',
          'block',
          'gain',
          'gn',
          'up',
          'gconv',
        ],
        p=[
          0.1,
          0.1,
          0.07,
          0.05,
          0.09,
          0.1,
          0.1,
          0.08,
          0.08,
          0.06,
          0.05,
          0.04,
          0.03,
          0.05,
        ],
      )
    )
    if kind == 'conv':
      src = pick(grouped)
      stride = 2 if ts[src].size >= 4 and rng.random() < 0.3 else 1
      conv(src, new_width(), stride=stride)
    elif kind == 'res':
      src = pick(single)
      (g,) = ts[src].parts
      h = conv(src, new_width(), k=3)
      y = conv(h, g, post=str(rng.choice(['none', 'bn'])))
      ops.append(('add', src, y, bool(rng.random() < 0.7)))
      ts.append(_Tensor(ts[src].size, (g,)))
    elif kind == 'proj':  # a new stream: a shortcut conv plus a branch
      src = pick(grouped)
      stride = 2 if ts[src].size >= 4 and rng.random() < 0.5 else 1
      g = new_width()
      a = conv(src, g, k=1, stride=stride, post=str(rng.choice(['none', 'bn'])))
      h = conv(src, new_width(), k=3, stride=stride)
      b = conv(h, g, post=str(rng.choice(['none', 'bn'])))
      ops.append(('add', a, b, bool(rng.random() < 0.7)))
      ts.append(_Tensor(ts[a].size, (g,)))
    elif kind == 'up':
      src = pick(lambda t: grouped(t) and t.size <= 4)
      if src is None:
        continue
      ops.append(('up', src, new_width()))
      ts.append(_Tensor(2 * ts[src].size, (ops[-1][2],)))
    elif kind == 'dense4d':
      src = pick(grouped)
      g = new_width()
      ops.append(('dense4d', src, g, bool(rng.random() < 0.5)))
      ts.append(_Tensor(ts[src].size, (g,)))
    elif kind == 'gconv':
      groups = int(rng.choice([2, 3]))
      src = pick(lambda t, n=groups: single(t) and widths[t.parts[0]] % n == 0)
      if src is None:
        continue
      widths.append(groups * int(rng.choice([1, 2])))
      post = str(rng.choice(POSTS))
      ops.append(('gconv', src, len(widths) - 1, groups, post))
      ts.append(_Tensor(ts[src].size, (len(widths) - 1,)))
    elif kind == 'dw':  # on a concatenation too: its BN holds several groups
      src = pick(grouped)
      ops.append(('dw', src, str(rng.choice(POSTS))))
      ts.append(_Tensor(ts[src].size, ts[src].parts))
    elif kind == 'cat':
      a = pick(grouped)
      b = pick(
        lambda t, a=ts[a]: (
          grouped(t) and t.size == a.size and not set(t.parts) & set(a.parts)
        )
      )
      if b is None:
        continue
      ops.append(('cat', a, b))
      ts.append(_Tensor(ts[a].size, ts[a].parts + ts[b].parts))
    elif kind == 'bn':
      src = pick(grouped)
      ops.append(('bn', src, bool(rng.random() < 0.5)))
      ts.append(_Tensor(ts[src].size, ts[src].parts))
    elif kind == 'pool':
      src = pick(lambda t: grouped(t) and t.size >= 2)
      if src is None:
        continue
      ops.append(('pool', src, str(rng.choice(['max', 'avg']))))
      ts.append(_Tensor(ts[src].size // 2, ts[src].parts))
    elif kind in ('se', 'block'):
      src = pick(single)
      ops.append((kind, src, new_width()))
      ts.append(_Tensor(ts[src].size, ts[src].parts))
    elif kind == 'gain':
      src = pick(single)
      ops.append(('gain', src))
      ts.append(_Tensor(ts[src].size, ts[src].parts))
    else:  # 'gn': per channel (prunable), or over 2 groups of an even width
      src = pick(single)
      (g,) = ts[src].parts
      groups = 2 if widths[g] % 2 == 0 and rng.random() < 0.5 else None
      ops.append(('gn', src, groups))
      ts.append(_Tensor(ts[src].size, ts[src].parts))
  last = len(ts) - 1
  how = 'flatten' if ts[last].size <= 4 and rng.random() < 0.5 else 'mean'
  hidden = new_width() if rng.random() < 0.4 else -1
  ops.append(('head', last, how, hidden))
  return tuple(ops), tuple(widths)


@dataclasses.dataclass
class Group:
  producers: set = dataclasses.field(default_factory=set)
  consumers: set = dataclasses.field(default_factory=set)
  concat_producers: set = dataclasses.field(default_factory=set)
  writers: int = 0  # convs and dense layers writing it
  blocks: int = 1  # the lcm of the groups of grouped convs touching it

  def normal(self) -> dict[str, Any]:
    return {
      'producers': sorted(self.producers),
      'consumers': sorted(self.consumers),
      'concat_producers': sorted(self.concat_producers),
      'stream': self.writers > 1,
      'blocks': self.blocks,
    }


def expected(spec_: tuple, widths: tuple[int, ...]):
  """({widths index: group}, bn_after pairs, pinned indices), by bookkeeping
  over the spec. Pinned groups (a GroupNorm over several channels) are not
  in the dict."""
  groups = {g: Group() for g in range(len(widths))}
  parts: list[tuple[int, ...]] = [()]
  writer: list[str | None] = [None]  # a layer whose raw output a tensor is
  readers = np.zeros(len(spec_) + 1, int)
  for kind, *a in spec_:
    srcs = {'add': a[:2], 'cat': a[:2]}.get(kind, a[:1])
    for s in srcs:
      readers[s] += 1
  bn_after, pinned = set(), set()

  def read(src, path, blocks=1):
    p = parts[src]
    offset = 0
    for g in p:
      span = None if len(p) == 1 else sum(widths[q] for q in p)
      groups[g].consumers.add((path, offset, span, blocks))
      groups[g].blocks = math.lcm(groups[g].blocks, blocks)
      offset += widths[g]

  def hold(path, p):  # a module holding a tensor's channels, last axis
    if len(p) == 1:
      groups[p[0]].producers.add(path)
      return
    span, offset = sum(widths[q] for q in p), 0
    for g in p:
      groups[g].concat_producers.add((path, offset, span))
      offset += widths[g]

  def post(i, g_parts, layer, kind):
    if kind in ('bn_relu', 'relu_bn', 'bn'):
      hold(f'bn{i}', g_parts)
      if kind != 'relu_bn' and layer is not None:
        bn_after.add((layer, f'bn{i}'))

  for i, (kind, *a) in enumerate(spec_):
    out_parts, out_writer = None, None
    if kind == 'conv':
      src, g, _, _, _, p = a
      read(src, f'conv{i}')
      groups[g].producers.add(f'conv{i}')
      groups[g].writers += 1
      post(i, (g,), f'conv{i}', p)
      out_parts = (g,)
      out_writer = f'conv{i}' if p == 'none' else None
    elif kind == 'gconv':
      src, g, n, p = a
      read(src, f'gconv{i}', n)
      groups[g].producers.add(f'gconv{i}')
      groups[g].writers += 1
      groups[g].blocks = math.lcm(groups[g].blocks, n)
      post(i, (g,), f'gconv{i}', p)
      out_parts = (g,)
      out_writer = f'gconv{i}' if p == 'none' else None
    elif kind == 'dw':
      src, p = a
      hold(f'dw{i}', parts[src])
      post(i, parts[src], f'dw{i}', p)
      out_parts = parts[src]
      out_writer = f'dw{i}' if p == 'none' else None
    elif kind == 'up':
      src, g = a
      read(src, f'up{i}')
      groups[g].producers.add(f'up{i}')
      groups[g].writers += 1
      out_parts = (g,)
    elif kind == 'dense4d':
      src, g, relu = a
      read(src, f'dense{i}')
      groups[g].producers.add(f'dense{i}')
      groups[g].writers += 1
      out_parts = (g,)
      out_writer = None if relu else f'dense{i}'
    elif kind in ('add', 'cat'):
      out_parts = parts[a[0]] + (parts[a[1]] if kind == 'cat' else ())
    elif kind == 'bn':
      src, _ = a
      out_parts = parts[src]
      hold(f'bn{i}', out_parts)
      if writer[src] is not None and readers[src] == 1:
        bn_after.add((writer[src], f'bn{i}'))
    elif kind == 'pool':
      out_parts = parts[a[0]]
    elif kind == 'se':
      src, g = a
      (s,) = parts[src]
      read(src, f'se_down{i}')
      groups[g].producers.add(f'se_down{i}')
      groups[g].writers += 1
      groups[g].consumers.add((f'se_up{i}', 0, None, 1))
      groups[s].producers.add(f'se_up{i}')
      groups[s].writers += 1
      out_parts = parts[src]
    elif kind == 'block':
      src, g = a
      (t,) = parts[src]
      b = f'block{i}'
      groups[g].producers.add(f'{b}/Conv_0')
      groups[g].consumers.add((f'{b}/Conv_1', 0, None, 1))
      groups[t].producers |= {f'{b}/Conv_1', f'{b}/gain'}
      groups[t].consumers.add((f'{b}/Conv_0', 0, None, 1))
      groups[g].writers += 1
      groups[t].writers += 1
      out_parts = parts[src]
    elif kind == 'gain':
      (t,) = parts[a[0]]
      groups[t].producers.add(f'gain{i}')
      out_parts = parts[a[0]]
    elif kind == 'gn':
      (t,) = parts[a[0]]
      groups[t].producers.add(f'gn{i}')
      if a[1]:
        pinned.add(t)
      out_parts = parts[a[0]]
    elif kind == 'head':
      src, _, hidden = a
      if hidden >= 0:
        read(src, 'fc')
        groups[hidden].producers.add('fc')
        groups[hidden].writers += 1
        groups[hidden].consumers.add(('out', 0, None, 1))
      else:
        read(src, 'out')
      break
    parts.append(out_parts)
    writer.append(out_writer)
  groups = {g: v for g, v in groups.items() if g not in pinned}
  return groups, bn_after, pinned


def batches(n: int = 2, seed: int = 0) -> list[dict[str, np.ndarray]]:
  """``n`` batches of 16 normal images of the nets' size, all unmasked."""
  rng = np.random.default_rng(seed)
  return [
    {
      'image': rng.normal(size=(16, SIZE, SIZE, 3)).astype(np.float32),
      'label': np.zeros(16, np.int32),
      'mask': np.ones(16, bool),
    }
    for _ in range(n)
  ]


def balanced_keep(rng, width: int, blocks: int = 1, k: int | None = None):
  """A random sorted keep-set of ``k`` (random if None) per block."""
  size = width // blocks
  k = int(rng.integers(1, size + 1)) if k is None else k
  return np.sort(
    np.concatenate(
      [b * size + rng.choice(size, k, False) for b in range(blocks)]
    )
  )


def found(structure) -> dict[int, dict[str, Any]]:
  """A discovered structure in :meth:`Group.normal`'s form, by index."""
  out = {}
  for g in structure.groups:
    out[g.index] = {
      'producers': sorted(g.producers),
      'consumers': sorted(
        (c, 0, None, 1)
        if isinstance(c, str)
        else (c.path, c.offset, c.span, c.blocks)
        for c in g.consumers
      ),
      'concat_producers': sorted(
        (p.path, p.offset, p.span) for p in g.concat_producers
      ),
      'stream': g.stream,
      'blocks': g.blocks,
    }
  return out
