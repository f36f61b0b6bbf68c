"""Physical pruning and masking of Flax models: two views of one plan.

A plan (:class:`pfa_jax.plan.Plan`, or a bare ``{group name: sorted kept
indices}`` tree) names keep-sets over the groups of ``model.structure()``
and, optionally, next-layer folds.

* :func:`prune` applies the folds, then slices every producer leaf (last
  axis) and every consumer kernel (axis -2; a grouped conv's kernel block by
  block, :func:`take`), and rewrites the index maps in
  ``variables['consts']``. It returns the same model class with smaller
  ``widths``: a genuinely smaller network.
* :func:`mask` applies the same folds and expresses the keep-sets as zeros
  in the dense network's ``params`` and ``consts``; the model object is
  unchanged, so every masked variant shares one compiled program.
  :func:`masks` returns the 0/1 multipliers alone (for masked training).

Both read one list of leaf edits (:func:`leaf_edits`, one per leaf axis
after :func:`merged`) derived from the model's
:class:`~pfa_jax.models.structure.Structure`, after one :func:`apply_folds`,
so the pruned and masked networks compute the same function (the invariant
the tests check).
"""

import dataclasses
from collections.abc import Mapping

import flax.linen as nn
import numpy as np
from flax import traverse_util

from pfa_jax import plan as plan_lib
from pfa_jax.models import structure as structure_lib

_COLLECTIONS = ('params', 'batch_stats')
_CONSTS = structure_lib.CONSTS


