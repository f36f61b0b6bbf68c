"""The compression job (edge): trained net -> smaller trained nets + report.

1. Validate every (method, recipe) pair and option (:func:`validate`)
   before anything is restored or evaluated.
2. Restore the trained checkpoint (its architecture comes from it).
3. For each method, collect what it reads from data once (PFA: one jitted
   statistics pass), shared by all its recipes.
4. For every (method, recipe): plan -> slice -> evaluate -> BN
   recalibration -> evaluate -> fine-tune -> evaluate.
5. ``result.json`` is rewritten after every recipe (a long job keeps its
   partial result); each recipe's sub-workdir holds ``plan.json`` and, when
   fine-tuned, ``config.json``, ``metrics.jsonl`` and ``result.json``.
"""

import os
import time
from collections.abc import Mapping
from typing import Any

import ml_collections
from absl import logging

from pfa_jax import checkpoint
from pfa_jax import costs
from pfa_jax import input_pipeline
from pfa_jax import methods
from pfa_jax import metrics
from pfa_jax import models
from pfa_jax import slicing
from pfa_jax import train
from pfa_jax.methods import base as methods_base

# ----------------------------------------------------------------------------
# Pure pieces.


def pairs(config) -> list[tuple[str, str]]:
  """``(method, recipe spec)`` for every entry of ``config.recipes``.

  An entry ``'l1@params:0.5'`` names its own method; others use
  ``config.method``. An empty ``config.recipes`` means
  ``config.method_recipes[config.method]``.
  """
  out = []
  specs = tuple(config.recipes)
  if not specs:
    recipes = config.get('method_recipes', {})
    if config.method not in recipes:
      raise ValueError(
        f'config.recipes is empty and config.method_recipes has no entry for '
        f'method {config.method!r}: name recipes with --config.recipes.'
      )
    specs = tuple(recipes[config.method])
  for spec in specs:
    name, sep, rest = str(spec).partition('@')
    out.append((name, rest) if sep else (config.method, str(spec)))
  if not out:
    raise ValueError('config.recipes is empty: name at least one recipe.')
  return out


def method_kwargs(method: methods_base.Method, method_kw) -> dict[str, Any]:
  """The options and hyperparameters ``method`` reads from ``method_kw``.

  Raises:
    ValueError: a key that no method declares, or one that this method does
      not read but that was changed from its default (it would be silently
      ignored).
  """
  kw = dict(method_kw)
  known = dict(methods.OPTIONS)
  for m in methods.METHODS.values():
    for k, v in m.hparams.items():
      known.setdefault(k, v)
  out = {}
  for k, v in kw.items():
    if k not in known:
      raise ValueError(
        f'method_kw.{k} is not an option of any method; known: {sorted(known)}.'
      )
    if k in methods.OPTIONS or k in method.hparams:
      out[k] = v
    elif v != known[k]:
      raise ValueError(
        f'method_kw.{k}={v!r} is set, but method {method.name!r} does not '
        f'read it (it takes {sorted(method.hparams) or "no hyperparameters"}).'
      )
  return out


def name_of(method: str, recipe) -> str:
  return f'{method}_{methods.parse_recipe(recipe).name}'


def validate(config) -> list[tuple[str, str]]:
  """Every check that needs no data or checkpoint; fails in the first second.

  Returns the ``(method, recipe)`` pairs.
  """
  found = pairs(config)
  names = set()
  for name, spec in found:
    method = methods.get_method(name)
    kw = method_kwargs(method, config.method_kw)
    hp = method.check_hparams(
      {k: v for k, v in kw.items() if k not in methods.OPTIONS}
    )
    method.check_recipe(methods.parse_recipe(spec))
    opts = {k: kw.get(k, v) for k, v in methods.OPTIONS.items()}
    seed = int(config.compress.seed)
    methods._check_options(opts, method, seed)  # noqa: SLF001
    if 'stats_dtype' in hp:
      methods.pfa.check_stats_dtype(hp['stats_dtype'])
    if hp.get('select') not in (None, *methods.random_method.SELECTS):
      raise ValueError(
        f'method_kw.select must be one of '
        f'{methods.random_method.SELECTS}, got {hp["select"]!r}.'
      )
    label = name_of(name, spec)
    if label in names:
      raise ValueError(f'Recipe {name}@{spec} appears twice.')
    names.add(label)
  if int(config.compress.recalibrate_batches) < 0:
    raise ValueError('compress.recalibrate_batches must be >= 0.')
  return found


