"""Physical pruning and masking of Flax models: two views of one keep-set.

``keep`` is a layer tree ``{group name: sorted kept indices}`` over the
groups of ``model.structure()``; unnamed groups stay whole.

* :func:`prune` slices every producer leaf (last axis) and every consumer
  kernel (axis -2) and returns the same model class with smaller ``widths``:
  a genuinely smaller network with the kept filters' trained weights.
* :func:`masks` / :func:`mask` express the same pruning as 0/1 multipliers on
  the dense network's ``params``: removed channels' producers and consumers
  are zeroed, so the masked dense net computes exactly the pruned net's
  function (the invariant the tests check) and can be trained with the mask
  re-applied, e.g. for vmap-parallel masked training of many variants.

Both read one *plan* (:func:`plan`), a list of (collection, leaf path, axis,
indices) edits derived from the model's :class:`~pfa_jax.models.structure.
Structure`, so they cannot disagree.
"""

import dataclasses
from collections.abc import Mapping

import flax.linen as nn
import numpy as np
from flax import traverse_util

from pfa_jax.models import structure as structure_lib

_COLLECTIONS = ('params', 'batch_stats')


@dataclasses.dataclass(frozen=True)
class Edit:
  """Keep ``index`` along ``axis`` of the leaf ``collection/path``."""

  collection: str
  path: str
  axis: int
  index: np.ndarray  # int, sorted


def check_keep(model: nn.Module, keep: Mapping) -> dict[str, np.ndarray]:
  """Validates ``keep`` against ``model``; returns it as sorted int arrays.

  Raises:
    ValueError: an unknown layer (e.g. another model's keep-set), a layer
      that is tied by a residual add (name its stream group instead), or an
      empty, unsorted, duplicated or out-of-range keep-set. The message names
      the layer.
  """
  s = model.structure()
  out = {}
  for name, idx in keep.items():
    if name not in s.names:
      stream = s.stream_of(name)
      if stream is not None:
        raise ValueError(
          f'Layer {name!r} writes the residual stream {stream!r}; its output '
          'channels are added to the other layers of that stream, so pruning '
          f'it alone would leave the residual add inconsistent. Prune '
          f'{stream!r} instead (one keep-set for the whole stream).'
        )
      raise ValueError(
        f'Unknown layer {name!r} for {type(model).__name__}: is this keep-set '
        f'for another model? Known layers: {", ".join(s.names)}.'
      )
    width = int(model.widths[s.group(name).index])
    arr = np.asarray(idx)
    if arr.ndim != 1 or arr.size == 0:
      raise ValueError(
        f'Layer {name!r}: keep-set must be a non-empty 1-D index list, got '
        f'shape {arr.shape}.'
      )
    if not np.issubdtype(arr.dtype, np.integer):
      raise ValueError(f'Layer {name!r}: indices must be integers.')
    if arr.min() < 0 or arr.max() >= width:
      raise ValueError(
        f'Layer {name!r}: indices must lie in [0, {width}), got min '
        f'{arr.min()}, max {arr.max()}.'
      )
    if np.any(np.diff(arr) <= 0):
      kind = 'duplicated' if len(np.unique(arr)) < arr.size else 'unsorted'
      raise ValueError(
        f'Layer {name!r}: keep-set must be strictly increasing ({kind} '
        'indices found).'
      )
    out[name] = arr.astype(np.int64)
  return out


def plan(model: nn.Module, variables, keep: Mapping) -> list[Edit]:
  """The leaf edits that apply ``keep`` to ``variables`` of ``model``."""
  keep = check_keep(model, keep)
  s = model.structure()
  flat = {
    c: traverse_util.flatten_dict(variables.get(c, {}), sep='/')
    for c in _COLLECTIONS
  }
  edits = []
  for name, idx in keep.items():
    group = s.group(name)
    width = int(model.widths[group.index])
    for prod in group.producers:
      found = False
      for c in _COLLECTIONS:
        for path in flat[c]:
          if path.startswith(prod + '/'):
            edits.append(Edit(c, path, -1, idx))
            found = True
      if not found:
        raise ValueError(f'Layer {name!r}: no variables under {prod!r}.')
    for cons in group.consumers:
      path = f'{cons}/kernel'
      if path not in flat['params']:
        raise ValueError(f'Layer {name!r}: consumer kernel {path!r} missing.')
      rows = flat['params'][path].shape[-2]
      if rows % width:
        raise ValueError(
          f'Layer {name!r}: consumer {path!r} has {rows} inputs, not a '
          f'multiple of the width {width}.'
        )
      # A dense layer after a channel-last flatten reads channel c at rows
      # p * width + c for every spatial position p.
      repeat = rows // width
      index = (np.arange(repeat)[:, None] * width + idx[None, :]).ravel()
      edits.append(Edit('params', path, -2, index))
  return edits


