"""Input pipeline: TFDS split -> deterministic host batches -> sharded arrays.

Three layers, each usable on its own:

* ``load_examples`` reads one host's slice of a TFDS split
  (``tfds.split_for_jax_process``), applies the class subset and returns a
  ``tf.data.Dataset`` of ``{'image', 'label'}`` (CIFAR is materialised in host
  memory once; ImageNet streams encoded JPEGs).
* ``train_batches`` / ``eval_batches`` turn such a dataset into numpy batches
  ``{'image': [B, H, W, C] float32, 'label': [B] int32, 'mask': [B] bool}``.
  Train batches drop the remainder, repeat forever and are a pure function of
  ``(seed, step)``: epoch ``e`` is shuffled with a seed derived from
  ``(seed, e)`` and every example is augmented with stateless ops seeded by
  ``(epoch seed, example index)``, so resuming at ``start_step`` skips straight
  to the right place and yields exactly the batches an uninterrupted run sees.
  Eval batches are padded to a fixed count with ``mask == False``.
* ``shard_batches`` places host batches on all devices of a ``('data',)``
  mesh with ``jax.make_array_from_process_local_data``.

``get_datasets(config)`` and ``get_split_iter(config, split, ...)`` wire these
up from a config (see ``configs/``).
"""

import dataclasses
import functools
import itertools
import logging as py_logging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

Batch = dict[str, np.ndarray]
PreprocessFn = Callable[[dict[str, tf.Tensor], tf.Tensor], dict[str, tf.Tensor]]


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """Static facts about a supported dataset."""

  train_split: str
  eval_split: str
  num_classes: int
  mean: tuple[float, float, float]  # RGB, on [0, 1] pixels
  std: tuple[float, float, float]
  in_memory: bool  # small enough to decode once and keep in host RAM


