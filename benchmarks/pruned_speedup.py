"""Do PFA-pruned networks really run faster? (issue 12 section 3)

  python -m benchmarks.pruned_speedup [--batches 1,128] [--repeats 5]
    [--name pruned_speedup]

VGG-16 (CIFAR) and ResNet-56 (residual modes ``inner`` and
``inner+stream``) are pruned with the PFA pipeline on synthetic statistics
of random weights: a random covariance per group gives the spectrum and the
Pearson removal order; ``recipes``' PFA-En family is searched for the largest
tau whose FLOPs are <= 1/2 and 1/4 of the full model (``costs.cost_fn``), the
keep-sets come from ``select`` and the network is cut with
``slicing.prune``. Each pruned network is also built with its kept widths
rounded up to a multiple of 8 and of 16 (capped at the full width; AVX-512
holds 16 float32) *inside* the target search, so the FLOPs budget still
holds (``--round-to``). The jitted eval forward pass of the library's
inference path (`models.for_inference`: BN folded into the convs;
``--no-fold`` for conv -> BN) is then timed, pruned against full,
interleaved, at each batch size. ``--tail-ab`` also times each pruned
network compiled with the channel-tail split off
(``PFA_JAX_ONEDNN_TAIL_MAX=0``, :func:`pfa_jax.onednn.tail_split`), in the
same rounds, as variant ``<variant>_tailoff``; ``--inline-ab`` times the
full and each pruned network compiled with every call on the team thread
(``PFA_JAX_ONEDNN_INLINE_MFLOPS=0``, :func:`pfa_jax.onednn.call_threads`),
as variant ``<variant>_inlineoff``, and ``--plain-ab`` with every oneDNN
call on reordered weights (``PFA_JAX_ONEDNN_PLAIN_PIXELS=0``,
:func:`pfa_jax.onednn.plain_weights`), as ``<variant>_plainoff``; their
speed-ups are over the full network compiled the same way.
Reported: FLOPs ratio, time ratio and their quotient (1.0 = ideal), and
the memory-traffic ratio (:func:`bytes_accessed`); target
at batch 128: time speed-up >= 0.8x the FLOPs reduction. Writes
``benchmarks/results/pruned_speedup.json`` (``loaded`` when the machine was busy at the
start, ``benchmarks.common.loaded``).

Off the CPU (``jax.default_backend()`` 'gpu'): ``conv_impl='auto'`` is XLA's
convolutions (recorded as ``conv_path``), the CPU-only narrow-kernel check is
skipped, each batch is put on the device before it is timed, and the results
go to ``pruned_speedup_gpu.json`` unless ``--name`` says otherwise
(``PFA_JAX_BENCH_RESULTS`` names the folder, ``benchmarks.common.RESULTS``).
"""

import argparse
import bisect
import math
import os
import time

import jax
import numpy as np

from benchmarks import common
from pfa_jax import conv
from pfa_jax import costs
from pfa_jax import hostmem
from pfa_jax import models
from pfa_jax import onednn
from pfa_jax import recipes
from pfa_jax import select
from pfa_jax import slicing
from pfa_jax import spectra as spectra_lib

CASES = (
  ('vgg16_cifar', 'inner+stream'),
  ('resnet56', 'inner'),
  ('resnet56', 'inner+stream'),
)
SHAPE = (32, 32, 3)


