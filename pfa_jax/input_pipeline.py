"""Input pipeline: TFDS split -> deterministic host batches -> sharded arrays.

The layers live in their own modules and are re-exported here, so
``input_pipeline.<name>`` keeps working for every caller:

* :mod:`pfa_jax.datasets`: ``load_examples`` (one host's slice of a TFDS
  split, class subset applied; CIFAR decoded once per process),
  ``DATASETS``, ``get_spec``, ``check_classes``, ``select_classes``;
* :mod:`pfa_jax.preprocess`: ``cifar_preprocess``, ``imagenet_preprocess``;
* :mod:`pfa_jax.batching`: ``train_batches`` (a pure function of ``(seed,
  step)``), ``eval_batches`` (padded, masked), ``pad_batch``;
* :mod:`pfa_jax.sharding`: ``make_mesh`` (the one mesh helper),
  ``shard_batches``.

This module wires them up from a config: ``get_datasets(config)`` and
``get_split_iter(config, split, ...)``. Config fields are read directly (a
missing one is an error naming it, not a default that disagrees with
``configs/``).
"""

import math
from collections.abc import Callable, Iterator
from typing import Any

import jax
from absl import logging

from pfa_jax.batching import Batch
from pfa_jax.batching import epoch_seed
from pfa_jax.batching import eval_batches
from pfa_jax.batching import pad_batch
from pfa_jax.batching import train_batches
from pfa_jax.datasets import DATASETS
from pfa_jax.datasets import DatasetInfo
from pfa_jax.datasets import DatasetSpec
from pfa_jax.datasets import _global_counts
from pfa_jax.datasets import check_classes
from pfa_jax.datasets import configure_tf
from pfa_jax.datasets import data_options
from pfa_jax.datasets import get_spec
from pfa_jax.datasets import load_arrays
from pfa_jax.datasets import load_examples
from pfa_jax.datasets import select_classes
from pfa_jax.preprocess import PreprocessFn
from pfa_jax.preprocess import cifar_preprocess
from pfa_jax.preprocess import get_preprocess_fn
from pfa_jax.preprocess import imagenet_preprocess
from pfa_jax.sharding import data_sharding
from pfa_jax.sharding import host_batch_size
from pfa_jax.sharding import make_mesh
from pfa_jax.sharding import replicated
from pfa_jax.sharding import shard_batch
from pfa_jax.sharding import shard_batches

__all__ = [
  'DATASETS',
  'Batch',
  'DatasetInfo',
  'DatasetSpec',
  'PreprocessFn',
  'check_classes',
  'cifar_preprocess',
  'configure_tf',
  'data_options',
  'data_sharding',
  'epoch_seed',
  'eval_batches',
  'get_datasets',
  'get_preprocess_fn',
  'get_spec',
  'get_split_iter',
  'host_batch_size',
  'imagenet_preprocess',
  'load_arrays',
  'load_examples',
  'make_mesh',
  'pad_batch',
  'replicated',
  'select_classes',
  'shard_batch',
  'shard_batches',
  'train_batches',
]


def _input_kw(config) -> dict[str, Any]:
  inp = config.input
  return dict(
    dataset=inp.dataset,
    data_dir=inp.data_dir or None,
    classes=tuple(inp.classes),
    image_size=int(inp.image_size),
  )


