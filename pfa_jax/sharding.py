"""Devices: the one ``('data',)`` mesh and sharded batches.

Every mesh in the project comes from ``make_mesh`` (``jax.make_mesh`` with
``Auto`` axes, so jit propagates shardings as before explicit sharding).
"""

from collections.abc import Iterable, Iterator

import jax
import numpy as np

Batch = dict[str, np.ndarray]
DATA = 'data'


def make_mesh(devices=None) -> jax.sharding.Mesh:
  """A 1-D mesh over ``devices`` (default: all global devices), axis ``'data'``."""
  devices = jax.devices() if devices is None else list(devices)
  return jax.make_mesh(
    (len(devices),),
    (DATA,),
    axis_types=(jax.sharding.AxisType.Auto,),
    devices=devices,
  )


def replicated(mesh: jax.sharding.Mesh | None = None):
  """``NamedSharding`` that replicates over ``mesh`` (default ``make_mesh()``)."""
  mesh = make_mesh() if mesh is None else mesh
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def data_sharding(mesh: jax.sharding.Mesh | None = None):
  """``NamedSharding`` that splits the leading (batch) axis over ``'data'``."""
  mesh = make_mesh() if mesh is None else mesh
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(DATA))


def host_batch_size(global_batch_size: int) -> int:
  """Per-host share of a global batch; checks it splits over all devices."""
  if global_batch_size % jax.device_count():
    raise ValueError(
      f'Batch size {global_batch_size} must be divisible by the number of '
      f'devices ({jax.device_count()}).'
    )
  return global_batch_size // jax.process_count()


def shard_batch(batch: Batch, mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """Host-local numpy batch -> global arrays sharded over ``'data'``."""
  sharding = data_sharding(mesh)
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(sharding, x), batch
  )


def shard_batches(
  batches: Iterable[Batch], mesh: jax.sharding.Mesh, *, prefetch: int = 2
) -> Iterator[dict[str, jax.Array]]:
  """``shard_batch`` over an iterator, keeping ``prefetch`` batches in flight."""
  queue = []
  for batch in batches:
    queue.append(shard_batch(batch, mesh))
    if len(queue) > prefetch:
      yield queue.pop(0)
  yield from queue
