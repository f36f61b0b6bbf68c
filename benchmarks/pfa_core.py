"""Benchmark of the PFA core (stats, spectra, recipes, selection).

Run from the repository root::

  python -m benchmarks.pfa_core [--at-scale] [--at-scale-samples 1200000]
    [--reference ssyrk|device] [--name pfa_core]

Prints a table and writes ``benchmarks/results/pfa_core.json`` (the folder:
``benchmarks.common.RESULTS``; the stem: ``--name``) with machine info,
versions, load averages (``loaded`` when the machine was busy at the start,
``benchmarks.common.loaded``), each target and what was achieved:

1. ``analyze()`` (spectra, KL + 8 energy recipes, unit selection) for the 14
   VGG-16-CIFAR layers with M = 10,000 correlated synthetic responses: <= 1 s.
2. Full removal order of one 4096-unit layer: <= 2 s.
3. Streaming ``stats.update`` throughput at C = 512 (>= 0.8x) and 4096
   (>= 1.0x) of a same-run SciPy float32 SSYRK accumulating the same batches
   (``scipy.linalg.blas.ssyrk``, beta = 1, in place; interleaved repetitions,
   medians). Beside it, the issue's own yardstick: NumPy's ``x.T @ x`` per
   batch (not accumulated), which is an SSYRK plus a mirror of the triangle
   into a fresh [C, C] array. Both the public ``stats.update`` (not donating: XLA copies the
   [C, C] state once per call) and a donating ``jit`` (as ``compress`` and
   ``methods.pfa`` run it) are timed.
4. float32 relative error (1.2M samples, mean/std = 100) vs float64, with
   the naive float32 sum(x) / sum(x x^T) path for contrast.
5. ``--at-scale``: the paper's complexity example, C = 4096 over M = 1.2M
   samples streamed in batches of 2048 (a pool of 8 generated batches is
   cycled, so generation is not timed), plus C = 64/128/256/512. Each batch
   is fed to the donating update and to SSYRK, interleaved; the target is
   <= 1.2x SSYRK's time over the same batches.

Off the CPU (``jax.default_backend()`` 'gpu'), a host BLAS is no yardstick
for the device: sections 3 and 5 take ``--reference device`` (the default
there), a jitted, donated ``acc + x.T @ x`` (float32, ``Precision.HIGHEST``;
in section 3 also as one ``lax.dot_general``) over the same device-resident
batches, interleaved with ``stats.update``; the figure is ``stats.update``'s
time over the reference's (``device_add``). Sections 1 and 2 are NumPy/LAPACK
code and still run on the host CPU (``measured_on``); section 4 runs
anywhere. The results go to ``pfa_core_gpu.json`` unless ``--name`` says
otherwise.
"""

import argparse
import datetime
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg.blas
from jax import lax

from benchmarks import common
from pfa_jax import analysis
from pfa_jax import hostmem
from pfa_jax import native
from pfa_jax import select
from pfa_jax import stats

VGG_WIDTHS = (64, 64, 128, 128, 256, 256, 256) + (512,) * 7
THROUGHPUT = ((512, 20), (4096, 8))  # section 3: (units, batches)
REFERENCES = ('ssyrk', 'device')
# Sections 1 and 2 are NumPy/LAPACK code, whatever JAX's backend is.
_HOST = 'host CPU (NumPy/LAPACK)'


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
    'note': 'wall time after one warm-up call; the first call is the cold '
    'time (the key keeps its old name: analyze() is NumPy/LAPACK on the '
    'host and compiles nothing now); CPU seconds summed over threads',
    'kl_widths': kl_widths,
    'measured_on': _HOST,
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
    'measured_on': _HOST,
    'pass': med <= 2.0,
  }


def _ssyrk_acc(c):
  acc = np.zeros((c, c), np.float32, order='F')

  def add(x):
    nonlocal acc
    acc = scipy.linalg.blas.ssyrk(
      1.0, x.T, beta=1.0, c=acc, trans=0, lower=1, overwrite_c=1
    )
    return acc

  return add


_DEVICE_GRAMS = {
  'matmul': lambda x: jnp.matmul(x.T, x, precision=lax.Precision.HIGHEST),
  'dot_general': lambda x: lax.dot_general(
    x, x, (((0,), (0,)), ((), ())), precision=lax.Precision.HIGHEST
  ),
}


