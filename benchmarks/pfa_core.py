"""Benchmark of the PFA core (stats, spectra, recipes, selection).

Run from the repository root::

  python -m benchmarks.pfa_core

Prints a table and writes ``benchmarks/results/pfa_core.json`` with machine
info, versions, the date, each target and what was achieved. Targets (from
the authors' tool measured on the same machine: 28.6 s for job 1 and 286 s to
select half of a 4096-unit layer):

1. ``analyze()`` (spectra, KL + 8 energy recipes, unit selection) for the 14
   VGG-16-CIFAR layers with M = 10,000 correlated synthetic responses: <= 1 s.
2. Full removal order of one 4096-unit layer: <= 2 s.
3. Streaming ``stats.update`` throughput at C = 512 and 4096 >= 0.8x a
   same-run NumPy float32 ``X.T @ X`` over the same batches (interleaved
   repetitions, medians).
4. float32 relative error (1.2M samples, mean/std = 100) vs float64, with
   the naive float32 sum(x) / sum(x x^T) path for contrast.

Timings on a shared 2-core machine are noisy; the load average is recorded.
"""

import datetime
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from pfa_jax import analysis
from pfa_jax import select
from pfa_jax import stats

VGG_WIDTHS = (64, 64, 128, 128, 256, 256, 256) + (512,) * 7
_OUT = os.path.join(os.path.dirname(__file__), 'results', 'pfa_core.json')


def _synthetic(rng, m, c):
  r = max(4, c // 8)
  x = rng.standard_normal((m, r), dtype=np.float32) @ rng.standard_normal(
    (r, c), dtype=np.float32
  )
  return np.maximum(x + 0.3 * rng.standard_normal((m, c), dtype=np.float32), 0)


def bench_analyze(reps=3):
  rng = np.random.default_rng(0)
  resp = {
    f'conv{i}' if i < 13 else 'fc': _synthetic(rng, 10_000, c)
    for i, c in enumerate(VGG_WIDTHS)
  }
  t0 = time.perf_counter()
  out = analysis.analyze(resp)
  cold = time.perf_counter() - t0
  times, cpu = [], []
  for _ in range(reps):
    t0, p0 = time.perf_counter(), time.process_time()
    analysis.analyze(resp)
    times.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - p0)
  kl_widths = {k: v['width'] for k, v in out['recipes']['kl'].items()}
  return {
    'target_s': 1.0,
    'cold_s_incl_jit_compile': cold,
    'warm_median_s': float(np.median(times)),
    'warm_times_s': times,
    'warm_cpu_s_median': float(np.median(cpu)),
    'note': 'wall time after one warm-up call (jit compile of stats.update '
    'per distinct width is in the cold time); CPU seconds summed over threads',
    'kl_widths': kl_widths,
    'pass': bool(np.median(times) <= 1.0),
  }


def bench_selection(reps=3):
  rng = np.random.default_rng(1)
  c = 4096
  x = rng.standard_normal((6000, 256), dtype=np.float32) @ rng.standard_normal(
    (256, c), dtype=np.float32
  )
  x += 0.3 * rng.standard_normal(x.shape, dtype=np.float32)
  s = stats.update(stats.init(c), x)
  cov = stats.covariance(s)
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    order = select.removal_order(cov)
    times.append(time.perf_counter() - t0)
  assert sorted(order.tolist()) == list(range(c))
  med = float(np.median(times))
  return {
    'target_s': 2.0,
    'median_s': med,
    'times_s': times,
    'pass': med <= 2.0,
  }


def bench_throughput(c, num_batches, reps, batch=2048):
  rng = np.random.default_rng(2)
  xs = [
    (50.0 + rng.standard_normal((batch, c), dtype=np.float32))
    for _ in range(num_batches)
  ]
  xs_dev = [jnp.asarray(x) for x in xs]
  state = stats.update(stats.init(c), xs_dev[0])  # compile
  jax.block_until_ready(state)
  ours, ref, ours_cpu, ref_cpu = [], [], [], []
  for _ in range(reps):
    t0, p0 = time.perf_counter(), time.process_time()
    state = stats.init(c)
    for x in xs_dev:
      state = stats.update(state, x)
    jax.block_until_ready(state)
    ours.append(time.perf_counter() - t0)
    ours_cpu.append(time.process_time() - p0)
    t0, p0 = time.perf_counter(), time.process_time()
    acc = np.zeros((c, c), np.float32)
    for x in xs:
      acc += x.T @ x
    ref.append(time.perf_counter() - t0)
    ref_cpu.append(time.process_time() - p0)
  ratios = [r / o for r, o in zip(ref, ours, strict=True)]
  n = batch * num_batches
  return {
    'units': c,
    'batch': batch,
    'num_batches': num_batches,
    'ours_median_s': float(np.median(ours)),
    'numpy_xtx_median_s': float(np.median(ref)),
    'ours_samples_per_s': n / float(np.median(ours)),
    'numpy_samples_per_s': n / float(np.median(ref)),
    'ratio_median': float(np.median(ratios)),
    'ratios': ratios,
    'cpu_time_ratio_median': float(np.median(ref_cpu) / np.median(ours_cpu)),
    'target_ratio': 0.8,
    'pass': bool(np.median(ratios) >= 0.8),
  }


