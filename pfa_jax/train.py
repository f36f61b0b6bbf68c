"""Training edge: the one loop, ``evaluate_model`` and BN recalibration.

``train_and_evaluate(config, workdir, init=None)`` trains from scratch
(``config.model``) or fine-tunes a given ``(model, variables, arch)`` (the
pruned network from ``compress.py``); there is no second loop. The pure
pieces live in :mod:`pfa_jax.optim` (schedules, optimiser) and
:mod:`pfa_jax.steps` (state, steps, losses) and are re-exported here.

Reproducibility: the data order is a pure function of ``(config.seed,
step)`` (see ``input_pipeline.train_batches``) and the dropout key of step
``s`` is ``fold_in(rng_loop, s)``, so a job restarted from its latest
checkpoint ends with bit-identical parameters on CPU. ``metrics.jsonl`` is
flushed and fsynced row by row; on resume, rows past the restored step are
dropped, so re-run steps never appear twice.

Distillation (``config.distill.weight`` > 0, with ``teacher=(model,
variables)``) is recorded in every summary (``distill_weight``,
``distill_temperature``), because it confounds comparisons between methods.
"""

import dataclasses
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from absl import logging

from pfa_jax import checkpoint
from pfa_jax import evaluation
from pfa_jax import input_pipeline
from pfa_jax import metrics
from pfa_jax import models
from pfa_jax import steps as steps_lib
from pfa_jax.clu_compat import metric_writers
from pfa_jax.clu_compat import parameter_overview
from pfa_jax.clu_compat import periodic_actions
from pfa_jax.evaluation import _to_host
from pfa_jax.evaluation import evaluate
from pfa_jax.evaluation import evaluate_model
from pfa_jax.optim import LrFn
from pfa_jax.optim import add_l1_subgradient
from pfa_jax.optim import bn_scale_mask
from pfa_jax.optim import create_learning_rate_fn
from pfa_jax.optim import create_optimizer
from pfa_jax.optim import learning_rate_schedule
from pfa_jax.optim import num_train_steps
from pfa_jax.recalibrate import recalibrate_bn
from pfa_jax.steps import TrainState
from pfa_jax.steps import apply_mask
from pfa_jax.steps import create_train_state
from pfa_jax.steps import distill_kl
from pfa_jax.steps import eval_step
from pfa_jax.steps import eval_sums
from pfa_jax.steps import train_step
from pfa_jax.steps import variables_of

Init = tuple[nn.Module, Mapping[str, Any], Mapping[str, Any]]
Teacher = tuple[nn.Module, Mapping[str, Any]]

__all__ = [
  'LrFn',
  'TrainResult',
  'TrainState',
  'add_l1_subgradient',
  'apply_mask',
  'bn_scale_mask',
  'create_learning_rate_fn',
  'create_optimizer',
  'create_train_state',
  'distill_kl',
  'distill_settings',
  'eval_step',
  'eval_sums',
  'evaluate',
  'evaluate_model',
  'learning_rate_schedule',
  'num_train_steps',
  'recalibrate_bn',
  'train_and_evaluate',
  'train_step',
  'variables_of',
]


@dataclasses.dataclass
class TrainResult:
  """What ``train_and_evaluate`` hands back."""

  model: nn.Module
  variables: dict[str, Any]  # {'params', 'batch_stats', **consts}
  arch: dict[str, Any]
  metrics: dict[str, Any]  # JSON-friendly summary
  state: TrainState | None = None


def distill_settings(config) -> tuple[float, float]:
  """``(weight, temperature)`` of ``config.distill``; ``(0, 4)`` if absent.

  Raises:
    ValueError: weight outside ``[0, 1]`` or temperature ``<= 0``.
  """
  d = config.get('distill')
  if d is None:
    return 0.0, 4.0
  w, t = float(d.weight), float(d.temperature)
  if not 0.0 <= w <= 1.0:
    raise ValueError(f'config.distill.weight must be in [0, 1], got {w}.')
  if not t > 0:
    raise ValueError(f'config.distill.temperature must be > 0, got {t}.')
  return w, t


def _build_model(config, num_classes: int):

  model = models.get_model(
    config.model.name, num_classes=num_classes, **dict(config.model.kw)
  )
  return model, models.arch_of(model)


