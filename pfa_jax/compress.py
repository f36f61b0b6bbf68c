"""The compression job (edge): trained net -> smaller trained net + report.

1. Restore the trained checkpoint (its architecture comes from the checkpoint).
2. Stream response statistics over ``config.pfa.num_batches`` batches of a
   split (and class subset) with one jitted pure ``stats_step``: the
   model's forward pass sows each group's response, and the streaming
   covariance consumes it in the same program.
3. Spectra, and the Pearson removal order of every layer: once.
4. For every recipe in ``config.pfa.recipes`` (``kl``, ``energy:τ``,
   ``params:x``, ``flops:x``): widths -> keep-sets (``pfa`` selection,
   ``random``, or ``scratch``) -> slice -> evaluate -> fine-tune -> evaluate.
   All recipes reuse the one statistics pass.
5. Write ``result.json`` (and ``spectra.json``) in the workdir; each
   fine-tune run has its own sub-workdir with ``config.json``,
   ``metrics.jsonl`` and ``result.json``.
"""

import functools
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from pfa_jax import checkpoint
from pfa_jax import costs
from pfa_jax import input_pipeline
from pfa_jax import metrics
from pfa_jax import models
from pfa_jax import recipes
from pfa_jax import select
from pfa_jax import slicing
from pfa_jax import spectra as spectra_lib
from pfa_jax import stats
from pfa_jax import train

RESNET_MODES = ('inner', 'inner+stream')
SELECTS = ('pfa', 'random', 'scratch')


# ----------------------------------------------------------------------------
# Pure pieces.


def parse_recipe(spec: str) -> tuple[str, float | None]:
  """``'energy:0.9'`` -> ``('energy', 0.9)``; ``'kl'`` -> ``('kl', None)``.

  Raises:
    ValueError: unknown kind, or a missing or non-numeric value.
  """
  kind, _, value = str(spec).partition(':')
  if kind == 'kl' and not value:
    return 'kl', None
  if kind not in ('energy', 'params', 'flops'):
    raise ValueError(
      f"Unknown recipe {spec!r}: use 'kl', 'energy:<tau>', 'params:<x>' or "
      "'flops:<x>' (x <= 1 is a fraction of the full model, else a count)."
    )
  try:
    v = float(value)
  except ValueError:
    raise ValueError(
      f'Recipe {spec!r} needs a number after the colon.'
    ) from None
  if not np.isfinite(v) or v <= 0:
    raise ValueError(f'Recipe {spec!r}: value must be positive and finite.')
  return kind, v


def recipe_name(spec: str) -> str:
  kind, v = parse_recipe(spec)
  return kind if v is None else f'{kind}_{v:g}'


def analysed_groups(model: nn.Module, resnet_mode: str) -> list[str]:
  """Groups PFA prunes: all, except residual streams in 'inner' mode."""
  if resnet_mode not in RESNET_MODES:
    raise ValueError(
      f'pfa.resnet_mode must be one of {RESNET_MODES}, got {resnet_mode!r}.'
    )
  s = model.structure()
  return [
    g.name for g in s.groups if resnet_mode == 'inner+stream' or not g.stream
  ]


def stats_step(states, variables, batch, *, model, names):
  """One forward pass + covariance update for the ``names`` groups (pure)."""
  _, resp = models.responses(model, variables, batch['image'])
  resp = {n: resp[n].astype(jnp.float32) for n in names}
  return stats.update_tree(states, resp, mask=batch['mask'])


def recipe_widths(
  spec: str,
  spectra: Mapping[str, np.ndarray],
  model: nn.Module,
  input_shape: Sequence[int],
) -> tuple[dict[str, int], dict[str, Any]]:
  """Widths for one recipe spec, and what was solved (τ, target)."""
  kind, v = parse_recipe(spec)
  if kind == 'kl':
    return recipes.kl(spectra), {}
  if kind == 'energy':
    return recipes.energy(spectra, v), {'tau': v}
  full = costs.count(model, input_shape)[kind]
  target = v * full if v <= 1 else v
  fixed = {n: w for n, w in models.widths_of(model).items() if n not in spectra}
  cost_of = costs.cost_fn(model, input_shape, kind)
  try:
    tau, widths = recipes.to_target(
      spectra, lambda w: cost_of({**fixed, **w}), target
    )
  except ValueError as e:
    raise ValueError(f'Recipe {spec!r} is impossible: {e}') from e
  return widths, {'tau': float(tau), 'target': float(target)}