def bench_float32_error(c=64, batch=2048, num_batches=600):
  key = jax.random.PRNGKey(0)
  mix = jax.random.normal(jax.random.PRNGKey(1), (c, c)) / np.sqrt(c)

  @jax.jit
  def step(state, s1, s2, i):
    z = jax.random.normal(jax.random.fold_in(key, i), (batch, c))
    x = 100.0 + z @ mix  # std ~ 1
    s2 = s2 + jnp.matmul(x.T, x, precision=jax.lax.Precision.HIGHEST)
    return stats.update(state, x), s1 + x.sum(0), s2, x

  state = stats.init(c)
  n1 = jnp.zeros((c,))
  n2 = jnp.zeros((c, c))
  e1 = np.zeros(c)
  e2 = np.zeros((c, c))
  for i in range(num_batches):
    state, n1, n2, x = step(state, n1, n2, i)
    xd = np.asarray(x, np.float64) - 100.0  # exact in float64
    e1 += xd.sum(0)
    e2 += xd.T @ xd
  m = batch * num_batches
  d = e1 / m
  ref = (e2 - m * np.outer(d, d)) / (m - 1)
  n1 = np.asarray(n1, np.float64)
  naive = (np.asarray(n2, np.float64) - np.outer(n1, n1) / m) / (m - 1)

  def rel(a):
    return float(np.linalg.norm(a - ref) / np.linalg.norm(ref))

  ours = rel(stats.covariance(state))
  return {
    'samples': m,
    'units': c,
    'mean_over_std': 100.0,
    'ours_rel_error_fro': ours,
    'naive_float32_rel_error_fro': rel(naive),
    'target_rel_error': 1e-6,
    'pass': ours <= 1e-6,
  }


def main():
  results = {
    'date': datetime.datetime.now(datetime.UTC).isoformat(),
    'machine': {
      'platform': platform.platform(),
      'processor': platform.processor(),
      'cpu_count': os.cpu_count(),
      'python': sys.version.split()[0],
      'load_avg_at_start': os.getloadavg(),
    },
    'versions': {'jax': jax.__version__, 'numpy': np.__version__},
    'devices': [str(d) for d in jax.devices()],
  }
  results['1_analyze_vgg16'] = bench_analyze()
  results['2_removal_order_4096'] = bench_selection()
  results['3_throughput'] = {
    '512': bench_throughput(512, num_batches=20, reps=5),
    '4096': bench_throughput(4096, num_batches=3, reps=3),
  }
  results['4_float32_error'] = bench_float32_error()
  results['machine']['load_avg_at_end'] = os.getloadavg()
  results['notes'] = [
    'The 2-core machine was shared with other jobs (see load averages), '
    'so wall times are inflated; CPU seconds are recorded as well.',
    'C=4096 throughput: NumPy uses SSYRK for X.T @ X (half the FLOPs) and '
    "OpenBLAS's kernel is faster per FLOP than XLA:CPU's; stats.update "
    'computes a block upper-triangular Gram (10/16 of the FLOPs) plus the '
    'centring and the compensated merge.',
  ]

  rows = [
    (
      '1 analyze VGG16 (warm)',
      '<= 1 s',
      f'{results["1_analyze_vgg16"]["warm_median_s"]:.3f} s '
      f'(cold {results["1_analyze_vgg16"]["cold_s_incl_jit_compile"]:.2f} s)',
      results['1_analyze_vgg16']['pass'],
    ),
    (
      '2 removal order C=4096',
      '<= 2 s',
      f'{results["2_removal_order_4096"]["median_s"]:.3f} s',
      results['2_removal_order_4096']['pass'],
    ),
  ]
  for c, r in results['3_throughput'].items():
    rows.append(
      (
        f'3 update throughput C={c}',
        '>= 0.8x numpy',
        f'{r["ratio_median"]:.2f}x ({r["ours_samples_per_s"]:.0f}/s)',
        r['pass'],
      )
    )
  e = results['4_float32_error']
  rows.append(
    (
      '4 float32 rel. error',
      '<= 1e-6',
      f'{e["ours_rel_error_fro"]:.2e} (naive {e["naive_float32_rel_error_fro"]:.1e})',
      e['pass'],
    )
  )
  for name, target, got, ok in rows:
    print(f'{name:<28} {target:<14} {got:<36} {"PASS" if ok else "FAIL"}')
  os.makedirs(os.path.dirname(_OUT), exist_ok=True)
  with open(_OUT, 'w') as f:
    json.dump(results, f, indent=2)
  print(f'wrote {_OUT}')


if __name__ == '__main__':
  main()
