"""Host batches from a finite dataset: deterministic train, padded eval.

Train batches drop the remainder, repeat forever and are a pure function of
``(seed, step)``: epoch ``e`` is shuffled with a seed derived from ``(seed,
e)`` and every example is augmented with stateless ops seeded by ``(epoch
seed, example index)``, so resuming at ``start_step`` skips straight to the
right place and yields exactly the batches an uninterrupted run sees. Eval
batches are padded to a fixed count with ``mask == False``.
"""

import itertools
from collections.abc import Iterator

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from pfa_jax.array_input import Batch
from pfa_jax.array_input import epoch_seed
from pfa_jax.array_input import pad_batch
from pfa_jax.datasets import data_options
from pfa_jax.preprocess import PreprocessFn


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
    d = d.prefetch(2).with_options(data_options())
    skip = 0
    for batch in tfds.as_numpy(d):
      batch['mask'] = np.ones([batch_size], bool)
      yield batch


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
  d = d.batch(batch_size).prefetch(2).with_options(data_options())
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
