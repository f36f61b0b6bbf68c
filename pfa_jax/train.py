"""Training: pure steps (``train_step``, ``eval_step``) and the one loop.

``train_and_evaluate(config, workdir, init=None)`` trains from scratch
(``config.model``) or fine-tunes a given ``(model, variables, arch)`` (the
pruned network from ``compress.py``); there is no second loop.

Reproducibility: the data order is a pure function of ``(config.seed,
step)`` (see ``input_pipeline.train_batches``) and the dropout key of step
``s`` is ``fold_in(rng_loop, s)``, so a job restarted from its latest
checkpoint ends with bit-identical parameters on CPU.

Optimiser (as in the papers' PyTorch code): SGD with (Nesterov) momentum and
*coupled* weight decay, ``g + wd * w``, applied to every parameter (BN scales
and biases included, as ``torch.optim.SGD(model.parameters(), ...)`` does).
Network Slimming adds ``bn_l1 * sign(gamma)`` to the gradient of every BN
``scale`` leaf.
"""

import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from clu import metric_writers
from clu import parameter_overview
from clu import periodic_actions
from flax.training import train_state

from pfa_jax import checkpoint
from pfa_jax import input_pipeline
from pfa_jax import metrics

LrFn = Callable[[jax.typing.ArrayLike], jax.Array]
Init = tuple[nn.Module, Mapping[str, Any], Mapping[str, Any]]


class TrainState(train_state.TrainState):
  """``TrainState`` plus BatchNorm running statistics (``{}`` if none)."""

  batch_stats: Any = None


# ----------------------------------------------------------------------------
# Learning rate and optimiser (pure).


def learning_rate_schedule(
  *,
  base_lr: float,
  schedule: str,
  num_steps: int,
  warmup_steps: int = 0,
  boundaries: tuple[int, ...] = (),
  decay_factor: float = 0.1,
) -> LrFn:
  """Learning rate as a function of the (0-based) step.

  * ``constant``: ``base_lr``.
  * ``step``: ``base_lr * decay_factor ** #{b in boundaries : step >= b}``.
  * ``cosine``: ``base_lr * (1 + cos(pi * t)) / 2`` with ``t = (step - W) /
    (num_steps - W)`` clipped to ``[0, 1]``.

  With ``W = warmup_steps > 0`` the result is multiplied by ``min(1, (step +
  1) / W)`` (linear warm-up that reaches ``base_lr`` at step ``W - 1``).
  """
  if schedule not in ('constant', 'step', 'cosine'):
    raise ValueError(f'Unknown lr schedule {schedule!r}.')
  bounds = jnp.asarray(sorted(boundaries), jnp.float32)

  def lr_fn(step):
    step = jnp.asarray(step, jnp.float32)
    lr = jnp.asarray(base_lr, jnp.float32)
    if schedule == 'step' and len(boundaries):
      lr = lr * decay_factor ** jnp.sum(step >= bounds)
    elif schedule == 'cosine':
      t = (step - warmup_steps) / max(1, num_steps - warmup_steps)
      lr = lr * 0.5 * (1 + jnp.cos(jnp.pi * jnp.clip(t, 0.0, 1.0)))
    if warmup_steps > 0:
      lr = lr * jnp.minimum(1.0, (step + 1) / warmup_steps)
    return lr

  return lr_fn


def num_train_steps(config, steps_per_epoch: int) -> int:
  return max(1, math.ceil(float(config.num_epochs) * steps_per_epoch))


