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

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from pfa_jax import models
from pfa_jax import slicing

METRICS = ('params', 'flops')


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
  model = models.unfolded(model)
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

  Backed by the closed-form :class:`CostModel` (one abstract trace, then
  microseconds per call); exact for any widths (tested against
  :func:`count`, which traces the real pruned network).

  Use with ``recipes.to_target`` to compress to a parameter or FLOPs budget:
  ``recipes.to_target(spectra, costs.cost_fn(model, (32, 32, 3), 'flops'),
  0.4 * costs.count(model, (32, 32, 3))['flops'])``.
  """
  if metric not in METRICS:
    raise ValueError(f"metric must be 'params' or 'flops', got {metric!r}.")
  cm = cost_model(model, input_shape)
  index = {n: i for i, n in enumerate(cm.names)}

  def fn(widths):
    unknown = set(widths) - set(index)
    if unknown:
      raise KeyError(
        f'Unknown layer(s) {sorted(unknown)}; known: {sorted(index)}.'
      )
    w = cm.full.copy()
    for n, v in widths.items():
      w[index[n]] = int(v)
    return cm(w, metric)

  return fn


@dataclasses.dataclass(frozen=True)
class _Leaf:
  coef: int  # 1 for params; output spatial size for a kernel's MACs
  shape: tuple[int, ...]
  # axis -> ((group position, rows of that group on the axis), ...)
  axes: tuple[tuple[int, tuple[tuple[int, int], ...]], ...]


@dataclasses.dataclass(frozen=True)
class CostModel:
  """Exact ``widths -> params / flops`` of one model (see module docstring)."""

  names: tuple[str, ...]
  full: np.ndarray  # [n] the model's widths, in ``names`` order
  leaves: dict[str, tuple[_Leaf, ...]]  # metric -> leaves

  def __call__(self, widths: np.ndarray, metric: str = 'params') -> int:
    frac = 1.0 - np.asarray(widths, np.float64) / self.full
    total = 0.0
    for leaf in self.leaves[metric]:
      dims = [float(d) for d in leaf.shape]
      for axis, rows in leaf.axes:
        dims[axis] -= sum(r * frac[g] for g, r in rows)
      total += leaf.coef * math.prod(dims)
    return int(round(total))


def cost_model(model: nn.Module, input_shape) -> CostModel:
  """The closed-form cost model of ``model`` on one ``input_shape``."""
  return _cost_model(model, tuple(int(d) for d in input_shape))


@functools.lru_cache(maxsize=64)
def _cost_model(model, input_shape):
  model = models.unfolded(model)
  s = model.structure()
  names = s.names
  full = np.asarray([model.widths[g.index] for g in s.groups], np.float64)
  x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  rng = jax.random.key(0)
  variables = jax.eval_shape(
    lambda x: model.init({'params': rng, 'dropout': rng}, x, train=False), x
  )
  flat = traverse_util.flatten_dict(variables['params'], sep='/')
  axes = {path: {} for path in flat}
  for pos, name in enumerate(names):
    keep = {name: np.arange(int(full[pos]))}
    for e in slicing.leaf_edits(model, variables, keep):
      if e.collection == 'params':
        axis = e.axis % len(flat[e.path].shape)
        rows = len(e.index) // e.blocks  # a grouped kernel's rows per group
        axes[e.path].setdefault(axis, []).append((pos, rows))
  spatial = _kernel_spatial(model, variables, x)

  def leaf(path, coef):
    ax = tuple((a, tuple(r)) for a, r in sorted(axes[path].items()))
    return _Leaf(int(coef), tuple(flat[path].shape), ax)

  params = tuple(leaf(p, 1) for p in flat)
  flops = tuple(leaf(p, spatial[p]) for p in flat if p in spatial)
  return CostModel(names, full, {'params': params, 'flops': flops})


def _kernel_spatial(model, variables, x) -> dict[str, int]:
  """``{kernel path: output spatial size}`` of every conv / dense layer."""
  out = {}

  def interceptor(next_fun, args, kwargs, context):
    y = next_fun(*args, **kwargs)
    mod = context.module
    if context.method_name == '__call__' and isinstance(
      mod, (nn.Conv, nn.Dense)
    ):
      out['/'.join(mod.path) + '/kernel'] = math.prod(y.shape[1:-1])
    return y

  with nn.intercept_methods(interceptor):
    jax.eval_shape(
      lambda v, x: model.apply(v, x, train=False, mutable=False), variables, x
    )
  return out
