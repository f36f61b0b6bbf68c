"""Pruning schedules (edge): CF layer by layer and FCP rounds.

A schedule is an ordered list of :class:`Step` s, produced by a pure function
of the model's widths (:func:`cf_layer_steps`, :func:`fcp_round_steps`);
:func:`run` executes it. Every step prunes (``methods.prune``), evaluates,
recalibrates BN, evaluates, fine-tunes (``train.train_and_evaluate``) and
evaluates, and the next step starts from the fine-tuned net.

* **CF layer by layer** (``config.schedule.kind='layer'``): one step per
  pruned layer, in :func:`pfa_jax.methods.cf.layer_schedule` order (VGG from
  the deep end; ResNet: each block's first conv, last block first). The
  recipe is resolved to kept widths **once, on the full model** (a layer's
  ``⌈C·r⌉`` refers to its original width C), and layers whose width is kept
  whole are not steps. Each step re-collects CF's similarity of its layer on
  the current (already pruned, fine-tuned) net, as the authors do. The
  one-shot variant is the compress job (``config.job='compress'``).
* **FCP rounds** (``kind='rounds'``): each round picks ``num_pairs`` disjoint
  pairs per layer from the weights (``fcp.round_pairs``), trains
  ``method_kw.epochs`` epochs with ``λ·Σ(1 − corr)`` added
  (``fcp.regularizer``, in ``<step>/regularize``), drops one filter of each
  pair with its least-squares fold (``methods.prune('fcp', pairs=...)``) and
  fine-tunes. Rounds stop at the params/FLOPs target; the last round drops
  the fewest pairs per layer that reach it, so the target is not overshot by
  more than one uniform pair per layer.

Bookkeeping: ``<workdir>/<label>/steps.json`` lists the steps;
``<workdir>/<label>/<NN_step>/`` holds ``plan.json``, ``config.json``,
``metrics.jsonl``, ``ckpt/`` and ``result.json``. A step whose
``result.json`` exists is skipped on re-run and its net is restored from its
checkpoint (``checkpoint.restore_model``: the arch carries the widths); an
interrupted fine-tune resumes from its latest checkpoint. Checkpoints are
never selected by test accuracy: every step continues from its *last*
fine-tuning state (the CF authors keep the best test-accuracy checkpoint).
"""

import dataclasses
import json
import os
import time
from collections.abc import Mapping
from typing import Any

import ml_collections
from absl import logging

from pfa_jax import checkpoint
from pfa_jax import compress
from pfa_jax import costs
from pfa_jax import methods
from pfa_jax import metrics
from pfa_jax import models
from pfa_jax import train
from pfa_jax.methods import base
from pfa_jax.methods import cf
from pfa_jax.methods import fcp
from pfa_jax.models import structure

KINDS = ('layer', 'rounds')
_METHOD_OF = {'layer': 'cf', 'rounds': 'fcp'}
_SCHEDULE_HPARAMS = ('lam', 'num_pairs', 'epochs')  # fcp: read by the edge


@dataclasses.dataclass(frozen=True)
class Step:
  """One step: prune ``groups`` to ``widths``, then fine-tune.

  Attributes:
    name: sub-workdir name (``'03_conv10'``, ``'01_round'``).
    groups: the layers this step prunes.
    widths: their kept widths after the step.
    num_pairs: FCP only: pairs dropped per layer this round (capped at
      half a layer's current width); 0 for CF.
  """

  name: str
  groups: tuple[str, ...]
  widths: dict[str, int]
  num_pairs: int = 0

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self) | {'groups': list(self.groups)}


# ----------------------------------------------------------------------------
# Pure: the step lists.


def target_widths(
  model,
  recipe,
  *,
  groups='inner',
  min_width=1,
  round_to=1,
  input_shape=None,
) -> dict[str, int]:
  """CF's kept widths for ``recipe`` on the full ``model`` (no data read)."""
  method = methods.get_method('cf')
  names = base.select_groups(model, groups)
  ctx = base.Context(
    model=model,
    variables=None,
    stats=None,
    recipe=method.check_recipe(base.parse_recipe(recipe)),
    hparams=dict(method.hparams),
    rng=None,
    groups=names,
    input_shape=None if input_shape is None else tuple(input_shape),
    min_width=methods.min_widths(model, names, min_width),
    round_to=int(round_to),
  )
  return cf.widths_for(ctx)[0]


def _label(i: int, name: str) -> str:
  return f'{i:02d}_{name.replace("/", "-")}'


def cf_layer_steps(model, widths: Mapping[str, int]) -> list[Step]:
  """One step per layer that loses filters, deepest first (module doc)."""
  full = structure.widths_of(model)
  for n, w in widths.items():
    if n not in full:
      raise KeyError(f'cf_layer_steps: unknown layer {n!r}.')
    if not 1 <= int(w) <= full[n]:
      raise ValueError(
        f'cf_layer_steps: layer {n!r} width {w} outside [1, {full[n]}].'
      )
  pruned = [n for n, w in widths.items() if int(w) < full[n]]
  order = cf.layer_schedule(model, pruned)
  return [
    Step(_label(i, g[0]), g, {g[0]: int(widths[g[0]])})
    for i, g in enumerate(order)
  ]