def create_learning_rate_fn(config, steps_per_epoch: int) -> LrFn:
  """``learning_rate_schedule`` from ``config.optim`` (epochs -> steps)."""
  optim = config.optim
  return learning_rate_schedule(
    base_lr=float(optim.lr),
    schedule=optim.get('schedule', 'constant'),
    num_steps=num_train_steps(config, steps_per_epoch),
    warmup_steps=round(float(optim.get('warmup_epochs', 0)) * steps_per_epoch),
    boundaries=tuple(
      round(float(b) * steps_per_epoch) for b in optim.get('boundaries', ())
    ),
    decay_factor=float(optim.get('decay_factor', 0.1)),
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
  if optim.get('name', 'sgd') != 'sgd':
    raise ValueError(f'Unknown optimizer {optim.name!r}; only sgd.')
  parts = []
  if optim.get('weight_decay', 0.0):
    parts.append(optax.add_decayed_weights(float(optim.weight_decay)))
  if optim.get('bn_l1', 0.0):
    parts.append(
      optax.masked(add_l1_subgradient(float(optim.bn_l1)), bn_scale_mask)
    )
  momentum = float(optim.get('momentum', 0.0))
  parts.append(
    optax.sgd(
      lr_fn,
      momentum=momentum or None,
      nesterov=bool(optim.get('nesterov', False)),
    )
  )
  return optax.chain(*parts)


def create_train_state(
  rng: jax.Array,
  config,
  model: nn.Module,
  image_shape: tuple[int, ...],
  *,
  lr_fn: LrFn,
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
    tx=create_optimizer(config, lr_fn),
    batch_stats=dict(variables.get('batch_stats', {})),
  )


def variables_of(state: TrainState) -> dict[str, Any]:
  """``{'params', 'batch_stats'}`` (the latter omitted when empty)."""
  variables = {'params': state.params}
  if state.batch_stats:
    variables['batch_stats'] = state.batch_stats
  return variables


# ----------------------------------------------------------------------------
# Steps (pure; jitted by the loop).


def _cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(
    logits.astype(jnp.float32), labels
  )


def train_step(
  state: TrainState, batch: Mapping[str, jax.Array], rng: jax.Array, *, lr_fn
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One SGD step on the mask-weighted mean cross-entropy.

  Args:
    state: current state.
    batch: ``{'image': [B, H, W, C], 'label': [B], 'mask': [B]}``.
    rng: the loop key; dropout uses ``fold_in(rng, state.step)``.
    lr_fn: the schedule (only for the reported ``lr``; ``state.tx`` owns it).

  Returns:
    ``(new_state, {'loss', 'accuracy', 'lr'})``, all scalars.
  """
  rng = jax.random.fold_in(rng, state.step)
  mask = batch['mask'].astype(jnp.float32)  # [B]
  count = jnp.maximum(mask.sum(), 1.0)

  def loss_fn(params):
    variables = {'params': params}
    if state.batch_stats:
      variables['batch_stats'] = state.batch_stats
    logits, new_vars = state.apply_fn(
      variables,
      batch['image'],
      train=True,
      rngs={'dropout': rng},
      mutable=['batch_stats'],
    )
    loss = jnp.sum(_cross_entropy(logits, batch['label']) * mask) / count
    return loss, (logits, new_vars)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (loss, (logits, new_vars)), grads = grad_fn(state.params)
  new_state = state.apply_gradients(
    grads=grads,
    batch_stats=dict(new_vars.get('batch_stats', state.batch_stats)),
  )
  correct = (jnp.argmax(logits, -1) == batch['label']).astype(jnp.float32)
  step_metrics = {
    'loss': loss,
    'accuracy': jnp.sum(correct * mask) / count,
    'lr': lr_fn(state.step),
  }
  return new_state, step_metrics


def eval_step(
  state: TrainState, batch: Mapping[str, jax.Array]
) -> dict[str, jax.Array]:
  """Masked sums ``{'loss_sum', 'correct', 'count'}`` over one batch."""
  return eval_sums(state.apply_fn, variables_of(state), batch)


def eval_sums(apply_fn, variables, batch) -> dict[str, jax.Array]:
  """:func:`eval_step` for any ``(apply_fn, variables)``."""
  logits = apply_fn(variables, batch['image'], train=False)
  mask = batch['mask'].astype(jnp.float32)
  correct = (jnp.argmax(logits, -1) == batch['label']).astype(jnp.float32)
  return {
    'loss_sum': jnp.sum(_cross_entropy(logits, batch['label']) * mask),
    'correct': jnp.sum(correct * mask),
    'count': jnp.sum(mask),
  }


# ----------------------------------------------------------------------------
# Loop (edge).


@dataclasses.dataclass
class TrainResult:
  """What ``train_and_evaluate`` hands back."""

  model: nn.Module
  variables: dict[str, Any]  # {'params', 'batch_stats'}
  arch: dict[str, Any]
  metrics: dict[str, Any]  # JSON-friendly summary
  state: TrainState | None = None


def _to_host(tree):
  """Replicated (or fully addressable) arrays -> numpy, on any host."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


def evaluate(
  eval_step_fn: Callable[..., Any],
  state: TrainState,
  batches: Iterable[Mapping[str, jax.Array]],
) -> dict[str, float]:
  """Sums masked per-batch sums on the host; returns ``eval_summary``."""
  sums = [eval_step_fn(state, batch) for batch in batches]
  if not sums:
    return metrics.eval_summary({'loss_sum': 0, 'correct': 0, 'count': 0})
  host = _to_host(sums)
  total = {k: float(np.sum([np.float64(s[k]) for s in host])) for k in host[0]}
  return metrics.eval_summary(total)


def evaluate_model(config, model: nn.Module, variables) -> dict[str, float]:
  """Loss and accuracy of any ``(model, variables)`` on the eval split.

  The eval set is padded and masked, so every example counts exactly once.
  """
  mesh = input_pipeline.make_mesh()
  repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  step = jax.jit(
    functools.partial(eval_sums, model.apply),
    in_shardings=(repl, data),
    out_shardings=repl,
  )
  variables = jax.device_put(variables, repl)
  batches = input_pipeline.shard_batches(
    input_pipeline.get_split_iter(
      config,
      'test',
      augment=False,
      batch_size=int(config.input.eval_batch_size),
    ),
    mesh,
  )
  sums = [step(variables, b) for b in batches]
  host = _to_host(sums)
  total = {k: float(np.sum([np.float64(s[k]) for s in host])) for k in host[0]}
  return metrics.eval_summary(total)


def _build_model(config, num_classes: int):
  from pfa_jax import models  # Lazy: the train loop works without models.

  model = models.get_model(
    config.model.name,
    num_classes=num_classes,
    **dict(config.model.get('kw', {})),
  )
  return model, models.arch_of(model)


def _format_eta(seconds: float) -> str:
  if not math.isfinite(seconds):
    return '?'
  seconds = int(seconds)
  if seconds >= 3600:
    return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m'
  if seconds >= 60:
    return f'{seconds // 60}m{seconds % 60:02d}s'
  return f'{seconds}s'


def _check_finite(pending, first_step: int):
  """Raises ``FloatingPointError`` at the first step with a non-finite loss."""
  for i, m in enumerate(pending):
    if not np.isfinite(m['loss']):
      raise FloatingPointError(
        f'Non-finite training loss ({m["loss"]}) at step {first_step + i}. '
        'Lower the learning rate or check the data; the run was stopped '
        'before saving this state.'
      )


def train_and_evaluate(
  config, workdir: str | os.PathLike, *, init: Init | None = None
) -> TrainResult:
  """Trains (or fine-tunes), evaluating and checkpointing along the way.

  Resume order: the latest checkpoint in ``workdir/ckpt`` (its architecture
  must match) -> ``init`` -> a fresh ``config.model``.

  Args:
    config: see ``configs/`` (seed, input, model, optim, num_epochs,
      log_every_steps, eval_every_epochs, ckpt_every_steps, keep_ckpts).
    workdir: output directory: ``config.json``, ``metrics.jsonl``,
      TensorBoard events and ``ckpt/``.
    init: ``(model, variables, arch)`` to start from (e.g. a pruned net);
      ``None`` builds ``pfa_jax.models.get_model(config.model.name, ...)``.

  Returns:
    ``TrainResult`` with the final model, variables, arch and a metrics dict
    (``eval_accuracy``, ``eval_loss``, ``train_loss``, ``steps``,
    ``wall_time_s``, ``num_params``, ...).

  Raises:
    FloatingPointError: non-finite loss (message names the step).
    checkpoint.ArchMismatchError: ``workdir`` holds another model.
    checkpoint.CorruptCheckpointError: the latest checkpoint is unreadable.
  """
  t_start = time.time()
  workdir = os.fspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  metrics.write_config(config, workdir)
  ckpt_dir = os.path.join(workdir, checkpoint.CKPT_SUBDIR)
  mngr = checkpoint.create_manager(
    ckpt_dir, max_to_keep=config.get('keep_ckpts', None)
  )
  writer = metrics.create_writer(workdir)
  try:
    return _train_loop(config, workdir, mngr, writer, init, t_start)
  finally:
    mngr.wait_until_finished()
    mngr.close()
    writer.flush()
    writer.close()


def _train_loop(config, workdir, mngr, writer, init, t_start) -> TrainResult:
  latest = mngr.latest_step()
  start_step = int(latest or 0)
  train_iter, eval_iter_fn, info = input_pipeline.get_datasets(
    config, start_step=start_step
  )
  if init is None:
    model, arch = _build_model(config, info.num_classes)
    init_variables = None
  else:
    model, init_variables, arch = init
  arch = checkpoint.normalize_arch(arch)

  spe = info.steps_per_epoch
  num_steps = num_train_steps(config, spe)
  lr_fn = create_learning_rate_fn(config, spe)
  mesh = input_pipeline.make_mesh()
  repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  rng_init, rng_loop = jax.random.split(jax.random.key(int(config.seed)))

  make_state = functools.partial(
    create_train_state,
    rng_init,
    config,
    model,
    info.image_shape,
    lr_fn=lr_fn,
    variables=init_variables,
  )
  if latest is not None:
    checkpoint.check_arch(
      checkpoint.restore_arch(mngr, latest), arch, where=str(mngr.directory)
    )
    abstract = checkpoint.abstract_with_sharding(
      jax.eval_shape(make_state), repl
    )
    state = checkpoint.restore_state(mngr, latest, abstract)
    logging.info('Resumed from %s at step %d.', mngr.directory, latest)
  else:
    # Under jit the state gets fresh buffers: donating it in train_step must
    # never delete the caller's `init` variables.
    state = jax.jit(
      lambda v: create_train_state(
        rng_init, config, model, info.image_shape, lr_fn=lr_fn, variables=v
      ),
      out_shardings=repl,
    )(init_variables)
  parameter_overview.log_parameter_overview(
    state.params, msg=f'{checkpoint.arch_label(arch)} parameters'
  )
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))

  p_train_step = jax.jit(
    functools.partial(train_step, lr_fn=lr_fn),
    in_shardings=(repl, data, repl),
    out_shardings=(repl, repl),
    donate_argnums=0,
  )
  p_eval_step = jax.jit(
    eval_step, in_shardings=(repl, data), out_shardings=repl
  )
  rng_loop = jax.device_put(rng_loop, repl)

  # `every <= 0` means only at the last step.
  log_every = int(config.get('log_every_steps', 100))
  ckpt_every = int(config.get('ckpt_every_steps', 1000))
  eval_every = float(config.get('eval_every_epochs', 1.0))
  eval_every = max(1, round(eval_every * spe)) if eval_every > 0 else 0

  def itstime(step, every):
    return step == num_steps or (every > 0 and step % every == 0)

  report_progress = periodic_actions.ReportProgress(
    num_train_steps=num_steps, writer=writer, every_steps=log_every or None
  )
  batch_size = int(config.input.batch_size)

  def run_eval(step):
    with report_progress.timed('eval'):
      batches = input_pipeline.shard_batches(eval_iter_fn(), mesh)
      summary = evaluate(p_eval_step, state, batches)
    writer.write_scalars(
      step, {'eval_loss': summary['loss'], 'eval_accuracy': summary['accuracy']}
    )
    logging.info(
      'step %d eval: loss=%.4f acc=%.4f (%d examples)',
      step,
      summary['loss'],
      summary['accuracy'],
      summary['count'],
    )
    return summary

  train_batches = input_pipeline.shard_batches(train_iter, mesh)
  pending, pending_first = [], start_step + 1
  last_train_loss = None  # None when resumed after the last step.
  eval_summary = None
  t_window, steps_in_window = time.time(), 0  # For img/s and ETA.
  logging.info(
    'Training %s: steps %d..%d (%d/epoch, batch %d).',
    checkpoint.arch_label(arch),
    start_step + 1,
    num_steps,
    spe,
    batch_size,
  )
  with metric_writers.ensure_flushes(writer):
    for step in range(start_step + 1, num_steps + 1):
      batch = next(train_batches)
      state, step_metrics = p_train_step(state, batch, rng_loop)
      pending.append(step_metrics)
      steps_in_window += 1
      report_progress(step)
      do_log = itstime(step, log_every)
      do_ckpt = itstime(step, ckpt_every)
      do_eval = itstime(step, eval_every)
      if not (do_log or do_ckpt or do_eval):
        continue
      host = _to_host(pending)
      _check_finite(host, pending_first)
      if do_log:
        mean = {
          k: float(np.mean([m[k] for m in host])) for k in ('loss', 'accuracy')
        }
        last_train_loss = mean['loss']
        writer.write_scalars(
          step,
          {
            'train_loss': mean['loss'],
            'train_accuracy': mean['accuracy'],
            'lr': float(host[-1]['lr']),
            'epoch': step / spe,
          },
        )
        now = time.time()
        rate = steps_in_window / max(now - t_window, 1e-9)  # steps/s
        t_window, steps_in_window = now, 0
        logging.info(
          'step %d/%d (%.1f%%) loss=%.4f acc=%.4f lr=%.4g %.0f img/s ETA %s',
          step,
          num_steps,
          100 * step / num_steps,
          mean['loss'],
          mean['accuracy'],
          float(host[-1]['lr']),
          rate * batch_size,
          _format_eta((num_steps - step) / rate),
        )
        pending, pending_first = [], step + 1
      if do_eval:
        eval_summary = run_eval(step)
      if do_ckpt:
        checkpoint.save(mngr, step, state, arch)
  if eval_summary is None:  # Resumed after the last step.
    eval_summary = run_eval(num_steps)
  mngr.wait_until_finished()

  summary = {
    'eval_accuracy': eval_summary['accuracy'],
    'eval_loss': eval_summary['loss'],
    'num_eval_examples': int(eval_summary['count']),
    'train_loss': last_train_loss,
    'steps': int(num_steps),
    'start_step': int(start_step),
    'steps_per_epoch': int(spe),
    'num_params': num_params,
    'wall_time_s': time.time() - t_start,
  }
  writer.write_scalars(
    num_steps,
    {
      'final_eval_accuracy': summary['eval_accuracy'],
      'final_eval_loss': summary['eval_loss'],
      'wall_time_s': summary['wall_time_s'],
    },
  )
  return TrainResult(
    model=model,
    variables={'params': state.params, 'batch_stats': state.batch_stats},
    arch=arch,
    metrics=summary,
    state=state,
  )
