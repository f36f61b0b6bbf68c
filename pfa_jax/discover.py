"""A model's channel structure, discovered from its jaxpr.

:func:`discover` traces ``model.apply`` abstractly (no weights, no data:
``jax.eval_shape`` and ``jax.make_jaxpr`` over shapes) and returns the
:class:`~pfa_jax.models.structure.Structure` that the slicer, the masker, the
cost model and PFA's taps read: which modules write each prunable channel
space (every leaf on its last axis), which kernels read it (axis -2, with the
offset and span of a concatenation or the repeat of a flatten), the residual
streams that adds tie together, and the parameter-free channel maps stored in
``variables['consts']``.

How. Every array axis in the jaxpr carries a *label*: ``None`` (no channel
meaning), a node of a union-find over channel spaces, or a composite
(:class:`_Cat` for a concatenation, :class:`_Flat` for merged axes). Each
variable leaf's axes start as fresh nodes that remember their leaf and axis.
Elementwise ops unify the labels of their operands axis by axis (a residual
add ties two producers into one stream; a BN scale joins the channels it
multiplies); a convolution or a dense layer unifies its input's channel label
with the kernel's input axis (a *consumer*) and gives its output the kernel's
output axis (a *producer*). Whatever cannot be pruned channel by channel
with the slicer's edits is *pinned*, with the reason: a reduction over
channels (LayerNorm), a grouped convolution, a channel reshape or slice, a
contraction between two activations, a primitive this module does not know,
and the model's output.

It is the reference for the models' hand-written ``structure()`` methods
(``tests/discover_test.py`` checks every registered model against it), and a
user's own Flax CNN gets its structure without writing one
(:func:`cached`). The model's ``widths`` field, when it has one, is matched
to the groups by 2 log2(n) abstract inits with some widths doubled.
"""

import collections
import dataclasses
import functools
import itertools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from pfa_jax import models
from pfa_jax.models import structure as structure_lib

_PRODUCING = ('params', 'batch_stats')

# Elementwise primitives: operands of one shape, output of that shape.
_ELEMENTWISE = frozenset(
  """
  abs acos acosh add add_any and asin asinh atan atan2 atanh cbrt ceil clamp
  copy copy_p cos cosh div eq erf erf_inv erfc exp exp2 expm1 floor ge gt
  imag integer_pow is_finite le lgamma digamma log log1p logistic lt max min
  mul ne neg nextafter not or population_count pow real reduce_precision rem
  round rsqrt select_n sign sin sinh sqrt square stop_gradient sub tan tanh
  xor convert_element_type
  """.split()
)
_REDUCE = frozenset(
  'reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or '
  'argmax argmin'.split()
)
_CUMULATIVE = frozenset('cumsum cumprod cummax cummin cumlogsumexp'.split())
# Ops that carry a leaf (or a layer's output) through unchanged in value.
_CARRY = frozenset(
  ('reshape', 'broadcast_in_dim', 'convert_element_type', 'squeeze')
)
# Call-like primitives whose sub-jaxpr takes the equation's operands as they
# are (scan, while and cond slice or select them, so they stay unsupported).
_CALLS = frozenset(
  'jit pjit closed_call core_call named_call remat remat2 checkpoint '
  'custom_jvp_call custom_vjp_call custom_vjp_call_jaxpr'.split()
)
_CALL_PARAMS = ('jaxpr', 'call_jaxpr', 'fun_jaxpr')


@dataclasses.dataclass(frozen=True)
class _Cat:
  """An axis concatenated from parts ``((label, size), ...)``."""

  parts: tuple


@dataclasses.dataclass(frozen=True)
class _Flat:
  """Axes merged row-major by a reshape, ``((label, size), ...)``."""

  parts: tuple


@dataclasses.dataclass
class _Node:
  size: int
  leaf: tuple[str, int] | None = None  # (collection/path, axis)
  written: bool = False  # a layer, a channel map or the input writes it
  stream: bool = False  # an elementwise op joins two written spaces
  pins: list = dataclasses.field(default_factory=list)  # (order, reason)
  # (kernel path, offset, span) for reads through a concat or a flatten.
  reads: list = dataclasses.field(default_factory=list)
  # Equal blocks a grouped conv writes or reads (the lcm of its counts).
  blocks: int = 1


@dataclasses.dataclass(frozen=True)
class Discovery:
  """What :func:`discover` found.

  Attributes:
    structure: the prunable groups, in ``widths`` order when the model has a
      ``widths`` field, else in the order the forward pass writes them.
    widths: ``{group name: channels}``.
    pinned: ``{name: reason}`` for every channel space that some layer
      writes but that cannot be pruned (named like a group would be).
  """

  structure: structure_lib.Structure
  widths: dict[str, int]
  pinned: dict[str, str]