def device_add(kind='matmul'):
  """The device yardstick: a jitted ``acc + x^T x`` donating ``acc``.

  Args:
    kind: 'matmul' (``x.T @ x``) or 'dot_general' (one ``lax.dot_general``
      contracting the batch axes); float32 at ``Precision.HIGHEST`` (no
      TF32), as ``stats.update`` computes its product off the CPU.

  Returns:
    ``add(acc [C, C], x [N, C]) -> acc + x^T x``, ``acc`` donated.
  """
  gram = _DEVICE_GRAMS[kind]
  return jax.jit(lambda acc, x: acc + gram(x), donate_argnums=0)


def _device_zeros(c):
  return jnp.zeros((c, c), jnp.float32)


def _device_acc(c, add_fn):
  """``add(x)``: ``add_fn`` into a [C, C] device accumulator, blocking."""
  acc = _device_zeros(c)

  def add(x):
    nonlocal acc
    acc = jax.block_until_ready(add_fn(acc, x))
    return acc

  return add


def _throughput_batches(c, num_batches, batch):
  rng = np.random.default_rng(2)
  return [
    (50.0 + rng.standard_normal((batch, c), dtype=np.float32))
    for _ in range(num_batches)
  ]


def _check_reference(reference):
  if reference not in REFERENCES:
    raise ValueError(
      f'reference must be one of {REFERENCES}, got {reference!r}'
    )


def bench_throughput(c, num_batches, reps, batch=2048, reference='ssyrk'):
  """Section 3 against ``reference``: 'ssyrk' (host BLAS) or 'device'."""
  _check_reference(reference)
  if reference == 'device':
    return _throughput_device(c, num_batches, reps, batch)
  xs = _throughput_batches(c, num_batches, batch)
  xs_dev = [jnp.asarray(x) for x in xs]
  donated = jax.jit(stats.update.__wrapped__, donate_argnums=0)
  jax.block_until_ready(stats.update(stats.init(c), xs_dev[0]))  # compile
  jax.block_until_ready(donated(stats.init(c), xs_dev[0]))
  times = {'update': [], 'update_donated': [], 'ssyrk': [], 'numpy_xtx': []}
  load0 = os.getloadavg()
  for _ in range(reps):
    for name, fn in (('update', stats.update), ('update_donated', donated)):
      t0 = time.perf_counter()
      state = stats.init(c)
      for x in xs_dev:
        state = fn(state, x)
      jax.block_until_ready(state)
      times[name].append(time.perf_counter() - t0)
    add = _ssyrk_acc(c)
    t0 = time.perf_counter()
    for x in xs:
      add(x)
    times['ssyrk'].append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    for x in xs:
      x.T @ x
    times['numpy_xtx'].append(time.perf_counter() - t0)
  med, sizes = _timed_sizes(c, batch, num_batches, times)
  target = 1.0 if c >= 4096 else 0.8
  load = os.getloadavg()
  return {
    **sizes,
    'ratio_update': med['ssyrk'] / med['update'],
    'ratio_update_donated': med['ssyrk'] / med['update_donated'],
    'ratio_update_donated_vs_numpy_xtx': (
      med['numpy_xtx'] / med['update_donated']
    ),
    'target_ratio': target,
    'load_avg': [load0, load],
    'loaded': common.loaded(),
    'native_kernel': native.status(),
    'pass': bool(med['ssyrk'] / med['update_donated'] >= target),
  }


def _timed_sizes(c, batch, num_batches, times):
  """Medians and the fields both references report: sizes, times, GFLOP/s."""
  med = {k: float(np.median(v)) for k, v in times.items()}
  flops = float(c) * c * batch * num_batches  # SYRK: C^2 N multiply-adds / 2
  return med, {
    'units': c,
    'batch': batch,
    'num_batches': num_batches,
    'samples_both_sides': batch * num_batches,
    'median_s': med,
    'times_s': times,
    'gflops_syrk': {k: flops / v / 1e9 for k, v in med.items()},
  }