def keep_sets(
  how: str,
  widths: Mapping[str, int],
  orders: Mapping[str, np.ndarray],
  full_widths: Mapping[str, int],
  seed: int,
) -> dict[str, np.ndarray]:
  """Keep-sets for ``widths``: PFA selection, or random subsets."""
  if how not in SELECTS:
    raise ValueError(f'pfa.select must be one of {SELECTS}, got {how!r}.')
  if how == 'random':
    full = {n: full_widths[n] for n in widths}
    return select.random_keep_sets(full, widths, seed)
  # 'scratch' re-initialises, so which filters are kept does not matter.
  return select.keep_sets({n: orders[n] for n in widths}, widths)


# ----------------------------------------------------------------------------
# Edge.


def collect_stats(config, model, variables, names):
  """Streams the responses of ``names`` over the configured data."""
  p = config.pfa
  dtype = {'float32': jnp.float32, 'float64': jnp.float64}[p.stats_dtype]
  widths = models.widths_of(model)
  states = stats.init_tree({n: widths[n] for n in names}, dtype=dtype)
  mesh = input_pipeline.make_mesh()
  repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  step = jax.jit(
    functools.partial(stats_step, model=model, names=tuple(names)),
    in_shardings=(repl, repl, data),
    out_shardings=repl,
    donate_argnums=0,
  )
  variables = jax.device_put(variables, repl)
  states = jax.device_put(states, repl)
  num_batches = int(p.num_batches) or None
  batches = input_pipeline.shard_batches(
    input_pipeline.get_split_iter(
      config,
      p.split,
      augment=False,
      batch_size=int(p.batch_size),
      num_batches=num_batches,
    ),
    mesh,
  )
  t0 = time.time()
  i = 0
  for i, batch in enumerate(batches, 1):
    states = step(states, variables, batch)
    if i % 10 == 0 or i == num_batches:
      jax.block_until_ready(states)
      rate = i * int(p.batch_size) / (time.time() - t0)
      eta = (num_batches - i) * int(p.batch_size) / rate if num_batches else 0
      logging.info(
        'PFA statistics: batch %d%s, %.0f img/s, ETA %.0fs',
        i,
        f'/{num_batches}' if num_batches else '',
        rate,
        eta,
      )
  states = jax.device_get(states)
  stats.check_finite_tree(states)
  m = next(iter(states.values())).count
  return states, {
    'split': p.split,
    'num_batches': i,
    'num_examples': int(m),
    'classes': list(config.input.classes),
    'tap': getattr(model, 'tap', 'post_act'),
    'seconds': time.time() - t0,
  }


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
  workdir = os.fspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  metrics.write_config(config, workdir)
  p = config.pfa
  specs = list(p.recipes)
  if not specs:
    raise ValueError('config.pfa.recipes is empty: name at least one recipe.')
  for spec in specs:
    parse_recipe(spec)  # Fail early, before any expensive step.
  if p.select not in SELECTS:
    raise ValueError(f'pfa.select must be one of {SELECTS}, got {p.select!r}.')

  source = p.source or os.path.join(workdir, '..', 'train')
  model, variables, arch, step = checkpoint.restore_model(source)
  logging.info('Restored %s (step %d) from %s.', arch['class'], step, source)
  input_shape = _input_shape(config)
  names = analysed_groups(model, p.resnet_mode)
  full_widths = models.widths_of(model)
  full_cost = costs.count(model, input_shape)

  timings = {}
  t = time.time()
  full_eval = train.evaluate_model(config, model, variables)
  timings['eval_full_s'] = time.time() - t
  logging.info('Full model: %s, acc %.4f', full_cost, full_eval['accuracy'])

  states, data_info = collect_stats(config, model, variables, names)
  timings['stats_s'] = data_info.pop('seconds')
  t = time.time()
  covs = stats.covariance_tree(states)
  for n, c in covs.items():
    if data_info['num_examples'] <= c.shape[0]:
      logging.warning(
        'Layer %r: %d samples for %d units; the covariance is rank-deficient '
        'and the spectrum has trailing zeros.',
        n,
        data_info['num_examples'],
        c.shape[0],
      )
  spectra = spectra_lib.spectra(covs)
  orders = select.removal_orders(covs)
  timings['spectra_select_s'] = time.time() - t
  metrics.write_json(
    os.path.join(workdir, 'spectra.json'),
    {n: s.tolist() for n, s in spectra.items()},
  )

  results = {}
  report = functools.partial(
    _write_result,
    workdir,
    config,
    arch,
    full_cost,
    full_eval,
    full_widths,
    data_info,
    results,
    timings,
    t_start,
  )  # Rewritten after every recipe, so a long job's partial result is kept.
  for spec in specs:
    name = recipe_name(spec)
    results[name] = _run_recipe(
      config,
      workdir,
      spec,
      model=model,
      variables=variables,
      spectra=spectra,
      orders=orders,
      full_widths=full_widths,
      full_cost=full_cost,
      input_shape=input_shape,
    )
    report()
  return report()