class _Spaces:
  """Union-find over channel spaces."""

  def __init__(self):
    self.parent: list[int] = []
    self.nodes: list[_Node] = []
    self.consumed: list[tuple[int, str]] = []  # (node, kernel leaf key)
    # Kernel output axes that a conv or dense layer writes, in trace order.
    self.writers: list[int] = []
    self.maps: list[tuple[str, Any, Any]] = []  # (consts key, src, tgt)
    # (params space, concatenation) pairs: leaves that hold a concat's
    # channels (a BN after a DenseNet concat), one slice per part.
    self.shared: list[tuple[int, _Cat]] = []
    # (layer, BN module, the values between them): see _Tracer._follow.
    self.bn_after: list[tuple[str, str, tuple]] = []
    self.reads: collections.Counter = collections.Counter()
    # Grouped convs: (space, kernel leaf key, groups) for each read, and
    # {kernel leaf key: groups} to compare across widths.
    self.grouped: list[tuple[int, str, int]] = []
    self.order = itertools.count()  # pins, numbered in trace order
    self.group_counts: dict[str, int] = {}

  def new(self, size, leaf=None) -> int:
    self.parent.append(len(self.parent))
    self.nodes.append(_Node(int(size), leaf))
    return len(self.parent) - 1

  def find(self, i: int) -> int:
    while self.parent[i] != i:
      self.parent[i] = self.parent[self.parent[i]]
      i = self.parent[i]
    return i

  def write(self, label):
    """Marks a space as written by a layer, a channel map or the input."""
    if isinstance(label, int):
      self.nodes[self.find(label)].written = True

  def pin(self, label, reason: str):
    if isinstance(label, int):
      # Numbered, so a space reports the first pin of the forward pass.
      self.nodes[self.find(label)].pins.append((next(self.order), reason))
    elif isinstance(label, (_Cat, _Flat)):
      for part, _ in label.parts:
        self.pin(part, reason)

  def unify(self, a, b, reason: str):
    """The label of an axis that carries both ``a`` and ``b``."""
    if a is None:
      return b
    if b is None or a == b:
      return a
    if isinstance(a, int) and isinstance(b, int):
      ra, rb = self.find(a), self.find(b)
      if ra != rb:
        lo, hi = sorted((ra, rb))  # the older node stays the root
        self.parent[hi] = lo
        na, nb = self.nodes[lo], self.nodes[hi]
        na.pins += nb.pins
        na.stream |= nb.stream or (na.written and nb.written)
        na.written |= nb.written
        na.reads += nb.reads
        na.blocks = math.lcm(na.blocks, nb.blocks)
      return self.find(a)
    if (
      type(a) is type(b)
      and not isinstance(a, int)
      and [s for _, s in a.parts] == [s for _, s in b.parts]
    ):
      return type(a)(
        tuple(
          (self.unify(x, y, reason), s)
          for (x, s), (y, _) in zip(a.parts, b.parts)
        )
      )
    cat, other = (a, b) if isinstance(a, _Cat) else (b, a)
    if isinstance(cat, _Cat) and isinstance(other, int):
      root = self.nodes[self.find(other)]
      if not root.written and root.size == sum(n for _, n in cat.parts):
        self.shared.append((self.find(other), cat))
        return cat
    if _Cat in (type(a), type(b)):
      reason += ' across a concatenation'
    self.pin(a, reason)
    self.pin(b, reason)
    # The output is still these channels: it carries the pin on, so a bias
    # added after (a GroupNorm's) cannot start a fresh, prunable space.
    return a if isinstance(a, int) or not isinstance(b, int) else b


def _literal(v) -> bool:
  return isinstance(v, jex.Literal)


def _leaf_key(path) -> str:
  return '/'.join(str(getattr(k, 'key', k)) for k in path)


