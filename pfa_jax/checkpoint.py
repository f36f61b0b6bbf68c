"""Orbax checkpoints that carry their own architecture.

Each step directory holds three items: ``state`` (the ``TrainState``
pytree, ``StandardSave``), ``arch`` (a JSON dict ``{'name': str, 'kwargs':
{..., 'num_classes', 'widths'}}``) and ``integrity`` (JSON: a sha256 over
every leaf's tree path, dtype, shape and bytes, one digest per leaf, and the
model's input shape). Restoring reads ``arch`` first and builds the restore
target from it, so a pruned checkpoint restores without the caller knowing
its widths.

Errors are explicit and short (orbax's traceback is cut to one quoted line,
``raise ... from None``):

* another architecture: ``ArchMismatchError`` naming both, or naming the
  first leaf whose stored shape differs from the one the arch builds;
* unreadable (truncated, garbage) files, or bytes that no longer match the
  stored digests: ``CorruptCheckpointError`` naming the step directory (and
  the leaves that changed) and suggesting to delete it.

Checkpoints written before ``integrity`` existed restore unverified.
"""

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

STATE = 'state'
ARCH = 'arch'
INTEGRITY = 'integrity'
CKPT_SUBDIR = 'ckpt'

Arch = Mapping[str, Any]  # {'name': str, 'kwargs': {...}}
ModelFn = Callable[[Arch], nn.Module]


class ArchMismatchError(ValueError):
  """The checkpoint holds a different architecture than requested."""


class CorruptCheckpointError(RuntimeError):
  """A checkpoint exists but cannot be read."""


def normalize_arch(arch: Arch) -> dict[str, Any]:
  """A JSON round-trip, so tuples/lists and int types compare equal.

  An arch is a JSON dict with ``kwargs`` and a model key (``name`` for
  ``models.get_model`` or ``class`` for ``models.from_arch``); other keys are
  kept.
  """
  if (
    not isinstance(arch, Mapping)
    or 'kwargs' not in arch
    or not ({'name', 'class'} & set(arch))
  ):
    raise ValueError(
      f"arch must be a dict with 'kwargs' and 'name' (or 'class'), got {arch!r}"
    )
  try:
    return json.loads(json.dumps(dict(arch)))
  except TypeError as e:
    raise ValueError(f'arch is not JSON-serialisable: {arch!r}') from e


def arch_label(arch: Arch) -> str:
  """Short model name of an arch, for logs."""
  return str(arch.get('name') or arch.get('class'))


def create_manager(
  directory: str | os.PathLike,
  *,
  max_to_keep: int | None = None,
  read_only: bool = False,
  async_save: bool = True,
) -> ocp.CheckpointManager:
  """A manager over ``directory`` (created unless ``read_only``)."""
  options = ocp.CheckpointManagerOptions(
    max_to_keep=max_to_keep or None,
    create=not read_only,
    read_only=read_only,
    enable_async_checkpointing=async_save,
  )
  return ocp.CheckpointManager(
    os.path.abspath(os.fspath(directory)),
    options=options,
    item_handlers={
      STATE: ocp.StandardCheckpointHandler(),
      ARCH: ocp.JsonCheckpointHandler(),
      INTEGRITY: ocp.JsonCheckpointHandler(),
    },
  )