# ----------------------------------------------------------------------------
# Edge.


def data_source(config):
  """A re-iterable of sharded ``compress.split`` batches (no augmentation)."""
  c = config.compress
  mesh = input_pipeline.make_mesh()
  num_batches = int(c.num_batches) or None

  def batches():
    return input_pipeline.shard_batches(
      input_pipeline.get_split_iter(
        config,
        c.split,
        augment=False,
        batch_size=int(c.batch_size),
        num_batches=num_batches,
      ),
      mesh,
    )

  return batches


def recalibrate(config, model, variables, batches):
  """BN recalibration over the first ``compress.recalibrate_batches`` batches,
  then an evaluation; returns ``(variables, eval summary)``."""
  n = int(config.compress.recalibrate_batches)
  first = [b for _, b in zip(range(n), batches())]
  variables = train.recalibrate_bn(model, variables, first)
  return variables, train.evaluate_model(config, model, variables)


def restrict_head(config, model, variables):
  """Cuts a whole-dataset classifier to ``input.classes`` (domain adaptation).

  Decision: the compressed net for a class subset predicts only that
  subset. A model trained on the whole dataset gets its head sliced to the
  subset's logits (in ``input.classes`` order, as the pipeline relabels
  them); a model already trained on the subset is left alone. Returns
  ``(model, variables, {'classes', 'from_outputs'} or None)``.
  """
  classes = tuple(int(c) for c in config.input.get('classes', ()))
  n_all = input_pipeline.get_spec(config.input.dataset).num_classes
  if not classes or int(model.num_classes) != n_all:
    return model, variables, None
  model, variables = slicing.restrict_classes(model, variables, classes)
  logging.info('Classifier cut from %d outputs to classes %s.', n_all, classes)
  return model, variables, {'classes': list(classes), 'from_outputs': n_all}


def finetune_config(config) -> ml_collections.ConfigDict:
  """The training config with the fine-tune schedule swapped in."""
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.num_epochs = config.finetune.num_epochs
    c.optim = config.finetune.optim.copy_and_resolve_references()
  return c


def compress(config, workdir: str | os.PathLike) -> dict[str, Any]:
  """Runs the whole compression job; returns (and writes) ``result.json``."""
  t_start = time.time()
  found = validate(config)  # Fail early, before any expensive step.
  workdir = os.fspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  metrics.write_config(config, workdir)

  source = config.compress.source or os.path.join(workdir, '..', 'train')
  model, variables, arch, step = checkpoint.restore_model(source)
  logging.info('Restored %s (step %d) from %s.', arch['class'], step, source)
  model, variables, head = restrict_head(config, model, variables)
  arch = models.arch_of(model)
  size = int(config.input.image_size)
  input_shape = (size, size, 3)
  full_cost = costs.count(model, input_shape)
  full_widths = models.widths_of(model)
  batches = data_source(config)

  timings = {}
  t = time.time()
  full_eval = train.evaluate_model(config, model, variables)
  timings['eval_full_s'] = time.time() - t
  logging.info('Full model: %s, acc %.4f', full_cost, full_eval['accuracy'])

  result = {
    # Taken when the job starts: the commit whose code ran, not the one
    # checked out when it ended.
    **metrics.provenance(),
    'job': 'compress',
    'model': config.model.name,
    'dataset': config.input.dataset,
    'arch': arch,
    'tap': getattr(model, 'tap', 'post_act'),
    'head': head,
    'distill': dict(config.distill),
    'full': {
      'widths': full_widths,
      'params': full_cost['params'],
      'flops': full_cost['flops'],
      'accuracy': full_eval['accuracy'],
      'loss': full_eval['loss'],
    },
    'recipes': {},
    'timings': timings,
  }
  collected = {}
  for name, spec in found:
    method = methods.get_method(name)
    kw = method_kwargs(method, config.method_kw)
    rng = int(config.compress.seed)
    _, recipe, hparams, opts, _, ctx_kw = methods.prepare(
      name,
      model,
      variables,
      recipe=spec,
      rng=rng,
      batches=batches,
      input_shape=input_shape,
      **kw,
    )
    key = (name, ctx_kw['groups'], tuple(sorted(hparams.items())))
    if key not in collected:
      t = time.time()
      collected[key] = methods.collect(
        method, model, variables, batches, ctx_kw['groups'], hparams
      )
      timings[f'collect_{name}_s'] = time.time() - t
    plan = methods.make_plan(
      method, model, variables, collected[key], recipe, hparams, rng, ctx_kw
    )
    label = name_of(name, spec)
    result['recipes'][label] = _run_recipe(
      config,
      os.path.join(workdir, label),
      model,
      variables,
      plan,
      opts=opts,
      batches=batches,
      rng=rng,
      input_shape=input_shape,
      full_cost=full_cost,
    )
    _write(workdir, result, t_start)
  return _write(workdir, result, t_start)


