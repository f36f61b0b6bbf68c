"""Pure training pieces: ``TrainState``, the train/eval steps and their losses.

Variables: a model's variables are ``{'params', 'batch_stats', 'consts',
...}``. ``params`` is trained, ``batch_stats`` is updated by train-mode
forward passes, and every other collection (today only ``'consts'``: index
maps such as ResNet's option-A shortcut map) is carried unchanged in
``TrainState.extra_vars`` and passed to ``apply``; it is never mutable in a
step, so a module that tried to write it would fail loudly. Transient
collections (sown ``'responses'``, ``'intermediates'``) are dropped.

Pruning hooks of ``train_step`` (all off by default):

* ``param_mask``: a pytree like ``params`` (``None`` leaves = unmasked);
  the params are multiplied by it after every update (masked training);
* ``extra_loss(params) -> scalar``: added to the loss (e.g. FCP's pair
  regulariser);
* knowledge distillation from a teacher's eval-mode logits ``t`` with weight
  ``w`` and temperature ``T``: ``(1 - w) CE + w T^2 KL(softmax(t / T) ||
  softmax(s / T))`` (Hinton et al. 2015), mask-weighted over the batch.
"""

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from pfa_jax import models
from pfa_jax import optim

TRAINED = ('params', 'batch_stats')
TRANSIENT = ('intermediates', 'responses')


class TrainState(train_state.TrainState):
  """``TrainState`` plus BN running statistics and constant collections.

  ``batch_stats`` is ``{}`` for models without BatchNorm; ``extra_vars`` is
  ``{collection: tree}`` for every other (non-transient) collection.
  """

  batch_stats: Any = None
  extra_vars: Any = None


def extra_collections(variables: Mapping[str, Any]) -> dict[str, Any]:
  """The collections a state carries unchanged (``{}`` if none)."""
  return {
    k: v
    for k, v in variables.items()
    if k not in TRAINED and k not in TRANSIENT
  }


def create_train_state(
  rng: jax.Array,
  config,
  model: nn.Module,
  image_shape: tuple[int, ...],
  *,
  lr_fn: optim.LrFn,
  variables: Mapping[str, Any] | None = None,
) -> TrainState:
  """A fresh ``TrainState``; from ``variables`` if given (fine-tuning)."""
  if variables is None:
    rng_params, rng_dropout = jax.random.split(rng)
    variables = model.init(
      {'params': rng_params, 'dropout': rng_dropout},
      jnp.zeros((1, *image_shape), jnp.float32),
      train=False,
    )
  return TrainState.create(
    apply_fn=model.apply,
    params=variables['params'],
    tx=optim.create_optimizer(config, lr_fn),
    batch_stats=dict(variables.get('batch_stats', {})),
    extra_vars=extra_collections(variables),
  )


def variables_of(state: TrainState) -> dict[str, Any]:
  """``{'params', 'batch_stats', **extra_vars}`` (empty ones omitted)."""
  variables = {'params': state.params}
  if state.batch_stats:
    variables['batch_stats'] = state.batch_stats
  for k, v in (state.extra_vars or {}).items():
    variables[k] = v
  return variables


def apply_mask(params: Any, param_mask: Any) -> Any:
  """``params * param_mask`` leafwise; ``None`` mask leaves leave a leaf."""
  if param_mask is None:
    return params
  return jax.tree.map(
    lambda m, p: p if m is None else p * jnp.asarray(m, p.dtype),
    param_mask,
    params,
    is_leaf=lambda x: x is None,
  )


def cross_entropy(logits, labels):
  """Per-example softmax cross-entropy in float32."""
  return optax.softmax_cross_entropy_with_integer_labels(
    logits.astype(jnp.float32), labels
  )


def distill_kl(student_logits, teacher_logits, temperature: float):
  """Per-example ``T^2 KL(softmax(t / T) || softmax(s / T))``."""
  t = float(temperature)
  log_p_t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / t)
  log_p_s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t)
  kl = jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)
  return t * t * kl