def _check_finite(pending, first_step: int):
  """Raises ``FloatingPointError`` at the first step with a non-finite loss."""
  for i, m in enumerate(pending):
    if not np.isfinite(m['loss']):
      raise FloatingPointError(
        f'Non-finite training loss ({m["loss"]}) at step {first_step + i}. '
        'Lower the learning rate or check the data; the run was stopped '
        'before saving this state.'
      )


@dataclasses.dataclass(frozen=True)
class _Hooks:
  param_mask: Any
  extra_loss: Callable[[Any], Any] | None
  teacher: Teacher | None
  distill: tuple[float, float]


def train_and_evaluate(
  config,
  workdir: str | os.PathLike,
  *,
  init: Init | None = None,
  param_mask: Any = None,
  extra_loss: Callable[[Any], Any] | None = None,
  teacher: Teacher | None = None,
) -> TrainResult:
  """Trains (or fine-tunes), evaluating and checkpointing along the way.

  Resume order: the latest checkpoint in ``workdir/ckpt`` (its architecture
  must match) -> ``init`` -> a fresh ``config.model``.

  Args:
    config: see ``configs/`` (seed, input, model, optim, num_epochs,
      log_every_steps, eval_every_epochs, ckpt_every_steps, keep_ckpts and
      optionally distill.weight / distill.temperature).
    workdir: output directory: ``config.json``, ``metrics.jsonl``,
      TensorBoard events and ``ckpt/``.
    init: ``(model, variables, arch)`` to start from (e.g. a pruned net);
      ``None`` builds ``pfa_jax.models.get_model(config.model.name, ...)``.
    param_mask: a pytree like the params (``None`` leaves = free); the
      params are masked at the start and after every update.
    extra_loss: ``params -> scalar`` added to the training loss.
    teacher: ``(model, variables)`` for distillation; required when
      ``config.distill.weight > 0``, ignored otherwise.

  Returns:
    ``TrainResult`` with the final model, variables, arch and a metrics dict
    (``eval_accuracy``, ``eval_loss``, ``train_loss``, ``steps``,
    ``wall_time_s``, ``num_params``, ``distill_weight``, ...).

  Raises:
    ValueError: bad distill settings, or distillation without a teacher.
    FloatingPointError: non-finite loss (message names the step).
    checkpoint.ArchMismatchError: ``workdir`` holds another model.
    checkpoint.CorruptCheckpointError: the latest checkpoint is unreadable.
  """
  distill = distill_settings(config)
  if distill[0] > 0 and teacher is None:
    raise ValueError(
      f'config.distill.weight={distill[0]} needs teacher=(model, variables).'
    )
  hooks = _Hooks(
    param_mask, extra_loss, teacher if distill[0] > 0 else None, distill
  )
  t_start = time.time()
  workdir = os.fspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  metrics.write_config(config, workdir)
  ckpt_dir = os.path.join(workdir, checkpoint.CKPT_SUBDIR)
  mngr = checkpoint.create_manager(ckpt_dir, max_to_keep=config.keep_ckpts)
  # Rows past the restored step are re-run: drop them before appending.
  metrics.truncate_jsonl(
    os.path.join(workdir, metrics.METRICS_FILE), int(mngr.latest_step() or 0)
  )
  writer = metrics.create_writer(workdir)
  try:
    return _train_loop(config, workdir, mngr, writer, init, hooks, t_start)
  finally:
    mngr.wait_until_finished()
    mngr.close()
    writer.flush()
    writer.close()


