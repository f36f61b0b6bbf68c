"""TFDS splits -> one host's examples (decoded once per process).

``load_examples`` reads one host's slice of a TFDS split
(``tfds.split_for_jax_process`` semantics via ``tfds.even_splits``), applies
the class subset and returns a ``tf.data.Dataset`` of ``{'image', 'label'}``.
CIFAR is decoded into host numpy arrays once per process and kept in
``load_arrays``'s cache, keyed by (dataset, split, subset, classes, data_dir,
host slice, the TFDS reader in effect): compress's many evaluations and
fine-tunes reuse them instead of decoding the split again. ImageNet streams
encoded JPEGs. Call ``load_arrays.cache_clear()`` to free the memory.
"""

import functools
import logging as py_logging
import os
from collections.abc import Sequence

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

# Re-exported: callers reach the specs through this module (and
# input_pipeline) as before.
from pfa_jax.dataspec import DATASETS  # noqa: F401
from pfa_jax.dataspec import DatasetInfo  # noqa: F401
from pfa_jax.dataspec import DatasetSpec  # noqa: F401
from pfa_jax.dataspec import check_classes
from pfa_jax.dataspec import get_spec


@functools.cache
def configure_tf() -> None:
  """Keeps TF (used only for tf.data) off accelerators and out of XLA's way."""
  try:
    tf.config.set_visible_devices([], 'GPU')
    tf.config.set_visible_devices([], 'TPU')
  except (RuntimeError, ValueError):  # Runtime already initialised.
    pass
  try:
    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.config.threading.set_intra_op_parallelism_threads(1)
  except RuntimeError:
    pass
  py_logging.getLogger('tensorflow').setLevel(py_logging.ERROR)


