"""Runner of the random-architecture study (configs/paper/fig1_random.py).

``run(config, workdir)`` is a sweep point (``config.runner``):

* ``study.part = 'base'``: trains the base SimpleCNN with ``config.seed``
  (``pfa_jax.main.run``, job ``train``). The base seed's model lives in the
  shared ``<sweep root>/_base`` and is the one every group starts from and
  measures footprints on; the other seeds only give the base accuracy's
  spread. One row.
* ``study.part = 'group'``: K random architectures at the footprint of
  PFA recipe ``study.recipe`` on the base model, initialised by
  ``study.init`` and trained with the base schedule on the same batches;
  one row per variant (accuracy, change vs the base, params, widths).
* ``study.widths = 'pfa'`` (the paper's Fig. 1 PFA points): one network
  with PFA's own widths for ``study.recipe``, from scratch or from PFA's
  Pearson selection, trained on ``config.seed``'s data order. Recipe
  ``'full'`` keeps every filter: with ``init='selection'`` it is the base
  model trained for the variants' extra epochs, the control for "a
  compressed net beats the full one" (a fine-tuned net has trained longer).

Footprints (PFA's params for every recipe) and the Pearson removal orders
are computed once from the base model and cached in ``_base/``. Variant
``i`` of group ``g`` uses the seed ``crc32(recipe) + 1000 g + i`` for its
widths and keep-sets, so scratch and selection runs of the same index share
their widths, and a point is reproducible on its own.

Training path (``study.path='auto'``): the cheaper of vmapped masked
training, K sequential masked runs (one program) and K sequential sliced
runs (K programs), predicted from ``benchmarks/results/vmap_train_<backend>
.json`` for this run's K and step count, compiles included; without that
file, vmap on accelerators and sequential masked runs on CPU. All three
give the same result up to float summation order (tests/batched_test.py),
so the path is recorded in every row but is not part of the experiment.

On a cluster, run the base points first (they are the sweep's first
points; ``--task_index 0 --num_tasks 1`` on one machine), since groups
train the base themselves when it is missing.
"""

import json
import os
import time
import zlib

import jax
import numpy as np

from experiments import base_model
from pfa_jax import batched
from pfa_jax import checkpoint
from pfa_jax import costs
from pfa_jax import input_pipeline
from pfa_jax import methods
from pfa_jax import optim
from pfa_jax import sampling
from pfa_jax import select
from pfa_jax import slicing
from pfa_jax.methods import pfa as pfa_method

PATHS = ('vmap', 'masked', 'sliced')
WIDTHS = ('random', 'pfa')
FULL = 'full'  # the control: all filters, trained like the variants
_BENCH = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
  'benchmarks',
  'results',
)


def run(config, workdir):
  if config.study.part == 'base':
    return _base_point(config, workdir)
  if config.study.part != 'group':
    raise ValueError(
      f"study.part must be 'base' or 'group', got {config.study.part!r}."
    )
  return _group_point(config, workdir)


def base_dir(config, workdir) -> str:
  return config.study.base_workdir or os.path.join(
    os.path.dirname(os.path.abspath(workdir)), '_base'
  )


def _read(path):
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _write(path, obj):
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


def ensure_base(config, workdir) -> tuple[str, dict]:
  """The shared base model's directory and train result (trains if absent)."""
  d = base_dir(config, workdir)
  return d, base_model.trained(config, d, seed=int(config.study.base_seed))


def _base_point(config, workdir):
  if int(config.seed) == int(config.study.base_seed):
    _, res = ensure_base(config, workdir)
  else:
    res = base_model.trained(config, workdir)
  return {
    'part': 'base',
    'seed': int(config.seed),
    'accuracy': res['eval_accuracy'],
    'params': res['num_params'],
    'steps': res['steps'],
  }


def _stats_batches(config):
  n = int(config.compress.num_batches) or None
  return list(
    input_pipeline.get_split_iter(
      config,
      'train',
      augment=False,
      batch_size=int(config.compress.batch_size),
      num_batches=n,
    )
  )


def footprints(config, d, model, variables, shape) -> dict:
  """``{recipe: {'params', 'widths'}}`` of PFA on the base (cached)."""
  path = os.path.join(d, 'footprints.json')
  cached = _read(path) or {}
  from configs.paper import fig1_random  # noqa: PLC0415

  missing = [r for r in fig1_random.RECIPES if r not in cached]
  if missing:
    batches = _stats_batches(config)
    for r in missing:
      out = methods.prune(
        'pfa', model, variables, batches=batches, recipe=r, input_shape=shape
      )
      cached[r] = {
        'params': costs.count(out.model, shape)['params'],
        'widths': {n: len(k) for n, k in out.keep.items()},
      }
    _write(path, cached)
  return cached


def orders(config, d, model, variables, groups) -> dict:
  """Pearson removal orders of the base model's groups (cached)."""
  path = os.path.join(d, 'orders.json')
  cached = _read(path)
  if cached is None:
    stats = pfa_method.collect(
      model,
      variables,
      _stats_batches(config),
      groups,
      {'stats_dtype': 'float32'},
    )
    cached = {n: np.asarray(stats['orders'][n]).tolist() for n in groups}
    _write(path, cached)
  return {n: np.asarray(v) for n, v in cached.items()}


