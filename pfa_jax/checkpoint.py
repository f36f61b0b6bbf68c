"""Orbax checkpoints that carry their own architecture.

Each step directory holds two items: ``state`` (the ``TrainState`` pytree,
``StandardSave``) and ``arch`` (a JSON dict ``{'name': str, 'kwargs':
{..., 'num_classes', 'widths'}}``). Restoring reads ``arch`` first and builds
the restore target from it, so a pruned checkpoint restores without the
caller knowing its widths.

Errors are explicit: a checkpoint of another architecture raises
``ArchMismatchError`` naming both; unreadable (truncated, garbage) files raise
``CorruptCheckpointError`` naming the path and suggesting to delete it.
"""

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
    },
  )


def _step_path(mngr: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(os.fspath(mngr.directory), str(step))


def _corrupt(mngr, step, err) -> CorruptCheckpointError:
  path = _step_path(mngr, step)
  return CorruptCheckpointError(
    f'Checkpoint {path} exists but cannot be read ({type(err).__name__}: '
    f'{str(err)[:300]}). It is probably truncated or corrupt. Delete it '
    f'(`rm -r {path}`) to fall back to an earlier checkpoint or to start '
    'from scratch.'
  )


def save(
  mngr: ocp.CheckpointManager, step: int, state: Any, arch: Arch
) -> bool:
  """Saves ``state`` and ``arch`` at ``step`` (async; see ``wait``)."""
  return mngr.save(
    int(step),
    args=ocp.args.Composite(
      **{
        STATE: ocp.args.StandardSave(state),
        ARCH: ocp.args.JsonSave(normalize_arch(arch)),
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
    arch = restored[ARCH]
    return normalize_arch(arch)
  except Exception as e:  # Orbax raises many types for unreadable files.
    raise _corrupt(mngr, step, e) from e


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
  """Restores the ``state`` item into the structure of ``abstract_state``."""
  try:
    restored = mngr.restore(
      int(step),
      args=ocp.args.Composite(
        **{STATE: ocp.args.StandardRestore(abstract_state)}
      ),
    )
    return restored[STATE]
  except Exception as e:
    raise _corrupt(mngr, step, e) from e


def _replicated() -> jax.sharding.NamedSharding:
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ('data',))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


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
) -> tuple[nn.Module, dict[str, Any], dict[str, Any], int]:
  """Rebuilds a trained model from a checkpoint directory alone.

  Args:
    ckpt_dir: the manager directory (``workdir/ckpt``) or a workdir holding
      one.
    step: which step (default: latest).
    model_fn: ``arch -> model``; default ``pfa_jax.models.from_arch(arch)``
      (``class`` archs) or ``get_model(arch['name'], **arch['kwargs'])``.

  Returns:
    ``(model, variables, arch, step)`` with ``variables = {'params': ...,
    'batch_stats': ...}`` replicated over all devices (``batch_stats`` is
    ``{}`` for models without BatchNorm).

  Raises:
    FileNotFoundError: no checkpoint in ``ckpt_dir``.
    CorruptCheckpointError: the checkpoint cannot be read.
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
    try:
      tree = mngr.item_metadata(step)[STATE]
      tree = getattr(tree, 'tree', tree)
      if 'params' not in tree:
        raise ValueError(f"no 'params' in the state (keys {list(tree)})")
    except Exception as e:
      raise _corrupt(mngr, step, e) from e
    # The whole state (optimizer included) restores from its own metadata,
    # so no input shape or optimizer config is needed here.
    abstract = abstract_with_sharding(tree, _replicated())
    restored = restore_state(mngr, step, abstract)
  finally:
    mngr.close()
  variables = {
    'params': restored['params'],
    'batch_stats': restored.get('batch_stats') or {},
  }
  logging.info(
    'Restored %s (%s) from %s step %d', arch_label(arch), arch, ckpt_dir, step
  )
  return model, variables, arch, step