def prune(model: nn.Module, variables, keep: Mapping):
  """Slices ``model`` and ``variables`` to the kept channels.

  Args:
    model: a pfa_jax model (has ``widths`` and ``structure()``).
    variables: its ``{'params': ..., 'batch_stats': ...}``.
    keep: ``{group name: sorted kept indices}``; unnamed groups stay whole.

  Returns:
    ``(pruned_model, pruned_variables)``: the same class with the new widths,
    and variables that ``pruned_model.apply`` accepts unchanged.
  """
  keep = check_keep(model, keep)
  flat = {
    c: dict(traverse_util.flatten_dict(variables.get(c, {}), sep='/'))
    for c in _COLLECTIONS
  }
  for e in plan(model, variables, keep):
    flat[e.collection][e.path] = np.take(
      np.asarray(flat[e.collection][e.path]), e.index, axis=e.axis
    )
  s = model.structure()
  widths = structure_lib.widths_of(model)
  widths.update({n: len(i) for n, i in keep.items()})
  pruned = structure_lib.with_widths(model, widths)
  pruned = pruned.clone(**_pruned_index_maps(model, s, keep))
  new_vars = {
    c: traverse_util.unflatten_dict(flat[c], sep='/')
    for c in _COLLECTIONS
    if c in variables
  }
  return pruned, new_vars


def _pruned_index_maps(model, s, keep):
  """Composes each index map with the kept source and target channels."""
  fields = {}
  for m in s.index_maps:
    if m.field not in fields:
      current = getattr(model, m.field)
      if current is None:  # the model's default, made explicit
        current = model._shortcut_maps(model.widths)  # noqa: SLF001
      fields[m.field] = [list(x) for x in current]
    maps = fields[m.field]
    src_w = model.widths[s.group(m.source).index]
    tgt_w = model.widths[s.group(m.target).index]
    src = keep.get(m.source, np.arange(src_w))
    tgt = keep.get(m.target, np.arange(tgt_w))
    new_pos = {int(old): new for new, old in enumerate(src)}
    maps[m.position] = [new_pos.get(maps[m.position][j], -1) for j in tgt]
  return {f: tuple(tuple(x) for x in maps) for f, maps in fields.items()}


def masks(model: nn.Module, variables, keep: Mapping) -> dict:
  """0/1 ``params``-shaped multipliers that zero the pruned channels."""
  flat = {
    k: np.ones(np.shape(v), np.float32)
    for k, v in traverse_util.flatten_dict(variables['params'], sep='/').items()
  }
  for e in plan(model, variables, keep):
    if e.collection != 'params':
      continue  # BN running stats need no mask: scale and offset are zeroed.
    m = flat[e.path]
    removed = np.setdiff1d(np.arange(m.shape[e.axis]), e.index)
    sl = [slice(None)] * m.ndim
    sl[e.axis] = removed
    m[tuple(sl)] = 0.0
  return traverse_util.unflatten_dict(flat, sep='/')


def mask(model: nn.Module, variables, keep: Mapping):
  """The dense view of :func:`prune`: same shapes, pruned channels zeroed.

  Returns:
    ``(masked_model, masked_variables)``. The model differs from ``model``
    only in its parameter-free index maps (ResNet-56's option-A shortcut),
    which stop copying removed channels, so that removed stream channels are
    exactly zero, as they are absent in the pruned network.
  """
  keep = check_keep(model, keep)
  m = traverse_util.flatten_dict(masks(model, variables, keep), sep='/')
  params = {
    k: np.asarray(v) * m[k]
    for k, v in traverse_util.flatten_dict(variables['params'], sep='/').items()
  }
  masked_vars = {
    **variables,
    'params': traverse_util.unflatten_dict(params, sep='/'),
  }
  return model.clone(**_masked_index_maps(model, keep)), masked_vars


def _masked_index_maps(model, keep):
  """Index maps with entries touching removed channels set to -1."""
  s = model.structure()
  fields = {}
  for m in s.index_maps:
    if m.field not in fields:
      current = getattr(model, m.field)
      if current is None:
        current = model._shortcut_maps(model.widths)  # noqa: SLF001
      fields[m.field] = [list(x) for x in current]
    maps = fields[m.field]
    src = set(keep.get(m.source, range(model.widths[s.group(m.source).index])))
    tgt = set(keep.get(m.target, range(model.widths[s.group(m.target).index])))
    maps[m.position] = [
      c if (j in tgt and c in src) else -1
      for j, c in enumerate(maps[m.position])
    ]
  return {f: tuple(tuple(x) for x in maps) for f, maps in fields.items()}