class _Tracer:
  """Walks a jaxpr, assigning every variable a label per axis."""

  def __init__(self, spaces: _Spaces, grouped=frozenset()):
    self.s = spaces
    self.grouped = grouped
    self.labels: dict[Any, tuple] = {}
    self.kind: dict[Any, str] = {}  # 'act' | 'param' | 'const'
    self.taint: dict[Any, frozenset] = {}  # consts leaves a value reads
    # ('leaf', key): a reshape / broadcast / cast of one variable leaf;
    # ('layer', path, values): a layer's output, plus its own bias at most.
    self.origin: dict[Any, tuple] = {}

  def read(self, v):
    if isinstance(v, jex.Literal):
      return (None,) * np.ndim(v.val), 'const', frozenset()
    return (
      self.labels.get(v, (None,) * len(v.aval.shape)),
      self.kind.get(v, 'const'),
      self.taint.get(v, frozenset()),
    )

  def write(self, v, labels, kind, taint):
    if isinstance(v, jex.DropVar):
      return
    self.labels[v] = tuple(labels)
    self.kind[v] = kind
    self.taint[v] = taint

  def run(self, jaxpr, in_labels, in_kinds, in_taints):
    for v, lab, k, t in zip(jaxpr.invars, in_labels, in_kinds, in_taints):
      self.write(v, lab, k, t)
    for eqn in jaxpr.eqns:
      self.eqn(eqn)
    self.s.reads.update(v for v in jaxpr.outvars if not _literal(v))
    return [self.read(v) for v in jaxpr.outvars]

  def _follow(self, eqn, name):
    """Tracks layer outputs into the BN that reads them (``bn_after``).

    A conv or dense output, plus its own bias, that a BN's mean is
    subtracted from is that BN's input; every value on the way must have no
    other reader (checked when the walk ends), so the BN sees all of it.
    """
    self.s.reads.update(v for v in eqn.invars if not _literal(v))
    if len(eqn.outvars) != 1:
      return
    ins = [None if _literal(v) else self.origin.get(v) for v in eqn.invars]
    leaves = [o[1] for o in ins if o and o[0] == 'leaf']
    layers = [o for o in ins if o and o[0] == 'layer']
    out = eqn.outvars[0]
    if name in _CARRY and len(ins) == 1 and ins[0]:
      if ins[0][0] == 'leaf':
        self.origin[out] = ins[0]
      elif name == 'convert_element_type':  # a layer's output, recast
        self.origin[out] = (*ins[0][:2], (*ins[0][2], out))
    elif name in ('conv_general_dilated', 'dot_general'):
      kernels = [k for k in leaves if k.startswith('params/')]
      if len(kernels) == 1 and kernels[0].endswith('/kernel'):
        self.origin[out] = ('layer', _module(kernels[0]), (out,))
    elif name in ('add', 'sub') and len(layers) == 1 and len(leaves) == 1:
      (_, path, values), key = layers[0], leaves[0]
      if name == 'add' and key == f'params/{path}/bias':
        self.origin[out] = ('layer', path, (*values, out))
      elif (
        name == 'sub'
        and ins[0] is layers[0]
        and key.startswith('batch_stats/')
        and key.endswith('/mean')
      ):
        self.s.bn_after.append((path, _module(key), values))

  # -- one equation --------------------------------------------------------
  def eqn(self, eqn):
    ins = [self.read(v) for v in eqn.invars]
    shapes = [
      tuple(np.shape(v.val))
      if isinstance(v, jex.Literal)
      else tuple(v.aval.shape)
      for v in eqn.invars
    ]
    kinds = [k for _, k, _ in ins]
    kind = 'act' if 'act' in kinds else 'param' if 'param' in kinds else 'const'
    taint = frozenset().union(*(t for _, _, t in ins))
    name = eqn.primitive.name
    self._follow(eqn, name)
    sub = self._sub_jaxpr(eqn, shapes)
    if sub is not None:
      outs = self.run(
        sub,
        [lab for lab, _, _ in ins],
        kinds,
        [t for _, _, t in ins],
      )
      for v, (lab, k, t) in zip(eqn.outvars, outs):
        self.write(v, lab, k, t)
      return
    labels = [lab for lab, _, _ in ins]
    out_shape = tuple(eqn.outvars[0].aval.shape) if eqn.outvars else ()
    # Primitive handlers are the `_op_<primitive>` methods (a helper's name
    # can then never shadow a primitive, as `_reduce` did lax's 'reduce').
    handler = getattr(self, f'_op_{name}', None)
    if name in _ELEMENTWISE:
      out = self._elementwise(labels, shapes, out_shape, name)
    elif name in _REDUCE:
      out = self._reduce(labels[0], eqn.params['axes'], name)
    elif name.startswith('reduce_window') or name in _CUMULATIVE:
      out = self._window(eqn, labels[0], shapes[0], out_shape, name)
    elif handler is not None:
      out = handler(eqn, labels, shapes, out_shape, kinds, ins)
    else:
      for lab in labels:
        for a in lab:
          self.s.pin(a, f'read by the unsupported primitive {name!r}')
      out = None
    for i, v in enumerate(eqn.outvars):
      lab = (
        out if (out is not None and i == 0) else ((None,) * len(v.aval.shape))
      )
      self.write(v, lab, kind, taint)

  @staticmethod
  def _sub_jaxpr(eqn, shapes):
    """The body of a call-like equation, if its inputs are the operands."""
    if eqn.primitive.name not in _CALLS:
      return None
    for key in _CALL_PARAMS:
      j = eqn.params.get(key)
      if isinstance(j, jex.ClosedJaxpr):
        j = j.jaxpr
      if isinstance(j, jex.Jaxpr) and [
        tuple(v.aval.shape) for v in j.invars
      ] == list(shapes):
        return j
    return None

  def _elementwise(self, labels, shapes, out_shape, name):
    out = [None] * len(out_shape)
    for ax in range(len(out_shape)):
      for lab, shape in zip(labels, shapes):
        if len(shape) != len(out_shape) or shape[ax] != out_shape[ax]:
          continue  # a scalar literal, or a broadcast axis
        out[ax] = self.s.unify(out[ax], lab[ax], f'mixed channels in {name!r}')
    return out

  def _reduce(self, label, axes, name):
    for ax in axes:
      self.s.pin(label[ax], f'channels reduced over by {name!r}')
    return [a for ax, a in enumerate(label) if ax not in axes]

  def _window(self, eqn, label, shape, out_shape, name):
    dims = eqn.params.get('window_dimensions')
    strides = eqn.params.get('window_strides')
    out = []
    for ax, a in enumerate(label):
      if name in _CUMULATIVE:
        moved = ax == eqn.params['axis']
      else:
        moved = dims[ax] != 1 or strides[ax] != 1
      if (moved and shape[ax] > 1) or shape[ax] != out_shape[ax]:
        self.s.pin(a, f'channels combined by {name!r}')
        a = None
      out.append(a)
    return out

  # -- shape ops -----------------------------------------------------------
  def _op_broadcast_in_dim(self, eqn, labels, shapes, out_shape, *_):
    out = [None] * len(out_shape)
    for i, d in enumerate(eqn.params['broadcast_dimensions']):
      if shapes[0][i] == out_shape[d]:
        out[d] = labels[0][i]
    return out

  def _op_transpose(self, eqn, labels, *_):
    return [labels[0][p] for p in eqn.params['permutation']]

  def _op_squeeze(self, eqn, labels, *_):
    return [
      a for i, a in enumerate(labels[0]) if i not in eqn.params['dimensions']
    ]

  def _op_reshape(self, eqn, labels, shapes, out_shape, *_):
    src = [(a, n) for a, n in zip(labels[0], shapes[0]) if n != 1]
    dst = [i for i, n in enumerate(out_shape) if n != 1]
    out = [None] * len(out_shape)
    i = j = 0
    while i < len(src) and j < len(dst):
      # The smallest runs of input and output axes with equal products.
      i2, j2 = i + 1, j + 1
      p, q = src[i][1], out_shape[dst[j]]
      while p != q:
        if p < q:
          p *= src[i2][1]
          i2 += 1
        else:
          q *= out_shape[dst[j2]]
          j2 += 1
      run = src[i:i2]
      if i2 - i == 1 and j2 - j == 1:
        out[dst[j]] = run[0][0]
      elif j2 - j == 1:
        parts = []
        for a, n in run:
          parts += list(a.parts) if isinstance(a, _Flat) else [(a, n)]
        out[dst[j]] = _Flat(tuple(parts))
      elif (
        i2 - i == 1
        and isinstance(run[0][0], _Flat)
        and [n for _, n in run[0][0].parts] == [out_shape[d] for d in dst[j:j2]]
      ):
        for d, (a, _) in zip(dst[j:j2], run[0][0].parts):
          out[d] = a
      else:
        for a, _ in run:
          self.s.pin(a, 'channels split or regrouped by a reshape')
      i, j = i2, j2
    return out

  def _sized(self, labels, shape, out_shape, what):
    out = []
    for a, n, m in zip(labels, shape, out_shape):
      if n != m:
        self.s.pin(a, f'channels {what}')
        a = None
      out.append(a)
    return out

  def _op_slice(self, eqn, labels, shapes, out_shape, *_):
    return self._sized(labels[0], shapes[0], out_shape, 'sliced')

  def _op_dynamic_slice(self, eqn, labels, shapes, out_shape, *_):
    return self._sized(labels[0], shapes[0], out_shape, 'sliced')

  def _op_pad(self, eqn, labels, shapes, out_shape, *_):
    return self._sized(labels[0], shapes[0], out_shape, 'padded')

  def _op_rev(self, eqn, labels, shapes, out_shape, *_):
    for ax in eqn.params['dimensions']:
      if shapes[0][ax] > 1:
        self.s.pin(labels[0][ax], 'channels reversed')
    return list(labels[0])

  def _op_concatenate(self, eqn, labels, shapes, out_shape, *_):
    d = eqn.params['dimension']
    out = list(
      self._elementwise(
        [lab[:d] + lab[d + 1 :] for lab in labels],
        [s[:d] + s[d + 1 :] for s in shapes],
        out_shape[:d] + out_shape[d + 1 :],
        'concatenate',
      )
    )
    parts = []
    for lab, s in zip(labels, shapes):
      a = lab[d]
      parts += list(a.parts) if isinstance(a, _Cat) else [(a, s[d])]
    out.insert(d, _Cat(tuple(parts)))
    return out

  # -- contractions --------------------------------------------------------
  def _consume(self, act, kernel, key, rows):
    """An activation axis ``act`` read by a kernel's input axis."""
    if act is None:
      return
    k = kernel if isinstance(kernel, int) else None
    leaf = self.s.nodes[k].leaf if k is not None else None
    if leaf is None or not leaf[0].endswith('/kernel') or leaf[1] != -2:
      self.s.pin(act, f'channels read by something other than a kernel ({key})')
      return
    path = leaf[0]
    if isinstance(act, int):
      self.s.unify(act, k, 'kernel input')
      self.s.consumed.append((k, path))
      return
    parts = list(act.parts)
    if isinstance(act, _Flat):
      # A channel-last flatten: the last part is the channel axis, read at
      # every spatial position; the other parts must not be channels.
      for a, _ in parts[:-1]:
        self.s.pin(a, f'channels flattened before others into {path!r}')
      last, span = parts[-1]
      parts = list(last.parts) if isinstance(last, _Cat) else [(last, span)]
      single = not isinstance(last, _Cat)
    else:
      span = rows
      single = False
    offset = 0
    for a, n in parts:
      if isinstance(a, int):
        self.s.nodes[self.s.find(a)].reads.append(
          (_module(path), offset, None if single else span)
        )
      elif a is not None:
        self.s.pin(a, f'nested channel layout read by {path!r}')
      offset += n

  def _op_conv_general_dilated(
    self, eqn, labels, shapes, out_shape, kinds, ins
  ):
    dn = eqn.params['dimension_numbers']
    lhs, rhs = labels
    lb, lf = dn.lhs_spec[0], dn.lhs_spec[1]
    ro, ri = dn.rhs_spec[0], dn.rhs_spec[1]
    ob, of = dn.out_spec[0], dn.out_spec[1]
    groups = eqn.params['feature_group_count']
    out = [None] * len(out_shape)
    out[ob] = lhs[lb] if eqn.params['batch_group_count'] == 1 else None
    c_in, c_out = shapes[0][lf], shapes[1][ro]
    leaf = self.s.nodes[rhs[ri]].leaf if isinstance(rhs[ri], int) else None
    fixed = leaf is not None and leaf[0] in self.grouped
    if groups == c_in and c_out == c_in and groups > 1 and not fixed:
      # Depthwise: output channel c is input channel c's filter, so the
      # layer belongs to its input's group (it writes no new space).
      out[of] = self.s.unify(lhs[lf], rhs[ro], 'depthwise conv')
      return out
    if groups == 1:
      self._consume(lhs[lf], rhs[ri], 'conv', shapes[1][ri])
    else:
      self._grouped(lhs[lf], rhs[ro], leaf, groups)
    out[of] = rhs[ro]
    if isinstance(rhs[ro], int):
      self.s.writers.append(rhs[ro])
      self.s.write(rhs[ro])
    return out

  def _grouped(self, act, out, leaf, groups):
    """A grouped conv: block b of ``act`` feeds block b of ``out``.

    ``leaf``: ``(key, axis)`` of the kernel's input axis, if a variable.
    """
    why = f'grouped convolution ({groups} groups)'
    if leaf is None or not leaf[0].endswith('/kernel') or leaf[1] != -2:
      self.s.pin(act, f'{why} of a kernel that is not a variable')
      self.s.pin(out, f'{why} of a kernel that is not a variable')
      return
    self.s.group_counts[leaf[0]] = groups
    if isinstance(out, int):
      node = self.s.nodes[self.s.find(out)]
      node.blocks = math.lcm(node.blocks, groups)
    if not isinstance(act, int):
      self.s.pin(act, f'{why} over a concatenation or a flatten')
    else:
      node = self.s.nodes[self.s.find(act)]
      node.blocks = math.lcm(node.blocks, groups)
      self.s.grouped.append((act, leaf[0], groups))

  def _op_dot_general(self, eqn, labels, shapes, out_shape, kinds, ins):
    (lc, rc), (lbd, rbd) = eqn.params['dimension_numbers']
    lhs, rhs = labels
    acts = [k == 'act' for k in kinds]
    taints = [t for _, _, t in ins]
    out = [
      self.s.unify(lhs[a], rhs[b], 'batched matmul') for a, b in zip(lbd, rbd)
    ]
    free = [
      [a for i, a in enumerate(lhs) if i not in lc and i not in lbd],
      [a for i, a in enumerate(rhs) if i not in rc and i not in rbd],
    ]
    if acts[0] != acts[1]:
      act_side = 0 if acts[0] else 1
      p_side = 1 - act_side
      a_lab, p_lab = (lhs, rhs) if act_side == 0 else (rhs, lhs)
      a_dims, p_dims = (lc, rc) if act_side == 0 else (rc, lc)
      if taints[p_side] and all(p_lab[d] is None for d in p_dims):
        # A channel map built from a consts leaf (ResNet's option A).
        key = sorted(taints[p_side])[0]
        for d in a_dims:
          for t in free[p_side]:
            self.s.maps.append((key, a_lab[d], t))
            self.s.write(t)
      else:
        for a, p in zip(a_dims, p_dims):
          self._consume(a_lab[a], p_lab[p], 'dense', shapes[p_side][p])
        for t in free[p_side]:
          if isinstance(t, int):
            self.s.writers.append(t)
            self.s.write(t)
    elif acts[0]:
      for a, b in zip(lc, rc):
        self.s.pin(lhs[a], 'contracted with another activation')
        self.s.pin(rhs[b], 'contracted with another activation')
    else:
      for a, b in zip(lc, rc):
        self.s.unify(lhs[a], rhs[b], 'weights multiplied together')
    return out + free[0] + free[1]


