"""Input pipeline: dataset split -> deterministic host batches -> sharded arrays.

Two sources (``config.input.source``): ``'tfds'`` (TensorFlow Datasets and
tf.data, the default) and ``'npz'`` (CIFAR from decoded ``.npz`` arrays in
NumPy, :mod:`pfa_jax.array_input`, for machines without TensorFlow; this
module imports TensorFlow only when the TFDS source is used). The layers
live in their own modules and are re-exported here, so
``input_pipeline.<name>`` keeps working for every caller:

* :mod:`pfa_jax.datasets`: ``load_examples`` (one host's slice of a TFDS
  split, class subset applied; CIFAR decoded once per process),
  ``DATASETS``, ``get_spec``, ``check_classes``, ``select_classes``;
* :mod:`pfa_jax.preprocess`: ``cifar_preprocess``, ``imagenet_preprocess``;
* :mod:`pfa_jax.batching`: ``train_batches`` (a pure function of ``(seed,
  step)``), ``eval_batches`` (padded, masked), ``pad_batch``;
* :mod:`pfa_jax.sharding`: ``make_mesh`` (the one mesh helper),
  ``shard_batches``;
* :mod:`pfa_jax.dataspec`: ``DATASETS``, ``get_spec``, ``check_classes``.

This module wires them up from a config: ``get_datasets(config)`` and
``get_split_iter(config, split, ...)``. Config fields are read directly (a
missing one is an error naming it, not a default that disagrees with
``configs/``).
"""

import importlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import jax
from absl import logging

from pfa_jax import array_input
from pfa_jax.array_input import Batch
from pfa_jax.array_input import epoch_seed
from pfa_jax.array_input import pad_batch
from pfa_jax.dataspec import DATASETS
from pfa_jax.dataspec import DatasetInfo
from pfa_jax.dataspec import DatasetSpec
from pfa_jax.dataspec import check_classes
from pfa_jax.dataspec import get_spec
from pfa_jax.sharding import data_sharding
from pfa_jax.sharding import host_batch_size
from pfa_jax.sharding import make_mesh
from pfa_jax.sharding import replicated
from pfa_jax.sharding import shard_batch
from pfa_jax.sharding import shard_batches

SOURCES = ('tfds', 'npz')

# The TFDS source's names, imported on first use (PEP 562): with
# input.source='npz' nothing imports TensorFlow.
_TF_NAMES = {
  'batching': ('eval_batches', 'train_batches'),
  'datasets': (
    'configure_tf',
    'data_options',
    'load_arrays',
    'load_examples',
    'select_classes',
  ),
  'preprocess': (
    'PreprocessFn',
    'cifar_preprocess',
    'get_preprocess_fn',
    'imagenet_preprocess',
  ),
}


