"""A model's channel structure, as data.

Every pfa_jax model describes its prunable channel *groups* with a
:class:`Structure`. A group is one keep-set: a set of output channels that is
pruned as a unit. For a plain conv layer the group is that layer's filters;
for a residual stage it is the stream shared, through the residual adds, by
every layer that writes into it.

Each group names

* ``producers``: module paths whose every ``params`` / ``batch_stats`` leaf
  holds the group's channels on its **last** axis (conv kernel ``[H, W, I, O]``,
  bias, BN scale/bias/mean/var, dense kernel ``[I, O]``), or the path of one
  such leaf (a root-level ``self.param``, or a layer scale in a block that
  also holds other layers);
* ``consumers``: paths of kernels that read the group's channels on axis
  ``-2`` (the input-channel axis of conv ``HWIO`` and dense ``[I, O]``
  kernels). A dense layer after a channel-last flatten reads each channel at
  ``I / C`` positions; the slicer infers that repeat from the kernel shape.
  A grouped conv (``Consumer.blocks``) reads each block of the channels into
  its own block of outputs.
* ``index``: its position in the model's ``widths`` tuple.
* ``blocks``: equal blocks that must keep as many channels each (a grouped
  conv writes or reads the group); 1 otherwise.

``index_maps`` describe parameter-free channel maps between groups, such as
ResNet-56's zero-padding ("option A") shortcut. They are *data*: an int32
leaf of the non-trainable ``'consts'`` variable collection, never a static
module field, so masked variants of one model (which differ only in those
maps) share one compiled program, and a pruned model's maps travel with its
variables.

:mod:`pfa_jax.discover` derives this description from a model's jaxpr; a
consumer may read a group at a channel ``offset`` inside a wider input (a
concatenation) with an explicit per-position ``span``, and index maps are
arrays addressed by path.

The slicer, the masker, the cost model and PFA's response taps all read this
one description, so adding a model means writing its modules and its
``structure()``; no pruning code changes.
"""

import dataclasses

CONSTS = 'consts'


@dataclasses.dataclass(frozen=True)
class Consumer:
  """A kernel that reads a group's channels on its input axis (-2).

  Attributes:
    path: module path; the kernel is ``<path>/kernel``.
    offset: first row of the group inside one spatial position's block of
      input rows (non-zero after a channel concatenation).
    span: input rows per spatial position (the concatenated width); ``None``
      means the group's own width. A channel-last flatten repeats the block
      ``rows / span`` times; the slicer infers that repeat from the kernel.
    blocks: the feature groups of a grouped convolution (``1``: a plain
      kernel). Its kernel ``[H, W, C / blocks, O]`` reads block ``b`` of the
      group's channels (``b C / blocks ..``) into block ``b`` of its
      outputs, so the slicer gathers each output block's rows from its own
      input block, and a keep-set keeps as many channels in every block.
  """

  path: str
  offset: int = 0
  span: int | None = None
  blocks: int = 1


def holds(key: str, path: str) -> bool:
  """Whether the flattened leaf ``key`` ('a/b/kernel') is ``path`` or lies in
  the module ``path``."""
  return key == path or key.startswith(path + '/')


def as_consumer(c) -> Consumer:
  return c if isinstance(c, Consumer) else Consumer(c)


@dataclasses.dataclass(frozen=True)
class Producer:
  """A module whose leaves hold a group's channels inside a wider last axis.

  A BN after a (DenseNet) concatenation normalises several groups' channels
  in one set of leaves: each group owns ``offset .. offset + width`` of a
  last axis of ``span`` entries.
  """

  path: str
  offset: int
  span: int


@dataclasses.dataclass(frozen=True)
class Group:
  """One prunable keep-set.

  Attributes:
    name: layer name used in every layer tree (widths, spectra, keep-sets).
    index: position of this group's width in the model's ``widths`` field.
    producers: module (or leaf) paths writing these channels (sliced on the
      last axis).
    consumers: kernel paths (``str``) or :class:`Consumer` entries reading
      these channels (sliced on axis -2).
    stream: True for a residual stream shared by several producers.
    concat_producers: :class:`Producer` entries: modules that hold these
      channels at an offset of a concatenation's channels (sliced there).
    blocks: a keep-set keeps the same number of channels in each of this
      many equal, contiguous blocks (a grouped convolution writes or reads
      them; the least common multiple of its groups' counts). Widths are
      multiples of it.
  """

  name: str
  index: int
  producers: tuple[str, ...]
  consumers: tuple[str | Consumer, ...]
  stream: bool = False
  concat_producers: tuple[Producer, ...] = ()
  blocks: int = 1


@dataclasses.dataclass(frozen=True)
class IndexMap:
  """A parameter-free channel map stored as data in ``variables['consts']``.

  ``variables['consts'][path...][-1]`` (flattened with ``/``) is an int32
  vector: entry ``j`` is the ``source`` channel that output channel ``j`` of
  ``target`` copies, or ``-1`` for a zero channel.
  """

  path: str
  source: str
  target: str


@dataclasses.dataclass(frozen=True)
class Structure:
  """All prunable groups of a model, in ``widths`` order."""

  groups: tuple[Group, ...]
  index_maps: tuple[IndexMap, ...] = ()
  # The module that writes the logits (its leaves' last axis is the
  # classes): what `slicing.restrict_classes` slices for a class subset.
  head: str = ''
  # (layer, BN module) pairs: a BN that reads the layer's output, and only
  # it, directly (after the layer's own bias at most), so a constant added
  # to that output is absorbed by the BN's mean. Where a fold's offset goes
  # for a bias-free layer; this package's layers put their BN at `../bn`.
  bn_after: tuple[tuple[str, str], ...] = ()

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(g.name for g in self.groups)

  def group(self, name: str) -> Group:
    for g in self.groups:
      if g.name == name:
        return g
    raise KeyError(
      f'Unknown layer {name!r}; this model has: {", ".join(self.names)}.'
    )

  def stream_of(self, path: str) -> str | None:
    """The stream group that module ``path`` writes into, if any."""
    for g in self.groups:
      if g.stream and path in g.producers:
        return g.name
    return None


def widths_of(model) -> dict[str, int]:
  """The model's widths as a layer tree ``{group name: width}``."""
  s = model.structure()
  return {g.name: int(model.widths[g.index]) for g in s.groups}


def with_widths(model, widths) -> object:
  """A copy of ``model`` with the named groups set to the given widths.

  Groups not named keep their width. Unknown names raise ``KeyError``.
  """
  s = model.structure()
  new = list(model.widths)
  for name, w in widths.items():
    w = int(w)
    if w < 1:
      raise ValueError(f'Layer {name!r}: width must be >= 1, got {w}.')
    blocks = s.group(name).blocks
    if w % blocks:
      raise ValueError(
        f'Layer {name!r}: a grouped convolution splits it into {blocks} '
        f'blocks, so its width must be a multiple of {blocks}, got {w}.'
      )
    new[s.group(name).index] = w
  return model.clone(widths=tuple(new))