def _plain(model: nn.Module) -> nn.Module:
  """This package's models on their reference path: XLA convs, BN unfolded."""
  model = models.unfolded(model)
  if any(f.name == 'conv_impl' for f in dataclasses.fields(model)):
    model = model.clone(conv_impl='xla')
  return model


def _abstract_variables(model, sample, kw):
  return jax.eval_shape(
    lambda x: model.init(jax.random.PRNGKey(0), x, **kw), sample
  )


def _as_sample(sample):
  if isinstance(sample, jax.ShapeDtypeStruct):
    return sample
  if isinstance(sample, Sequence) and all(
    isinstance(n, (int, np.integer)) for n in sample
  ):
    return jax.ShapeDtypeStruct(tuple(sample), jnp.float32)
  return jax.ShapeDtypeStruct(np.shape(sample), jnp.result_type(sample))


def _trace(model, variables, sample, kw, grouped=frozenset()):
  """Labels every axis of ``model.apply``'s jaxpr; returns the spaces.

  ``grouped``: kernels of grouped convs that are not depthwise even where
  their group count equals their width.
  """
  try:
    if variables is None:
      variables = _abstract_variables(model, sample, kw)
    closed = jax.make_jaxpr(lambda v, x: model.apply(v, x, **kw))(
      variables, sample
    )
  except Exception as e:  # noqa: BLE001 - re-raised with what was traced
    raise ValueError(
      f'discover: tracing {type(model).__name__}.apply on an input of shape '
      f'{sample.shape} failed: {type(e).__name__}: {e}'
    ) from e
  leaves = jax.tree_util.tree_flatten_with_path(variables)[0]
  spaces = _Spaces()
  tracer = _Tracer(spaces, grouped)
  in_labels, in_kinds, in_taints = [], [], []
  for path, leaf in leaves:
    key = _leaf_key(path)
    nd = len(leaf.shape)
    in_labels.append(
      tuple(spaces.new(n, (key, ax - nd)) for ax, n in enumerate(leaf.shape))
    )
    in_kinds.append('param')
    consts = key.startswith(structure_lib.CONSTS + '/')
    in_taints.append(frozenset([key]) if consts else frozenset())
  image = tuple(spaces.new(n) for n in sample.shape)
  for a in image:
    spaces.pin(a, 'the model input')
    spaces.write(a)
  in_labels.append(image)
  in_kinds.append('act')
  in_taints.append(frozenset())
  jaxpr = closed.jaxpr
  n_const = len(jaxpr.invars) - len(in_labels)
  if n_const:
    raise ValueError(
      f'discover: {type(model).__name__}.apply closed over {n_const} '
      'unexpected inputs.'
    )
  for v, (path, _) in zip(jaxpr.invars, leaves):
    tracer.origin[v] = ('leaf', _leaf_key(path))
  outs = tracer.run(jaxpr, in_labels, in_kinds, in_taints)
  head = []
  for labels, _, _ in outs:
    for a in labels:
      spaces.pin(a, 'the model output')
    if labels and isinstance(labels[-1], int):
      head.append(spaces.find(labels[-1]))
  return spaces, head, [(_leaf_key(p), tuple(lab.shape)) for p, lab in leaves]