def train_step(
  state: TrainState,
  batch: Mapping[str, jax.Array],
  rng: jax.Array,
  *,
  lr_fn: optim.LrFn,
  param_mask: Any = None,
  extra_loss: Callable[[Any], jax.Array] | None = None,
  teacher_apply: Callable[..., jax.Array] | None = None,
  teacher_variables: Any = None,
  distill_weight: float = 0.0,
  distill_temperature: float = 4.0,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One SGD step on the mask-weighted mean loss.

  Args:
    state: current state.
    batch: ``{'image': [B, H, W, C], 'label': [B], 'mask': [B]}``.
    rng: the loop key; dropout uses ``fold_in(rng, state.step)``.
    lr_fn: the schedule (only for the reported ``lr``; ``state.tx`` owns it).
    param_mask: re-applied to the params after the update (module doc).
    extra_loss: ``params -> scalar`` added to the loss.
    teacher_apply: the teacher's ``apply`` (distillation when
      ``distill_weight > 0``); called in eval mode.
    teacher_variables: the teacher's variables.
    distill_weight: ``w`` in ``[0, 1]``.
    distill_temperature: ``T > 0``.

  Returns:
    ``(new_state, metrics)``: scalars ``loss`` (the optimised total),
    ``ce``, ``accuracy`` and ``lr``, plus ``kd`` and ``extra_loss`` when on.
  """
  distill = float(distill_weight) > 0
  if distill and teacher_apply is None:
    raise ValueError('distill_weight > 0 needs teacher_apply.')
  rng = jax.random.fold_in(rng, state.step)
  mask = batch['mask'].astype(jnp.float32)  # [B]
  count = jnp.maximum(mask.sum(), 1.0)
  if distill:
    teacher_logits = jax.lax.stop_gradient(
      teacher_apply(teacher_variables, batch['image'], train=False)
    )

  def loss_fn(params):
    variables = variables_of(state.replace(params=params))
    logits, new_vars = state.apply_fn(
      variables,
      batch['image'],
      train=True,
      rngs={'dropout': rng},
      mutable=['batch_stats'],
    )
    ce = jnp.sum(cross_entropy(logits, batch['label']) * mask) / count
    parts = {'ce': ce}
    loss = ce
    if distill:
      w = float(distill_weight)
      kd = distill_kl(logits, teacher_logits, distill_temperature)
      parts['kd'] = jnp.sum(kd * mask) / count
      loss = (1 - w) * ce + w * parts['kd']
    if extra_loss is not None:
      parts['extra_loss'] = jnp.asarray(extra_loss(params), jnp.float32)
      loss = loss + parts['extra_loss']
    return loss, (logits, new_vars, parts)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (loss, (logits, new_vars, parts)), grads = grad_fn(state.params)
  new_state = state.apply_gradients(
    grads=grads,
    batch_stats=dict(new_vars.get('batch_stats', state.batch_stats)),
  )
  if param_mask is not None:
    new_state = new_state.replace(
      params=apply_mask(new_state.params, param_mask)
    )
  correct = (jnp.argmax(logits, -1) == batch['label']).astype(jnp.float32)
  step_metrics = {
    'loss': loss,
    **parts,
    'accuracy': jnp.sum(correct * mask) / count,
    'lr': lr_fn(state.step),
  }
  return new_state, step_metrics


def eval_step(
  state: TrainState, batch: Mapping[str, jax.Array]
) -> dict[str, jax.Array]:
  """Masked sums ``{'loss_sum', 'correct', 'count'}`` over one batch."""
  return eval_sums(state.apply_fn, variables_of(state), batch)


def eval_step_for(model: nn.Module) -> Callable[..., dict[str, jax.Array]]:
  """`eval_step` on `models.for_inference(model)`: BN folded where it can.

  The training loop's eval step (`pfa_jax.train`): the same sums to float32
  rounding, with each conv + BN (+ residual + ReLU) one native call on the
  oneDNN path (`pfa_jax.models.layers.ConvBN.fold_bn`).
  """
  apply_fn = models.for_inference(model).apply
  return lambda state, batch: eval_sums(apply_fn, variables_of(state), batch)


def eval_sums(apply_fn, variables, batch) -> dict[str, jax.Array]:
  """:func:`eval_step` for any ``(apply_fn, variables)``."""
  logits = apply_fn(variables, batch['image'], train=False)
  mask = batch['mask'].astype(jnp.float32)
  correct = (jnp.argmax(logits, -1) == batch['label']).astype(jnp.float32)
  return {
    'loss_sum': jnp.sum(cross_entropy(logits, batch['label']) * mask),
    'correct': jnp.sum(correct * mask),
    'count': jnp.sum(mask),
  }
