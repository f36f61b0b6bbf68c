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
  """``widths -> cost`` of ``model`` with those widths, for ``recipes``.

  Use with ``recipes.to_target`` to compress to a parameter or FLOPs budget:
  ``recipes.to_target(spectra, costs.cost_fn(model, (32, 32, 3), 'flops'),
  0.4 * costs.count(model, (32, 32, 3))['flops'])``.
  """
  if metric not in ('params', 'flops'):
    raise ValueError(f"metric must be 'params' or 'flops', got {metric!r}.")

  def fn(widths):
    return count(structure.with_widths(model, widths), input_shape)[metric]

  return fn
