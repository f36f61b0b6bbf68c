"""Model registry: ``get_model(name, *, num_classes, widths=None, **kw)``.

Every model is a flax linen module with a ``widths`` field (one entry per
prunable group, see :mod:`pfa_jax.models.structure`), a ``num_classes``
field and a ``structure()`` method, called as
``model.apply(variables, x, train=...)`` on NHWC images. A pruned network is
the same class with other widths.

``name`` is a registered model (``MODELS``) or a user's own class as an
import path, ``'module:Class'`` (e.g. ``'experiments.user_model:BranchyCNN'``,
whose ``structure()`` comes from :mod:`pfa_jax.discover`). Architectures
(:func:`arch_of`) name a user's class by that path, so a checkpoint of it is
restored in a new process by importing it.
"""

import dataclasses
import importlib
import inspect
import json
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np
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
_NEEDS = ('widths', 'num_classes')  # fields every model class has


def resolve(name: str) -> tuple[type, dict[str, Any]]:
  """``(class, fixed fields)`` of a registered name or a ``'module:Class'``.

  Raises:
    ValueError: an unknown name, a module that does not import, no such
      class, or a class without a ``widths`` / ``num_classes`` field, a
      ``structure()`` method or a ``train`` argument; the message names
      what is missing.
  """
  if isinstance(name, str) and name in MODELS:
    return MODELS[name]
  if not isinstance(name, str) or ':' not in name:
    raise ValueError(
      f'Unknown model {name!r}; known models: {", ".join(sorted(MODELS))}; '
      "or a flax module of your own as 'module:Class'."
    )
  module, _, qualname = name.partition(':')
  try:
    obj = importlib.import_module(module)
  except ImportError as e:
    raise ValueError(
      f'Model {name!r}: cannot import module {module!r} ({e}). Run from the '
      'directory that holds it, or put it on PYTHONPATH.'
    ) from None
  for part in qualname.split('.'):
    obj = getattr(obj, part, None)
  if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
    hint = (
      ' A class defined in a script run as __main__ exists only in that '
      'process: define it in a module to train or restore it by name.'
      if module == '__main__'
      else ''
    )
    raise ValueError(
      f'Model {name!r}: module {module!r} has no flax module class '
      f'{qualname!r}.{hint}'
    )
  fields = {f.name for f in dataclasses.fields(obj)}
  lacks = [f'a {n!r} field' for n in _NEEDS if n not in fields]
  if not callable(getattr(obj, 'structure', None)):
    lacks.append('a structure() method (pfa_jax.discover.cached gives one)')
  params = inspect.signature(obj.__call__).parameters
  if 'train' not in params and not any(
    p.kind is p.VAR_KEYWORD for p in params.values()
  ):
    lacks.append('a `train` argument to __call__ (BN and dropout mode)')
  if lacks:
    raise ValueError(f'Model {name!r} lacks {", ".join(lacks)}.')
  return obj, {}


def class_name(cls: type) -> str:
  """How an architecture names ``cls``: this package's by class name."""
  if _CLASSES.get(cls.__name__) is cls:
    return cls.__name__
  return f'{cls.__module__}:{cls.__qualname__}'


