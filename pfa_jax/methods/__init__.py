"""Compression methods on one interface: a registry and a one-call API.

``METHODS`` maps a name to a :class:`~pfa_jax.methods.base.Method`. Every
method turns (model, variables, what it reads, a recipe, hyperparameters,
rng) into a :class:`~pfa_jax.plan.Plan`; :func:`prune` then applies the
plan's selection, folds and slicing::

  out = pfa_jax.methods.prune('pfa', model, variables, batches=batches,
                              recipe='flops:0.5')
  out.model, out.variables, out.keep, out.plan, out.report

``batches`` must be re-iterable (a list, or a zero-arg callable returning a
fresh iterator): statistics, compensation and recalibration each take their
own pass, and a generator would be silently empty on the second one.
"""

import dataclasses
import importlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from pfa_jax import models
from pfa_jax import plan as plan_lib
from pfa_jax import slicing
from pfa_jax.methods import base
from pfa_jax.methods import l1
from pfa_jax.methods import pfa
from pfa_jax.methods import random as random_method
from pfa_jax.methods import slim
from pfa_jax.methods.base import Context
from pfa_jax.methods.base import Method
from pfa_jax.methods.base import Recipe
from pfa_jax.methods.base import parse_recipe

METHODS: dict[str, Method] = {
  m.name: m for m in (pfa.METHOD, l1.METHOD, slim.METHOD, random_method.METHOD)
}
# Companion methods register themselves from their own modules, if present.
for _mod in ('cf', 'fcp'):
  try:
    _m = importlib.import_module(f'pfa_jax.methods.{_mod}')
  except ImportError:  # not built yet
    continue
  if hasattr(_m, 'METHOD'):
    METHODS[_m.METHOD.name] = _m.METHOD

INITS = ('selection', 'scratch')
COMPENSATIONS = ('none', 'ls')
# prune()'s own options; anything else is a method hyperparameter.
OPTIONS = {
  'groups': 'all',
  'min_width': 1,
  'round_to': 1,
  'init': 'selection',
  'compensation': 'none',
  'ridge': 1e-3,
  'recalibrate': 0,
}


def get_method(name: str) -> Method:
  if name not in METHODS:
    raise ValueError(
      f'Unknown method {name!r}; known methods: {", ".join(sorted(METHODS))}.'
    )
  return METHODS[name]


def reiterable(batches) -> Callable[[], Iterator]:
  """A zero-arg callable returning a fresh iterator over ``batches``."""
  if batches is None:
    return None
  if callable(batches):
    return batches
  if isinstance(batches, Iterator):
    raise ValueError(
      'batches is a one-shot iterator (e.g. a generator): statistics, '
      'compensation and recalibration each need their own pass, and it would '
      'be empty on the second. Pass a list, or a zero-arg callable that '
      'returns a fresh iterator.'
    )
  if not isinstance(batches, Iterable):
    raise ValueError(f'batches must be re-iterable, got {type(batches)}.')
  return lambda: iter(batches)


@dataclasses.dataclass(frozen=True)
class Pruned:
  """What :func:`prune` returns."""

  model: nn.Module
  variables: dict[str, Any]
  keep: dict[str, np.ndarray]
  plan: plan_lib.Plan
  report: dict[str, Any]


def _check_options(opts, method: Method, rng):
  for key in ('init', 'compensation'):
    allowed = INITS if key == 'init' else COMPENSATIONS
    if opts[key] not in allowed:
      raise ValueError(f'{key} must be one of {allowed}, got {opts[key]!r}.')
  if int(opts['round_to']) < 1:
    raise ValueError(f'round_to must be >= 1, got {opts["round_to"]!r}.')
  if method.needs_rng and rng is None:
    raise ValueError(
      f'Method {method.name!r} draws random numbers: pass rng (a jax key or '
      'an int seed); there is no hidden default.'
    )
  if opts['init'] == 'scratch' and rng is None:
    raise ValueError("init='scratch' re-initialises: pass rng.")


def _input_shape(input_shape, batches):
  if input_shape is not None:
    return tuple(int(d) for d in input_shape)
  if batches is None:
    return None
  first = next(iter(batches()), None)
  if first is None:
    raise ValueError('batches is empty.')
  return tuple(np.shape(first['image'])[1:])


def min_widths(model, groups, min_width) -> dict[str, int]:
  if isinstance(min_width, Mapping):
    unknown = sorted(set(min_width) - set(groups))
    if unknown:
      raise ValueError(
        f'min_width names layers that are not pruned: {unknown}.'
      )
    return {n: int(min_width.get(n, 1)) for n in groups}
  if int(min_width) < 1:
    raise ValueError(f'min_width must be >= 1, got {min_width!r}.')
  return {n: int(min_width) for n in groups}


