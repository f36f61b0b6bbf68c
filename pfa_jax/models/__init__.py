"""Model registry: ``get_model(name, *, num_classes, widths=None, **kw)``.

Every model is a flax linen module with a ``widths`` field (one entry per
prunable group, see :mod:`pfa_jax.models.structure`) and a ``structure()``
method, called as ``model.apply(variables, x, train=...)`` on NHWC images.
A pruned network is the same class with other widths.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
from flax import traverse_util

from pfa_jax.models import layers
from pfa_jax.models import structure
from pfa_jax.models.resnet import ResNet
from pfa_jax.models.simple_cnn import SimpleCNN
from pfa_jax.models.vgg import CONV_WIDTHS
from pfa_jax.models.vgg import VGG16

# name -> (class, fixed kwargs). `resnet8` / `resnet_tiny` are small
# variants for tests and quick experiments.
MODELS: dict[str, tuple[type, dict[str, Any]]] = {
  'simple_cnn': (SimpleCNN, {}),
  'vgg16_cifar': (VGG16, {'variant': 'cifar', 'widths': CONV_WIDTHS + (512,)}),
  'vgg16_imagenet': (
    VGG16,
    {
      'variant': 'imagenet',
      'use_bn': False,
      'widths': CONV_WIDTHS + (4096, 4096),
    },
  ),
  'resnet20': (ResNet, {'stage_sizes': (3, 3, 3)}),
  'resnet56': (ResNet, {'stage_sizes': (9, 9, 9)}),
  'resnet8': (ResNet, {'stage_sizes': (1, 1, 1)}),
  'resnet34': (
    ResNet,
    {
      'stage_sizes': (3, 4, 6, 3),
      'stage_widths': (64, 128, 256, 512),
      'variant': 'imagenet',
    },
  ),
  'resnet_tiny_imagenet': (
    ResNet,
    {
      'stage_sizes': (1, 1, 1, 1),
      'stage_widths': (8, 16, 16, 32),
      'variant': 'imagenet',
    },
  ),
}
_CLASSES = {c.__name__: c for c, _ in MODELS.values()}
_COLLECTIONS = ('params', 'batch_stats')


def get_model(
  name: str,
  *,
  num_classes: int,
  widths: Mapping[str, int] | tuple[int, ...] | None = None,
  width_mult: float = 1.0,
  **kw,
) -> nn.Module:
  """Builds a registered model.

  Args:
    name: one of ``MODELS``.
    num_classes: size of the classifier output.
    widths: per-group widths, as a layer tree ``{name: width}`` (unnamed
      groups keep their default) or a full tuple in structure order.
    width_mult: scales every default width (rounded, at least 1), for
      narrower variants such as the CPU demo's.
    **kw: other module fields (``tap``, ``conv_impl``, ``dropout``, ...).

  Returns:
    The flax module.

  Raises:
    ValueError: unknown name or field.
  """
  if name not in MODELS:
    raise ValueError(
      f'Unknown model {name!r}; known models: {", ".join(sorted(MODELS))}.'
    )
  cls, fixed = MODELS[name]
  fields = {f.name for f in dataclasses.fields(cls)} - {'parent', 'name'}
  bad = sorted(set(kw) - fields)
  if bad:
    raise ValueError(
      f'Model {name!r} has no field(s) {bad}; fields: {sorted(fields)}.'
    )
  args = {**fixed, **kw, 'num_classes': num_classes}
  if isinstance(widths, (tuple, list)):
    args['widths'] = tuple(int(w) for w in widths)
    widths = None
  model = cls(**args)
  if model.widths is None:  # ResNet: materialise the default widths
    model = model.clone(widths=model.default_widths())
  if width_mult != 1.0:
    scaled = tuple(max(1, round(w * width_mult)) for w in model.widths)
    model = model.clone(widths=scaled)
  if widths:
    model = structure.with_widths(model, widths)
  return model


def arch_of(model: nn.Module) -> dict[str, Any]:
  """A JSON-serialisable description that :func:`from_arch` rebuilds."""
  kwargs = {}
  for f in dataclasses.fields(model):
    if f.name in ('parent', 'name'):
      continue
    kwargs[f.name] = _to_json(getattr(model, f.name))
  return {'class': type(model).__name__, 'kwargs': kwargs}


def from_arch(arch: Mapping[str, Any]) -> nn.Module:
  """Inverse of :func:`arch_of`."""
  cls_name = arch.get('class')
  if cls_name not in _CLASSES:
    raise ValueError(
      f'Architecture names unknown model class {cls_name!r}; known: '
      f'{sorted(_CLASSES)}.'
    )
  kwargs = {k: _from_json(v) for k, v in arch['kwargs'].items()}
  return _CLASSES[cls_name](**kwargs)


def _to_json(v):
  if isinstance(v, tuple):
    return [_to_json(x) for x in v]
  return v


def _from_json(v):
  if isinstance(v, list):
    return tuple(_from_json(x) for x in v)
  return v


def init(model: nn.Module, rng: jax.Array, input_shape) -> dict:
  """Initialises variables for one NHWC input of ``input_shape`` (H, W, C)."""
  x = jax.numpy.zeros((1, *input_shape), jax.numpy.float32)
  init_fn = jax.jit(lambda r, x: model.init({'params': r, 'dropout': r}, x))
  return model_variables(init_fn(rng, x))


def model_variables(variables) -> dict:
  """Only the collections a model carries (drops sown responses)."""
  return {k: v for k, v in variables.items() if k in _COLLECTIONS}


def responses(
  model: nn.Module, variables, x: jax.Array, *, train: bool = False
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Logits and every prunable group's PFA response ``[N, C]``.

  One forward pass; pure, so it can be jitted. Responses are those of the
  groups in ``model.structure()``, taken at the model's ``tap`` point.
  """
  logits, state = model.apply(
    model_variables(variables), x, train=train, mutable=[layers.RESPONSES]
  )
  flat = traverse_util.flatten_dict(state[layers.RESPONSES], sep='/')
  sown = {k.removesuffix('/out'): v[0] for k, v in flat.items()}
  names = model.structure().names
  return logits, {n: sown[n] for n in names}


widths_of = structure.widths_of
with_widths = structure.with_widths

__all__ = [
  'MODELS',
  'arch_of',
  'from_arch',
  'get_model',
  'init',
  'responses',
  'model_variables',
  'widths_of',
  'with_widths',
]
