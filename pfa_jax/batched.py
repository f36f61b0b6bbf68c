"""vmap-batched masked training: K pruned variants of one dense net at once.

Every variant is the dense network with a 0/1 mask on its ``params``
(:func:`pfa_jax.slicing.masks`) and its own ``consts`` (option-A index maps
as data), so all K share one compiled program. Params, optimiser state, BN
statistics, ``consts`` and masks are stacked on a leading axis of size K;
one jitted step is ``vmap(steps.train_step)`` over that axis, with the same
batch and the same dropout key for every variant, and each variant's mask
re-applied to its params after the update (``train_step``'s
``param_mask``).

Why the masked dense net trains exactly like the sliced one: a removed
channel's producer (kernel, BN scale and offset) is zero, so its output is
exactly 0 and its consumers' rows see zeros; every gradient into removed
entries is therefore 0 (and their momentum and coupled weight decay stay 0),
and the kept entries see the sliced network's forward and backward pass.
The mask re-application is a guard, not a correction. BN running statistics
of removed channels decay geometrically (batch mean and variance are 0),
and are never read, since their scale and offset are 0.

Dropout: a variant draws dropout bits in the dense shape, the sliced net
in its own shape, so the two see different (identically distributed) bits;
with dropout off they are the same computation up to float summation
order. The study turns dropout off at CPU scale and, at paper scale, accepts
that masked and sliced runs are the same experiment in distribution, not
bit for bit. All variants of one group share each step's bits.

Design (vs jaxpruner's ``wrap_optax``, which keeps masks in the optimiser
state and masks the updates): masks here are a separate stacked pytree next
to an unmodified optax state. The masks identify the variant (slicing reads
them back), so they are data, not optimiser state; the optimiser is
exactly the one single runs use (``optim.create_optimizer``), and masking
the params after the update also zeroes anything a non-linear transform
might leak into removed entries. jaxpruner's design suits changing masks
(gradual pruning updates them inside ``update``); ours are fixed per run.

Masked scratch init (:func:`variant`): the *sliced* network is initialised
and scattered into the dense shapes (:func:`pfa_jax.slicing.scatter`).
Initialising the dense net and masking it would scale every fan-in-scaled
kernel by ``sqrt(C_kept / C)``: a different experiment.
"""

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pfa_jax import models
from pfa_jax import optim
from pfa_jax import plan as plan_lib
from pfa_jax import slicing
from pfa_jax import steps

INITS = ('selection', 'scratch')


