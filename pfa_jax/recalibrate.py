"""BatchNorm recalibration: running statistics re-estimated from data.

After slicing, the kept channels' running statistics no longer describe the
pruned network's activations. ``recalibrate_bn`` replaces every BN layer's
``mean`` and ``var`` by the cumulative average, over the given batches, of
the per-batch moments of that layer's input in train-mode forward passes.
This is ``torch.optim.swa_utils.update_bn`` (momentum ``None``), as used by
ModelOpt and NNCF; not a momentum update and not only the last batch.

Decisions:

* The variance is flax's: the biased batch variance (divide by ``n``).
* Each BN call's moments are taken from its actual input through a flax
  method interceptor, and the same ``mask`` is passed to the BN so the
  forward pass normalises with the real examples' moments only.
* Weighting: batch ``b`` weighs ``n_b``, its number of real (``mask=1``)
  examples. For full batches this is torch's equal-weight average; a padded
  last batch counts in proportion to its real examples and an all-padding
  batch not at all.
* A BN module called ``k`` times per pass contributes the mean of its ``k``
  calls' moments. BN layers that never run in train mode keep their
  statistics.
"""

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

MOMENTS = 'bn_moments'


def _masked_moments(x, mask, feature_axes):
  """Biased mean/var of ``x`` over non-feature axes, real examples only."""
  axes = tuple(i for i in range(x.ndim) if i not in feature_axes)
  w = jnp.broadcast_to(
    mask.reshape((-1,) + (1,) * (x.ndim - 1)), x.shape
  ).astype(jnp.float32)
  x = x.astype(jnp.float32)
  n = jnp.maximum(jnp.sum(w, axis=axes), 1.0)
  mean = jnp.sum(w * x, axis=axes) / n
  shape = [1 if i in axes else x.shape[i] for i in range(x.ndim)]
  var = jnp.sum(w * jnp.square(x - mean.reshape(shape)), axis=axes) / n
  return mean, var


def _moments_fn(model: nn.Module):
  """``(variables, batch, rng) -> {bn_path: (means, vars)}`` (jitted)."""

  def fn(variables, batch, rng):
    mask = batch['mask'].astype(bool)

    def interceptor(next_fun, args, kwargs, context):
      module = context.module
      if not isinstance(module, nn.BatchNorm) or (
        context.method_name != '__call__'
      ):
        return next_fun(*args, **kwargs)
      x = args[0]
      use_ra = kwargs.get(
        'use_running_average', args[1] if len(args) > 1 else None
      )
      use_ra = module.use_running_average if use_ra is None else use_ra
      if use_ra:
        return next_fun(*args, **kwargs)
      feature_axes = tuple(
        a % x.ndim
        for a in (
          module.axis if isinstance(module.axis, tuple) else (module.axis,)
        )
      )
      mean, var = _masked_moments(x, mask, feature_axes)
      module.sow(MOMENTS, 'mean', mean)
      module.sow(MOMENTS, 'var', var)
      bmask = jnp.broadcast_to(
        mask.reshape((-1,) + (1,) * (x.ndim - 1)), x.shape
      )
      return next_fun(*args, **{**kwargs, 'mask': bmask})

    with nn.intercept_methods(interceptor):
      _, state = model.apply(
        variables,
        batch['image'],
        train=True,
        rngs={'dropout': rng},
        mutable=['batch_stats', MOMENTS],
      )
    return state.get(MOMENTS, {}), jnp.sum(batch['mask'].astype(jnp.float32))

  return jax.jit(fn)


def _iterate(batches):
  if callable(batches):
    return iter(batches())
  return iter(batches)


def recalibrate_bn(
  model: nn.Module,
  variables: Mapping[str, Any],
  batches: Iterable[Mapping[str, Any]] | Callable[[], Iterable[Any]],
  *,
  rng: jax.Array | None = None,
) -> dict[str, Any]:
  """Re-estimates every BN layer's running ``mean``/``var`` from ``batches``.

  Args:
    model: the (pruned) flax module, ``apply(variables, x, train=...)``.
    variables: its variables (``batch_stats`` required if it has BN).
    batches: a list (or zero-arg callable returning an iterator) of
      ``{'image', 'label', 'mask'}`` batches; one pass is made.
    rng: dropout key for the train-mode passes (batch ``i`` uses
      ``fold_in(rng, i)``); ``None`` = ``jax.random.key(0)``, since these
      passes only read activations.

  Returns:
    ``variables`` with new ``batch_stats`` (other collections as given).

  Raises:
    ValueError: no batch has a real example.
  """
  rng = jax.random.key(0) if rng is None else rng
  step = _moments_fn(model)
  sums: dict[tuple[str, ...], np.ndarray] = {}
  total = 0.0
  for i, batch in enumerate(_iterate(batches)):
    moments, count = step(variables, batch, jax.random.fold_in(rng, i))
    count = float(count)
    if count == 0:
      continue
    total += count
    for path, values in traverse_util.flatten_dict(moments).items():
      # A BN module called k times per pass: the mean of its k calls.
      acc = np.mean([np.asarray(v, np.float64) for v in values], axis=0)
      sums[path] = sums.get(path, 0.0) + count * acc
  if total == 0:
    raise ValueError('recalibrate_bn: the batches hold no real example.')
  stats = traverse_util.flatten_dict(dict(variables.get('batch_stats', {})))
  new = dict(stats)
  for path, acc in sums.items():
    if path not in stats:
      raise ValueError(
        f'BN layer {"/".join(path[:-1])} has no batch_stats entry '
        f'{path[-1]!r}; pass variables that include its batch_stats.'
      )
    new[path] = np.asarray(acc / total, np.float32)
  return {**variables, 'batch_stats': traverse_util.unflatten_dict(new)}
