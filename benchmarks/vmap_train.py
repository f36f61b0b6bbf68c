"""Training K pruned variants: vmapped masked vs sequential masked vs sliced.

  python -m benchmarks.vmap_train [--ks 1,4,16] [--width_mult 0.333]

For a SimpleCNN (``--width_mult`` of the paper's widths, dropout off, batch
``--batch`` of 32x32x3) and K random architectures at ``--footprint`` of its
parameters (``pfa_jax.sampling``), times one SGD step of

* ``vmap``: the K masked variants in one jitted, vmapped step
  (``pfa_jax.batched``);
* ``masked``: one masked variant alone (the dense program); K sequential
  masked runs cost K of these, with one compile for all;
* ``sliced``: each physically pruned variant alone; K sequential sliced runs
  cost the sum of their step times and K compiles (every variant has its
  own shapes). Measured on ``--sliced_sample`` variants and scaled to K.

Reported per K: images/s summed over the variants (``total_img_s``), per
variant (``per_variant_img_s``), compile seconds, and the wall time a study
of ``--study_steps`` steps per variant would take with each path (compiles
included). Repetitions interleave the paths and report medians, since this
shared machine's speed drifts. ``loadavg`` is recorded before and after;
``loaded`` is true when the machine was busy at the start
(``benchmarks.common.loaded``; numbers then overstate times).

Writes ``benchmarks/results/vmap_train_<backend>.json``.
"""

import argparse
import os
import statistics
import time

import jax
import ml_collections
import numpy as np

from benchmarks import common
from pfa_jax import batched
from pfa_jax import hostmem
from pfa_jax import models
from pfa_jax import optim
from pfa_jax import sampling
from pfa_jax import slicing
from pfa_jax import steps

_SHAPE = (32, 32, 3)


def _config():
  return ml_collections.ConfigDict(
    {
      'optim': {
        'name': 'sgd',
        'lr': 0.05,
        'momentum': 0.9,
        'nesterov': True,
        'weight_decay': 5e-4,
        'bn_l1': 0.0,
      }
    }
  )


def _batch(b):
  rng = np.random.default_rng(0)
  return {
    'image': rng.normal(size=(b, *_SHAPE)).astype(np.float32),
    'label': rng.integers(0, 10, size=b).astype(np.int32),
    'mask': np.ones(b, np.float32),
  }


def _timed_step(step, state, batch, rng, masks):
  t = time.perf_counter()
  state, m = step(state, batch, rng, masks)
  jax.block_until_ready(m)
  return state, time.perf_counter() - t