def _step_path(mngr: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(os.fspath(mngr.directory), str(step))


def _one_line(err: BaseException) -> str:
  """``Type: first line`` of an (orbax) error, at most 200 characters."""
  text = str(err).strip().splitlines()
  return f'{type(err).__name__}: {(text[0] if text else "")[:200]}'


def _corrupt(mngr, step, err=None, *, detail=None) -> CorruptCheckpointError:
  path = _step_path(mngr, step)
  why = detail or f'cannot be read ({_one_line(err)})'
  return CorruptCheckpointError(
    f'Checkpoint {path} (step {step}) exists but {why}. It is probably '
    f'truncated or corrupt. Delete it (`rm -r {path}`) to fall back to an '
    'earlier checkpoint or to start from scratch.'
  )


def _key_name(k) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def leaf_paths(tree: Any) -> dict[str, Any]:
  """``{'params/conv1/kernel': leaf}``; attribute, dict and index keys alike.

  A ``TrainState`` and the dict orbax restores from its metadata give the
  same paths.
  """
  return {
    '/'.join(_key_name(k) for k in path): leaf
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
  }


def _host(x) -> np.ndarray:
  """The full value of a leaf (replicated or fully addressable arrays)."""
  if isinstance(x, jax.Array):
    if x.is_fully_replicated:
      x = x.addressable_data(0)
    elif not x.is_fully_addressable:
      raise ValueError(
        f'Cannot digest an array sharded across hosts ({x.sharding}); '
        'checkpoint a replicated state.'
      )
  return np.ascontiguousarray(np.asarray(x))


def digest(tree: Any) -> dict[str, Any]:
  """sha256 of every leaf (path, dtype, shape, bytes) and of all of them."""
  leaves = {}
  for path, leaf in sorted(leaf_paths(tree).items()):
    x = _host(leaf)
    h = hashlib.sha256(f'{path}|{x.dtype.str}|{x.shape}|'.encode())
    h.update(x.tobytes())
    leaves[path] = h.hexdigest()
  total = hashlib.sha256(json.dumps(leaves, sort_keys=True).encode())
  return {'sha256': total.hexdigest(), 'leaves': leaves}


def save(
  mngr: ocp.CheckpointManager,
  step: int,
  state: Any,
  arch: Arch,
  *,
  input_shape: tuple[int, ...] | None = None,
) -> bool:
  """Saves ``state``, ``arch`` and the state's digests at ``step`` (async).

  ``input_shape`` (H, W, C) lets ``restore_model`` check the arch's shapes.
  """
  integrity = {
    **digest(state),
    'input_shape': None if input_shape is None else list(input_shape),
  }
  return mngr.save(
    int(step),
    args=ocp.args.Composite(
      **{
        STATE: ocp.args.StandardSave(state),
        ARCH: ocp.args.JsonSave(normalize_arch(arch)),
        INTEGRITY: ocp.args.JsonSave(integrity),
      }
    ),
    force=True,
  )


def restore_arch(mngr: ocp.CheckpointManager, step: int) -> dict[str, Any]:
  """The architecture stored at ``step``."""
  try:
    restored = mngr.restore(
      int(step), args=ocp.args.Composite(**{ARCH: ocp.args.JsonRestore()})
    )
    arch = normalize_arch(restored[ARCH])
  except Exception as e:  # Orbax raises many types for unreadable files.
    raise _corrupt(mngr, step, e) from None
  return arch


def restore_integrity(mngr, step: int) -> dict[str, Any] | None:
  """The stored digests and input shape; ``None`` for older checkpoints."""
  if not os.path.isdir(os.path.join(_step_path(mngr, step), INTEGRITY)):
    return None
  try:
    restored = mngr.restore(
      int(step), args=ocp.args.Composite(**{INTEGRITY: ocp.args.JsonRestore()})
    )
    return dict(restored[INTEGRITY])
  except Exception as e:
    raise _corrupt(mngr, step, e) from None


def stored_tree(mngr, step: int) -> Any:
  """The ``state`` item's metadata tree (shapes and dtypes, no data)."""
  try:
    tree = mngr.item_metadata(step)[STATE]
    tree = getattr(tree, 'tree', tree)
    if not isinstance(tree, Mapping) or 'params' not in tree:
      raise ValueError(f"no 'params' in the state ({type(tree).__name__})")
  except Exception as e:
    raise _corrupt(mngr, step, e) from None
  return tree


def check_shapes(stored: Any, expected: Any, *, where: str) -> None:
  """Raises ``ArchMismatchError`` naming the first leaf that differs."""
  a = {p: tuple(x.shape) for p, x in leaf_paths(stored).items()}
  b = {p: tuple(x.shape) for p, x in leaf_paths(expected).items()}
  missing, extra = sorted(set(b) - set(a)), sorted(set(a) - set(b))
  if missing or extra:
    raise ArchMismatchError(
      f'The checkpoint in {where} holds other variables than the model: '
      f'missing {missing[:5]}, unexpected {extra[:5]}.'
    )
  for p in sorted(a, key=lambda p: (not p.startswith('params/'), p)):
    if a[p] != b[p]:
      raise ArchMismatchError(
        f'The checkpoint in {where} stores {p} with shape {list(a[p])}, but '
        f'the architecture gives {list(b[p])}.'
      )


def check_arch(found: Arch, expected: Arch, *, where: str) -> None:
  """Raises ``ArchMismatchError`` if two architectures differ."""
  found, expected = normalize_arch(found), normalize_arch(expected)
  if found != expected:
    raise ArchMismatchError(
      f'The checkpoint in {where} is of another model:\n'
      f'  checkpoint: {json.dumps(found, sort_keys=True)}\n'
      f'  requested:  {json.dumps(expected, sort_keys=True)}\n'
      'Use a fresh workdir, or delete the old checkpoints.'
    )


def abstract_with_sharding(tree: Any, sharding: jax.sharding.Sharding) -> Any:
  """``ShapeDtypeStruct``s of ``tree`` (arrays or abstract) on ``sharding``."""
  return jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree
  )