def choose_path(
  requested: str, k: int, num_steps: int, backend=None, bench=None
) -> str:
  """The training path for K variants of ``num_steps`` (module docstring).

  ``bench`` is a ``benchmarks/vmap_train.py`` result (default: this
  backend's committed one, if any).
  """
  if requested != 'auto':
    if requested not in PATHS:
      raise ValueError(f'study.path must be auto or one of {PATHS}.')
    return requested
  backend = backend or jax.default_backend()
  if bench is None:
    bench = _read(os.path.join(_BENCH, f'vmap_train_{backend}.json'))
  if bench is None:
    return 'masked' if backend == 'cpu' else 'vmap'
  # The smallest measured K >= k: vmap's cost is not linear in K (on CPU it
  # grows faster), so never extrapolate it upwards from a smaller K.
  above = [r for r in bench['rows'] if r['K'] >= k]
  row = (
    min(above, key=lambda r: r['K'])
    if above
    else max(bench['rows'], key=lambda r: r['K'])
  )
  scale = k / row['K']

  def wall(p):
    r = row[p]
    comp = r['compile_s'] * (scale if p == 'sliced' else 1.0)
    per_step = r['step_s_all_variants'] * scale
    return num_steps * per_step + comp

  return min(PATHS, key=wall)


def _group_point(config, workdir):
  st = config.study
  d, base_res = ensure_base(config, workdir)
  model, variables, _, _ = checkpoint.restore_model(os.path.join(d, 'train'))
  variables = jax.device_get(variables)
  train_iter, eval_iter_fn, info = input_pipeline.get_datasets(config)
  shape = tuple(info.image_shape)
  groups = model.structure().names
  full_params = costs.count(model, shape)['params']
  if st.widths not in WIDTHS:
    raise ValueError(
      f'study.widths must be one of {WIDTHS}, got {st.widths!r}.'
    )
  if st.recipe == FULL:
    if st.widths != 'pfa':
      raise ValueError(f"study.recipe={FULL!r} needs study.widths='pfa'.")
    fp = {'params': full_params}
  else:
    fp = footprints(config, d, model, variables, shape)[st.recipe]
  n_total, k = int(st.num_variants), int(st.group_size)
  if st.widths == 'pfa':
    n_total, k = 1, 1  # one architecture; seeds are separate points
  first = int(st.group) * k
  idx = range(first, min(first + k, n_total))
  if not idx:
    raise ValueError(f'study.group {st.group} is past N = {n_total}.')
  pearson = (
    orders(config, d, model, variables, groups)
    if (st.init == 'selection')
    else None
  )
  struct = model.structure()
  full_w = {n: int(model.widths[struct.group(n).index]) for n in groups}
  blocks = {n: struct.group(n).blocks for n in groups}
  plans, seeds = [], []
  for i in idx:
    if st.widths == 'pfa':
      # PFA's own widths (or all of them, the 'full' control); the seed
      # varies the data order and the scratch init, not the architecture.
      seed = zlib.crc32(f'pfa:{st.recipe}'.encode()) + int(config.seed)
      w = full_w if st.recipe == FULL else fp['widths']
    else:
      seed = zlib.crc32(st.recipe.encode()) + 1000 * int(st.group) + i
      w = sampling.sample_widths(
        model, shape, fp['params'], seed=seed, tol=float(st.tol)
      )
    if pearson is not None:
      keep = select.keep_sets(pearson, w, blocks)
    else:
      keep = sampling.random_keep(full_w, w, seed, blocks)
    plans.append(keep)
    seeds.append(seed)
  variants = [
    jax.device_get(
      batched.variant(
        model,
        variables,
        p,
        init=st.init,
        rng=jax.random.key(s),
        input_shape=shape,
      )
    )
    for p, s in zip(plans, seeds)
  ]
  spe = info.steps_per_epoch
  num_steps = optim.num_train_steps(config, spe)
  lr_fn = optim.create_learning_rate_fn(config, spe)
  batches = [next(train_iter) for _ in range(num_steps)]
  eval_batches = list(eval_iter_fn())
  path = choose_path(st.path, len(plans), num_steps)
  rng = jax.random.split(jax.random.key(int(config.seed)))[1]
  t0 = time.time()
  accs = _train_variants(
    config,
    model,
    variants,
    plans,
    batches,
    eval_batches,
    path,
    num_steps=num_steps,
    lr_fn=lr_fn,
    rng=rng,
  )
  train_s = time.time() - t0
  base_acc = float(base_res['eval_accuracy'])
  rows = []
  for i, plan, seed, acc in zip(idx, plans, seeds, accs):
    widths = {n: len(v) for n, v in plan.items()}
    params = costs.count(
      model.clone(widths=tuple(widths[n] for n in groups)), shape
    )['params']
    rows.append(
      {
        'recipe': st.recipe,
        'init': st.init,
        'widths_from': st.widths,
        'data_seed': int(config.seed),
        'variant': i,
        'seed': seed,
        'target_params': fp['params'],
        'params': params,
        'footprint': params / full_params,
        'accuracy': acc['accuracy'],
        'delta_accuracy': acc['accuracy'] - base_acc,
        'base_accuracy': base_acc,
        'widths': json.dumps([widths[n] for n in groups]),
        'path': path,
        'steps': num_steps,
        'train_s_group': train_s,
      }
    )
  return rows


def _train_variants(
  config, model, variants, plans, batches, eval_batches, path, **kw
):
  if path == 'vmap':
    states, _ = batched.train(
      config,
      model,
      [v for v, _ in variants],
      [m for _, m in variants],
      batches,
      **kw,
    )
    return batched.evaluate(states, eval_batches)
  out = []
  for (v, m), plan in zip(variants, plans):
    if path == 'masked':
      states, _ = batched.train(config, model, [v], [m], batches, **kw)
    else:
      small_model, small = slicing.prune(model, v, plan)
      states, _ = batched.train(
        config, small_model, [small], None, batches, **kw
      )
    out += batched.evaluate(states, eval_batches)
  return out