def main(argv=None):
  hostmem.retain_freed_memory()  # before the first JAX computation
  p = argparse.ArgumentParser()
  p.add_argument('--ks', default='1,4,16')
  p.add_argument('--width_mult', type=float, default=1 / 3)
  p.add_argument('--batch', type=int, default=128)
  p.add_argument('--footprint', type=float, default=0.3)
  p.add_argument('--repeats', type=int, default=4)
  p.add_argument('--sliced_sample', type=int, default=3)
  p.add_argument('--study_steps', type=int, default=200)
  p.add_argument('--conv_impl', default='auto')
  p.add_argument('--out', default='')
  args = p.parse_args(argv)
  ks = [int(k) for k in args.ks.split(',')]
  load_before = os.getloadavg()
  model = models.get_model(
    'simple_cnn',
    num_classes=10,
    width_mult=args.width_mult,
    dropout=0.0,
    conv_impl=args.conv_impl,
  )
  dense = models.init(model, jax.random.key(0), _SHAPE)
  full = models.widths_of(model)
  lr_fn = optim.learning_rate_schedule(
    base_lr=0.05, schedule='constant', num_steps=1000
  )
  config = _config()
  batch = _batch(args.batch)
  rng = jax.random.key(1)
  kmax = max(ks)
  plans = []
  for i in range(kmax):
    w = sampling.sample_widths(
      model, _SHAPE, args.footprint, seed=i, check=False
    )
    plans.append(sampling.random_keep(full, w, i))
  # On the host: donated device states must never alias these.
  variants = [jax.device_get(batched.variant(model, dense, pl)) for pl in plans]

  # Programs: one vmapped per K, one dense masked, one per sliced variant.
  runners = {}
  compile_s = {}
  for k in ks:
    states = batched.create_states(
      config, model, [v for v, _ in variants[:k]], lr_fn=lr_fn
    )
    masks = batched.stack([m for _, m in variants[:k]])
    step = batched.make_train_step(lr_fn)
    states, dt = _timed_step(step, states, batch, rng, masks)
    compile_s[f'vmap{k}'] = dt
    runners[f'vmap{k}'] = [step, states, masks]
  single = jax.jit(
    lambda s, b, r, m: steps.train_step(s, b, r, lr_fn=lr_fn, param_mask=m),
    donate_argnums=0,
  )
  v0, m0 = variants[0]
  st = steps.create_train_state(
    rng, config, model, _SHAPE, lr_fn=lr_fn, variables=v0
  )
  st, compile_s['masked'] = _timed_step(single, st, batch, rng, m0)
  runners['masked'] = [single, st, m0]
  sliced_compile = []
  for i in range(min(args.sliced_sample, kmax)):
    sm, sv = slicing.prune(model, variants[i][0], plans[i])
    step = jax.jit(
      lambda s, b, r, m: steps.train_step(s, b, r, lr_fn=lr_fn),
      donate_argnums=0,
    )
    st = steps.create_train_state(
      rng, config, sm, _SHAPE, lr_fn=lr_fn, variables=sv
    )
    st, dt = _timed_step(step, st, batch, rng, None)
    sliced_compile.append(dt)
    runners[f'sliced{i}'] = [step, st, None]

  times = {name: [] for name in runners}
  for _ in range(args.repeats):  # interleaved round-robin
    for name, r in runners.items():
      r[1], dt = _timed_step(r[0], r[1], batch, rng, r[2])
      times[name].append(dt)
  med = {n: statistics.median(t) for n, t in times.items()}
  t_sliced = statistics.mean(med[n] for n in med if n.startswith('sliced'))
  c_sliced = statistics.mean(sliced_compile)
  b, n_steps = args.batch, args.study_steps
  rows = []
  for k in ks:
    paths = {
      'vmap': (med[f'vmap{k}'], compile_s[f'vmap{k}']),
      'masked': (k * med['masked'], compile_s['masked']),
      'sliced': (k * t_sliced, k * c_sliced),
    }
    row = {'K': k}
    for path, (t_round, c) in paths.items():
      row[path] = {
        'step_s_all_variants': t_round,
        'total_img_s': k * b / t_round,
        'per_variant_img_s': b / t_round,
        'compile_s': c,
        'study_wall_s': n_steps * t_round + c,
      }
    row['fastest_steady'] = max(paths, key=lambda p: row[p]['total_img_s'])
    row['fastest_study'] = min(paths, key=lambda p: row[p]['study_wall_s'])
    rows.append(row)
  load_after = os.getloadavg()
  payload = {
    'args': vars(args),
    'widths_full': full,
    'footprint_params': args.footprint,
    'median_step_s': med,
    'sliced_compile_s': sliced_compile,
    'rows': rows,
    'loadavg_before': load_before,
    'loadavg_after': load_after,
    'loaded': common.loaded(),
  }
  name = args.out or f'vmap_train_{jax.default_backend()}'
  path = common.write(name, payload)
  header = (
    'K',
    'path',
    'total img/s',
    'per-variant img/s',
    'compile s',
    f'study s ({n_steps} steps)',
  )
  table = []
  for row in rows:
    for path_name in ('vmap', 'masked', 'sliced'):
      r = row[path_name]
      table.append(
        (
          row['K'],
          path_name,
          f'{r["total_img_s"]:.0f}',
          f'{r["per_variant_img_s"]:.0f}',
          f'{r["compile_s"]:.1f}',
          f'{r["study_wall_s"]:.0f}',
        )
      )
  common.print_table(table, header)
  print(f'loadavg {load_before} -> {load_after}; wrote {path}')


if __name__ == '__main__':
  main()
