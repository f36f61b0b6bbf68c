"""Exact parameter and FLOPs counts of a (pruned) Flax model.

``count(model, input_shape)`` traces one abstract forward pass
(``jax.eval_shape``: no compute, no memory) and reads the real shapes, so it
is exact for any widths and automatically accounts for a pruned layer's
smaller consumers.

* ``params``: trainable parameters, i.e. every leaf of ``variables['params']``
  (conv/dense kernels and biases, BN scales and offsets). BN running
  statistics are not parameters and are not counted.
* ``flops``: multiply-accumulates (MACs) of the conv and dense layers for one
  input, the convention of the pruning literature (Li et al. 2017; He et al.
  2016): ``H_out * W_out * k_h * k_w * C_in * C_out`` per conv and
  ``C_in * C_out`` per dense layer. Not counted: biases, BN, ReLU, pooling,
  residual adds and the option-A shortcut's copies, which are negligible
  and foldable.
"""

import functools
import math
from collections.abc import Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from pfa_jax.models import structure


def count(model: nn.Module, input_shape) -> dict[str, int]:
  """``{'params': int, 'flops': int}`` of ``model`` on one ``input_shape``.

  Args:
    model: any flax module called as ``model.apply(variables, x, train=False)``.
    input_shape: one input's shape without the batch axis, e.g. (32, 32, 3).

  Returns:
    Trainable parameter count and multiply-accumulates per input.
  """
  return _count(model, tuple(input_shape))


@functools.lru_cache(maxsize=4096)
def _count(model, input_shape):
  x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  rng = jax.random.key(0)
  variables = jax.eval_shape(
    lambda x: model.init({'params': rng, 'dropout': rng}, x, train=False), x
  )
  params = sum(math.prod(p.shape) for p in jax.tree.leaves(variables['params']))
  macs = []

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    mod = context.module
    if context.method_name == '__call__' and isinstance(
      mod, (nn.Conv, nn.Dense)
    ):
      kernel = mod.variables['params']['kernel']
      spatial = math.prod(out.shape[1:-1])
      macs.append(spatial * math.prod(kernel.shape))
    return out

  with nn.intercept_methods(interceptor):
    jax.eval_shape(
      lambda v, x: model.apply(v, x, train=False, mutable=False), variables, x
    )
  return {'params': int(params), 'flops': int(sum(macs))}


def cost_fn(
  model: nn.Module, input_shape, metric: str = 'params'
) -> Callable[[Mapping[str, int]], int]:
  """``widths -> cost`` of ``model`` with those widths, for target searches.

  One abstract trace of the full model, then each call is a closed-form sum
  (no tracing), so bisection and random sampling cost microseconds per
  point. Every parameter leaf's last axis scales with the group its module
  produces, and every consumer kernel's input axis with the group it reads
  (times its flatten repeat); conv/dense MACs scale the same way. Exact for
  any widths (tested against :func:`count`).

  Use with ``recipes.to_target`` to compress to a parameter or FLOPs budget:
  ``recipes.to_target(spectra, costs.cost_fn(model, (32, 32, 3), 'flops'),
  0.4 * costs.count(model, (32, 32, 3))['flops'])``.
  """
  if metric not in ('params', 'flops'):
    raise ValueError(f"metric must be 'params' or 'flops', got {metric!r}.")
  terms = _terms(model, tuple(input_shape))[metric]
  full = structure.widths_of(model)

  def fn(widths):
    unknown = set(widths) - set(full)
    if unknown:
      raise KeyError(
        f'Unknown layer(s) {sorted(unknown)}; known: {sorted(full)}.'
      )
    w = {**full, **{n: int(v) for n, v in widths.items()}}
    total = 0
    for const, groups in terms:
      value = const
      for g, per in groups:
        value *= w[g] * per
      total += value
    return int(round(total))

  return fn


@functools.lru_cache(maxsize=256)
def _terms(model, input_shape):
  """``{'params'|'flops': [(constant, ((group, multiplier), ...)), ...]}``.

  Each term is a product: the constant times, for each named group, its
  width times a multiplier (a flatten repeat, or 1).
  """
  x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  rng = jax.random.key(0)
  variables = jax.eval_shape(
    lambda x: model.init({'params': rng, 'dropout': rng}, x, train=False), x
  )
  s = model.structure()
  full = structure.widths_of(model)
  producer_of = {p: g.name for g in s.groups for p in g.producers}
  consumer_of = {
    structure.as_consumer(c).path: g.name for g in s.groups for c in g.consumers
  }

  def factors(path, shape):
    """(constant, groups) of one leaf with module path ``path``."""
    dims = list(shape)
    groups = []
    module = path.rsplit('/', 1)[0]
    owner = next(
      (
        g
        for p, g in producer_of.items()
        if module == p or module.startswith(p + '/')
      ),
      None,
    )
    if owner is not None and dims:
      groups.append((owner, 1))
      dims[-1] = 1
    if path.endswith('kernel') and module in consumer_of and len(dims) >= 2:
      g = consumer_of[module]
      groups.append((g, dims[-2] // full[g]))
      dims[-2] = 1
    return math.prod(dims), tuple(groups)

  from flax import traverse_util  # noqa: PLC0415

  flat = traverse_util.flatten_dict(variables['params'], sep='/')
  params = [factors(k, v.shape) for k, v in flat.items()]
  flops = []

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    mod = context.module
    if context.method_name == '__call__' and isinstance(
      mod, (nn.Conv, nn.Dense)
    ):
      path = '/'.join(mod.path) + '/kernel'
      const, groups = factors(path, mod.variables['params']['kernel'].shape)
      flops.append((const * math.prod(out.shape[1:-1]), groups))
    return out

  with nn.intercept_methods(interceptor):
    jax.eval_shape(
      lambda v, x: model.apply(v, x, train=False, mutable=False), variables, x
    )
  return {'params': params, 'flops': flops}
