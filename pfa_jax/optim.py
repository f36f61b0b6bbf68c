"""Learning-rate schedules and the optimiser, built from optax parts (pure).

Schedules are optax schedules of the 0-based update count (``state.step``):

* ``constant``: ``optax.constant_schedule``;
* ``step``: ``optax.piecewise_constant_schedule`` with one factor per
  boundary (``lr * decay_factor ** #{b : step >= b}``; repeated boundaries
  multiply);
* ``cosine``: ``optax.cosine_decay_schedule`` over ``num_steps - W`` steps.

A warm-up of ``W > 0`` steps is ``optax.linear_schedule`` from ``lr / W`` to
``lr`` at step ``W - 1`` (``lr * (step + 1) / W``), joined to the main
schedule with ``optax.join_schedules``, which then sees ``step - W``. A step
boundary inside the warm-up is rejected: the joined schedule could not honour
it.

Optimiser (as in the papers' PyTorch code): SGD with (Nesterov) momentum and
*coupled* weight decay, ``g + wd * w``, applied to every parameter (BN scales
and biases included, as ``torch.optim.SGD(model.parameters(), ...)`` does).
Network Slimming adds ``bn_l1 * sign(gamma)`` to the gradient of every BN
``scale`` leaf.
"""

import collections
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

LrFn = Callable[[jax.typing.ArrayLike], jax.Array]
SCHEDULES = ('constant', 'step', 'cosine')


def learning_rate_schedule(
  *,
  base_lr: float,
  schedule: str,
  num_steps: int,
  warmup_steps: int = 0,
  boundaries: tuple[int, ...] = (),
  decay_factor: float = 0.1,
) -> LrFn:
  """An optax schedule (see the module docstring for the formulas).

  Raises:
    ValueError: unknown ``schedule``, negative ``warmup_steps`` or a step
      boundary inside the warm-up.
  """
  if schedule not in SCHEDULES:
    raise ValueError(
      f'Unknown lr schedule {schedule!r}; expected one of {SCHEDULES}.'
    )
  warmup_steps = int(warmup_steps)
  if warmup_steps < 0:
    raise ValueError(f'warmup_steps must be >= 0, got {warmup_steps}.')
  base_lr = float(base_lr)
  if schedule == 'step' and boundaries:
    early = sorted(b for b in boundaries if b < warmup_steps)
    if early:
      raise ValueError(
        f'lr boundaries {early} (steps) fall inside the {warmup_steps}-step '
        'warm-up; move them after it or shorten the warm-up.'
      )
    counts = collections.Counter(int(b) - warmup_steps for b in boundaries)
    main = optax.piecewise_constant_schedule(
      base_lr, {b: float(decay_factor) ** n for b, n in counts.items()}
    )
  elif schedule == 'cosine':
    main = optax.cosine_decay_schedule(
      base_lr, decay_steps=max(1, int(num_steps) - warmup_steps)
    )
  else:
    main = optax.constant_schedule(base_lr)
  if warmup_steps <= 0:
    return _as_f32(main)
  warmup = optax.linear_schedule(
    init_value=base_lr / warmup_steps,
    end_value=base_lr,
    transition_steps=warmup_steps - 1,
  )
  return _as_f32(optax.join_schedules([warmup, main], [warmup_steps]))


def _as_f32(fn) -> LrFn:
  return lambda step: jnp.asarray(fn(step), jnp.float32)


def num_train_steps(config, steps_per_epoch: int) -> int:
  return max(1, math.ceil(float(config.num_epochs) * steps_per_epoch))


def create_learning_rate_fn(config, steps_per_epoch: int) -> LrFn:
  """``learning_rate_schedule`` from ``config.optim`` (epochs -> steps).

  Every field is read directly: a config without one is an error naming it,
  not a silent default that disagrees with ``configs/common.py``.
  """
  optim = config.optim
  return learning_rate_schedule(
    base_lr=float(optim.lr),
    schedule=optim.schedule,
    num_steps=num_train_steps(config, steps_per_epoch),
    warmup_steps=round(float(optim.warmup_epochs) * steps_per_epoch),
    boundaries=tuple(
      round(float(b) * steps_per_epoch) for b in optim.boundaries
    ),
    decay_factor=float(optim.decay_factor),
  )


def add_l1_subgradient(strength: float) -> optax.GradientTransformation:
  """``g + strength * sign(w)`` (the L1 subgradient; Network Slimming)."""

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError('add_l1_subgradient needs params.')
    updates = jax.tree.map(
      lambda g, w: g + strength * jnp.sign(w).astype(g.dtype), updates, params
    )
    return updates, state

  return optax.GradientTransformation(
    lambda params: optax.EmptyState(), update_fn
  )


def bn_scale_mask(params: Any) -> Any:
  """True for leaves named ``scale`` (BatchNorm gammas), else False."""
  return jax.tree_util.tree_map_with_path(
    lambda path, _: getattr(path[-1], 'key', None) == 'scale', params
  )


def create_optimizer(config, lr_fn: LrFn) -> optax.GradientTransformation:
  """Coupled weight decay (+ BN L1) followed by SGD with momentum/Nesterov."""
  optim = config.optim
  if optim.name != 'sgd':
    raise ValueError(f'Unknown optimizer {optim.name!r}; only sgd.')
  parts = []
  if optim.weight_decay:
    parts.append(optax.add_decayed_weights(float(optim.weight_decay)))
  if optim.bn_l1:
    parts.append(
      optax.masked(add_l1_subgradient(float(optim.bn_l1)), bn_scale_mask)
    )
  momentum = float(optim.momentum)
  parts.append(
    optax.sgd(lr_fn, momentum=momentum or None, nesterov=bool(optim.nesterov))
  )
  return optax.chain(*parts)