def _throughput_device(c, num_batches, reps, batch):
  """Section 3 on the JAX device: ``stats.update`` against ``device_add``.

  The batches are on the device before any timing; each timed pass starts
  from a fresh state made outside the clock and feeds every batch, so all
  sides see the same samples. Passes are interleaved; medians.
  """
  xs = jax.block_until_ready(
    jax.device_put(_throughput_batches(c, num_batches, batch))
  )
  fns = {
    'update': stats.update,
    'update_donated': jax.jit(stats.update.__wrapped__, donate_argnums=0),
    **{f'device_{k}': device_add(k) for k in _DEVICE_GRAMS},
  }

  def fresh(name):
    return stats.init(c) if name.startswith('update') else _device_zeros(c)

  for name, fn in fns.items():  # compile
    jax.block_until_ready(fn(fresh(name), xs[0]))
  times = {k: [] for k in fns}
  load0 = os.getloadavg()
  for _ in range(reps):
    for name, fn in fns.items():
      state = jax.block_until_ready(fresh(name))
      t0 = time.perf_counter()
      for x in xs:
        state = fn(state, x)
      jax.block_until_ready(state)
      times[name].append(time.perf_counter() - t0)
  med, sizes = _timed_sizes(c, batch, num_batches, times)
  target = 1.0 if c >= 4096 else 0.8  # section 3's, as time ratios below
  ratio = med['update_donated'] / med['device_matmul']
  load = os.getloadavg()
  return {
    **sizes,
    'reference': 'device',
    'reference_what': 'jitted, donated acc + x.T @ x (float32, Precision.'
    'HIGHEST) on the JAX device over the same device-resident batches; '
    'fresh states made outside the clock',
    'update_over_reference': med['update'] / med['device_matmul'],
    'update_donated_over_reference': ratio,
    'update_donated_over_dot_general': (
      med['update_donated'] / med['device_dot_general']
    ),
    'target_update_donated_over_reference': 1 / target,
    'load_avg': [load0, load],
    'loaded': common.loaded(),
    'pass': bool(ratio <= 1 / target),
  }


