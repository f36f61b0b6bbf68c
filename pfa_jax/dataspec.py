"""Static facts about the supported datasets (no TensorFlow).

Both input sources read these: :mod:`pfa_jax.datasets` (TFDS) and
:mod:`pfa_jax.array_input` (decoded ``.npz`` arrays, for machines without
TensorFlow).
"""

import dataclasses
from collections.abc import Sequence


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
