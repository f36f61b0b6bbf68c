"""Per-example preprocessing (pure tf; ``seed`` is a [2] int tensor).

Every function returns ``(example, seed) -> example`` so augmentation is
stateless and a pure function of the seed (see :mod:`pfa_jax.batching`).
"""

from collections.abc import Callable, Sequence

import tensorflow as tf

from pfa_jax.datasets import get_spec

PreprocessFn = Callable[[dict[str, tf.Tensor], tf.Tensor], dict[str, tf.Tensor]]


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
  dataset: str, *, augment: bool, image_size: int
) -> PreprocessFn:
  """The dataset's preprocessing; ``image_size`` is used by ImageNet only."""
  spec = get_spec(dataset)
  if dataset.startswith('cifar'):
    return cifar_preprocess(mean=spec.mean, std=spec.std, augment=augment)
  return imagenet_preprocess(
    mean=spec.mean, std=spec.std, augment=augment, image_size=image_size
  )