def bench_at_scale(c, m, batch=2048, reference='ssyrk'):
  """Section 5 against ``reference``: 'ssyrk' (host BLAS) or 'device'."""
  _check_reference(reference)
  rng = np.random.default_rng(3)
  pool = [
    50.0 + rng.standard_normal((batch, c), dtype=np.float32) for _ in range(8)
  ]
  pool_dev = jax.block_until_ready([jnp.asarray(x) for x in pool])
  donated = jax.jit(stats.update.__wrapped__, donate_argnums=0)
  state = donated(stats.init(c), pool_dev[0])
  jax.block_until_ready(state)
  if reference == 'device':  # the same batches, on the device
    add, ref_pool = _device_acc(c, device_add('matmul')), pool_dev
  else:
    add, ref_pool = _ssyrk_acc(c), pool
  add(ref_pool[0])
  num_batches = -(-m // batch)
  load0 = os.getloadavg()
  ours = ref = 0.0
  state = stats.init(c)
  for i in range(num_batches):
    t0 = time.perf_counter()
    state = donated(state, pool_dev[i % 8])
    jax.block_until_ready(state)
    ours += time.perf_counter() - t0
    t0 = time.perf_counter()
    add(ref_pool[i % 8])
    ref += time.perf_counter() - t0
  load = os.getloadavg()
  flops = float(c) * c * batch * num_batches
  key = 'ssyrk' if reference == 'ssyrk' else 'reference'
  return {
    'units': c,
    'samples': batch * num_batches,
    'batch': batch,
    **({'reference': 'device'} if reference == 'device' else {}),
    'ours_s': ours,
    f'{key}_s': ref,
    f'ours_over_{key}': ours / ref,
    'gflops_syrk': {'ours': flops / ours / 1e9, key: flops / ref / 1e9},
    'paper_one_core_s': 127.5 if c == 4096 else None,
    f'target_ours_over_{key}': 1.2,
    'load_avg': [load0, load],
    'loaded': common.loaded(),
    'pass': bool(ours / ref <= 1.2),
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


SECTIONS = ('analyze', 'selection', 'throughput', 'error', 'at_scale')


def main(argv=None):
  hostmem.retain_freed_memory()  # before the first JAX computation
  p = argparse.ArgumentParser()
  p.add_argument(
    '--only',
    default='analyze,selection,throughput,error',
    help=f'comma-separated sections of {SECTIONS}; results are merged '
    'into the existing JSON',
  )
  p.add_argument('--at-scale', action='store_true', help='add at_scale')
  p.add_argument('--at-scale-samples', type=int, default=1_200_000)
  p.add_argument(
    '--at-scale-4096-samples',
    type=int,
    default=0,
    help='M for the C = 4096 point only (default: --at-scale-samples); '
    'lets a loaded machine run a shorter stream at the widest layer',
  )
  p.add_argument(
    '--reference',
    choices=REFERENCES,
    default=None,
    help='yardstick of sections 3 and 5: host SciPy SSYRK or a jitted '
    'x.T @ x on the JAX device (default: ssyrk on the CPU backend, device '
    'elsewhere)',
  )
  p.add_argument(
    '--name',
    type=common.file_stem,
    default=None,
    help='results file stem (default: pfa_core on the CPU backend, '
    'pfa_core_<backend> elsewhere, e.g. pfa_core_gpu)',
  )
  a = p.parse_args(argv)
  only = set(a.only.split(',')) | ({'at_scale'} if a.at_scale else set())
  unknown = only - set(SECTIONS)
  if unknown:
    p.error(f'unknown sections {sorted(unknown)}; known: {SECTIONS}')
  backend = jax.default_backend()
  cpu = backend == 'cpu'
  reference = a.reference or ('ssyrk' if cpu else 'device')
  stem = a.name or ('pfa_core' if cpu else f'pfa_core_{backend}')
  out = os.path.join(common.RESULTS, f'{stem}.json')
  results = {}
  if os.path.exists(out):
    with open(out) as f:
      results = json.load(f)
    for stale in ('date', 'versions', 'devices', 'notes'):
      results.pop(stale, None)
  results['machine'] = {
    'date': datetime.datetime.now(datetime.UTC).isoformat(),
    'platform': platform.platform(),
    'cpu_count': os.cpu_count(),
    'python': sys.version.split()[0],
    'versions': {'jax': jax.__version__, 'numpy': np.__version__},
    'devices': [str(d) for d in jax.devices()],
    'backend': backend,
    'device_kind': jax.devices()[0].device_kind,
    'reference': reference,
    'sections_run': sorted(only),
    'load_avg_at_start': os.getloadavg(),
  }
  rows = []
  if 'analyze' in only:
    r = results['1_analyze_vgg16'] = bench_analyze()
    rows.append(
      (
        '1 analyze VGG16 (warm)',
        '<= 1 s',
        f'{r["warm_median_s"]:.3f} s (cold {r["cold_s_incl_jit_compile"]:.2f} s)',
        r['pass'],
      )
    )
  if 'selection' in only:
    r = results['2_removal_order_4096'] = bench_selection()
    rows.append(
      ('2 removal order C=4096', '<= 2 s', f'{r["median_s"]:.3f} s', r['pass'])
    )
  if 'throughput' in only:
    results['3_throughput'] = {
      str(c): bench_throughput(c, num_batches=n, reps=5, reference=reference)
      for c, n in THROUGHPUT
    }
    for c, r in results['3_throughput'].items():
      if reference == 'device':
        rows.append(
          (
            f'3 update C={c} (donated)',
            f'<= {r["target_update_donated_over_reference"]:.2f}x dev. time',
            f'{r["update_donated_over_reference"]:.2f}x x.T @ x (plain '
            f'{r["update_over_reference"]:.2f}x; '
            f'{r["update_donated_over_dot_general"]:.2f}x dot_general)',
            r['pass'],
          )
        )
        continue
      rows.append(
        (
          f'3 update C={c} (donated)',
          f'>= {r["target_ratio"]}x SSYRK',
          f'{r["ratio_update_donated"]:.2f}x (plain {r["ratio_update"]:.2f}x; '
          f'{r["ratio_update_donated_vs_numpy_xtx"]:.2f}x numpy x.T @ x)',
          r['pass'],
        )
      )
  if 'error' in only:
    e = results['4_float32_error'] = bench_float32_error()
    rows.append(
      (
        '4 float32 rel. error',
        '<= 1e-6',
        f'{e["ours_rel_error_fro"]:.2e} '
        f'(naive {e["naive_float32_rel_error_fro"]:.1e})',
        e['pass'],
      )
    )
  if 'at_scale' in only:
    m = a.at_scale_samples
    m_wide = a.at_scale_4096_samples or m
    results['5_at_scale'] = {
      str(c): bench_at_scale(c, m_wide if c == 4096 else m, reference=reference)
      for c in (64, 128, 256, 512, 4096)
    }
    key = 'ssyrk' if reference == 'ssyrk' else 'reference'
    for c, r in results['5_at_scale'].items():
      rows.append(
        (
          f'5 at scale C={c} M={r["samples"]}',
          '<= 1.2x SSYRK' if key == 'ssyrk' else '<= 1.2x dev. time',
          f'{r[f"ours_over_{key}"]:.2f}x ({r["ours_s"]:.1f} s)',
          r['pass'],
        )
      )
  results['machine']['load_avg_at_end'] = os.getloadavg()
  for name, target, got, ok in rows:
    print(f'{name:<32} {target:<16} {got:<36} {"PASS" if ok else "FAIL"}')
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, 'w') as f:
    json.dump(results, f, indent=2)
  print(f'wrote {out}')


if __name__ == '__main__':
  main()