def get_datasets(
  config, *, start_step: int = 0
) -> tuple[Iterator[Batch], Callable[[], Iterator[Batch]], DatasetInfo]:
  """Train iterator, eval-iterator factory and ``DatasetInfo`` for a config.

  Args:
    config: reads ``config.seed`` and ``config.input.*`` (dataset, data_dir,
      batch_size, eval_batch_size, train_subset, eval_subset, classes,
      augment, shuffle_buffer, image_size).
    start_step: position of the first train batch (for resuming).

  Returns:
    ``(train_iter, eval_iter_fn, info)``: ``train_iter`` yields host numpy
    batches forever; ``eval_iter_fn()`` returns a fresh padded pass over the
    eval split (``info.num_eval_batches`` batches on every host).
  """
  kw = _input_kw(config)
  inp = config.input
  spec = get_spec(kw['dataset'])
  batch_size = host_batch_size(inp.batch_size)
  eval_batch_size = host_batch_size(inp.eval_batch_size)
  common = dict(data_dir=kw['data_dir'], classes=kw['classes'])
  train_ds, num_train = load_examples(
    kw['dataset'],
    'train',
    subset=inp.train_subset,
    drop_remainder=True,
    **common,
  )
  eval_ds, num_eval = load_examples(
    kw['dataset'], 'eval', subset=inp.eval_subset, **common
  )
  if jax.process_count() > 1:
    count_kw = dict(data_dir=kw['data_dir'], classes=kw['classes'])
    train_counts = _global_counts(
      kw['dataset'],
      'train',
      subset=inp.train_subset,
      drop_remainder=True,
      **count_kw,
    )
    eval_counts = _global_counts(
      kw['dataset'],
      'eval',
      subset=inp.eval_subset,
      drop_remainder=False,
      **count_kw,
    )
  else:
    train_counts, eval_counts = [num_train], [num_eval]
  steps_per_epoch = min(train_counts) // batch_size
  num_eval_batches = math.ceil(max(eval_counts) / eval_batch_size)
  if steps_per_epoch < 1:
    raise ValueError(
      f'{kw["dataset"]}: {min(train_counts)} train examples per host is less '
      f'than one batch of {batch_size}.'
    )
  if kw['dataset'].startswith('cifar'):
    image_shape = tuple(int(d) for d in train_ds.element_spec['image'].shape)
  else:
    image_shape = (kw['image_size'], kw['image_size'], 3)
  info = DatasetInfo(
    num_train_examples=sum(train_counts),
    num_eval_examples=sum(eval_counts),
    num_classes=len(kw['classes']) or spec.num_classes,
    steps_per_epoch=steps_per_epoch,
    num_eval_batches=num_eval_batches,
    image_shape=image_shape,
  )
  logging.info('Data: %s', info)
  train_iter = train_batches(
    train_ds,
    preprocess_fn=get_preprocess_fn(
      kw['dataset'], augment=bool(inp.augment), image_size=kw['image_size']
    ),
    batch_size=batch_size,
    seed=int(config.seed),
    steps_per_epoch=steps_per_epoch,
    shuffle_buffer=min(int(inp.shuffle_buffer), num_train),
    start_step=start_step,
  )
  eval_preprocess = get_preprocess_fn(
    kw['dataset'], augment=False, image_size=kw['image_size']
  )

  def eval_iter_fn():
    return eval_batches(
      eval_ds,
      preprocess_fn=eval_preprocess,
      batch_size=eval_batch_size,
      num_batches=num_eval_batches,
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
    config: reads ``config.input`` (dataset, data_dir, classes, image_size,
      train_subset / eval_subset) and ``config.seed``.
    split: ``'train'``, ``'test'``/``'eval'``/``'validation'`` (the
      dataset's eval split) or any TFDS split name.
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
  ds, num = load_examples(
    kw['dataset'],
    split,
    subset=subset,
    data_dir=kw['data_dir'],
    classes=kw['classes'],
  )
  host_bs = host_batch_size(batch_size)
  if num_batches is None and jax.process_count() > 1:
    counts = _global_counts(
      kw['dataset'],
      split,
      data_dir=kw['data_dir'],
      subset=subset,
      classes=kw['classes'],
      drop_remainder=False,
    )
    num_batches = math.ceil(max(counts) / host_bs)
  return eval_batches(
    ds,
    preprocess_fn=get_preprocess_fn(
      kw['dataset'], augment=augment, image_size=kw['image_size']
    ),
    batch_size=host_bs,
    num_batches=num_batches,
    shuffle_seed=seed if shuffle else None,
    shuffle_buffer=min(num, int(config.input.shuffle_buffer)),
    augment_seed=epoch_seed(seed, 0),
  )