@dataclasses.dataclass(frozen=True)
class Edit:
  """Keep ``index`` of the positions ``owned`` along ``axis`` of a leaf.

  ``owned`` are the positions of ``collection/path`` on ``axis`` that one
  group's channels occupy (the whole axis for a producer; a block of rows
  per spatial position for a consumer after a concatenation or a flatten).
  Positions the group does not own are left alone: two groups concatenated
  into one consumer edit disjoint rows of its kernel (:func:`merged`).

  ``blocks > 1``: the input axis of a grouped conv's kernel
  ``[..., C / blocks, O]``. ``index`` and ``owned`` then count the group's
  ``C`` channels, and output block ``b`` keeps the rows of its own input
  block's kept channels (:func:`take`).
  """

  collection: str
  path: str
  axis: int
  index: np.ndarray  # int, sorted, a subset of owned
  owned: np.ndarray  # int, sorted
  blocks: int = 1


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
    blocks = s.group(name).blocks
    if blocks > 1:
      counts = np.bincount(arr // (width // blocks), minlength=blocks)
      if np.any(counts != counts[0]):
        raise ValueError(
          f'Layer {name!r}: a grouped convolution splits its {width} '
          f'channels into {blocks} blocks of {width // blocks}, and a '
          'keep-set must keep as many in each; this one keeps '
          f'{counts.tolist()}.'
        )
    out[name] = arr.astype(np.int64)
  return out


def _local(idx, width: int, blocks: int) -> np.ndarray:
  """``[blocks, k]``: each block's kept channels, counted in the block."""
  size = width // blocks
  idx = np.asarray(idx)
  return (idx - idx // size * size).reshape(blocks, -1)


def _blocked(x, blocks: int):
  """A grouped kernel ``[..., rows, O]`` as ``[..., rows, blocks, O / b]``."""
  return x.reshape(*x.shape[:-1], blocks, x.shape[-1] // blocks)


def take(x, e: Edit) -> np.ndarray:
  """``x`` with edit ``e`` applied: the kept positions along its axis."""
  x = np.asarray(x)
  if e.blocks == 1:
    return np.take(x, e.index, axis=e.axis)
  local = _local(e.index, len(e.owned), e.blocks)
  x4 = _blocked(x, e.blocks)
  out = np.stack([x4[..., r, b, :] for b, r in enumerate(local)], axis=-2)
  return out.reshape(*x.shape[:-2], local.shape[1], x.shape[-1])


def _flat(variables, collection):
  return dict(
    traverse_util.flatten_dict(variables.get(collection, {}), sep='/')
  )


def _consumer_rows(name, cons, rows, width, idx) -> np.ndarray:
  """Rows of a consumer kernel with ``rows`` inputs that read channels idx."""
  span = width if cons.span is None else int(cons.span)
  if rows % span or cons.offset + width > span:
    raise ValueError(
      f'Layer {name!r}: consumer {cons.path!r} has {rows} inputs, which do '
      f'not hold the {width} channels at offset {cons.offset} of blocks of '
      f'{span}.'
    )
  # A channel-last flatten reads channel c at rows p * span + offset + c for
  # every spatial position p.
  repeat = rows // span
  base = np.arange(repeat)[:, None] * span + cons.offset
  return (base + np.asarray(idx)[None, :]).ravel()


def leaf_edits(model: nn.Module, variables, keep: Mapping) -> list[Edit]:
  """The leaf edits that apply ``keep`` to ``variables`` of ``model``."""
  keep = check_keep(model, keep)
  s = model.structure()
  flat = {c: _flat(variables, c) for c in _COLLECTIONS}
  edits = []
  for name, idx in keep.items():
    group = s.group(name)
    width = int(model.widths[group.index])
    for prod in group.producers:
      found = False
      for c in _COLLECTIONS:
        for path in flat[c]:
          if structure_lib.holds(path, prod):
            owned = np.arange(np.shape(flat[c][path])[-1])
            edits.append(Edit(c, path, -1, idx, owned))
            found = True
      if not found:
        raise ValueError(f'Layer {name!r}: no variables under {prod!r}.')
    for prod in group.concat_producers:
      found = False
      for c in _COLLECTIONS:
        for path, leaf in flat[c].items():
          if structure_lib.holds(path, prod.path):
            n = np.shape(leaf)[-1]
            if n != prod.span or prod.offset + width > n:
              raise ValueError(
                f'Layer {name!r}: {c}/{path} has {n} channels, which do not '
                f'hold the {width} channels at offset {prod.offset} of '
                f'{prod.span}.'
              )
            owned = prod.offset + np.arange(width)
            edits.append(Edit(c, path, -1, prod.offset + idx, owned))
            found = True
      if not found:
        raise ValueError(f'Layer {name!r}: no variables under {prod.path!r}.')
    for cons in map(structure_lib.as_consumer, group.consumers):
      path = f'{cons.path}/kernel'
      if path not in flat['params']:
        raise ValueError(f'Layer {name!r}: consumer kernel {path!r} missing.')
      rows = flat['params'][path].shape[-2]
      if cons.blocks > 1:
        if rows * cons.blocks != width:
          raise ValueError(
            f'Layer {name!r}: grouped convolution {cons.path!r} has {rows} '
            f'inputs per group, not {width} channels in {cons.blocks} '
            'groups.'
          )
        owned = np.arange(width)
        edits.append(Edit('params', path, -2, idx, owned, cons.blocks))
        continue
      index = _consumer_rows(name, cons, rows, width, idx)
      owned = _consumer_rows(name, cons, rows, width, np.arange(width))
      edits.append(Edit('params', path, -2, index, owned))
  return edits


def merged(edits: list[Edit], variables) -> list[Edit]:
  """One edit per leaf axis: every position kept unless a group drops it."""
  drop, order, whole = {}, [], {}
  for e in edits:
    key = (e.collection, e.path, e.axis)
    if e.blocks > 1 or key in whole:
      if key in whole or key in drop:
        raise ValueError(
          f'{e.collection}/{e.path}: a grouped convolution reads one group '
          f'only, on its axis {e.axis}.'
        )
      whole[key] = e
      order.append(key)
      continue
    if key not in drop:
      drop[key] = set()
      order.append(key)
    drop[key].update(np.setdiff1d(e.owned, e.index).tolist())
  flat = {c: _flat(variables, c) for c in _COLLECTIONS}
  out = []
  for c, path, axis in order:
    if (c, path, axis) in whole:
      out.append(whole[c, path, axis])
      continue
    n = np.shape(flat[c][path])[axis]
    index = np.setdiff1d(np.arange(n), np.fromiter(drop[c, path, axis], int))
    out.append(Edit(c, path, axis, index, np.arange(n)))
  return out


def _offset_target(cons_path, flat_params, flat_stats, bn_after):
  """Where a fold's constant goes: the consumer's bias, or its BN's mean.

  The BN is the structure's ``bn_after`` entry for the consumer, or this
  package's ``<parent>/bn``. ``None`` where there is neither.
  """
  bias = f'{cons_path}/bias'
  if bias in flat_params:
    return 'params', bias, 1.0
  bn = dict(bn_after).get(cons_path, f'{cons_path.rpartition("/")[0]}/bn')
  mean = f'{bn}/mean'
  if mean in flat_stats:
    return 'batch_stats', mean, -1.0  # BN subtracts its mean
  return None


def offset_free(model: nn.Module, variables, name: str) -> list[str]:
  """Consumers of group ``name`` that cannot absorb a fold's constant.

  A fold's offset goes to each consumer's bias or to the BN right after it;
  a bias-free consumer with no such BN has nowhere to put it. Methods fit
  their folds without an intercept for a group that has one of these.
  """
  s = model.structure()
  flat = {c: _flat(variables, c) for c in _COLLECTIONS}
  return [
    c.path
    for c in map(structure_lib.as_consumer, s.group(name).consumers)
    if _offset_target(c.path, flat['params'], flat['batch_stats'], s.bn_after)
    is None
  ]


def apply_folds(model: nn.Module, variables, plan) -> dict:
  """``variables`` with the plan's folds applied to the dense consumers.

  Removed rows are left untouched; :func:`prune` drops them and :func:`mask`
  zeroes them.
  """
  plan = plan_lib.as_plan(plan)
  if not plan.folds:
    return variables
  keep = check_keep(model, plan.keep)
  s = model.structure()
  flat = {c: _flat(variables, c) for c in _COLLECTIONS}
  for name, fold in plan.folds.items():
    group = s.group(name)
    if group.stream:
      raise ValueError(
        f'Layer {name!r} is a residual stream: its identity shortcuts read '
        'it without weights, so no next-layer fold can compensate it.'
      )
    width = int(model.widths[group.index])
    kept = keep[name]
    removed = np.setdiff1d(np.arange(width), kept)
    matrix = np.asarray(fold.matrix, np.float64)
    if matrix.shape != (len(removed), len(kept)):
      raise ValueError(
        f'Layer {name!r}: fold matrix has shape {matrix.shape}, expected '
        f'(removed, kept) = {(len(removed), len(kept))}.'
      )
    offset = None if fold.offset is None else np.asarray(fold.offset)
    if offset is not None and offset.shape != (len(removed),):
      raise ValueError(
        f'Layer {name!r}: fold offset has shape {offset.shape}, expected '
        f'({len(removed)},).'
      )
    if not np.all(np.isfinite(matrix)) or (
      offset is not None and not np.all(np.isfinite(offset))
    ):
      raise ValueError(f'Layer {name!r}: fold has non-finite entries.')
    for cons in map(structure_lib.as_consumer, group.consumers):
      path = f'{cons.path}/kernel'
      w = np.array(flat['params'][path], np.float64)
      if cons.blocks > 1:
        wr = _fold_blocks(name, cons, w, width, kept, matrix)
      else:
        rows_k = _consumer_rows(name, cons, w.shape[-2], width, kept)
        rows_r = _consumer_rows(name, cons, w.shape[-2], width, removed)
        repeat = len(rows_k) // len(kept)
        wk = w[..., rows_k, :].reshape(*w.shape[:-2], repeat, len(kept), -1)
        wr = w[..., rows_r, :].reshape(*w.shape[:-2], repeat, len(removed), -1)
        wk = wk + np.einsum('rk,...ro->...ko', matrix, wr)
        w[..., rows_k, :] = wk.reshape(*w.shape[:-2], len(rows_k), -1)
      dtype = np.asarray(flat['params'][path]).dtype
      flat['params'][path] = w.astype(dtype)
      if offset is not None:
        target = _offset_target(
          cons.path, flat['params'], flat['batch_stats'], s.bn_after
        )
        if target is None:
          raise ValueError(
            f'Layer {name!r}: consumer {cons.path!r} has neither a bias nor '
            'a following BN to absorb the fold offset; use a fold without '
            'offset.'
          )
        coll, leaf, sign = target
        delta = np.einsum('r,...ro->...o', offset, wr)
        delta = delta.reshape(-1, delta.shape[-1]).sum(0)
        old = np.asarray(flat[coll][leaf])
        flat[coll][leaf] = (old + sign * delta).astype(old.dtype)
  out = dict(variables)
  for c in _COLLECTIONS:
    if c in variables:
      out[c] = traverse_util.unflatten_dict(flat[c], sep='/')
  return out


def _fold_blocks(name, cons, w, width, kept, matrix):
  """Folds into a grouped kernel ``w`` in place, each block into its own.

  Returns the removed rows as a dense-layout ``[..., removed, O]`` (zero
  where a removed channel's block differs from the output's), for the
  offset.
  """
  blocks, size = cons.blocks, width // cons.blocks
  removed = np.setdiff1d(np.arange(width), kept)
  kb, rb = kept // size, removed // size
  if np.any(matrix[rb[:, None] != kb[None, :]]):
    raise ValueError(
      f'Layer {name!r}: the fold carries channels across the {blocks} '
      f'blocks that grouped convolution {cons.path!r} reads apart; fit it '
      'block by block (compensation.ls_fold(..., blocks=...)).'
    )
  w4 = _blocked(w, blocks)
  wr = np.zeros((*w4.shape[:-3], len(removed), blocks, w4.shape[-1]))
  for b in range(blocks):
    k, r = np.flatnonzero(kb == b), np.flatnonzero(rb == b)
    rows_r = w4[..., removed[r] - b * size, b, :]
    w4[..., kept[k] - b * size, b, :] += np.einsum(
      'rk,...ro->...ko', matrix[np.ix_(r, k)], rows_r
    )
    wr[..., r, b, :] = rows_r
  return wr.reshape(*wr.shape[:-2], -1)


def prune(model: nn.Module, variables, plan):
  """Slices ``model`` and ``variables`` to the plan's kept channels.

  Args:
    model: a pfa_jax model (has ``widths`` and ``structure()``).
    variables: its ``{'params', 'batch_stats', 'consts'}``.
    plan: a :class:`~pfa_jax.plan.Plan`, or ``{group: sorted kept indices}``;
      unnamed groups stay whole.

  Returns:
    ``(pruned_model, pruned_variables)``: the same class with the new widths,
    and variables that ``pruned_model.apply`` accepts unchanged. The sliced
    leaves are host (NumPy) arrays: ``jax.device_put`` them once before
    calling the model repeatedly, or every jitted call copies them again.
  """
  plan = plan_lib.as_plan(plan)
  keep = check_keep(model, plan.keep)
  variables = apply_folds(model, variables, plan)
  flat = {c: _flat(variables, c) for c in _COLLECTIONS}
  for e in merged(leaf_edits(model, variables, keep), variables):
    flat[e.collection][e.path] = take(flat[e.collection][e.path], e)
  widths = structure_lib.widths_of(model)
  widths.update({n: len(i) for n, i in keep.items()})
  pruned = structure_lib.with_widths(model, widths)
  new_vars = {
    c: traverse_util.unflatten_dict(flat[c], sep='/')
    for c in _COLLECTIONS
    if c in variables
  }
  if _CONSTS in variables:
    new_vars[_CONSTS] = _map_consts(model, variables, keep, _compose_map)
  return pruned, new_vars


def _compose_map(current, src, tgt):
  """The map of the sliced network: kept targets read kept sources."""
  new_pos = {int(old): new for new, old in enumerate(src)}
  return np.asarray([new_pos.get(int(current[j]), -1) for j in tgt], np.int32)


def _masked_map(current, src, tgt):
  """The dense map with every entry touching a removed channel set to -1."""
  src, tgt = set(int(i) for i in src), set(int(i) for i in tgt)
  return np.asarray(
    [
      int(c) if (j in tgt and int(c) in src) else -1
      for j, c in enumerate(current)
    ],
    np.int32,
  )


def _map_consts(model, variables, keep, fn):
  s = model.structure()
  flat = _flat(variables, _CONSTS)
  for m in s.index_maps:
    if m.path not in flat:
      raise ValueError(
        f'Index map {m.path!r} (from {m.source!r} to {m.target!r}) is '
        f'missing from variables[{_CONSTS!r}]; were the variables made by '
        'models.init?'
      )
    src_w = model.widths[s.group(m.source).index]
    tgt_w = model.widths[s.group(m.target).index]
    src = keep.get(m.source, np.arange(src_w))
    tgt = keep.get(m.target, np.arange(tgt_w))
    flat[m.path] = fn(np.asarray(flat[m.path]), src, tgt)
  return traverse_util.unflatten_dict(flat, sep='/')


def masks(model: nn.Module, variables, plan) -> dict:
  """0/1 ``params``-shaped multipliers that zero the pruned channels."""
  keep = plan_lib.as_plan(plan).keep
  flat = {
    k: np.ones(np.shape(v), np.float32)
    for k, v in _flat(variables, 'params').items()
  }
  for e in merged(leaf_edits(model, variables, keep), variables):
    if e.collection != 'params':
      continue  # BN running stats need no mask: scale and offset are zeroed.
    m = flat[e.path]
    if e.blocks > 1:
      m4 = _blocked(m, e.blocks)
      for b, kept in enumerate(_local(e.index, len(e.owned), e.blocks)):
        m4[..., np.setdiff1d(np.arange(m.shape[-2]), kept), b, :] = 0.0
      flat[e.path] = m4.reshape(m.shape)
      continue
    removed = np.setdiff1d(np.arange(m.shape[e.axis]), e.index)
    sl = [slice(None)] * m.ndim
    sl[e.axis] = removed
    m[tuple(sl)] = 0.0
  return traverse_util.unflatten_dict(flat, sep='/')


def mask(model: nn.Module, variables, plan):
  """The dense view of :func:`prune`: same shapes, pruned channels zeroed.

  Returns:
    ``(model, masked_variables)``. The model is returned unchanged (one
    compiled program for every mask); the option-A index maps in
    ``consts`` stop copying removed channels, so removed stream channels are
    exactly zero, as they are absent in the pruned network.
  """
  plan = plan_lib.as_plan(plan)
  keep = check_keep(model, plan.keep)
  variables = apply_folds(model, variables, plan)
  m = traverse_util.flatten_dict(masks(model, variables, keep), sep='/')
  params = {
    k: np.asarray(v) * m[k] for k, v in _flat(variables, 'params').items()
  }
  masked_vars = {
    **variables,
    'params': traverse_util.unflatten_dict(params, sep='/'),
  }
  if _CONSTS in variables:
    masked_vars[_CONSTS] = _map_consts(model, variables, keep, _masked_map)
  return model, masked_vars


def scatter(model: nn.Module, pruned_variables, plan, like) -> dict:
  """Scatters a pruned network's variables into the dense shapes of ``like``.

  The inverse of :func:`prune` on kept entries: removed entries are zero
  (``params``) or taken from ``like`` (``batch_stats``, whose removed
  channels never influence the output), and ``consts`` are the masked maps.
  Used for masked scratch init: initialise the *sliced* network (fan-in
  scaled to its real widths) and train it in the dense shape.
  """
  keep = check_keep(model, plan_lib.as_plan(plan).keep)
  dense = {c: _flat(like, c) for c in _COLLECTIONS}
  small = {c: _flat(pruned_variables, c) for c in _COLLECTIONS}
  index = {}
  for e in merged(leaf_edits(model, like, keep), like):
    index.setdefault((e.collection, e.path), []).append(e)
  out = {}
  for c in _COLLECTIONS:
    if c not in like:
      continue
    leaves = {}
    for path, full in dense[c].items():
      base = (
        np.zeros_like(np.asarray(full)) if c == 'params' else np.array(full)
      )
      value = np.asarray(small[c][path])
      sl = [np.arange(n) for n in base.shape]
      grouped = None
      for e in index.get((c, path), []):
        if e.blocks > 1:
          grouped = e
        else:
          sl[e.axis] = e.index
      if grouped is None:
        base[np.ix_(*sl)] = value
      else:
        # The plain axes first, then each block's rows into its own block.
        sl[-2] = np.arange(value.shape[-2])
        inner = np.zeros(
          (*base.shape[:-2], *value.shape[-2:-1], base.shape[-1])
        )
        inner[np.ix_(*sl)] = value
        e, base4 = grouped, _blocked(base, grouped.blocks)
        inner4 = _blocked(inner, e.blocks)
        for b, kept in enumerate(_local(e.index, len(e.owned), e.blocks)):
          base4[..., kept, b, :] = inner4[..., :, b, :]
      leaves[path] = base
    out[c] = traverse_util.unflatten_dict(leaves, sep='/')
  if _CONSTS in like:
    out[_CONSTS] = _map_consts(model, like, keep, _masked_map)
  return out


def restrict_classes(model: nn.Module, variables, classes):
  """The classifier cut to ``classes``: logit ``j`` is class ``classes[j]``.

  Slices every leaf of the model's head (``structure().head``) on its last
  axis, so the restricted model's logits equal the full model's
  ``logits[..., classes]`` exactly; the data pipeline relabels a class
  subset ``0..k-1`` in the same order (``input_pipeline.select_classes``).

  Raises:
    ValueError: a model without a declared head, or a class index outside
      ``[0, num_classes)`` or repeated.
  """
  head = model.structure().head
  if not head:
    raise ValueError(f'{type(model).__name__} declares no classifier head.')
  classes = [int(c) for c in classes]
  n = int(model.num_classes)
  bad = [c for c in classes if not 0 <= c < n]
  if bad or len(set(classes)) != len(classes) or not classes:
    raise ValueError(
      f'classes must be distinct indices in [0, {n}), got {classes}.'
    )
  idx = np.asarray(classes)
  out = {}
  for col, tree in variables.items():
    flat = traverse_util.flatten_dict(tree, sep='/')
    out[col] = traverse_util.unflatten_dict(
      {
        k: (v[..., idx] if k == head or k.startswith(head + '/') else v)
        for k, v in flat.items()
      },
      sep='/',
    )
  return model.clone(num_classes=len(classes)), out
