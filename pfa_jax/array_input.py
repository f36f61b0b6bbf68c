"""CIFAR from decoded ``.npz`` arrays, with no TensorFlow: ``input.source='npz'``.

For machines without TensorFlow or TFDS (the GPU image): ``input.data_dir``
names a folder holding ``<dataset>_arrays.npz`` as the offline converter
writes it (``python ../shared/datasets/make_tfds_data_dir.py --input
<archive> --export-npz DIR``: ``x_train``/``x_test`` uint8 [N, 32, 32, 3],
``y_train``/``y_test`` integer labels, original order).

The contract is the TFDS path's (:mod:`pfa_jax.batching`), in NumPy:

* a split is sliced like ``'train[:subset]'`` and then across hosts like
  ``tfds.even_splits``; the class subset is applied to each host's slice and
  relabelled ``0..k-1`` in the order given;
* train batches drop the remainder, repeat forever and are a pure function
  of ``(seed, step)``: epoch ``e`` is a permutation seeded by
  ``epoch_seed(seed, e)``, and batch ``s`` of it is augmented (4-pixel zero
  pad, random 32x32 crop, horizontal flip) from a generator seeded by
  ``(epoch seed, s)``, so a resumed run sees exactly the batches an
  uninterrupted one does;
* eval batches are padded to a fixed count with ``mask == False``.

The random streams differ from TensorFlow's, so the two sources give other
(equally distributed) batches for the same seed.
"""

import functools
import itertools
import os
from collections.abc import Iterator, Sequence

import numpy as np

from pfa_jax.dataspec import check_classes
from pfa_jax.dataspec import get_spec

Batch = dict[str, np.ndarray]
CIFAR_PAD = 4
_SPLITS = {'train': 'train', 'test': 'test', 'eval': 'test'}


def epoch_seed(seed: int, epoch: int) -> int:
  """A 31-bit seed for epoch ``epoch`` (a pure function of both)."""
  state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch)])
  return int(state.generate_state(1)[0] & 0x7FFFFFFF)


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


# ----------------------------------------------------------------------------
# Loading.


def npz_path(dataset: str, data_dir: str | None) -> str:
  """``data_dir/<dataset>_arrays.npz``; a clear error when it is not there."""
  how = (
    'Build it from the offline copies with `python '
    '../shared/datasets/make_tfds_data_dir.py --input <archive> '
    '--export-npz <dir> --decoder pil` and set input.data_dir to <dir>.'
  )
  if not data_dir:
    raise ValueError(
      "input.source='npz' needs input.data_dir: the folder holding "
      f'{dataset}_arrays.npz. {how}'
    )
  path = os.path.join(os.path.expanduser(data_dir), f'{dataset}_arrays.npz')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} does not exist. {how}')
  return path


@functools.lru_cache(maxsize=2)
def _read(dataset: str, path: str) -> dict[str, np.ndarray]:
  """The four arrays of one file, checked and read-only (cached)."""
  num_classes = get_spec(dataset).num_classes
  out = {}
  with np.load(path) as data:
    for split in ('train', 'test'):
      x, y = f'x_{split}', f'y_{split}'
      missing = [k for k in (x, y) if k not in data.files]
      if missing:
        raise ValueError(
          f'{path}: no array {missing[0]!r}; it has {data.files}.'
        )
      images, labels = data[x], data[y]
      if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise ValueError(
          f'{path}: {x} must be uint8 [N, H, W, 3], got {images.dtype} '
          f'{images.shape}.'
        )
      if labels.shape != images.shape[:1] or labels.dtype.kind not in 'iu':
        raise ValueError(
          f'{path}: {y} must be {images.shape[0]} integer labels, got '
          f'{labels.dtype} {labels.shape}.'
        )
      bad = labels[(labels < 0) | (labels >= num_classes)]
      if bad.size:
        raise ValueError(
          f'{path}: {y} holds label {int(bad[0])}, outside 0..'
          f'{num_classes - 1} of {dataset}.'
        )
      out[x], out[y] = images, labels.astype(np.int32)
  for v in out.values():
    v.flags.writeable = False
  return out


def host_slice(
  n: int, process_index: int, process_count: int, drop_remainder: bool
) -> slice:
  """Host ``process_index``'s share of ``n`` examples (``tfds.even_splits``).

  The first ``n % process_count`` hosts get one example more, unless
  ``drop_remainder`` gives every host ``n // process_count``.
  """
  base, extra = divmod(n, process_count)
  if drop_remainder:
    extra = 0
  start = process_index * base + min(process_index, extra)
  return slice(start, start + base + (process_index < extra))