DATASETS = {
  'cifar10': DatasetSpec(
    'train',
    'test',
    10,
    (0.4914, 0.4822, 0.4465),
    (0.2470, 0.2435, 0.2616),
    True,
  ),
  'cifar100': DatasetSpec(
    'train',
    'test',
    100,
    (0.5071, 0.4865, 0.4409),
    (0.2673, 0.2564, 0.2762),
    True,
  ),
  'imagenet2012': DatasetSpec(
    'train',
    'validation',
    1000,
    (0.485, 0.456, 0.406),
    (0.229, 0.224, 0.225),
    False,
  ),
}


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the train loop needs to know about the data.

  Example counts are global (all hosts); with a class subset they count only
  the kept classes. ``steps_per_epoch`` is the same on every host.
  """

  num_train_examples: int
  num_eval_examples: int
  num_classes: int
  steps_per_epoch: int
  num_eval_batches: int
  image_shape: tuple[int, int, int]  # (H, W, C)


def get_spec(dataset: str) -> DatasetSpec:
  if dataset not in DATASETS:
    raise ValueError(
      f'Unknown dataset {dataset!r}; expected one of {sorted(DATASETS)}.'
    )
  return DATASETS[dataset]


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


def _data_options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  # A small private pool: tf.data must not compete with XLA for the CPUs.
  options.threading.private_threadpool_size = max(2, (os.cpu_count() or 2) // 2)
  options.threading.max_intra_op_parallelism = 1
  return options


# ----------------------------------------------------------------------------
# Classes.


def check_classes(classes: Sequence[int], num_classes: int) -> tuple[int, ...]:
  """Validates a class subset; returns it as a tuple (empty = all classes).

  Raises:
    ValueError: naming any id outside ``[0, num_classes)`` or repeated.
  """
  classes = tuple(int(c) for c in classes)
  unknown = sorted({c for c in classes if not 0 <= c < num_classes})
  if unknown:
    raise ValueError(
      f'Unknown class ids {unknown}: the dataset has classes '
      f'0..{num_classes - 1}.'
    )
  dups = sorted({c for c in classes if classes.count(c) > 1})
  if dups:
    raise ValueError(f'Repeated class ids {dups} in the class subset.')
  return classes


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
  ds = select_classes(ds, classes, spec.num_classes)
  if spec.in_memory:
    images, labels = [], []
    for b in tfds.as_numpy(ds.batch(4096).with_options(_data_options())):
      images.append(b['image'])
      labels.append(b['label'].astype(np.int32))
    if not images:
      raise ValueError(
        f'{dataset}:{name} has no examples for classes {classes}'
      )
    images, labels = np.concatenate(images), np.concatenate(labels)
    ds = tf.data.Dataset.from_tensor_slices({'image': images, 'label': labels})
    return ds, len(labels)
  num = int(ds.cardinality())
  if num < 0:  # Unknown after filtering: count labels only.
    num = int(ds.map(lambda ex: 0).reduce(0, lambda n, _: n + 1))
  return ds, num


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


# ----------------------------------------------------------------------------
# Preprocessing (pure tf; `seed` is a [2] int tensor for stateless ops).


def _normalize(image, mean, std):
  image = tf.cast(image, tf.float32) / 255.0
  return (image - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def cifar_preprocess(
  *, mean: Sequence[float], std: Sequence[float], augment: bool, pad: int = 4
) -> PreprocessFn:
  """Pad-``pad`` random crop + horizontal flip (if ``augment``), normalise."""

  def fn(ex, seed):
    image = ex['image']
    if augment:
      seed_crop, seed_flip = tf.unstack(
        tf.random.experimental.stateless_split(seed, 2)
      )
      shape = tf.shape(image)
      padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
      image = tf.image.stateless_random_crop(padded, shape, seed=seed_crop)
      image = tf.image.stateless_random_flip_left_right(image, seed=seed_flip)
    return {'image': _normalize(image, mean, std), 'label': ex['label']}

  return fn


def imagenet_preprocess(
  *,
  mean: Sequence[float],
  std: Sequence[float],
  augment: bool,
  image_size: int = 224,
) -> PreprocessFn:
  """Random-resized-crop + flip (train) or resize-256 + centre-crop (eval).

  Images are encoded JPEG strings; the eval resize keeps the 256/224 ratio.
  """

  def train_fn(ex, seed):
    seed_box, seed_flip = tf.unstack(
      tf.random.experimental.stateless_split(seed, 2)
    )
    data = ex['image']
    shape = tf.io.extract_jpeg_shape(data)
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape,
      bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]),
      seed=seed_box,
      min_object_covered=0.1,
      aspect_ratio_range=(3 / 4, 4 / 3),
      area_range=(0.08, 1.0),
      max_attempts=10,
      use_image_if_no_bounding_boxes=True,
    )
    y, x, _ = tf.unstack(begin)
    h, w, _ = tf.unstack(size)
    image = tf.io.decode_and_crop_jpeg(data, tf.stack([y, x, h, w]), channels=3)
    image = tf.image.resize(image, [image_size, image_size], 'bilinear')
    image = tf.image.stateless_random_flip_left_right(image, seed=seed_flip)
    return {'image': _normalize(image, mean, std), 'label': ex['label']}

  def eval_fn(ex, seed):
    del seed
    image = tf.io.decode_jpeg(ex['image'], channels=3)
    resize = round(image_size * 256 / 224)
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = resize / tf.reduce_min(shape)
    new_hw = tf.cast(tf.round(shape * scale), tf.int32)
    image = tf.image.resize(image, new_hw, 'bilinear')
    top = (new_hw[0] - image_size) // 2
    left = (new_hw[1] - image_size) // 2
    image = image[top : top + image_size, left : left + image_size]
    image = tf.ensure_shape(image, [image_size, image_size, 3])
    return {'image': _normalize(image, mean, std), 'label': ex['label']}

  return train_fn if augment else eval_fn


def get_preprocess_fn(
  dataset: str, *, augment: bool, image_size: int = 224
) -> PreprocessFn:
  spec = get_spec(dataset)
  if dataset.startswith('cifar'):
    return cifar_preprocess(mean=spec.mean, std=spec.std, augment=augment)
  return imagenet_preprocess(
    mean=spec.mean, std=spec.std, augment=augment, image_size=image_size
  )


# ----------------------------------------------------------------------------
# Batching.


def epoch_seed(seed: int, epoch: int) -> int:
  """A 31-bit seed for epoch ``epoch`` (a pure function of both)."""
  state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch)])
  return int(state.generate_state(1)[0] & 0x7FFFFFFF)


def _seeded(preprocess_fn: PreprocessFn, seed: int):
  """``(index, example) -> example`` with stateless seed ``[seed, index]``."""

  @tf.autograph.experimental.do_not_convert
  def fn(index, ex):
    ex = preprocess_fn(ex, tf.stack([tf.constant(seed, tf.int64), index]))
    return {
      'image': tf.cast(ex['image'], tf.float32),
      'label': tf.cast(ex['label'], tf.int32),
    }

  return fn


def train_batches(
  ds: tf.data.Dataset,
  *,
  preprocess_fn: PreprocessFn,
  batch_size: int,
  seed: int,
  steps_per_epoch: int,
  shuffle_buffer: int,
  start_step: int = 0,
  shuffle: bool = True,
) -> Iterator[Batch]:
  """Endless, shuffled, augmented batches; a pure function of (seed, step).

  Args:
    ds: finite dataset of ``{'image', 'label'}`` (one host's examples).
    preprocess_fn: ``(example, seed[2]) -> example``.
    batch_size: per-host batch size; the remainder of an epoch is dropped.
    seed: data seed.
    steps_per_epoch: batches per epoch (``<= len(ds) // batch_size``).
    shuffle_buffer: tf.data shuffle buffer (clipped to >= 1).
    start_step: the first yielded batch is the one an uninterrupted iterator
      yields at this (0-based) position.
    shuffle: shuffle each epoch.

  Yields:
    ``{'image': [B, H, W, C] f32, 'label': [B] i32, 'mask': [B] bool}``.
  """
  if steps_per_epoch < 1:
    raise ValueError(
      f'steps_per_epoch={steps_per_epoch}: fewer examples than one batch '
      f'of {batch_size}.'
    )
  first_epoch, skip = divmod(int(start_step), steps_per_epoch)
  for epoch in itertools.count(first_epoch):
    eseed = epoch_seed(seed, epoch)
    d = ds.enumerate()
    if shuffle:
      d = d.shuffle(
        max(1, shuffle_buffer), seed=eseed, reshuffle_each_iteration=False
      )
    # Skip raw examples (before the costly map): augmentation seeds depend on
    # the example index, not on the position, so the result is unchanged.
    d = d.skip(skip * batch_size)
    d = d.map(
      _seeded(preprocess_fn, eseed),
      num_parallel_calls=tf.data.AUTOTUNE,
      deterministic=True,
    )
    d = d.batch(batch_size, drop_remainder=True).take(steps_per_epoch - skip)
    d = d.prefetch(2).with_options(_data_options())
    skip = 0
    for batch in tfds.as_numpy(d):
      batch['mask'] = np.ones([batch_size], bool)
      yield batch


def pad_batch(batch: Batch, batch_size: int) -> Batch:
  """Pads a host batch with zeros to ``batch_size``; padding has mask False."""
  n = len(batch['label'])
  mask = batch.get('mask', np.ones([n], bool)).astype(bool)
  out = {k: v for k, v in batch.items() if k != 'mask'}
  out = {
    k: np.concatenate([v, np.zeros((batch_size - n, *v.shape[1:]), v.dtype)])
    for k, v in out.items()
  }
  out['mask'] = np.concatenate([mask, np.zeros([batch_size - n], bool)])
  return out


def eval_batches(
  ds: tf.data.Dataset,
  *,
  preprocess_fn: PreprocessFn,
  batch_size: int,
  num_batches: int | None = None,
  shuffle_seed: int | None = None,
  shuffle_buffer: int = 10_000,
  augment_seed: int = 0,
) -> Iterator[Batch]:
  """One pass, padded batches with ``mask``; no example dropped or repeated.

  Args:
    ds: finite dataset of ``{'image', 'label'}``.
    preprocess_fn: ``(example, seed[2]) -> example``.
    batch_size: per-host batch size; the last batch is padded.
    num_batches: exact number of batches to yield: fewer data batches are
      truncated, more are padded with all-masked batches (so every host runs
      the same number of steps). ``None`` = one pass.
    shuffle_seed: if set, shuffle with this seed first.
    shuffle_buffer: shuffle buffer size.
    augment_seed: seed for stateless augmentation in ``preprocess_fn``.

  Yields:
    ``{'image', 'label', 'mask'}`` numpy batches of exactly ``batch_size``.
  """
  d = ds.enumerate()
  if shuffle_seed is not None:
    d = d.shuffle(
      max(1, shuffle_buffer),
      seed=epoch_seed(shuffle_seed, 0),
      reshuffle_each_iteration=False,
    )
  if num_batches is not None:
    d = d.take(num_batches * batch_size)
  d = d.map(
    _seeded(preprocess_fn, augment_seed),
    num_parallel_calls=tf.data.AUTOTUNE,
    deterministic=True,
  )
  d = d.batch(batch_size).prefetch(2).with_options(_data_options())
  count, template = 0, None
  for batch in tfds.as_numpy(d):
    batch = pad_batch(batch, batch_size)
    template = batch
    count += 1
    yield batch
  if num_batches is not None and count < num_batches:
    if template is None:
      spec = d.element_spec
      template = {
        k: np.zeros(
          [batch_size, *spec[k].shape[1:]], spec[k].dtype.as_numpy_dtype
        )
        for k in ('image', 'label')
      }
    empty = {k: np.zeros_like(v) for k, v in template.items() if k != 'mask'}
    empty['mask'] = np.zeros([batch_size], bool)
    for _ in range(num_batches - count):
      yield empty


# ----------------------------------------------------------------------------
# Devices.


def make_mesh() -> jax.sharding.Mesh:
  """A 1-D mesh over all (global) devices, axis ``'data'``."""
  return jax.sharding.Mesh(np.asarray(jax.devices()), ('data',))


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
  sharding = jax.sharding.NamedSharding(
    mesh, jax.sharding.PartitionSpec('data')
  )
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


# ----------------------------------------------------------------------------
# Config entry points.


def _input_kw(config) -> dict[str, Any]:
  inp = config.input
  return dict(
    dataset=inp.dataset,
    data_dir=inp.get('data_dir') or None,
    classes=tuple(inp.get('classes') or ()),
    image_size=int(inp.get('image_size') or 224),
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
    subset=inp.get('train_subset', 0),
    drop_remainder=True,
    **common,
  )
  eval_ds, num_eval = load_examples(
    kw['dataset'], 'eval', subset=inp.get('eval_subset', 0), **common
  )
  if jax.process_count() > 1:
    count_kw = dict(data_dir=kw['data_dir'], classes=kw['classes'])
    train_counts = _global_counts(
      kw['dataset'],
      'train',
      subset=inp.get('train_subset', 0),
      drop_remainder=True,
      **count_kw,
    )
    eval_counts = _global_counts(
      kw['dataset'],
      'eval',
      subset=inp.get('eval_subset', 0),
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
    split, subset = 'eval', config.input.get('eval_subset', 0)
  elif split == 'train':
    subset = config.input.get('train_subset', 0)
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
    shuffle_buffer=min(num, int(config.input.get('shuffle_buffer', 10_000))),
    augment_seed=epoch_seed(seed, 0),
  )