def _module(key: str) -> str:
  """'params/a/b/kernel' -> 'a/b'."""
  return key.split('/', 1)[1].rpartition('/')[0]


def _in(key: str, path: str) -> bool:
  """Whether leaf ``key`` ('params/a/b/kernel') is, or is under, ``path``."""
  return structure_lib.holds(key.split('/', 1)[1], path)


def _collapse(paths: set[str], all_keys: list[str]) -> list[str]:
  """Producer paths: the highest modules whose every leaf is in ``paths``.

  A leaf whose own module also holds other leaves (a layer-scale parameter
  beside a block's convs), or that sits at the model's root, is named by its
  own path ('a/b/gain', 'gain').
  """
  by_prefix: dict[str, list[str]] = {}
  for key in all_keys:
    if key.split('/', 1)[0] not in _PRODUCING:
      continue
    parts = _module(key).split('/')
    for i in range(1, len(parts) + 1):
      by_prefix.setdefault('/'.join(parts[:i]), []).append(key)
  out = set()
  for key in paths:
    parts = _module(key).split('/')
    best = key.split('/', 1)[1]
    for i in range(len(parts), 0, -1):
      prefix = '/'.join(parts[:i])
      if prefix and all(k in paths for k in by_prefix[prefix]):
        best = prefix
      else:
        break
    out.add(best)
  return sorted(out)