def restore_state(
  mngr: ocp.CheckpointManager, step: int, abstract_state: Any
) -> Any:
  """Restores the ``state`` item into the structure of ``abstract_state``.

  Checks the stored shapes first (``ArchMismatchError`` naming the leaf) and
  the digests after (``CorruptCheckpointError`` naming the leaves).
  """
  where = _step_path(mngr, step)
  check_shapes(stored_tree(mngr, step), abstract_state, where=where)
  integrity = restore_integrity(mngr, step)
  try:
    restored = mngr.restore(
      int(step),
      args=ocp.args.Composite(
        **{STATE: ocp.args.StandardRestore(abstract_state)}
      ),
    )[STATE]
  except Exception as e:
    raise _corrupt(mngr, step, e) from None
  if integrity is None:
    logging.warning('Checkpoint %s has no digests; not verified.', where)
    return restored
  found = digest(restored)
  if found['sha256'] != integrity['sha256']:
    bad = sorted(
      p for p, h in found['leaves'].items() if integrity['leaves'].get(p) != h
    ) or sorted(set(integrity['leaves']) ^ set(found['leaves']))
    raise _corrupt(
      mngr,
      step,
      detail=f'its contents do not match the stored sha256 (changed: '
      f'{", ".join(bad[:5])}{" ..." if len(bad) > 5 else ""})',
    )
  return restored


def _default_model_fn(arch: Arch) -> nn.Module:
  from pfa_jax import models  # Lazy: keeps this module usable on its own.

  if 'name' not in arch and hasattr(models, 'from_arch'):
    return models.from_arch(arch)
  return models.get_model(arch['name'], **arch['kwargs'])


def restore_model(
  ckpt_dir: str | os.PathLike,
  *,
  step: int | None = None,
  model_fn: ModelFn | None = None,
  input_shape: tuple[int, int, int] | None = None,
) -> tuple[nn.Module, dict[str, Any], dict[str, Any], int]:
  """Rebuilds a trained model from a checkpoint directory alone.

  Args:
    ckpt_dir: the manager directory (``workdir/ckpt``) or a workdir holding
      one.
    step: which step (default: latest).
    model_fn: ``arch -> model``; default ``pfa_jax.models.from_arch(arch)``
      (``class`` archs) or ``get_model(arch['name'], **arch['kwargs'])``.
    input_shape: (H, W, C) to check the arch's variable shapes against the
      stored ones; default: the shape saved with the checkpoint (if any).

  Returns:
    ``(model, variables, arch, step)`` with ``variables = {'params': ...,
    'batch_stats': ..., **constant collections}`` replicated over all
    devices (``batch_stats`` is ``{}`` for models without BatchNorm).

  Raises:
    FileNotFoundError: no checkpoint in ``ckpt_dir``.
    ArchMismatchError: the arch builds variables of other shapes.
    CorruptCheckpointError: the checkpoint cannot be read or its digests
      do not match.
  """
  ckpt_dir = os.fspath(ckpt_dir)
  if os.path.isdir(os.path.join(ckpt_dir, CKPT_SUBDIR)):
    ckpt_dir = os.path.join(ckpt_dir, CKPT_SUBDIR)
  if not os.path.isdir(ckpt_dir):
    raise FileNotFoundError(f'No checkpoint directory {ckpt_dir}.')
  mngr = create_manager(ckpt_dir, read_only=True)
  try:
    step = mngr.latest_step() if step is None else int(step)
    if step is None:
      raise FileNotFoundError(f'No checkpoint found in {ckpt_dir}.')
    arch = restore_arch(mngr, step)
    model = (model_fn or _default_model_fn)(arch)
    tree = stored_tree(mngr, step)
    integrity = restore_integrity(mngr, step) or {}
    shape = input_shape or integrity.get('input_shape')
    if shape:
      _check_model_shapes(model, tree, shape, where=_step_path(mngr, step))
    # The whole state (optimizer included) restores from its own metadata,
    # so no optimizer config is needed here.
    abstract = abstract_with_sharding(tree, _replicated())
    restored = restore_state(mngr, step, abstract)
  finally:
    mngr.close()
  variables = {
    'params': restored['params'],
    'batch_stats': restored.get('batch_stats') or {},
    **(restored.get('extra_vars') or {}),
  }
  logging.info(
    'Restored %s (%s) from %s step %d', arch_label(arch), arch, ckpt_dir, step
  )
  return model, variables, arch, step


def _replicated() -> jax.sharding.NamedSharding:
  from pfa_jax import sharding  # noqa: PLC0415

  return sharding.replicated()


def _check_model_shapes(model, tree, input_shape, *, where) -> None:
  """The arch's ``init`` shapes vs the stored params/batch_stats/consts."""
  key = jax.random.key(0)
  x = jax.ShapeDtypeStruct((1, *input_shape), np.float32)
  built = jax.eval_shape(
    lambda x: model.init({'params': key, 'dropout': key}, x), x
  )
  stored = {'params': tree['params']}
  expected = {'params': built['params']}
  if tree.get('batch_stats') or built.get('batch_stats'):
    stored['batch_stats'] = tree.get('batch_stats') or {}
    expected['batch_stats'] = built.get('batch_stats', {})
  check_shapes(stored, expected, where=where)