def fcp_round_steps(
  model,
  recipe,
  *,
  groups,
  num_pairs: int,
  input_shape,
  max_rounds: int = 100,
) -> list[Step]:
  """FCP's rounds until the params/FLOPs target (module doc).

  Round k drops ``min(n, C_k // 2)`` filters of every layer (C_k its width
  before the round; a layer a grouped conv splits into blocks drops
  ``ceil(n / blocks)`` in each, :func:`fcp.round_count`), with n =
  ``num_pairs`` except in the last round, where n is the smallest count
  that meets the target.

  Raises:
    ValueError: a recipe that is not ``params:``/``flops:``, ``num_pairs <
      1``, or a target that cannot be met (all layers at width 1, or more
      than ``max_rounds`` rounds), naming the numbers.
  """
  r = base.parse_recipe(recipe)
  if r.kind not in ('params', 'flops'):
    raise ValueError(
      f'FCP rounds stop at a params/FLOPs target; got recipe {recipe!r}.'
    )
  if int(num_pairs) < 1:
    raise ValueError(
      f'method_kw.num_pairs must be >= 1 for FCP rounds, got {num_pairs}.'
    )
  names = base.select_groups(model, groups)
  shape = tuple(input_shape)
  full_cost = costs.count(model, shape)[r.kind]
  target = r.value * full_cost if r.value <= 1 else r.value
  cost = costs.cost_fn(model, shape, r.kind)
  widths = {n: structure.widths_of(model)[n] for n in names}
  blocks = {n: model.structure().group(n).blocks for n in names}
  steps = []
  while cost(widths) > target:
    if len(steps) >= int(max_rounds):
      raise ValueError(
        f'FCP: {recipe!r} (target {target:.6g}) not reached in {max_rounds} '
        f'rounds of {num_pairs} pairs; raise num_pairs or max_rounds.'
      )

    def after(n, widths=widths):
      return {
        g: w - fcp.round_count(w, n, blocks[g]) for g, w in widths.items()
      }

    if after(int(num_pairs)) == widths:
      raise ValueError(
        f'FCP: {recipe!r} needs {r.kind} <= {target:.6g}, but at '
        f'{cost(widths):.6g} every pruned layer is down to width 1.'
      )
    n = next(
      (k for k in range(1, int(num_pairs)) if cost(after(k)) <= target),
      int(num_pairs),
    )
    widths = after(n)
    steps.append(Step(_label(len(steps), 'round'), names, widths, n))
  return steps


# ----------------------------------------------------------------------------
# Edge.


def check(config) -> list[tuple[str, str]]:
  """Cheap checks of a schedule config; returns its (method, recipe) pairs."""
  s = config.get('schedule')
  if s is None:
    raise ValueError('config.schedule is missing (configs/common.schedule()).')
  if s.kind not in KINDS:
    raise ValueError(f'schedule.kind must be one of {KINDS}, got {s.kind!r}.')
  found = compress.validate(config)
  for name, spec in found:
    if name != _METHOD_OF[s.kind]:
      raise ValueError(
        f'schedule.kind={s.kind!r} runs method {_METHOD_OF[s.kind]!r}, but '
        f'recipe {name}@{spec} names {name!r}.'
      )
    kind = base.parse_recipe(spec).kind
    if s.kind == 'rounds' and kind not in ('params', 'flops'):
      raise ValueError(
        f'FCP rounds stop at a params/FLOPs target; got recipe {spec!r}.'
      )
  if s.kind == 'rounds' and int(config.method_kw.num_pairs) < 1:
    raise ValueError('FCP rounds need method_kw.num_pairs >= 1.')
  return found


def run(config, workdir: str | os.PathLike) -> dict[str, Any]:
  """Runs ``config.schedule`` for every recipe; writes ``result.json``."""
  t_start = time.time()
  found = check(config)
  workdir = os.fspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  metrics.write_config(config, workdir)
  source = config.compress.source or os.path.join(workdir, '..', 'train')
  model, variables, arch, _ = checkpoint.restore_model(source)
  size = int(config.input.image_size)
  shape = (size, size, 3)
  full_cost = costs.count(model, shape)
  full_eval = train.evaluate_model(config, model, variables)
  result = {
    'job': 'schedule',
    'schedule': dict(config.schedule),
    'model': config.model.name,
    'arch': arch,
    'source': source,
    'full': {**full_cost, 'accuracy': full_eval['accuracy']},
    'recipes': {},
  }
  for name, spec in found:
    label = compress.name_of(name, spec)
    result['recipes'][label] = _run_schedule(
      config,
      os.path.join(workdir, label),
      model,
      variables,
      spec,
      shape=shape,
      full_cost=full_cost,
    )
    _write(workdir, result, t_start)
  return _write(workdir, result, t_start)