def _synthetic_stats(widths, seed=0):
  """Random low-rank-plus-noise covariances -> spectra, removal orders."""
  rng = np.random.default_rng(seed)
  lam, orders = {}, {}
  for name, c in widths.items():
    r = max(2, c // 4)
    a = rng.standard_normal((c, r)) * np.geomspace(1.0, 0.05, r)
    cov = a @ a.T + 0.01 * np.eye(c)
    orders[name] = select.removal_order(cov, name=name)
    lam[name] = spectra_lib.spectrum(cov, name=name)
  return lam, orders


def round_up(widths, full, multiple):
  return {
    k: min(full[k], -(-w // multiple) * multiple) for k, w in widths.items()
  }


def widths_for_target(lam, cost, target, full, multiple=1):
  """Largest-tau PFA-En widths (rounded up to ``multiple``) with cost <= target."""
  cand = recipes.breakpoints(lam)

  def widths(i):
    return round_up(recipes.energy(lam, float(cand[i])), full, multiple)

  if cost(widths(0)) > target:
    raise ValueError(
      f'FLOPs target {target:.0f} is below the smallest network '
      f'({cost(widths(0)):.0f})'
    )
  fits = [cost(widths(len(cand) - 1)) <= target]
  if fits[0]:
    return widths(len(cand) - 1)
  first_bad = bisect.bisect_left(
    range(len(cand)), True, lo=1, key=lambda i: cost(widths(i)) > target
  )
  return widths(first_bad - 1)


def _time(fn, v, x, repeats):
  jax.block_until_ready(fn(v, x))
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(v, x))
    ts.append(time.perf_counter() - t0)
  return float(np.median(ts))


def bytes_accessed(model, variables, batch):
  """XLA's bytes-accessed count of the eval forward, on the pure-XLA path.

  The sum over the compiled program's ops of the bytes each reads and
  writes: a memory-traffic yardstick beside FLOPs (the native path's FFI
  calls are opaque to XLA's cost analysis, so the count uses
  ``conv_impl='xla'``; same architecture and widths).
  """
  m = model.clone(conv_impl='xla')
  x = jax.ShapeDtypeStruct((batch, *SHAPE), np.float32)
  lowered = jax.jit(lambda v, x: m.apply(v, x, train=False)).lower(variables, x)
  cost = lowered.compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  # NaN where a backend's cost analysis has no count: not a lost run.
  return float((cost or {}).get('bytes accessed', math.nan))


def pruned_variants(name, mode, factors, multiples=(1, 8, 16)):
  """The full network and its PFA-pruned variants, ~1/f of its FLOPs each.

  Returns (model, variables, groups, full_flops, variants, unreachable):
  ``variants['{f}x_round{m}'] = (pruned model, variables, flops)``, and
  ``unreachable`` the targets no width assignment meets.
  """
  model = models.get_model(name, num_classes=10)
  variables = models.init(model, jax.random.key(0), SHAPE)
  groups = [
    g.name
    for g in model.structure().groups
    if mode == 'inner+stream' or not g.stream
  ]
  full_w = models.widths_of(model)
  lam, orders = _synthetic_stats({g: full_w[g] for g in groups})
  fixed = {k: v for k, v in full_w.items() if k not in groups}
  cost_of = costs.cost_fn(model, SHAPE, 'flops')
  full_flops = costs.count(model, SHAPE)['flops']

  def cost(w):
    return cost_of({**fixed, **w})

  variants = {}
  unreachable = []
  for f in factors:
    for mult in multiples:
      try:
        w = widths_for_target(
          lam, cost, full_flops / f, {g: full_w[g] for g in groups}, mult
        )
      except ValueError as e:  # e.g. 4x with only the inner groups
        unreachable.append({'variant': f'{f}x_round{mult}', 'why': str(e)})
        continue
      keep = select.keep_sets({g: orders[g] for g in groups}, w)
      pm, pv = slicing.prune(model, variables, keep)
      # The slicer's leaves are host (NumPy) arrays; on the device once, as
      # the full network's are. Timed as they came, every call re-sent them
      # (~280 for ResNet-56: one DevicePut each in a profiler trace).
      pv = jax.device_put(pv)
      variants[f'{f}x_round{mult}'] = (pm, pv, cost(w))
  return model, variables, groups, full_flops, variants, unreachable


def _lowered_off(apply, nets, x, key, marker) -> dict:
  """Each network lowered with the trace-time setting ``key`` = 0.

  ``nets``: name -> (model, variables). Each is lowered through its own jit
  of ``apply`` (the default traces stay as they are) and checked to have no
  ``marker`` (what a call the setting makes shows in the HLO) left.
  """
  off_fwd = jax.jit(lambda m, v, x: apply(m, v, x), static_argnums=0)
  with common.env(key, '0'):
    off = {k: off_fwd.lower(m, v, x) for k, (m, v) in nets.items()}
  for k, lowered in off.items():
    if marker in lowered.as_text():
      raise RuntimeError(
        f'{k}: {marker!r} is still in the program with {key}=0'
      )
  return off


def _tail_off(apply, fwd, variants, x) -> dict:
  """Each pruned network compiled with the channel-tail split off.

  ``tail_split`` is read at trace time (``PFA_JAX_ONEDNN_TAIL_MAX=0``,
  :func:`_lowered_off`; ``fwd``, the same function's jit, keeps the default
  traces); a network with no split layer is left out.
  """
  nets = {k: (pm, pv) for k, (pm, pv, _) in variants.items()}
  off = _lowered_off(apply, nets, x, 'PFA_JAX_ONEDNN_TAIL_MAX', 'split_conv')
  return {
    k: lowered.compile()
    for k, lowered in off.items()
    if 'split_conv' in fwd.lower(*nets[k], x).as_text()
  }


# Trace-time settings a run can also compile every network without: name ->
# (environment variable set to 0, what a call it changes shows in the HLO).
SETTINGS_AB = {
  'inline': ('PFA_JAX_ONEDNN_INLINE_MFLOPS', 'threads = 1 : i64'),
  'plain': ('PFA_JAX_ONEDNN_PLAIN_PIXELS', 'plain_weights = true'),
}


def _setting_off(apply, nets, x, name) -> dict:
  """Each network compiled with setting ``name`` (`SETTINGS_AB`) off.

  ``nets``: key -> (model, variables); see :func:`_lowered_off`.
  """
  off = _lowered_off(apply, nets, x, *SETTINGS_AB[name])
  return {k: lowered.compile() for k, lowered in off.items()}


_SUFFIXES = ('_tailoff', *(f'_{name}off' for name in SETTINGS_AB))


def _base(variant: str) -> str:
  """The pruned variant an A/B row is of: '4x_round1_tailoff' -> '4x_round1'."""
  for suffix in _SUFFIXES:
    variant = variant.removesuffix(suffix)
  return variant


def bench_case(
  name,
  mode,
  factors,
  batches,
  repeats,
  multiples=(1, 8, 16),
  rounds=7,
  fold=True,
  device_inputs=False,
  tail_ab=False,
  settings_ab=(),
):
  """Rows of FLOPs, time and bytes ratios, pruned against full.

  ``device_inputs``: each batch is put on the device before it is timed
  (off the CPU, where a host-to-device copy in every call would be timed);
  False passes the NumPy batch to every call, as the CPU results always did.
  """
  model, variables, groups, full_flops, variants, unreachable = pruned_variants(
    name, mode, factors, multiples
  )
  # The library's inference path (BN folded into the convs) for both the
  # full and the pruned networks; fold=False: conv -> BN as separate calls.
  infer = models.for_inference if fold else (lambda m: m)

  def apply(m, v, x):
    return infer(m).apply(v, x, train=False)

  fwd = jax.jit(apply, static_argnums=0)
  rows = [
    {'model': name, 'mode': mode, 'unreachable': True, **u} for u in unreachable
  ]
  rng = np.random.default_rng(1)
  for b in batches:
    x = rng.standard_normal((b, *SHAPE)).astype(np.float32)
    if device_inputs:
      x = jax.block_until_ready(jax.device_put(x))
    t_full = []
    runs = {
      k: (lambda v, x, pm=pm: fwd(pm, v, x))
      for k, (pm, _, _) in variants.items()
    }
    if tail_ab:
      runs.update(
        {
          f'{k}_tailoff': c
          for k, c in _tail_off(apply, fwd, variants, x).items()
        }
      )
    full_off = {}
    for setting in settings_ab:  # (`name` is the model's)
      nets = {'full': (model, variables)}
      nets.update({k: (pm, pv) for k, (pm, pv, _) in variants.items()})
      off = _setting_off(apply, nets, x, setting)
      full_off[f'_{setting}off'] = off.pop('full')
      runs.update({f'{k}_{setting}off': c for k, c in off.items()})
    t_var = {k: [] for k in runs}
    t_full_off = {suffix: [] for suffix in full_off}
    for _ in range(rounds):  # interleave full and pruned
      t_full.append(_time(lambda v, x: fwd(model, v, x), variables, x, repeats))
      for suffix, compiled in full_off.items():
        t_full_off[suffix].append(_time(compiled, variables, x, repeats))
      for k, run in runs.items():
        pv = variants[_base(k)][1]
        t_var[k].append(_time(run, pv, x, repeats))
    full_bytes = bytes_accessed(model, variables, b)
    for k in runs:
      pm, pv, flops = variants[_base(k)]
      # A setting's A/B row compares with the full network compiled the
      # same way.
      suffix = k[len(_base(k)) :]
      tf = float(np.median(t_full_off.get(suffix, t_full)))
      tv = float(np.median(t_var[k]))
      fr = full_flops / flops
      rows.append(
        {
          'model': name,
          'mode': mode,
          'variant': k,
          'batch': b,
          'flops_reduction': fr,
          'speedup': tf / tv,
          'efficiency': (tf / tv) / fr,
          'bytes_reduction_xla_count': full_bytes / bytes_accessed(pm, pv, b),
          'full_s': tf,
          'pruned_s': tv,
          'widths': {
            g: int(pm_w)
            for g, pm_w in models.widths_of(pm).items()
            if g in groups
          },
        }
      )
  return rows


def main(argv=None):
  # Before the first JAX computation. Host malloc settings only: on a GPU
  # they touch no device buffer (XLA's allocator holds those), so they stay.
  retained = hostmem.retain_freed_memory()
  p = argparse.ArgumentParser()
  p.add_argument('--batches', default='1,128')
  p.add_argument('--factors', default='2,4')
  p.add_argument('--repeats', type=int, default=5)
  p.add_argument(
    '--rounds',
    type=int,
    default=7,
    help='interleaved rounds of full and pruned (3 before session 11: runs '
    'a few minutes apart then differed by up to 0.2 in efficiency)',
  )
  p.add_argument(
    '--round-to',
    default='1,8,16',
    help='kept-width multiples, one pruned variant each (16 = one '
    'AVX-512 register of float32)',
  )
  p.add_argument('--cases', default=','.join(f'{m}:{r}' for m, r in CASES))
  p.add_argument(
    '--no-fold',
    action='store_true',
    help='time conv -> BN as separate calls (models.for_inference off)',
  )
  p.add_argument(
    '--tail-ab',
    action='store_true',
    help='also time each pruned network with the channel-tail split off',
  )
  p.add_argument(
    '--inline-ab',
    action='store_true',
    help='also time the full and each pruned network with every call on '
    'the team thread (PFA_JAX_ONEDNN_INLINE_MFLOPS=0)',
  )
  p.add_argument(
    '--plain-ab',
    action='store_true',
    help='also time the full and each pruned network with every oneDNN '
    'call on reordered weights (PFA_JAX_ONEDNN_PLAIN_PIXELS=0)',
  )
  p.add_argument(
    '--name',
    type=common.file_stem,
    default=None,
    help='results file stem (default: pruned_speedup on the CPU backend, '
    'pruned_speedup_<backend> elsewhere, e.g. pruned_speedup_gpu)',
  )
  a = p.parse_args(argv)
  backend = jax.default_backend()
  cpu = backend == 'cpu'
  batches = [int(b) for b in a.batches.split(',')]
  factors = [int(f) for f in a.factors.split(',')]
  load0 = os.getloadavg()
  rows = []
  for case in a.cases.split(','):
    name, mode = case.split(':')
    rows += bench_case(
      name,
      mode,
      factors,
      batches,
      a.repeats,
      tuple(int(m) for m in a.round_to.split(',')),
      a.rounds,
      fold=not a.no_fold,
      device_inputs=not cpu,
      tail_ab=a.tail_ab,
      settings_ab=tuple(
        name for name in SETTINGS_AB if getattr(a, f'{name}_ab')
      ),
    )
  load = os.getloadavg()
  common.print_table(
    [
      (
        r['model'],
        r['mode'],
        r['variant'],
        r['batch'],
        f'{r["flops_reduction"]:.2f}x',
        f'{r["speedup"]:.2f}x',
        f'{r["efficiency"]:.2f}',
        f'{r["bytes_reduction_xla_count"]:.2f}x',
      )
      for r in rows
      if not r.get('unreachable')
    ],
    (
      'model',
      'mode',
      'variant',
      'batch',
      'FLOPs red.',
      'speed-up',
      'eff.',
      'bytes red.',
    ),
  )
  at128 = [
    r
    for r in rows
    if r.get('batch') == 128 and _base(r['variant']) == r['variant']
  ]
  # The narrow kernel is CPU code: not even looked for elsewhere.
  narrow = cpu and onednn.narrow_available() and onednn.narrow_max() > 0
  path = common.write(
    a.name or ('pruned_speedup' if cpu else f'pruned_speedup_{backend}'),
    {
      'target': f'batch 128, {backend.upper()}: speed-up >= 0.8 x FLOPs '
      'reduction',
      'load_avg': [load0, load],
      'loaded': common.loaded(),
      'conv_impl': 'default (auto)',
      'conv_path': conv.resolve('auto'),
      'matmul_precision': jax.config.jax_default_matmul_precision or 'default',
      'inputs_on_device': not cpu,
      'retain_freed_memory': retained,
      'glibc_tunables': os.environ.get('GLIBC_TUNABLES', ''),
      'fold_bn': not a.no_fold,
      'narrow_kernel': narrow,
      'tail_max': onednn.tail_max() if narrow else 0,
      'inline_mflops': onednn.inline_mflops() if cpu else 0.0,
      'plain_pixels': onednn.plain_pixels() if cpu else 0,
      'rounds': a.rounds,
      'repeats': a.repeats,
      'dtype': 'float32',
      'results': rows,
      'pass': bool(at128) and all(r['efficiency'] >= 0.8 for r in at128),
    },
  )
  print(f'wrote {path}')


if __name__ == '__main__':
  main()