def _train_loop(config, workdir, mngr, writer, init, hooks, t_start):
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
    evaluation.check_num_classes(config, model)
  arch = checkpoint.normalize_arch(arch)

  spe = info.steps_per_epoch
  num_steps = num_train_steps(config, spe)
  lr_fn = create_learning_rate_fn(config, spe)
  mesh = input_pipeline.make_mesh()
  repl = input_pipeline.replicated(mesh)
  data = input_pipeline.data_sharding(mesh)
  rng_init, rng_loop = jax.random.split(jax.random.key(int(config.seed)))

  def make_state(v):
    state = create_train_state(
      rng_init, config, model, info.image_shape, lr_fn=lr_fn, variables=v
    )
    return state.replace(params=apply_mask(state.params, hooks.param_mask))

  if latest is not None:
    checkpoint.check_arch(
      checkpoint.restore_arch(mngr, latest), arch, where=str(mngr.directory)
    )
    abstract = checkpoint.abstract_with_sharding(
      jax.eval_shape(make_state, init_variables), repl
    )
    state = checkpoint.restore_state(mngr, latest, abstract)
    logging.info('Resumed from %s at step %d.', mngr.directory, latest)
  else:
    # Under jit the state gets fresh buffers: donating it in train_step must
    # never delete the caller's `init` variables.
    state = jax.jit(make_state, out_shardings=repl)(init_variables)
  parameter_overview.log_parameter_overview(
    state.params, msg=f'{checkpoint.arch_label(arch)} parameters'
  )
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))

  weight, temperature = hooks.distill
  teacher_apply, teacher_vars = None, None
  if hooks.teacher is not None:
    teacher_apply = hooks.teacher[0].apply
    teacher_vars = jax.device_put(dict(hooks.teacher[1]), repl)
  param_mask = (
    None if hooks.param_mask is None else jax.device_put(hooks.param_mask, repl)
  )

  def step_fn(state, batch, rng, param_mask, teacher_vars):
    return train_step(
      state,
      batch,
      rng,
      lr_fn=lr_fn,
      param_mask=param_mask,
      extra_loss=hooks.extra_loss,
      teacher_apply=teacher_apply,
      teacher_variables=teacher_vars,
      distill_weight=weight,
      distill_temperature=temperature,
    )

  p_train_step = jax.jit(
    step_fn,
    in_shardings=(repl, data, repl, repl, repl),
    out_shardings=(repl, repl),
    donate_argnums=0,
  )
  p_eval_step = jax.jit(
    steps_lib.eval_step_for(model),
    in_shardings=(repl, data),
    out_shardings=repl,
  )
  rng_loop = jax.device_put(rng_loop, repl)

  # `every <= 0` means only at the last step.
  log_every = int(config.log_every_steps)
  ckpt_every = int(config.ckpt_every_steps)
  eval_every = float(config.eval_every_epochs)
  eval_every = max(1, round(eval_every * spe)) if eval_every > 0 else 0

  def itstime(step, every):
    return step == num_steps or (every > 0 and step % every == 0)

  report_progress = periodic_actions.ReportProgress(
    num_train_steps=num_steps,
    writer=writer,
    every_steps=log_every or None,
    every_secs=None,  # time triggers right after an eval print 0 steps/s
  )

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
  logging.info(
    'Training %s: steps %d..%d (%d/epoch, batch %d)%s.',
    checkpoint.arch_label(arch),
    start_step + 1,
    num_steps,
    spe,
    int(config.input.batch_size),
    f', distillation w={weight} T={temperature}' if weight > 0 else '',
  )
  with metric_writers.ensure_flushes(writer):
    for step in range(start_step + 1, num_steps + 1):
      batch = next(train_batches)
      state, step_metrics = p_train_step(
        state, batch, rng_loop, param_mask, teacher_vars
      )
      pending.append(step_metrics)
      report_progress(step)
      do_log = itstime(step, log_every)
      do_ckpt = itstime(step, ckpt_every)
      do_eval = itstime(step, eval_every)
      if not (do_log or do_ckpt or do_eval):
        continue
      host = _to_host(pending)
      _check_finite(host, pending_first)
      if do_log:
        mean = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
        last_train_loss = mean['loss']
        writer.write_scalars(
          step,
          {
            **{f'train_{k}': v for k, v in mean.items() if k != 'lr'},
            'lr': float(host[-1]['lr']),
            'epoch': step / spe,
          },
        )
        logging.vlog(
          1,
          'step %d/%d loss=%.4f acc=%.4f lr=%.4g',
          step,
          num_steps,
          mean['loss'],
          mean['accuracy'],
          float(host[-1]['lr']),
        )
        pending, pending_first = [], step + 1
      if do_eval:
        eval_summary = run_eval(step)
      if do_ckpt:
        checkpoint.save(mngr, step, state, arch, input_shape=info.image_shape)
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
    'distill_weight': weight,
    'distill_temperature': temperature,
    'masked_training': hooks.param_mask is not None,
    'wall_time_s': time.time() - t_start,
  }
  writer.write_scalars(
    num_steps,
    {
      'final_eval_accuracy': summary['eval_accuracy'],
      'final_eval_loss': summary['eval_loss'],
      'distill_weight': weight,
      'wall_time_s': summary['wall_time_s'],
    },
  )
  return TrainResult(
    model=model,
    variables=variables_of(state) | {'batch_stats': state.batch_stats},
    arch=arch,
    metrics=summary,
    state=state,
  )