def _run_recipe(
  config,
  workdir,
  model,
  variables,
  plan,
  *,
  opts,
  batches,
  rng,
  input_shape,
  full_cost,
) -> dict[str, Any]:
  t0 = time.time()
  os.makedirs(workdir, exist_ok=True)
  out = methods.apply_plan(
    model,
    variables,
    plan,
    opts={**opts, 'recalibrate': 0},
    batches=batches,
    rng=rng,
    input_shape=input_shape,
  )
  metrics.write_json(os.path.join(workdir, 'plan.json'), out.plan.to_json())
  pruned, pruned_vars = out.model, out.variables
  cost = costs.count(pruned, input_shape)
  row = {
    **{k: v for k, v in out.report.items() if k != 'scores'},
    'kept': {n: [int(i) for i in k] for n, k in out.keep.items()},
    'params': cost['params'],
    'flops': cost['flops'],
    'params_ratio': cost['params'] / full_cost['params'],
    'flops_ratio': cost['flops'] / full_cost['flops'],
  }
  ev = train.evaluate_model(config, pruned, pruned_vars)
  row.update(accuracy_pruned=ev['accuracy'], loss_pruned=ev['loss'])
  n_recal = int(config.compress.recalibrate_batches)
  if n_recal:
    pruned_vars, ev = recalibrate(config, pruned, pruned_vars, batches)
    row.update(
      accuracy_recalibrated=ev['accuracy'],
      loss_recalibrated=ev['loss'],
      recalibrate_batches=n_recal,
    )
  logging.info(
    '%s: params %d (%.2fx smaller), FLOPs %.3g; acc sliced %.4f%s.',
    os.path.basename(workdir),
    cost['params'],
    full_cost['params'] / cost['params'],
    cost['flops'],
    row['accuracy_pruned'],
    f', recalibrated {row["accuracy_recalibrated"]:.4f}' if n_recal else '',
  )
  if float(config.finetune.num_epochs) > 0:
    teacher = (model, variables) if float(config.distill.weight) > 0 else None
    ft = train.train_and_evaluate(
      finetune_config(config),
      workdir,
      init=(pruned, pruned_vars, models.arch_of(pruned)),
      **({'teacher': teacher} if teacher else {}),
    )
    row.update(
      accuracy_finetuned=ft.metrics['eval_accuracy'],
      loss_finetuned=ft.metrics['eval_loss'],
      finetune_steps=ft.metrics['steps'],
    )
    metrics.write_json(
      os.path.join(workdir, 'result.json'), {**row, 'finetune': ft.metrics}
    )
  row['seconds'] = time.time() - t0
  return row


def _write(workdir, result: Mapping[str, Any], t_start) -> dict[str, Any]:
  out = {
    **result,
    'timings': {**result['timings'], 'total_s': time.time() - t_start},
  }
  metrics.write_json(os.path.join(workdir, 'result.json'), out)
  return out