def discover(
  model: nn.Module, sample, variables=None, **apply_kwargs
) -> Discovery:
  """The channel structure of ``model``, from the jaxpr of its forward pass.

  Args:
    model: a Flax linen module. This package's models run on their
      reference path (``conv_impl='xla'``, ``fold_bn=False``) for the trace.
    sample: an input, a ``jax.ShapeDtypeStruct``, or a shape tuple (float32).
      Only its shape and dtype are read.
    variables: the model's variables, or ``None`` to use the shapes
      ``model.init`` would create (``jax.eval_shape``; nothing is computed).
    **apply_kwargs: passed to ``model.apply`` (e.g. ``train=False``; the
      default). BN must read its running statistics, so trace in eval mode.

  Returns:
    A :class:`Discovery`.
  """
  apply_kwargs.setdefault('train', False)
  model = _plain(model)
  sample = _as_sample(sample)
  widths = getattr(model, 'widths', None)
  if widths is not None and any(int(w) == 1 for w in widths):
    return _through_ones(model, sample, apply_kwargs)
  if widths is None:
    spaces, head_roots, leaves = _trace(model, variables, sample, apply_kwargs)
    found = _spaces_found(spaces, leaves)
  else:
    # A layout can look per-channel at one width only: a GroupNorm of 2
    # groups, or a conv of 2 feature groups, on 2 channels. Traced at twice
    # the widths it groups them, and pruning one channel would break it.
    # So can a conv of 4 fixed groups on 4 channels look depthwise.
    doubled = model.clone(widths=tuple(2 * int(w) for w in widths))
    twice_spaces, _, twice_leaves = _trace(doubled, None, sample, apply_kwargs)
    spaces, head_roots, leaves = _trace(
      model, variables, sample, apply_kwargs, set(twice_spaces.group_counts)
    )
    found = _spaces_found(spaces, leaves)
    twice = {
      f.kernel: f.pins[0]
      for f in _spaces_found(twice_spaces, twice_leaves)
      if f.pins
    }
    counts = (spaces.group_counts, twice_spaces.group_counts)
    for f in found:
      if not f.pins and f.kernel in twice:
        f.pins.append(f'{twice[f.kernel]} (at twice the widths)')
      # A group count set from a width (``feature_group_count=C // 8``)
      # would change with the pruned width, and the blocks with it.
      moved = [k for k in f.grouped if counts[0][k] != counts[1].get(k)]
      if moved and not f.pins:
        k = moved[0]
        f.pins.append(
          f'grouped convolution {_module(k)!r} has {counts[0][k]} groups, '
          f'and {counts[1].get(k)} at twice the widths: its group count '
          'follows a width'
        )
  names = {f.root: f.name for f in found}
  pinned = {}
  for f in found:
    if f.root in head_roots and not f.pins:
      f.pins.append('the model output')
    if f.pins:
      pinned[f.name] = f.pins[0]
  # A channel map between two groups is data the slicer rewrites; one that
  # touches a fixed space fixes the other end too (to a fixed point).
  ok = {f.root for f in found if not f.pins}
  maps = {
    (key, _root(spaces, src), _root(spaces, tgt))
    for key, src, tgt in spaces.maps
  }
  changed = True
  while changed:
    changed = False
    for key, src, tgt in maps:
      if (src in ok) != (tgt in ok):
        r = src if src in ok else tgt
        ok.discard(r)
        pinned[names[r]] = f'channel map {key!r} joins it to a fixed space'
        changed = True
  index_maps = tuple(
    structure_lib.IndexMap(key.split('/', 1)[1], names[src], names[tgt])
    for key, src, tgt in sorted(maps, key=lambda m: m[0])
    if src in ok and tgt in ok
  )
  kept = [f for f in found if f.root in ok]
  order = _width_order(model, sample, apply_kwargs, kept, dict(leaves))
  groups = sorted(
    (
      structure_lib.Group(
        name=f.name,
        index=order[f.name],
        producers=tuple(f.producers),
        consumers=tuple(sorted(set(f.consumers), key=_ckey)),
        stream=f.stream,
        concat_producers=tuple(f.concat_producers),
        blocks=f.blocks,
      )
      for f in kept
    ),
    key=lambda g: g.index,
  )
  head = ''
  if head_roots:
    mods = _collapse(
      {
        k
        for k, ax in _members(spaces).get(head_roots[0], [])
        if ax == -1 and k.split('/', 1)[0] in _PRODUCING
      },
      [k for k, _ in leaves],
    )
    head = mods[0] if len(mods) == 1 else ''
  return Discovery(
    structure_lib.Structure(tuple(groups), index_maps, head, _bn_after(spaces)),
    {f.name: spaces.nodes[f.root].size for f in kept},
    pinned,
  )


def _bn_after(spaces) -> tuple[tuple[str, str], ...]:
  """(layer, BN) pairs whose values between them have no other reader."""
  found = {}
  for layer, bn, values in spaces.bn_after:
    ok = all(spaces.reads[v] == 1 for v in values)
    found.setdefault(layer, set()).add(bn if ok else None)
  pairs = [(k, bns.pop()) for k, bns in found.items() if len(bns) == 1]
  return tuple(sorted((k, b) for k, b in pairs if b is not None))