def __getattr__(name):
  for module, names in _TF_NAMES.items():
    if name in names:
      return getattr(importlib.import_module(f'pfa_jax.{module}'), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


__all__ = [
  'Batch',
  'check_classes',
  'data_sharding',
  'DatasetInfo',
  'DATASETS',
  'DatasetSpec',
  'epoch_seed',
  'get_datasets',
  'get_spec',
  'get_split_iter',
  'host_batch_size',
  'make_mesh',
  'pad_batch',
  'replicated',
  'shard_batch',
  'shard_batches',
  'source',
  'SOURCES',
  *(name for names in _TF_NAMES.values() for name in names),
]


def _input_kw(config) -> dict[str, Any]:
  inp = config.input
  return dict(
    dataset=inp.dataset,
    data_dir=inp.data_dir or None,
    classes=tuple(inp.classes),
    image_size=int(inp.image_size),
  )


def source(config) -> str:
  """``config.input.source``, checked; ``'tfds'`` for configs without it."""
  src = config.input.get('source', 'tfds')
  if src not in SOURCES:
    raise ValueError(f'input.source must be one of {SOURCES}, got {src!r}.')
  return src


def _dataset_info(
  dataset: str,
  train_counts: list[int],
  eval_counts: list[int],
  batch_size: int,
  eval_batch_size: int,
  *,
  num_classes: int,
  image_shape: tuple[int, ...],
) -> DatasetInfo:
  """``DatasetInfo`` from every host's example counts (one source or other)."""
  steps_per_epoch = min(train_counts) // batch_size
  if steps_per_epoch < 1:
    raise ValueError(
      f'{dataset}: {min(train_counts)} train examples per host is less '
      f'than one batch of {batch_size}.'
    )
  info = DatasetInfo(
    num_train_examples=sum(train_counts),
    num_eval_examples=sum(eval_counts),
    num_classes=num_classes,
    steps_per_epoch=steps_per_epoch,
    num_eval_batches=math.ceil(max(eval_counts) / eval_batch_size),
    image_shape=tuple(int(d) for d in image_shape),
  )
  logging.info('Data: %s', info)
  return info


def _host_arrays(
  config,
  split: str,
  subset: int,
  *,
  drop_remainder: bool = False,
  process_index: int | None = None,
):
  """One host's (images, labels) of the npz source (see ``array_input``)."""
  inp = config.input
  if process_index is None:
    process_index = jax.process_index()
  return array_input.load_arrays(
    inp.dataset,
    split,
    data_dir=inp.data_dir or None,
    subset=int(subset),
    classes=tuple(inp.classes),
    drop_remainder=drop_remainder,
    process_index=process_index,
    process_count=jax.process_count(),
  )


def _array_counts(config, split: str, subset: int, drop_remainder: bool):
  """Every host's example count of the npz source."""
  return [
    len(
      _host_arrays(
        config, split, subset, drop_remainder=drop_remainder, process_index=p
      )[1]
    )
    for p in range(jax.process_count())
  ]


def get_datasets(
  config, *, start_step: int = 0
) -> tuple[Iterator[Batch], Callable[[], Iterator[Batch]], DatasetInfo]:
  """Train iterator, eval-iterator factory and ``DatasetInfo`` for a config.

  Args:
    config: reads ``config.seed`` and ``config.input.*`` (source, dataset,
      data_dir, batch_size, eval_batch_size, train_subset, eval_subset,
      classes, augment, shuffle_buffer, image_size).
    start_step: position of the first train batch (for resuming).

  Returns:
    ``(train_iter, eval_iter_fn, info)``: ``train_iter`` yields host numpy
    batches forever; ``eval_iter_fn()`` returns a fresh padded pass over the
    eval split (``info.num_eval_batches`` batches on every host).
  """
  if source(config) == 'npz':
    return _array_datasets(config, start_step)
  from pfa_jax import batching  # noqa: PLC0415  (TensorFlow: TFDS source only)
  from pfa_jax import datasets  # noqa: PLC0415
  from pfa_jax import preprocess  # noqa: PLC0415

  kw = _input_kw(config)
  inp = config.input
  spec = get_spec(kw['dataset'])
  batch_size = host_batch_size(inp.batch_size)
  eval_batch_size = host_batch_size(inp.eval_batch_size)
  common = dict(data_dir=kw['data_dir'], classes=kw['classes'])
  train_ds, num_train = datasets.load_examples(
    kw['dataset'],
    'train',
    subset=inp.train_subset,
    drop_remainder=True,
    **common,
  )
  eval_ds, num_eval = datasets.load_examples(
    kw['dataset'], 'eval', subset=inp.eval_subset, **common
  )
  if jax.process_count() > 1:
    train_counts = datasets._global_counts(
      kw['dataset'],
      'train',
      subset=inp.train_subset,
      drop_remainder=True,
      **common,
    )
    eval_counts = datasets._global_counts(
      kw['dataset'],
      'eval',
      subset=inp.eval_subset,
      drop_remainder=False,
      **common,
    )
  else:
    train_counts, eval_counts = [num_train], [num_eval]
  if kw['dataset'].startswith('cifar'):
    image_shape = train_ds.element_spec['image'].shape
  else:
    image_shape = (kw['image_size'], kw['image_size'], 3)
  info = _dataset_info(
    kw['dataset'],
    train_counts,
    eval_counts,
    batch_size,
    eval_batch_size,
    num_classes=len(kw['classes']) or spec.num_classes,
    image_shape=image_shape,
  )
  train_iter = batching.train_batches(
    train_ds,
    preprocess_fn=preprocess.get_preprocess_fn(
      kw['dataset'], augment=bool(inp.augment), image_size=kw['image_size']
    ),
    batch_size=batch_size,
    seed=int(config.seed),
    steps_per_epoch=info.steps_per_epoch,
    shuffle_buffer=min(int(inp.shuffle_buffer), num_train),
    start_step=start_step,
  )
  eval_preprocess = preprocess.get_preprocess_fn(
    kw['dataset'], augment=False, image_size=kw['image_size']
  )

  def eval_iter_fn():
    return batching.eval_batches(
      eval_ds,
      preprocess_fn=eval_preprocess,
      batch_size=eval_batch_size,
      num_batches=info.num_eval_batches,
    )

  return train_iter, eval_iter_fn, info


def _array_datasets(config, start_step: int):
  """``get_datasets`` for the npz source (NumPy batches, no TensorFlow)."""
  inp = config.input
  spec = get_spec(inp.dataset)
  batch_size = host_batch_size(inp.batch_size)
  eval_batch_size = host_batch_size(inp.eval_batch_size)
  train = _host_arrays(config, 'train', inp.train_subset, drop_remainder=True)
  evals = _host_arrays(config, 'eval', inp.eval_subset)
  if jax.process_count() > 1:
    train_counts = _array_counts(config, 'train', inp.train_subset, True)
    eval_counts = _array_counts(config, 'eval', inp.eval_subset, False)
  else:
    train_counts, eval_counts = [len(train[1])], [len(evals[1])]
  info = _dataset_info(
    inp.dataset,
    train_counts,
    eval_counts,
    batch_size,
    eval_batch_size,
    num_classes=len(inp.classes) or spec.num_classes,
    image_shape=train[0].shape[1:],
  )
  norm = dict(mean=spec.mean, std=spec.std)
  train_iter = array_input.train_batches(
    *train,
    **norm,
    augment=bool(inp.augment),
    batch_size=batch_size,
    seed=int(config.seed),
    steps_per_epoch=info.steps_per_epoch,
    start_step=start_step,
  )

  def eval_iter_fn():
    return array_input.eval_batches(
      *evals,
      **norm,
      batch_size=eval_batch_size,
      num_batches=info.num_eval_batches,
    )

  return train_iter, eval_iter_fn, info


def get_split_iter(
  config,
  split: str,
  *,
  augment: bool,
  batch_size: int,
  num_batches: int | None = None,
  shuffle: bool = False,
  seed: int | None = None,
) -> Iterator[Batch]:
  """One padded pass over a split (for the PFA statistics pass).

  Args:
    config: reads ``config.input`` (source, dataset, data_dir, classes,
      image_size, train_subset / eval_subset, shuffle_buffer) and
      ``config.seed``.
    split: ``'train'``, ``'test'``/``'eval'``/``'validation'`` (the
      dataset's eval split) or, with the TFDS source, any TFDS split name.
    augment: apply the train augmentation (stateless, seeded).
    batch_size: global batch size (divisible by the device count).
    num_batches: stop after this many batches (``None`` = whole split).
      Every host yields exactly this many (padding with masked batches).
    shuffle: shuffle examples first (seeded).
    seed: shuffle/augment seed (default ``config.seed``).

  Yields:
    Host numpy batches ``{'image', 'label', 'mask'}`` with the class subset
    applied and the last batch padded.
  """
  kw = _input_kw(config)
  if split in ('test', 'eval', 'validation'):
    split, subset = 'eval', config.input.eval_subset
  elif split == 'train':
    subset = config.input.train_subset
  else:
    subset = 0
  seed = int(config.seed if seed is None else seed)
  host_bs = host_batch_size(batch_size)
  if source(config) == 'npz':
    images, labels = _host_arrays(config, split, subset)
    if num_batches is None and jax.process_count() > 1:
      counts = _array_counts(config, split, subset, False)
      num_batches = math.ceil(max(counts) / host_bs)
    spec = get_spec(kw['dataset'])
    return array_input.eval_batches(
      images,
      labels,
      mean=spec.mean,
      std=spec.std,
      batch_size=host_bs,
      num_batches=num_batches,
      shuffle_seed=seed if shuffle else None,
      augment=augment,
      augment_seed=epoch_seed(seed, 0),
    )
  from pfa_jax import batching  # noqa: PLC0415  (TensorFlow: TFDS source only)
  from pfa_jax import datasets  # noqa: PLC0415
  from pfa_jax import preprocess  # noqa: PLC0415

  ds, num = datasets.load_examples(
    kw['dataset'],
    split,
    subset=subset,
    data_dir=kw['data_dir'],
    classes=kw['classes'],
  )
  if num_batches is None and jax.process_count() > 1:
    counts = datasets._global_counts(
      kw['dataset'],
      split,
      data_dir=kw['data_dir'],
      subset=subset,
      classes=kw['classes'],
      drop_remainder=False,
    )
    num_batches = math.ceil(max(counts) / host_bs)
  return batching.eval_batches(
    ds,
    preprocess_fn=preprocess.get_preprocess_fn(
      kw['dataset'], augment=augment, image_size=kw['image_size']
    ),
    batch_size=host_bs,
    num_batches=num_batches,
    shuffle_seed=seed if shuffle else None,
    shuffle_buffer=min(num, int(config.input.shuffle_buffer)),
    augment_seed=epoch_seed(seed, 0),
  )