def prepare(
  name,
  model,
  variables,
  *,
  recipe,
  rng=None,
  batches=None,
  input_shape=None,
  **kwargs,
):
  """Validates everything cheap, before any pass over data.

  Returns ``(method, recipe, hparams, options, batches, context_kwargs)``.
  """
  method = get_method(name)
  opts = {k: kwargs.pop(k, v) for k, v in OPTIONS.items()}
  hparams = method.check_hparams(kwargs)
  recipe = method.check_recipe(parse_recipe(recipe))
  _check_options(opts, method, rng)
  groups = base.select_groups(model, opts['groups'])
  batches = reiterable(batches)
  if (
    method.collect is not None
    and batches is None
    and _reads_data(method, hparams)
  ):
    raise ValueError(f'Method {name!r} reads data: pass batches.')
  if (
    opts['compensation'] != 'none' or opts['recalibrate']
  ) and batches is None:
    raise ValueError('compensation and recalibrate need batches.')
  shape = _input_shape(input_shape, batches)
  if shape is None and recipe.kind in ('params', 'flops'):
    raise ValueError(
      f'A {recipe.kind} budget is counted on one input: pass '
      'input_shape=(H, W, C) or batches.'
    )
  ctx_kw = dict(
    groups=groups,
    input_shape=shape,
    min_width=min_widths(model, groups, opts['min_width']),
    round_to=int(opts['round_to']),
  )
  return method, recipe, hparams, opts, batches, ctx_kw


def _reads_data(method, hparams):
  return not (method.name == 'random' and hparams.get('select') == 'random')


def collect(method: Method, model, variables, batches, groups, hparams):
  """What ``method`` reads from data (``None`` for weight-only methods)."""
  if method.collect is None or not _reads_data(method, hparams):
    return None
  return method.collect(model, variables, batches(), groups, hparams)


def make_plan(method, model, variables, stats, recipe, hparams, rng, ctx_kw):
  ctx = Context(
    model=model,
    variables=variables,
    stats=stats,
    recipe=recipe,
    hparams=hparams,
    rng=rng,
    **ctx_kw,
  )
  plan = method.plan(ctx)
  report = {
    'method': method.name,
    'recipe': recipe.to_json(),
    **dict(plan.report),
  }
  return dataclasses.replace(plan, report=report)


def apply_plan(model, variables, plan, *, opts, batches, rng, input_shape):
  """Compensation -> slicing -> init -> recalibration. Returns Pruned."""
  if opts['compensation'] == 'ls':
    from pfa_jax.methods import compensation  # noqa: PLC0415

    plan = compensation.compensate(
      model, variables, plan, batches, ridge=float(opts['ridge'])
    )
  pruned, pruned_vars = slicing.prune(model, variables, plan)
  if opts['init'] == 'scratch':
    key = rng if not isinstance(rng, (int, np.integer)) else jax.random.key(rng)
    pruned_vars = models.init(pruned, jax.random.fold_in(key, 1), input_shape)
  if opts['recalibrate']:
    from pfa_jax import train  # noqa: PLC0415

    n = int(opts['recalibrate'])
    it = batches()
    pruned_vars = train.recalibrate_bn(
      pruned, pruned_vars, [b for _, b in zip(range(n), it)]
    )
  report = {
    **plan.report,
    'init': opts['init'],
    'compensation': opts['compensation'],
    'recalibrate_batches': int(opts['recalibrate']),
    'widths': models.widths_of(pruned),
  }
  plan = dataclasses.replace(plan, report=report)
  return Pruned(pruned, pruned_vars, dict(plan.keep), plan, report)


def prune(
  name: str,
  model: nn.Module,
  variables,
  *,
  recipe,
  batches=None,
  rng=None,
  input_shape=None,
  **kwargs,
) -> Pruned:
  """Prunes ``model`` with method ``name``; see the module docstring.

  Args:
    name: a key of ``METHODS``.
    model, variables: the trained network.
    recipe: a recipe form (``pfa_jax.methods.base``).
    batches: re-iterable ``{'image', 'label', 'mask'}`` batches, for methods
      that read data, compensation and recalibration.
    rng: a jax key or int seed; required by methods that draw and by
      ``init='scratch'``, ignored otherwise.
    input_shape: one input's (H, W, C), for params/FLOPs recipes; inferred
      from ``batches`` when omitted.
    **kwargs: ``groups`` ('all' | 'inner' | 'inner+stream' | names),
      ``min_width`` (int or per-layer dict), ``round_to`` (kept widths
      rounded up to a multiple), ``init`` ('selection' | 'scratch'),
      ``compensation`` ('none' | 'ls') with ``ridge``, ``recalibrate`` (number
      of batches for BN recalibration, 0 = off), and the method's own
      hyperparameters. Unknown names raise.
  """
  method, recipe, hparams, opts, batches, ctx_kw = prepare(
    name,
    model,
    variables,
    recipe=recipe,
    rng=rng,
    batches=batches,
    input_shape=input_shape,
    **kwargs,
  )
  stats = collect(method, model, variables, batches, ctx_kw['groups'], hparams)
  plan = make_plan(
    method, model, variables, stats, recipe, hparams, rng, ctx_kw
  )
  return apply_plan(
    model,
    variables,
    plan,
    opts=opts,
    batches=batches,
    rng=rng,
    input_shape=ctx_kw['input_shape'],
  )


__all__ = [
  'METHODS',
  'Context',
  'Method',
  'Pruned',
  'Recipe',
  'get_method',
  'parse_recipe',
  'prune',
]