def _write(workdir, result, t_start):
  out = {**result, 'total_s': time.time() - t_start, **metrics.provenance()}
  metrics.write_json(os.path.join(workdir, 'result.json'), out)
  return out


def _steps(config, model, spec, shape) -> list[Step]:
  kw = config.method_kw
  if config.schedule.kind == 'layer':
    widths = target_widths(
      model,
      spec,
      groups=kw.groups,
      min_width=kw.min_width,
      round_to=kw.round_to,
      input_shape=shape,
    )
    return cf_layer_steps(model, widths)
  return fcp_round_steps(
    model,
    spec,
    groups=kw.groups,
    num_pairs=int(kw.num_pairs),
    input_shape=shape,
    max_rounds=int(config.schedule.max_rounds),
  )


def _run_schedule(config, workdir, model, variables, spec, *, shape, full_cost):
  steps = _steps(config, model, spec, shape)
  os.makedirs(workdir, exist_ok=True)
  metrics.write_json(
    os.path.join(workdir, 'steps.json'), [s.to_json() for s in steps]
  )
  logging.info('%s: %d steps.', os.path.basename(workdir), len(steps))
  batches = compress.data_source(config)
  rows = []
  for step in steps:
    sub = os.path.join(workdir, step.name)
    done = os.path.join(sub, 'result.json')
    if os.path.exists(done):
      model, variables, _, _ = checkpoint.restore_model(sub)
      with open(done) as f:
        rows.append(json.load(f))
      logging.info('%s: done, restored.', step.name)
      continue
    model, variables, row = _run_step(
      config, sub, model, variables, step, batches=batches, shape=shape
    )
    row.update(
      params_ratio=row['params'] / full_cost['params'],
      flops_ratio=row['flops'] / full_cost['flops'],
    )
    metrics.write_json(done, row)
    rows.append(row)
  final = rows[-1] if rows else {}
  return {
    'steps': [s.name for s in steps],
    'rows': rows,
    'widths': models.widths_of(model),
    **{k: final.get(k) for k in ('params', 'flops')},
    **{k: final.get(k) for k in ('params_ratio', 'flops_ratio')},
    'accuracy_finetuned': final.get('accuracy_finetuned'),
  }


def _options(config, method):
  kw = compress.method_kwargs(method, config.method_kw)
  return {k: v for k, v in kw.items() if k not in ('groups', 'recalibrate')}


def _train_config(config, num_epochs) -> ml_collections.ConfigDict:
  c = compress.finetune_config(config)
  with c.unlocked():
    c.num_epochs = float(num_epochs)
  return c


def _run_step(config, sub, model, variables, step, *, batches, shape):
  t0 = time.time()
  kind = config.schedule.kind
  method = methods.get_method(_METHOD_OF[kind])
  opts = _options(config, method)
  row = {'step': step.to_json()}
  if kind == 'rounds':
    pairs = fcp.round_pairs(model, variables, step.groups, step.num_pairs)
    lam = float(config.method_kw.lam)
    reg = train.train_and_evaluate(
      _train_config(config, config.method_kw.epochs),
      os.path.join(sub, 'regularize'),
      init=(model, variables, models.arch_of(model)),
      extra_loss=fcp.regularizer(model, pairs, lam),
    )
    model, variables = reg.model, reg.variables
    opts['pairs'] = pairs
    row['accuracy_regularized'] = reg.metrics['eval_accuracy']
    row['regularize_steps'] = reg.metrics['steps']
  for k in _SCHEDULE_HPARAMS:
    opts.pop(k, None)
  out = methods.prune(
    method.name,
    model,
    variables,
    recipe=dict(step.widths),
    batches=batches,
    rng=int(config.compress.seed),
    input_shape=shape,
    groups=list(step.groups),
    **opts,
  )
  os.makedirs(sub, exist_ok=True)
  metrics.write_json(os.path.join(sub, 'plan.json'), out.plan.to_json())
  pruned, pruned_vars = out.model, out.variables
  cost = costs.count(pruned, shape)
  ev = train.evaluate_model(config, pruned, pruned_vars)
  row.update(
    widths=models.widths_of(pruned),
    params=cost['params'],
    flops=cost['flops'],
    accuracy_pruned=ev['accuracy'],
  )
  n_recal = int(config.compress.recalibrate_batches)
  if n_recal:
    pruned_vars, ev = compress.recalibrate(config, pruned, pruned_vars, batches)
    row['accuracy_recalibrated'] = ev['accuracy']
  ft = train.train_and_evaluate(
    compress.finetune_config(config),
    sub,
    init=(pruned, pruned_vars, models.arch_of(pruned)),
  )
  row.update(
    accuracy_finetuned=ft.metrics['eval_accuracy'],
    finetune_steps=ft.metrics['steps'],
    seconds=time.time() - t0,
  )
  logging.info(
    '%s: widths %s, params %d, acc pruned %.4f -> fine-tuned %.4f.',
    step.name,
    step.widths,
    cost['params'],
    row['accuracy_pruned'],
    row['accuracy_finetuned'],
  )
  return ft.model, ft.variables, row