def _through_ones(model, sample, kw) -> Discovery:
  """Discovery of a model with a width of 1, traced at width 2.

  A one-channel axis is indistinguishable from an inserted or broadcast one
  (a BN's ``(1,)`` scale reshaped to ``(1, 1, 1, 1)``), so its label would
  be lost. The structure does not depend on the widths except through the
  offsets and spans of concatenations: every width of 1 is traced as 2, and
  each offset and span then loses the extra channels of the groups before
  it, and in it, on the same concatenated axis. Checked against the real
  widths' leaf shapes (a fixed part of a concatenation that a width of 1
  also sets would not be corrected): a mismatch raises.
  """
  wide = tuple(max(int(w), 2) for w in model.widths)
  d = discover(model.clone(widths=wide), sample, None, **kw)
  extra = {
    g.name: wide[g.index] - model.widths[g.index] for g in d.structure.groups
  }
  # Each concatenated axis, as {(path, span, kind): [(offset, group)]}.
  axes = {}
  for g in d.structure.groups:
    for c in map(structure_lib.as_consumer, g.consumers):
      if c.span is not None:
        axes.setdefault((c.path, c.span, 'in'), []).append((c.offset, g.name))
    for p in g.concat_producers:
      axes.setdefault((p.path, p.span, 'out'), []).append((p.offset, g.name))

  def fixed(path, offset, span, kind):
    parts = axes[(path, span, kind)]
    before = sum(extra[n] for o, n in parts if o < offset)
    return offset - before, span - sum(extra[n] for _, n in parts)

  groups = []
  for g in d.structure.groups:
    consumers = []
    for c in map(structure_lib.as_consumer, g.consumers):
      if c.span is not None:
        c = structure_lib.Consumer(
          c.path, *fixed(c.path, c.offset, c.span, 'in')
        )
      consumers.append(c)
    producers = tuple(
      structure_lib.Producer(p.path, *fixed(p.path, p.offset, p.span, 'out'))
      for p in g.concat_producers
    )
    groups.append(
      dataclasses.replace(
        g, consumers=tuple(consumers), concat_producers=producers
      )
    )
  # Positions per row block do not depend on the widths: rows / span must
  # agree between the two traces, and a BN after a concat holds ``span``.
  real, traced = (
    traverse_util.flatten_dict(_abstract_variables(m, sample, kw), sep='/')
    for m in (model, model.clone(widths=wide))
  )
  for g, w in zip(groups, d.structure.groups, strict=True):
    pairs = zip(
      map(structure_lib.as_consumer, g.consumers),
      map(structure_lib.as_consumer, w.consumers),
      strict=True,
    )
    ok = all(
      c.span is None
      or real[f'params/{c.path}/kernel'].shape[-2] * cw.span
      == traced[f'params/{c.path}/kernel'].shape[-2] * c.span
      for c, cw in pairs
    ) and all(
      real[k].shape[-1] == p.span
      for p in g.concat_producers
      for k in real
      if _in(k, p.path)
    )
    if not ok:
      raise ValueError(
        f'discover: with a width of 1, the concatenation that group '
        f'{g.name!r} is part of does not add up; a width of 1 may set a '
        'part of it that is not a group. Trace it with widths >= 2.'
      )
  return Discovery(
    dataclasses.replace(d.structure, groups=tuple(groups)),
    {g.name: int(model.widths[g.index]) for g in groups},
    d.pinned,
  )


@dataclasses.dataclass
class _Found:
  """A space some layer writes: a group, unless it has pins."""

  root: int
  name: str
  kernel: str  # its first writer's kernel (identifies it across widths)
  producers: list[str]
  consumers: list[structure_lib.Consumer]
  concat_producers: list[structure_lib.Producer]
  stream: bool
  pins: list[str]
  blocks: int = 1
  grouped: tuple[str, ...] = ()  # grouped convs' kernels that write or read it


def _root(spaces, label):
  return spaces.find(label) if isinstance(label, int) else None


def _members(spaces) -> dict[int, list[tuple[str, int]]]:
  """Every leaf axis ``(key, axis)``, by the space it ended up in."""
  out = {}
  for i, node in enumerate(spaces.nodes):
    if node.leaf is not None:
      out.setdefault(spaces.find(i), []).append(node.leaf)
  return out


def _under(path: str, keys) -> list[str]:
  """The params / batch_stats leaves at or under ``path``."""
  return [k for k in keys if k.split('/', 1)[0] in _PRODUCING and _in(k, path)]


def _spaces_found(spaces, leaves) -> list[_Found]:
  """Every written space, in the order the forward pass writes them."""
  all_keys = [k for k, _ in leaves]
  members = _members(spaces)
  consumed = {(spaces.find(k), p) for k, p in spaces.consumed}
  grouped: dict[int, list[tuple[str, int]]] = {}
  for a, key, groups in spaces.grouped:
    grouped.setdefault(spaces.find(a), []).append((key, groups))
  writers: dict[int, list[tuple[str, int]]] = {}  # insertion: trace order
  for w in spaces.writers:
    writers.setdefault(spaces.find(w), []).append(spaces.nodes[w].leaf)
  # Leaves that hold a slice of a concatenation (a BN after a DenseNet
  # concat): {space: [(leaf key, offset, span)]}.
  sliced: dict[int, list[tuple[str, int, int]]] = {}
  for r, cat in spaces.shared:
    keys = [
      key
      for key, axis in members.get(spaces.find(r), [])
      if axis == -1 and key.split('/', 1)[0] in _PRODUCING
    ]
    span, offset = sum(n for _, n in cat.parts), 0
    for part, n in cat.parts:
      if isinstance(part, int):
        sliced.setdefault(spaces.find(part), []).extend(
          (key, offset, span) for key in keys
        )
      offset += n
  found, streams = [], 0
  for root, writes in writers.items():
    node = spaces.nodes[root]
    prods, cons, pins = set(), [], [r for _, r in sorted(node.pins)]
    for key, axis in members.get(root, []):
      coll = key.split('/', 1)[0]
      if coll == structure_lib.CONSTS:
        continue
      if axis == -1 and coll in _PRODUCING:
        prods.add(key)
      elif axis == -2 and (root, key) in consumed:
        cons.append(structure_lib.Consumer(_module(key)))
      else:
        pins.append(f'{key} holds these channels on axis {axis}')
    cons += [structure_lib.Consumer(p, o, n) for p, o, n in node.reads]
    reads = grouped.get(root, [])
    cons += [structure_lib.Consumer(_module(k), blocks=g) for k, g in reads]
    convs = [k for k, _ in reads] + [k for k, _ in writes]
    modules = _collapse(prods, all_keys)
    shared = []
    for offset, span in sorted({(o, n) for _, o, n in sliced.get(root, [])}):
      keys = {k for k, o, n in sliced[root] if (o, n) == (offset, span)}
      for m in _collapse(keys, all_keys):
        shared.append(structure_lib.Producer(m, offset, span))
        prods |= keys
    for m in modules + [p.path for p in shared]:
      stray = [k for k in _under(m, all_keys) if k not in prods]
      if stray:
        pins.append(f'module {m!r} also holds {stray[0]!r}')
    key, axis = writes[0]
    if axis != -1:
      pins.append(f'{key} writes these channels on axis {axis}, not the last')
    stream = node.stream or len(writes) > 1
    streams += stream
    name = (
      f'stream{streams}'
      if stream
      else next((m for m in modules if _in(key, m)), _module(key))
    )
    found.append(
      _Found(
        root,
        name,
        key,
        modules,
        cons,
        shared,
        stream,
        pins,
        node.blocks,
        tuple(k for k in convs if k in spaces.group_counts),
      )
    )
  return found