def _run_recipe(
  config,
  workdir,
  spec,
  *,
  model,
  variables,
  spectra,
  orders,
  full_widths,
  full_cost,
  input_shape,
):
  p = config.pfa
  name = recipe_name(spec)
  t0 = time.time()
  widths, solved = recipe_widths(spec, spectra, model, input_shape)
  keep = keep_sets(p.select, widths, orders, full_widths, int(p.seed))
  pruned, pruned_vars = slicing.prune(model, variables, keep)
  if p.select == 'scratch':
    pruned_vars = models.init(
      pruned, jax.random.key(int(config.seed) + 1), input_shape
    )
  cost = costs.count(pruned, input_shape)
  before = train.evaluate_model(config, pruned, pruned_vars)
  logging.info(
    'Recipe %s: params %d -> %d (%.2fx), FLOPs %.3g -> %.3g; acc before '
    'fine-tuning %.4f.',
    name,
    full_cost['params'],
    cost['params'],
    full_cost['params'] / cost['params'],
    full_cost['flops'],
    cost['flops'],
    before['accuracy'],
  )
  out = {
    'recipe': spec,
    **solved,
    'select': p.select,
    'widths': {n: int(w) for n, w in models.widths_of(pruned).items()},
    'kept': {n: [int(i) for i in k] for n, k in keep.items()},
    'params': cost['params'],
    'flops': cost['flops'],
    'params_ratio': cost['params'] / full_cost['params'],
    'flops_ratio': cost['flops'] / full_cost['flops'],
    'accuracy_pruned': before['accuracy'],
    'loss_pruned': before['loss'],
  }
  if float(config.finetune.num_epochs) > 0:
    ft = train.train_and_evaluate(
      finetune_config(config),
      os.path.join(workdir, name),
      init=(pruned, pruned_vars, models.arch_of(pruned)),
    )
    out['accuracy_finetuned'] = ft.metrics['eval_accuracy']
    out['loss_finetuned'] = ft.metrics['eval_loss']
    out['finetune_steps'] = ft.metrics['steps']
    metrics.write_json(
      os.path.join(workdir, name, 'result.json'),
      {**out, 'finetune': ft.metrics},
    )
  out['seconds'] = time.time() - t0
  return out


def _input_shape(config) -> tuple[int, int, int]:
  size = int(config.input.image_size)
  return (size, size, 3)


def _write_result(
  workdir,
  config,
  arch,
  full_cost,
  full_eval,
  full_widths,
  data_info,
  results,
  timings,
  t_start,
):
  result = {
    'job': 'compress',
    'model': config.model.name,
    'dataset': config.input.dataset,
    'arch': arch,
    'resnet_mode': config.pfa.resnet_mode,
    'select': config.pfa.select,
    'data': data_info,
    'full': {
      'widths': full_widths,
      'params': full_cost['params'],
      'flops': full_cost['flops'],
      'accuracy': full_eval['accuracy'],
      'loss': full_eval['loss'],
    },
    'recipes': results,
    'timings': {**timings, 'total_s': time.time() - t_start},
    **metrics.provenance(),
  }
  metrics.write_json(os.path.join(workdir, 'result.json'), result)
  return result
