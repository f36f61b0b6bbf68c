"""Overhead of streaming PFA statistics on top of the plain forward pass.

  python -m benchmarks.stats_overhead [--batch 256] [--repeats 15]

For each model, times (a) the jitted eval forward pass and (b) the
library's statistics step ``pfa_jax.methods.pfa.collect_step`` (the same
forward pass, sowing every prunable layer's response, then the update of its
streaming covariance), interleaved on the same batches, the states carried
from call to call as in ``pfa.collect_states``; and, for the decision in
``collect_step``, (c) the same step as two programs (responses, then
update). ``overhead`` is the ratio of the two medians over
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
from pfa_jax import fused_bn
from pfa_jax import gram
from pfa_jax import hostmem
from pfa_jax import models
from pfa_jax import onednn
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
  # The library's statistics loop (pfa.collect_states) and, beside it, the
  # same step as two programs. The states are donated and carried, so every
  # timed call is a steady-state batch (the first also fixes the shifts).
  steps = {
    'stats': pfa.collect_step(model, names),
    'two_programs': pfa.two_program_step(model, names),
  }
  states = {
    k: jax.tree.map(jnp.array, stats.init_tree({n: widths[n] for n in names}))
    for k in steps
  }

  def run(k):
    states[k] = jax.block_until_ready(steps[k](states[k], variables, x))

  runs = {'forward': lambda: jax.block_until_ready(fwd(variables, x))}
  runs.update({k: functools.partial(run, k) for k in steps})
  times = {k: [] for k in runs}
  with gram.blas_threads_for(widths[n] for n in names):
    for fn in runs.values():
      fn()
    for _ in range(repeats):  # Interleaved: drift hits all equally.
      for k, fn in runs.items():
        times[k].append(common.median_time(fn, 3))
  med = {k: statistics.median(t) for k, t in times.items()}

  def paired(k):  # median over rounds of time / forward time
    return statistics.median(b / a for a, b in zip(times['forward'], times[k]))

  return {
    'model': name,
    'batch': batch,
    'layers': len(names),
    'rounds': repeats,
    'forward_img_s': batch / med['forward'],
    'stats_img_s': batch / med['stats'],
    'overhead': med['stats'] / med['forward'] - 1,
    'overhead_paired': paired('stats') - 1,
    'two_programs_overhead': med['two_programs'] / med['forward'] - 1,
    'two_programs_overhead_paired': paired('two_programs') - 1,
    'samples_per_call': {k: batch for k in runs},
  }


def kernels(batch: int, repeats: int) -> list[dict]:
  """Inference BN + ReLU with and without the fused spatial max, per map.

  ResNet-56's three stage shapes, with and without the residual add: what
  the response pass pays per layer over the plain forward pass (native
  kernels only; empty where they are not built).
  """
  rows = []
  if not onednn.available():
    return rows

  def plain(x, r, *bn):
    return fused_bn.infer(x, *bn, residual=r, relu=True, eps=1e-5)

  def with_max(x, r, *bn):
    return fused_bn.infer_with_max(x, *bn, residual=r, relu=True, eps=1e-5)

  fns = {'plain': jax.jit(plain), 'with_max': jax.jit(with_max)}
  for hw, c in ((32, 16), (16, 32), (8, 64)):
    shape = (batch, hw, hw, c)
    x = jax.random.normal(jax.random.key(2), shape)
    bn = (jnp.ones(c), jnp.zeros(c), jnp.zeros(c), jnp.ones(c))
    for residual in (False, True):
      args = (x, x if residual else None, *bn)
      calls = {
        k: functools.partial(lambda f, a: jax.block_until_ready(f(*a)), f, args)
        for k, f in fns.items()
      }
      times = {k: [] for k in calls}
      for call in calls.values():
        call()
      for _ in range(repeats):
        for k, call in calls.items():
          times[k].append(common.median_time(call, 5))
      med = {k: statistics.median(t) for k, t in times.items()}
      rows.append(
        {
          'shape': list(shape),
          'residual': residual,
          'plain_ms': 1e3 * med['plain'],
          'with_max_ms': 1e3 * med['with_max'],
          'ratio': med['with_max'] / med['plain'],
        }
      )
  return rows


def main(argv=None) -> list[dict]:
  hostmem.retain_freed_memory()  # before the first JAX computation
  p = argparse.ArgumentParser()
  p.add_argument('--batch', type=int, default=256)
  p.add_argument('--repeats', type=int, default=15)
  p.add_argument('--models', default=','.join(MODELS))
  a = p.parse_args(argv)
  out = [bench(m, a.batch, a.repeats) for m in a.models.split(',')]
  kern = kernels(a.batch, a.repeats)
  common.print_table(
    [
      (
        r['model'],
        r['layers'],
        f'{r["forward_img_s"]:.0f}',
        f'{r["stats_img_s"]:.0f}',
        f'{100 * r["overhead"]:+.1f}%',
        f'{100 * r["overhead_paired"]:+.1f}%',
        f'{100 * r["two_programs_overhead"]:+.1f}%',
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
      'two programs',
    ),
  )
  common.print_table(
    [
      (
        'x'.join(map(str, k['shape'])),
        k['residual'],
        f'{k["plain_ms"]:.3f}',
        f'{k["with_max_ms"]:.3f}',
        f'{k["ratio"]:.2f}',
      )
      for k in kern
    ],
    ('map', 'residual', 'BN ms', 'BN + max ms', 'ratio'),
  )
  path = common.write(
    'stats_overhead',
    {
      'target': 'overhead <= 5%',
      'load_average_start': list(common.START_LOAD),
      'loaded': common.loaded(),
      'results': out,
      'kernels': kern,
      'pass': all(r['overhead'] <= 0.05 for r in out),
    },
  )
  print(f'wrote {path}')
  return out


if __name__ == '__main__':
  main()