_COLLECTIONS = ('params', 'batch_stats', 'consts')


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
    name: one of ``MODELS``, or a class of the user's as ``'module:Class'``.
    num_classes: size of the classifier output.
    widths: per-group widths, as a layer tree ``{name: width}`` (unnamed
      groups keep their default) or a full tuple in structure order.
    width_mult: scales every default width (rounded, at least 1; a
      multiple of its group's blocks where a grouped conv splits it), for
      narrower variants such as the CPU demo's.
    **kw: other module fields (``tap``, ``conv_impl``, ``dropout``, ...).
      ``conv_impl='auto'`` (the configs' default: the best path there is)
      is dropped for a class without that field, which has one path.

  Returns:
    The flax module.

  Raises:
    ValueError: unknown name or field, ``num_classes`` < 1, ``width_mult``
      <= 0, or widths of the wrong count or not ints >= 1 (naming the group).
  """
  cls, fixed = resolve(name)
  if not _is_int(num_classes) or num_classes < 1:
    raise ValueError(
      f'Model {name!r}: num_classes must be an int >= 1, got {num_classes!r}.'
    )
  if not (
    isinstance(width_mult, (int, float))
    and not isinstance(width_mult, bool)
    and math.isfinite(width_mult)
    and width_mult > 0
  ):
    raise ValueError(
      f'Model {name!r}: width_mult must be a finite number > 0, got '
      f'{width_mult!r}.'
    )
  fields = {f.name for f in dataclasses.fields(cls)} - {'parent', 'name'}
  if 'conv_impl' not in fields and kw.get('conv_impl') == 'auto':
    kw = {k: v for k, v in kw.items() if k != 'conv_impl'}
  bad = sorted(set(kw) - fields)
  if bad:
    raise ValueError(
      f'Model {name!r} has no field(s) {bad}; fields: {sorted(fields)}.'
    )
  args = {**fixed, **kw, 'num_classes': int(num_classes)}
  if isinstance(widths, (tuple, list)):
    args['widths'] = tuple(widths)
    widths = None
  model = cls(**args)
  if 'widths' in args:
    check_widths(model, args['widths'], label=name)
    model = model.clone(widths=tuple(int(w) for w in args['widths']))
  if model.widths is None:  # ResNet: materialise the default widths
    if not hasattr(model, 'default_widths'):
      raise ValueError(
        f'Model {name!r}: its widths field has no default; give one, or '
        'pass widths.'
      )
    model = model.clone(widths=model.default_widths())
  if width_mult != 1.0:
    # A width a grouped conv splits into blocks stays a multiple of them.
    step = [1] * len(model.widths)
    for g in model.structure().groups:
      step[g.index] = g.blocks
    scaled = tuple(
      s * max(1, round(w * width_mult / s)) for w, s in zip(model.widths, step)
    )
    model = model.clone(widths=scaled)
  if widths:
    model = structure.with_widths(model, widths)
  return model


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def check_widths(model: nn.Module, widths, *, label: str = '') -> None:
  """Raises ValueError unless ``widths`` has one int >= 1 per group."""
  label = label or type(model).__name__
  names = model.structure().names
  if len(widths) != len(names):
    raise ValueError(
      f'Model {label!r} needs {len(names)} widths ({", ".join(names)}), got '
      f'{len(widths)}: {tuple(widths)}.'
    )
  for n, w in zip(names, widths, strict=True):
    if not _is_int(w) or w < 1:
      raise ValueError(
        f'Model {label!r}: width of group {n!r} must be an int >= 1, got {w!r}.'
      )


def check_input(model: nn.Module, input_shape) -> tuple[int, int, int]:
  """Checks that one ``(H, W, C)`` input runs through ``model``.

  Abstract (``jax.eval_shape``, no compute). Every module's output is
  checked as it is produced, so an input too small for the network's
  strides and VALID convolutions names the first layer that comes out
  empty, instead of failing later in a reduction.

  Returns:
    ``input_shape`` as a tuple of ints.

  Raises:
    ValueError: ``input_shape`` is not 3 ints >= 1, or is too small.
  """
  shape = tuple(input_shape)
  if len(shape) != 3 or not all(_is_int(d) and d >= 1 for d in shape):
    raise ValueError(
      f'input_shape must be (H, W, C) with ints >= 1, got {input_shape!r}.'
    )
  label = type(model).__name__

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    for leaf in jax.tree.leaves(out):
      if 0 in getattr(leaf, 'shape', ()):
        path = '/'.join(context.module.path) or label
        raise ValueError(
          f'Input {shape[0]}x{shape[1]}x{shape[2]} is too small for {label}: '
          f'layer {path} gives an empty output {tuple(leaf.shape)}. Use a '
          'larger config.input.image_size.'
        )
    return out

  key = jax.random.key(0)
  x = jax.ShapeDtypeStruct((1, *shape), jax.numpy.float32)
  with nn.intercept_methods(interceptor):
    jax.eval_shape(lambda x: model.init({'params': key, 'dropout': key}, x), x)
  return shape


def unfolded(model: nn.Module) -> nn.Module:
  """``model`` with ``fold_bn`` off, for tools that intercept ``nn.Conv``.

  A folded conv (`for_inference`) never calls its ``nn.Conv``; `costs` and
  `methods.compensation` find layers by intercepting those calls.
  """
  return (
    model.clone(fold_bn=False) if getattr(model, 'fold_bn', False) else model
  )


def for_inference(model: nn.Module) -> nn.Module:
  """``model`` with BN folded into its convs at inference, where it can fold.

  Models with a ``fold_bn`` field (this package's) get ``fold_bn=True``
  (`layers.ConvBN`: the same function to float32 rounding, one native call
  per conv on the oneDNN path); any other module is returned as is.
  """
  if any(f.name == 'fold_bn' for f in dataclasses.fields(model)):
    return model.clone(fold_bn=True)
  return model


def arch_of(model: nn.Module) -> dict[str, Any]:
  """A JSON-serialisable description that :func:`from_arch` rebuilds.

  Every field is recorded, except one whose value is not JSON (a user's
  ``act=nn.relu`` or ``dtype=jnp.float32``) and is its default, which the
  rebuilt model takes again.

  Raises:
    ValueError: naming a field whose value is neither JSON nor its default
      (no checkpoint could record it); the training and compression jobs
      call this before any work.
  """
  kwargs = {}
  for f in dataclasses.fields(model):
    if f.name in ('parent', 'name'):
      continue
    raw = getattr(model, f.name)
    value = _to_json(raw)
    try:
      json.dumps(value)
    except (TypeError, ValueError):
      if _is_default(f, raw):
        continue
      raise ValueError(
        f'{class_name(type(model))}: field {f.name!r} = {value!r} is not '
        'JSON (ints, floats, strings, bools, None, tuples) and not its '
        'default, so an architecture (a checkpoint) cannot record it; make '
        'it the default or a JSON value.'
      ) from None
    kwargs[f.name] = value
  return {'class': class_name(type(model)), 'kwargs': kwargs}


def _is_default(field: dataclasses.Field, value) -> bool:
  if field.default is dataclasses.MISSING:
    return False
  if value is field.default:
    return True
  try:
    return type(value) is type(field.default) and bool(value == field.default)
  except Exception:  # noqa: BLE001 - an ambiguous comparison is no match
    return False


def from_arch(arch: Mapping[str, Any]) -> nn.Module:
  """Inverse of :func:`arch_of` (imports a user's ``'module:Class'``)."""
  cls_name = arch.get('class')
  if cls_name in _CLASSES:
    cls = _CLASSES[cls_name]
  elif isinstance(cls_name, str) and ':' in cls_name:
    cls, _ = resolve(cls_name)
  else:
    raise ValueError(
      f'Architecture names unknown model class {cls_name!r}; known: '
      f"{sorted(_CLASSES)}, or a user's class as 'module:Class'."
    )
  kwargs = {k: _from_json(v) for k, v in arch['kwargs'].items()}
  return cls(**kwargs)


def _to_json(v):
  if isinstance(v, tuple):
    return [_to_json(x) for x in v]
  return v


def _from_json(v):
  if isinstance(v, list):
    return tuple(_from_json(x) for x in v)
  return v


def init(model: nn.Module, rng: jax.Array, input_shape) -> dict:
  """Initialises variables for one NHWC input of ``input_shape`` (H, W, C).

  The input shape is checked first (:func:`check_input`).
  """
  input_shape = check_input(model, input_shape)
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
  groups in ``model.structure()``, taken at the model's ``tap`` point. A
  group the model does not sow a response for (a user's model, whose
  structure came from ``pfa_jax.discover``) is tapped where its first
  consumer reads it: the spatial max of that layer's input, restricted to
  the group's channels (after a flatten, the max over positions). That is
  the ``'post_act'`` tap: the tensor the next layer reads.
  """
  s = model.structure()
  # Each group's first consumer: where a group that sows nothing is tapped.
  readers = {
    structure.as_consumer(g.consumers[0]).path for g in s.groups if g.consumers
  }
  inputs = {}

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name == '__call__' and args:
      path = '/'.join(context.module.path)
      if path in readers and path not in inputs:
        inputs[path] = args[0]
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    logits, state = model.apply(
      model_variables(variables), x, train=train, mutable=[layers.RESPONSES]
    )
  flat = traverse_util.flatten_dict(state.get(layers.RESPONSES, {}), sep='/')
  sown = {k.removesuffix('/out'): v[0] for k, v in flat.items()}
  widths = {g.name: int(model.widths[g.index]) for g in s.groups}
  out = {}
  for g in s.groups:
    if g.name in sown:
      out[g.name] = sown[g.name]
      continue
    c = structure.as_consumer(g.consumers[0]) if g.consumers else None
    if c is None or c.path not in inputs:
      raise ValueError(
        f'Layer {g.name!r}: {type(model).__name__} sows no response for it '
        'and no consumer layer of it was called, so PFA has no tap.'
      )
    span = widths[g.name] if c.span is None else int(c.span)
    h = inputs[c.path]
    h = h.reshape(h.shape[0], -1, span).max(axis=1)
    out[g.name] = h[:, c.offset : c.offset + widths[g.name]]
  return logits, out


widths_of = structure.widths_of
with_widths = structure.with_widths

__all__ = [
  'MODELS',
  'arch_of',
  'check_input',
  'check_widths',
  'class_name',
  'from_arch',
  'get_model',
  'init',
  'resolve',
  'responses',
  'model_variables',
  'widths_of',
  'with_widths',
]