def data_options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  # A small private pool: tf.data must not compete with XLA for the CPUs.
  options.threading.private_threadpool_size = max(2, (os.cpu_count() or 2) // 2)
  options.threading.max_intra_op_parallelism = 1
  return options


# ----------------------------------------------------------------------------
# Classes.


def select_classes(
  ds: tf.data.Dataset, classes: Sequence[int], num_classes: int
) -> tf.data.Dataset:
  """Keeps examples of ``classes`` and relabels them ``0..k-1`` in that order.

  An empty ``classes`` returns ``ds`` unchanged.
  """
  classes = check_classes(classes, num_classes)
  if not classes:
    return ds
  table = np.full([num_classes], -1, np.int32)
  table[list(classes)] = np.arange(len(classes), dtype=np.int32)
  table = tf.constant(table)

  @tf.autograph.experimental.do_not_convert
  def relabel(ex):
    return {**ex, 'label': tf.gather(table, tf.cast(ex['label'], tf.int32))}

  keep = tf.autograph.experimental.do_not_convert(lambda ex: ex['label'] >= 0)
  return ds.map(relabel).filter(keep)


# ----------------------------------------------------------------------------
# Loading.


def _missing_data_error(dataset: str, data_dir: str | None, err) -> Exception:
  where = data_dir or os.environ.get('TFDS_DATA_DIR') or '~/tensorflow_datasets'
  return FileNotFoundError(
    f'TFDS dataset {dataset!r} is not prepared in {where} ({err}). This code '
    'never downloads. Point TFDS_DATA_DIR (or config.input.data_dir) at a '
    'prepared TFDS directory, or build one from the offline copies with '
    '`make data` or `python ../shared/datasets/make_tfds_data_dir.py '
    '--input <archive> --data-dir <dir>`. ImageNet needs its manual_dir '
    'archives prepared with `tfds build imagenet2012 --manual_dir ...`.'
  )


def _tfds_load(dataset: str, split, *, data_dir: str | None, decoders=None):
  try:
    return tfds.load(
      dataset,
      split=split,
      data_dir=data_dir or None,
      download=False,
      shuffle_files=False,
      decoders=decoders,
      read_config=tfds.ReadConfig(
        shuffle_seed=0, interleave_cycle_length=1, add_tfds_id=False
      ),
    )
  except (
    AssertionError,
    FileNotFoundError,
    tfds.core.DatasetNotFoundError,
  ) as e:
    raise _missing_data_error(dataset, data_dir, e) from e


def _split_name(dataset: str, split: str, subset: int) -> str:
  spec = get_spec(dataset)
  name = {'train': spec.train_split, 'eval': spec.eval_split}.get(split, split)
  return f'{name}[:{subset}]' if subset else name


def load_examples(
  dataset: str,
  split: str,
  *,
  data_dir: str | None = None,
  subset: int = 0,
  classes: Sequence[int] = (),
  drop_remainder: bool = False,
  process_index: int | None = None,
  process_count: int | None = None,
) -> tuple[tf.data.Dataset, int]:
  """One host's slice of a split, class-filtered.

  Args:
    dataset: a key of ``DATASETS``.
    split: TFDS split name, or ``'train'``/``'eval'`` for the dataset's own.
    data_dir: TFDS data dir; ``None``/``''`` = TFDS default (``TFDS_DATA_DIR``).
    subset: if > 0, use only the first ``subset`` examples of the split.
    classes: class subset (labels remapped to ``0..k-1``); empty = all.
    drop_remainder: give every host the same number of examples (train).
    process_index: which host slice (default ``jax.process_index()``).
    process_count: number of slices (default ``jax.process_count()``).

  Returns:
    ``(ds, num_examples)``: a finite dataset of ``{'image', 'label'}`` where
    images are uint8 ``[H, W, 3]`` (in-memory datasets) or encoded JPEG
    strings (ImageNet), and the number of examples in it.

  Raises:
    FileNotFoundError: the dataset is not prepared (no download is tried).
    ValueError: unknown dataset or class ids.
  """
  configure_tf()
  spec = get_spec(dataset)
  classes = check_classes(classes, spec.num_classes)
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  if spec.in_memory:
    images, labels = load_arrays(
      dataset,
      split,
      data_dir=data_dir or None,
      subset=int(subset),
      classes=classes,
      # One host: every even split is the whole split, so train (drop) and
      # statistics (no drop) passes share one cache entry.
      drop_remainder=bool(drop_remainder) and process_count > 1,
      process_index=int(process_index),
      process_count=int(process_count),
      reader=_reader(),
    )
    ds = tf.data.Dataset.from_tensor_slices({'image': images, 'label': labels})
    return ds, len(labels)
  ds = _host_examples(
    dataset,
    split,
    data_dir,
    subset,
    classes,
    drop_remainder,
    process_index,
    process_count,
  )
  num = int(ds.cardinality())
  if num < 0:  # Unknown after filtering: count labels only.
    num = int(ds.map(lambda ex: 0).reduce(0, lambda n, _: n + 1))
  return ds, num


def _reader():
  """The TFDS reader in effect (``tfds.testing.mock_data`` replaces it)."""
  return tfds.core.dataset_builder.DatasetBuilder.as_dataset


def _host_examples(
  dataset,
  split,
  data_dir,
  subset,
  classes,
  drop_remainder,
  process_index,
  process_count,
) -> tf.data.Dataset:
  spec = get_spec(dataset)
  name = _split_name(dataset, split, subset)
  host_split = tfds.even_splits(
    name, n=process_count, drop_remainder=drop_remainder
  )[process_index]
  decoders = None if spec.in_memory else {'image': tfds.decode.SkipDecoding()}
  ds = _tfds_load(dataset, host_split, data_dir=data_dir, decoders=decoders)
  ds = ds.map(
    tf.autograph.experimental.do_not_convert(
      lambda ex: {'image': ex['image'], 'label': ex['label']}
    )
  )
  if subset and process_count == 1:
    ds = ds.take(subset)  # Also exact where the split string is not honoured.
  return select_classes(ds, classes, spec.num_classes)


@functools.lru_cache(maxsize=4)
def load_arrays(
  dataset: str,
  split: str,
  *,
  data_dir: str | None,
  subset: int,
  classes: tuple[int, ...],
  drop_remainder: bool,
  process_index: int,
  process_count: int,
  reader=None,
) -> tuple[np.ndarray, np.ndarray]:
  """Decoded ``(images uint8 [N, H, W, 3], labels int32 [N])``, cached.

  ``reader`` only keys the cache (``_reader()``), so data mocked in one
  ``tfds.testing.mock_data`` context is never served in another. The
  arrays are read-only: every caller shares them.
  """
  del reader
  ds = _host_examples(
    dataset,
    split,
    data_dir,
    subset,
    classes,
    drop_remainder,
    process_index,
    process_count,
  )
  images, labels = [], []
  for b in tfds.as_numpy(ds.batch(4096).with_options(data_options())):
    images.append(b['image'])
    labels.append(b['label'].astype(np.int32))
  if not images:
    name = _split_name(dataset, split, subset)
    raise ValueError(f'{dataset}:{name} has no examples for classes {classes}')
  images, labels = np.concatenate(images), np.concatenate(labels)
  images.flags.writeable = False
  labels.flags.writeable = False
  return images, labels


def _global_counts(
  dataset, split, *, data_dir, subset, classes, drop_remainder
):
  """Example counts of every host's slice (label-only pass when filtering)."""
  counts = []
  for p in range(jax.process_count()):
    name = _split_name(dataset, split, subset)
    host_split = tfds.even_splits(
      name, n=jax.process_count(), drop_remainder=drop_remainder
    )[p]
    ds = _tfds_load(
      dataset,
      host_split,
      data_dir=data_dir,
      decoders={'image': tfds.decode.SkipDecoding()},
    )
    if subset and jax.process_count() == 1:
      ds = ds.take(subset)
    if classes:
      ds = select_classes(ds, classes, get_spec(dataset).num_classes)
    num = int(ds.cardinality())
    if num < 0:
      num = int(ds.map(lambda ex: 0).reduce(0, lambda n, _: n + 1))
    counts.append(num)
  return counts
