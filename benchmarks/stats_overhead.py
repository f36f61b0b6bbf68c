"""Overhead of streaming PFA statistics on top of the plain forward pass.

  python -m benchmarks.stats_overhead [--batch 256] [--repeats 15]

For each model, times (a) the jitted eval forward pass and (b) the jitted
``pfa_jax.methods.pfa.stats_step`` (the same forward pass, sowing every prunable
layer's response and updating its streaming covariance), interleaved on the
same batches, the states carried from call to call as in
``pfa.collect_states``. ``overhead`` is the ratio of the two medians over
the rounds, ``overhead_paired`` the median of the per-round ratios (each
round times both back to back, so machine drift cancels). Target:
(b) / (a) <= 1.05. Writes
``benchmarks/results/stats_overhead.json``.
"""

import argparse
import functools
import statistics

import jax
import jax.numpy as jnp

from benchmarks import common
from pfa_jax import gram
from pfa_jax import hostmem
from pfa_jax import models
from pfa_jax import stats
from pfa_jax.methods import base
from pfa_jax.methods import pfa

MODELS = ('simple_cnn', 'vgg16_cifar', 'resnet56')


def bench(name: str, batch: int, repeats: int) -> dict:
  model = models.get_model(name, num_classes=10, conv_impl='auto')
  variables = models.init(model, jax.random.key(0), (32, 32, 3))
  names = base.select_groups(model, 'inner+stream')
  widths = models.widths_of(model)
  x = {
    'image': jax.random.normal(jax.random.key(1), (batch, 32, 32, 3)),
    'mask': jnp.ones((batch,), bool),
  }
  fwd = jax.jit(lambda v, b: model.apply(v, b['image'], train=False))
  # As the library's statistics loop runs it (pfa.collect_states): the
  # states are donated and carried, so every timed call is a steady-state
  # batch (the first batch also fixes each layer's shift and scale).
  step = jax.jit(
    functools.partial(pfa.stats_step, model=model, names=tuple(names)),
    donate_argnums=0,
  )
  states = jax.tree.map(
    jnp.array, stats.init_tree({n: widths[n] for n in names})
  )
  jax.block_until_ready(fwd(variables, x))
  states = jax.block_until_ready(step(states, variables, x))

  def run_stats():
    nonlocal states
    states = jax.block_until_ready(step(states, variables, x))

  t_fwd, t_stats = [], []
  with gram.blas_threads_for(widths[n] for n in names):
    for _ in range(repeats):  # Interleaved: drift hits both equally.
      t_fwd.append(
        common.median_time(lambda: jax.block_until_ready(fwd(variables, x)), 3)
      )
      t_stats.append(common.median_time(run_stats, 3))
  f, s = statistics.median(t_fwd), statistics.median(t_stats)
  paired = statistics.median(b / a for a, b in zip(t_fwd, t_stats))
  return {
    'model': name,
    'batch': batch,
    'layers': len(names),
    'rounds': repeats,
    'forward_img_s': batch / f,
    'stats_img_s': batch / s,
    'overhead': s / f - 1,
    'overhead_paired': paired - 1,  # median over rounds of stats / forward
    'samples_per_call': {'forward': batch, 'stats': batch},
  }


def main(argv=None) -> list[dict]:
  hostmem.retain_freed_memory()  # before the first JAX computation
  p = argparse.ArgumentParser()
  p.add_argument('--batch', type=int, default=256)
  p.add_argument('--repeats', type=int, default=15)
  p.add_argument('--models', default=','.join(MODELS))
  a = p.parse_args(argv)
  out = [bench(m, a.batch, a.repeats) for m in a.models.split(',')]
  common.print_table(
    [
      (
        r['model'],
        r['layers'],
        f'{r["forward_img_s"]:.0f}',
        f'{r["stats_img_s"]:.0f}',
        f'{100 * r["overhead"]:+.1f}%',
        f'{100 * r["overhead_paired"]:+.1f}%',
      )
      for r in out
    ],
    (
      'model',
      'layers',
      'fwd img/s',
      'fwd+stats img/s',
      'overhead',
      'paired',
    ),
  )
  path = common.write(
    'stats_overhead',
    {
      'target': 'overhead <= 5%',
      'load_average_start': list(common.START_LOAD),
      'loaded': common.loaded(),
      'results': out,
      'pass': all(r['overhead'] <= 0.05 for r in out),
    },
  )
  print(f'wrote {path}')
  return out


if __name__ == '__main__':
  main()
