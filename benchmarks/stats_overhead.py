"""Overhead of streaming PFA statistics on top of the plain forward pass.

  python -m benchmarks.stats_overhead [--batch 256] [--repeats 7]

For each model, times (a) the jitted eval forward pass and (b) the jitted
``pfa_jax.methods.pfa.stats_step`` (the same forward pass, sowing every prunable
layer's response and updating its streaming covariance), interleaved on the
same batches. Target: (b) / (a) <= 1.05. Writes
``benchmarks/results/stats_overhead.json``.
"""

import argparse
import functools

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
  step = jax.jit(
    functools.partial(pfa.stats_step, model=model, names=tuple(names))
  )
  states = stats.init_tree({n: widths[n] for n in names})
  jax.block_until_ready(fwd(variables, x))
  jax.block_until_ready(step(states, variables, x))
  t_fwd, t_stats = [], []
  # As the library's statistics loop runs (pfa.collect_states).
  with gram.blas_threads_for(widths[n] for n in names):
    for _ in range(repeats):  # Interleaved: drift hits both equally.
      t_fwd.append(
        common.median_time(lambda: jax.block_until_ready(fwd(variables, x)), 3)
      )
      t_stats.append(
        common.median_time(
          lambda: jax.block_until_ready(step(states, variables, x)), 3
        )
      )
  f, s = sorted(t_fwd)[repeats // 2], sorted(t_stats)[repeats // 2]
  return {
    'model': name,
    'batch': batch,
    'layers': len(names),
    'forward_img_s': batch / f,
    'stats_img_s': batch / s,
    'overhead': s / f - 1,
  }


def main(argv=None) -> list[dict]:
  hostmem.retain_freed_memory()  # before the first JAX computation
  p = argparse.ArgumentParser()
  p.add_argument('--batch', type=int, default=256)
  p.add_argument('--repeats', type=int, default=7)
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
      )
      for r in out
    ],
    ('model', 'layers', 'fwd img/s', 'fwd+stats img/s', 'overhead'),
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