def _width_order(model, sample, kw, groups, shapes) -> dict[str, int]:
  """Each group's index in ``model.widths`` (forward order without one).

  Widths are doubled in 2 log2(n) abstract inits: round (b, 1) doubles the
  indices with bit b set, round (b, 0) the others. A group set by one width
  grows in exactly one round of each pair, which spells its index; a group
  that grows in both or neither is set by several widths or none. Doubling,
  not adding one, keeps a width divisible by whatever divides it (a
  GroupNorm's groups, a grouped convolution's).
  """
  widths = getattr(model, 'widths', None)
  if widths is None:
    return {f.name: i for i, f in enumerate(groups)}
  n = len(widths)
  bits = max(1, (n - 1).bit_length())
  grew = {f.name: [] for f in groups}
  for b in range(bits):
    for flip in (1, 0):
      bumped = tuple(
        w * (1 + int((i >> b & 1) == flip)) for i, w in enumerate(widths)
      )
      v = traverse_util.flatten_dict(
        _abstract_variables(model.clone(widths=bumped), sample, kw), sep='/'
      )
      for f in groups:
        grew[f.name].append(int(v[f.kernel].shape[-1] > shapes[f.kernel][-1]))
  order, taken = {}, {}
  for name, d in grew.items():
    pairs = list(zip(d[0::2], d[1::2]))
    if any(sorted(p) != [0, 1] for p in pairs):
      raise ValueError(
        f'discover: the width of group {name!r} is not set by exactly one '
        f'entry of {type(model).__name__}.widths.'
      )
    i = sum(1 << b for b, (on, _) in enumerate(pairs) if on)
    if i >= n or i in taken:
      raise ValueError(
        f'discover: groups {taken.get(i)!r} and {name!r} share widths[{i}].'
      )
    order[name], taken[i] = i, name
  return order


@functools.lru_cache(maxsize=256)
def _cached(model, shape, dtype, kw):
  return discover(model, jax.ShapeDtypeStruct(shape, dtype), **dict(kw))


def cached(model: nn.Module, sample, **apply_kwargs) -> Discovery:
  """:func:`discover` over shapes alone, memoised per (model, input).

  For a user model's ``structure()`` method, which the slicer and the
  methods call many times::

    def structure(self):
      return discover.cached(self, (1, 32, 32, 3)).structure
  """
  sample = _as_sample(sample)
  return _cached(
    model,
    tuple(sample.shape),
    jnp.dtype(sample.dtype),
    tuple(sorted(apply_kwargs.items())),
  )


def check(model: nn.Module, sample, variables=None, **apply_kwargs) -> None:
  """Raises if ``model.structure()`` disagrees with the discovered one.

  The message names the first group (or index map, or head) that differs.
  """
  want = model.structure()
  got = discover(model, sample, variables, **apply_kwargs)
  diffs = compare(want, got.structure)
  if diffs:
    raise ValueError(
      f'{type(model).__name__}.structure() disagrees with its jaxpr: '
      + '; '.join(diffs[:3])
      + (f' (and {len(diffs) - 3} more)' if len(diffs) > 3 else '')
    )


def compare(
  want: structure_lib.Structure, got: structure_lib.Structure
) -> list[str]:
  """Differences between two structures, one message each (empty: equal)."""
  out = []
  gw = {g.name: g for g in want.groups}
  gg = {g.name: g for g in got.groups}
  for name in sorted(set(gw) | set(gg)):
    if name not in gg:
      out.append(f'group {name!r} is not in the discovered structure')
      continue
    if name not in gw:
      out.append(f'group {name!r} is missing from structure()')
      continue
    a, b = gw[name], gg[name]
    for field in ('index', 'producers', 'stream', 'concat_producers', 'blocks'):
      x, y = getattr(a, field), getattr(b, field)
      if field == 'producers':
        x, y = sorted(x), sorted(y)
      if field == 'concat_producers':
        x = sorted((p.path, p.offset, p.span) for p in x)
        y = sorted((p.path, p.offset, p.span) for p in y)
      if x != y:
        out.append(f'group {name!r}: {field} {x!r}, discovered {y!r}')
    ca = sorted(map(structure_lib.as_consumer, a.consumers), key=_ckey)
    cb = sorted(map(structure_lib.as_consumer, b.consumers), key=_ckey)
    if [_ckey(c) for c in ca] != [_ckey(c) for c in cb]:
      out.append(
        f'group {name!r}: consumers {[_ckey(c) for c in ca]}, discovered '
        f'{[_ckey(c) for c in cb]}'
      )
  ma = sorted((m.path, m.source, m.target) for m in want.index_maps)
  mb = sorted((m.path, m.source, m.target) for m in got.index_maps)
  if ma != mb:
    out.append(f'index maps {ma}, discovered {mb}')
  if want.head != got.head:
    out.append(f'head {want.head!r}, discovered {got.head!r}')
  return out


def _ckey(c: structure_lib.Consumer):
  return (c.path, c.offset, c.span, c.blocks)


__all__ = ['Discovery', 'cached', 'check', 'compare', 'discover']