def load_arrays(
  dataset: str,
  split: str,
  *,
  data_dir: str | None,
  subset: int = 0,
  classes: Sequence[int] = (),
  drop_remainder: bool = False,
  process_index: int = 0,
  process_count: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
  """One host's ``(images uint8 [N, H, W, 3], labels int32 [N])`` of a split.

  Args:
    dataset: a CIFAR key of ``dataspec.DATASETS``.
    split: ``'train'``, or ``'test'``/``'eval'`` (CIFAR's eval split).
    data_dir: the folder holding ``<dataset>_arrays.npz``.
    subset: if > 0, only the first ``subset`` examples of the split.
    classes: class subset, relabelled ``0..k-1`` in this order; empty = all.
    drop_remainder: give every host the same number of examples (train).
    process_index: which host slice.
    process_count: number of slices.

  Raises:
    ValueError: a dataset that is not in memory (ImageNet), an unknown split
      or class id, a malformed file, or no examples left.
    FileNotFoundError: no ``.npz`` in ``data_dir``.
  """
  spec = get_spec(dataset)
  if not spec.in_memory:
    raise ValueError(
      f"input.source='npz' serves the in-memory datasets (CIFAR), not "
      f'{dataset!r}; use the TFDS source.'
    )
  if split not in _SPLITS:
    raise ValueError(
      f'Unknown split {split!r} for the npz source; expected one of '
      f'{sorted(_SPLITS)}.'
    )
  classes = check_classes(classes, spec.num_classes)
  arrays = _read(dataset, npz_path(dataset, data_dir))
  images, labels = arrays[f'x_{_SPLITS[split]}'], arrays[f'y_{_SPLITS[split]}']
  if subset:
    images, labels = images[:subset], labels[:subset]
  part = host_slice(len(labels), process_index, process_count, drop_remainder)
  images, labels = images[part], labels[part]
  if classes:
    table = np.full([spec.num_classes], -1, np.int32)
    table[list(classes)] = np.arange(len(classes), dtype=np.int32)
    labels = table[labels]
    keep = labels >= 0
    images, labels = images[keep], labels[keep]
  if not len(labels):
    raise ValueError(
      f'{dataset}:{split} has no examples for classes {classes} on host '
      f'{process_index} of {process_count}.'
    )
  return images, labels


# ----------------------------------------------------------------------------
# Batches.


def preprocess(
  images: np.ndarray,
  rng: np.random.Generator | None,
  *,
  mean: Sequence[float],
  std: Sequence[float],
  pad: int = CIFAR_PAD,
) -> np.ndarray:
  """uint8 [B, H, W, 3] -> normalised float32; augmented when ``rng`` is set.

  Augmentation: zero-pad by ``pad``, crop back to H x W at a uniform offset,
  flip left-right with probability 1/2 (one draw per image).
  """
  if rng is not None:
    b, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    oy = rng.integers(0, 2 * pad + 1, b)
    ox = rng.integers(0, 2 * pad + 1, b)
    flip = rng.random(b) < 0.5
    rows = oy[:, None] + np.arange(h)
    cols = ox[:, None] + np.arange(w)
    cols = np.where(flip[:, None], cols[:, ::-1], cols)
    images = padded[
      np.arange(b)[:, None, None], rows[:, :, None], cols[:, None]
    ]
  x = images.astype(np.float32) / np.float32(255.0)
  return (x - np.float32(mean)) / np.float32(std)


def train_batches(
  images: np.ndarray,
  labels: np.ndarray,
  *,
  mean: Sequence[float],
  std: Sequence[float],
  augment: bool,
  batch_size: int,
  seed: int,
  steps_per_epoch: int,
  start_step: int = 0,
  shuffle: bool = True,
) -> Iterator[Batch]:
  """Endless, shuffled, augmented batches; a pure function of (seed, step).

  Yields:
    ``{'image': [B, H, W, 3] f32, 'label': [B] i32, 'mask': [B] bool}``.
  """
  if not 1 <= steps_per_epoch <= len(labels) // batch_size:
    raise ValueError(
      f'steps_per_epoch={steps_per_epoch} does not fit {len(labels)} '
      f'examples in batches of {batch_size}.'
    )
  first_epoch, skip = divmod(int(start_step), steps_per_epoch)
  for epoch in itertools.count(first_epoch):
    eseed = epoch_seed(seed, epoch)
    order = np.arange(len(labels))
    if shuffle:
      order = np.random.default_rng(eseed).permutation(order)
    for step in range(skip, steps_per_epoch):
      idx = order[step * batch_size : (step + 1) * batch_size]
      rng = np.random.default_rng([eseed, step]) if augment else None
      yield {
        'image': preprocess(images[idx], rng, mean=mean, std=std),
        'label': labels[idx],
        'mask': np.ones([batch_size], bool),
      }
    skip = 0


def eval_batches(
  images: np.ndarray,
  labels: np.ndarray,
  *,
  mean: Sequence[float],
  std: Sequence[float],
  batch_size: int,
  num_batches: int | None = None,
  shuffle_seed: int | None = None,
  augment: bool = False,
  augment_seed: int = 0,
) -> Iterator[Batch]:
  """One pass, padded batches with ``mask``; no example dropped or repeated.

  Args:
    images: uint8 [N, H, W, 3].
    labels: int32 [N].
    mean: per-channel mean of [0, 1] pixels.
    std: per-channel standard deviation.
    batch_size: per-host batch size; the last batch is padded.
    num_batches: exact number of batches: fewer data batches are truncated,
      more are padded with all-masked batches. ``None`` = one pass.
    shuffle_seed: if set, shuffle (``epoch_seed(shuffle_seed, 0)``) first.
    augment: apply the train augmentation, seeded by ``(augment_seed,
      batch index)``.
    augment_seed: see ``augment``.

  Yields:
    ``{'image', 'label', 'mask'}`` numpy batches of exactly ``batch_size``.
  """
  order = np.arange(len(labels))
  if shuffle_seed is not None:
    order = np.random.default_rng(epoch_seed(shuffle_seed, 0)).permutation(
      order
    )
  if num_batches is not None:
    order = order[: num_batches * batch_size]
  count = 0
  for count, start in enumerate(range(0, len(order), batch_size), 1):
    idx = order[start : start + batch_size]
    rng = np.random.default_rng([augment_seed, count - 1]) if augment else None
    batch = {
      'image': preprocess(images[idx], rng, mean=mean, std=std),
      'label': labels[idx],
    }
    yield pad_batch(batch, batch_size)
  if num_batches is not None and count < num_batches:
    empty = {
      'image': np.zeros([batch_size, *images.shape[1:]], np.float32),
      'label': np.zeros([batch_size], np.int32),
      'mask': np.zeros([batch_size], bool),
    }
    for _ in range(num_batches - count):
      yield empty