def variant(
  model: nn.Module,
  variables: Mapping[str, Any],
  plan,
  *,
  init: str = 'selection',
  rng: jax.Array | None = None,
  input_shape: tuple[int, int, int] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
  """One variant in the dense shape: ``(variables, params mask)``.

  Args:
    model: the dense model.
    variables: its variables (trained, for ``'selection'``; any, e.g. a
      fresh init, for ``'scratch'``, where only their shapes and ``consts``
      are used).
    plan: a :class:`~pfa_jax.plan.Plan` or ``{group: kept indices}``.
    init: ``'selection'`` keeps the kept filters' weights (after the plan's
      folds); ``'scratch'`` scatters a fresh init of the sliced network.
    rng: the init key for ``'scratch'``.
    input_shape: one input's (H, W, C), for ``'scratch'``.
  """
  if init not in INITS:
    raise ValueError(f'init must be one of {INITS}, got {init!r}.')
  plan = plan_lib.as_plan(plan)
  mask = slicing.masks(model, variables, plan)
  if init == 'selection':
    _, masked = slicing.mask(model, variables, plan)
    return masked, mask
  if rng is None or input_shape is None:
    raise ValueError("init='scratch' needs rng and input_shape.")
  small_model = models.with_widths(model, plan.widths())
  small = models.init(small_model, rng, tuple(input_shape))
  return slicing.scatter(model, small, plan, like=variables), mask


def stack(trees: Sequence[Any]) -> Any:
  """Stacks identically structured pytrees on a new leading axis."""
  if not trees:
    raise ValueError('Nothing to stack: need at least one variant.')
  return jax.tree.map(
    lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *trees
  )


def unstack(tree: Any) -> list[Any]:
  """Inverse of :func:`stack`."""
  k = jax.tree.leaves(tree)[0].shape[0]
  return [jax.tree.map(lambda x, i=i: x[i], tree) for i in range(k)]


def create_states(
  config,
  model: nn.Module,
  variables_list: Sequence[Mapping[str, Any]],
  *,
  lr_fn: optim.LrFn,
) -> steps.TrainState:
  """A ``TrainState`` whose leaves are stacked over the K variants.

  One optimiser (``optim.create_optimizer(config, lr_fn)``), its state
  initialised per variant under ``vmap``; ``step`` is ``[K]``.
  """
  tx = optim.create_optimizer(config, lr_fn)
  stacked = stack([dict(v) for v in variables_list])

  def one(v):
    return steps.TrainState.create(
      apply_fn=model.apply,
      params=v['params'],
      tx=tx,
      batch_stats=dict(v.get('batch_stats', {})),
      extra_vars=steps.extra_collections(v),
    )

  return jax.jit(jax.vmap(one))(stacked)


def make_train_step(lr_fn: optim.LrFn, *, masked: bool = True) -> Callable:
  """``(states, batch, rng, masks) -> (states, metrics [K])``, jitted.

  The batch and the key are shared (``in_axes=None``); states and masks
  are mapped. ``masked=False`` ignores ``masks`` (pass ``None``): plain
  training of K unmasked networks, e.g. the sliced baseline with K = 1.
  """

  def one(state, batch, rng, mask):
    return steps.train_step(
      state, batch, rng, lr_fn=lr_fn, param_mask=mask if masked else None
    )

  mapped = jax.vmap(one, in_axes=(0, None, None, 0 if masked else None))
  return jax.jit(mapped, donate_argnums=0)


@jax.jit
def _eval(states, batch):
  return jax.vmap(steps.eval_step, in_axes=(0, None))(states, batch)


def evaluate(states, batches: Iterable[Mapping[str, Any]]) -> list[dict]:
  """Per-variant ``{'loss', 'accuracy', 'count'}`` over ``batches``."""
  totals = None
  for b in batches:
    sums = jax.device_get(_eval(states, b))
    sums = {k: np.asarray(v, np.float64) for k, v in sums.items()}
    totals = sums if totals is None else {k: totals[k] + sums[k] for k in sums}
  if totals is None:
    raise ValueError('evaluate: no eval batches.')
  out = []
  for i in range(len(totals['count'])):
    n = max(totals['count'][i], 1.0)
    out.append(
      {
        'loss': float(totals['loss_sum'][i] / n),
        'accuracy': float(totals['correct'][i] / n),
        'count': int(totals['count'][i]),
      }
    )
  return out


def train(
  config,
  model: nn.Module,
  variables_list: Sequence[Mapping[str, Any]],
  masks_list: Sequence[Mapping[str, Any]] | None,
  batches: Iterable[Mapping[str, Any]],
  *,
  num_steps: int,
  lr_fn: optim.LrFn,
  rng: jax.Array,
  on_step: Callable[[int, dict], None] | None = None,
) -> tuple[steps.TrainState, dict[str, np.ndarray]]:
  """Trains K variants for ``num_steps`` on ``batches`` (edge loop).

  Args:
    config: reads ``config.optim`` (the optimiser, as single runs do).
    model: the dense model (or the sliced one, with ``masks_list=None``).
    variables_list: K variables dicts (from :func:`variant`).
    masks_list: K params masks, or ``None`` for unmasked training.
    batches: host batches ``{'image', 'label', 'mask'}``, shared by all.
    num_steps: steps to take.
    lr_fn: the schedule.
    rng: the loop key (dropout: ``fold_in(rng, step)``, as single runs).
    on_step: called as ``on_step(step, host_metrics)`` after every step
      whose metrics were fetched (every step; the loop is short).

  Returns:
    ``(states, {'loss': [steps, K], 'accuracy': [steps, K]})``.
  """
  states = create_states(config, model, variables_list, lr_fn=lr_fn)
  masks = None if masks_list is None else stack([dict(m) for m in masks_list])
  step_fn = _cached_step(lr_fn, masks is not None)
  it = iter(batches)
  history = []
  for s in range(1, int(num_steps) + 1):
    batch = next(it)
    states, metrics = step_fn(states, batch, rng, masks)
    history.append(metrics)
    if on_step is not None:
      on_step(s, metrics)
  host = jax.device_get(history)
  curves = {
    k: np.stack([np.asarray(h[k]) for h in host]) for k in ('loss', 'accuracy')
  }
  if not np.all(np.isfinite(curves['loss'])):
    bad = np.argwhere(~np.isfinite(curves['loss']))[0]
    raise FloatingPointError(
      f'Non-finite loss in variant {bad[1]} at step {bad[0] + 1}.'
    )
  return states, curves


@functools.lru_cache(maxsize=16)
def _cached_step(lr_fn, masked):
  return make_train_step(lr_fn, masked=masked)


def variables_of(states) -> list[dict[str, Any]]:
  """The K variants' variables (dense, masked), on the host."""
  return [jax.device_get(steps.variables_of(s)) for s in unstack(states)]
