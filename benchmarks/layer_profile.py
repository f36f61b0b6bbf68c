"""Where a pruned network's inference time goes, layer class by layer class.

  python -m benchmarks.layer_profile [--model resnet56] [--mode inner]
      [--factor 4] [--round-to 1] [--batch 128] [--repeats 5] [--rounds 5]

Issue 12 section 3 asks for a pruned network's speed-up to be >= 0.8x its
FLOPs reduction, which is the same as its GFLOP/s being >= 0.8x the full
network's. This benchmark shows which layers fall short. The full network
and one PFA-pruned variant (``benchmarks.pruned_speedup.pruned_variants``:
the same synthetic statistics and target search) run the library's
inference path (``models.for_inference``) under ``jax.profiler``. Each
compiled custom call (a oneDNN or narrow-kernel convolution) is matched by
its HLO name to its trace events, and calls are grouped by (kernel, input
shape, weight shape, output shape). Per class: the calls, the ms per forward pass, and
GFLOP/s from the shapes (2 N Ho Wo O kh kw C), each time the median of
``--rounds`` profiles of the two networks in turn. oneDNN computes output
channels in whole vectors of 16 (an AVX-512 register of float32), so for its
calls ``lane_gflops_per_s`` is the rate on the FLOPs of the output width
rounded up to 16 (:func:`lane_flops`): a layer whose plain rate is low but
whose lane rate matches the full network's is paying for its channel tail,
not running a slow kernel (the narrow kernel vectorises over pixels, and
has no such tail). ``other_ms`` is everything XLA ran outside those calls.
``stage_mix_efficiency`` (:func:`stage_mix_efficiency`) is the efficiency
the pruned network would have if each of its convolutions ran at the full
network's rate for convolutions of its map sizes: what the allocation of
FLOPs across stages alone allows, with no kernel loss.
Writes ``benchmarks/results/layer_profile.json`` (``--name`` another file
under ``benchmarks/results/``).
"""

import argparse
import collections
import glob
import gzip
import json
import re
import tempfile

import jax
import numpy as np

from benchmarks import common
from benchmarks import pruned_speedup
from pfa_jax import hostmem
from pfa_jax import models
from pfa_jax import onednn

_CALL = re.compile(
  r'\s*(?:ROOT )?%(\S+) = f32\[([\d,]*)\]\S* custom-call\(.*'
  r'custom_call_target="([^"]+)", '
  r'operand_layout_constraints=\{((?:[^{}]|\{[^}]*\})*)\}'
)
_SHAPE = re.compile(r'f32\[([\d,]*)\]')
# Trace events that are XLA's or the runtime's bookkeeping, not an op.
_NOT_OPS = ('$', 'Thunk', 'Pjit', 'CommonPjRt', 'ParseArguments', 'Handle ')


def _dims(text: str) -> tuple[int, ...]:
  return tuple(int(d) for d in text.split(',') if d)


def custom_calls(hlo_text: str) -> dict[str, dict]:
  """HLO name -> {target, out, operands} of each custom call in ``hlo_text``."""
  out = {}
  for line in hlo_text.splitlines():
    m = _CALL.match(line)
    if m:
      out[m.group(1)] = {
        'target': m.group(3).removeprefix('pfa_jax_'),
        'out': _dims(m.group(2)),
        'operands': [_dims(s) for s in _SHAPE.findall(m.group(4))],
      }
  return out


def conv_flops(call: dict) -> int:
  """2 N Ho Wo O kh kw C of a convolution call (0 for anything else)."""
  ops = call['operands']
  if 'conv' not in call['target'] or len(ops) < 2 or len(ops[1]) != 4:
    return 0
  n, ho, wo, o = call['out']
  kh, kw, c, _ = ops[1]
  return 2 * n * ho * wo * o * kh * kw * c


def lane_flops(call: dict) -> int | None:
  """`conv_flops` with O rounded up to 16, for oneDNN calls (else None)."""
  if not call['target'].startswith('dnnl_conv'):
    return None
  o = call['out'][-1]
  return conv_flops(call) // o * (-(-o // 16) * 16)


def _stage(row: dict) -> tuple:
  # Input and output map sides; the stem (3 input channels) apart.
  return row['input_hwc'][0], row['output_hwc'][0], row['weight'][2] <= 3


def stage_mix_efficiency(full: dict, pruned: dict) -> float:
  """Efficiency of ``pruned`` at ``full``'s per-stage convolution rates.

  Each of ``pruned``'s conv classes is timed at the rate (FLOPs / ms) of
  ``full``'s classes with the same (input side, output side, stem) key, and
  ``pruned``'s non-conv time is kept: full time / that time / FLOPs ratio.
  Below 1 when pruning keeps proportionally more of the stages that run
  slower per FLOP, whatever the kernels do. Both times are traced ones
  (per-class plus non-conv ms, ``profile``'s fields).
  """
  agg = collections.defaultdict(lambda: [0, 0.0])
  for row in full['classes']:
    agg[_stage(row)][0] += row['flops']
    agg[_stage(row)][1] += row['ms']
  ms = pruned['other_ms']
  for row in pruned['classes']:
    flops, stage_ms = agg[_stage(row)]
    if not flops:
      raise ValueError(f'no full-network convolution with the maps of {row}')
    ms += row['flops'] * stage_ms / flops
  full_ms = sum(row['ms'] for row in full['classes']) + full['other_ms']
  ratio = full['conv_flops'] / pruned['conv_flops']
  return full_ms / ms / ratio


def _trace_events(run, repeats: int) -> list[dict]:
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d):
      for _ in range(repeats):
        run()
    (path,) = glob.glob(f'{d}/**/*.trace.json.gz', recursive=True)
    with gzip.open(path) as f:
      return json.load(f)['traceEvents']


def profiler(model, variables, batch: int, repeats: int):
  """A function that profiles one network's jitted inference forward pass
  (per-class times, see `profile`); compiled and warmed up once, here."""
  fwd = jax.jit(
    lambda v, x: models.for_inference(model).apply(v, x, train=False)
  )
  x = np.random.default_rng(1).standard_normal((batch, *pruned_speedup.SHAPE))
  x = x.astype(np.float32)

  def run():
    jax.block_until_ready(fwd(variables, x))

  calls = custom_calls(fwd.lower(variables, x).compile().as_text())
  for _ in range(3):
    run()
  return lambda: _profile_round(run, calls, repeats)


def profile(model, variables, batch: int, repeats: int) -> dict:
  """Per-class times of one network's jitted inference forward pass."""
  return profiler(model, variables, batch, repeats)()


def _profile_round(run, calls: dict, repeats: int) -> dict:
  untraced = common.median_time(run, repeats)
  per_op = collections.Counter()
  for e in _trace_events(run, repeats):
    if e.get('ph') == 'X' and 'dur' in e and not e['name'].startswith(_NOT_OPS):
      per_op[e['name']] += e['dur'] / 1e3 / repeats  # ms per forward pass
  classes = {}
  for name, call in calls.items():
    ops = call['operands'] + [(), ()]
    key = (call['target'], ops[0][1:], ops[1], call['out'][1:])
    c = classes.setdefault(
      key, {'calls': 0, 'ms': 0.0, 'flops': 0, 'lane_flops': None}
    )
    c['calls'] += 1
    c['ms'] += per_op.get(name, 0.0)
    c['flops'] += conv_flops(call)
    if (lanes := lane_flops(call)) is not None:
      c['lane_flops'] = (c['lane_flops'] or 0) + lanes
  rows = [
    {
      'kernel': k[0],
      'input_hwc': list(k[1]),
      'weight': list(k[2]),
      'output_hwc': list(k[3]),
      **v,
    }
    for k, v in classes.items()
  ]
  other = sum(v for k, v in per_op.items() if k not in calls)
  return _summary(untraced * 1e3, other, rows)


def _summary(untraced_ms: float, other_ms: float, rows: list[dict]) -> dict:
  rows = sorted(rows, key=lambda r: -r['ms'])
  for r in rows:
    ms, lanes = r['ms'], r['lane_flops']
    r['gflops_per_s'] = r['flops'] / ms / 1e6 if ms else None
    r['lane_gflops_per_s'] = lanes / ms / 1e6 if ms and lanes else None
  flops = sum(r['flops'] for r in rows)
  return {
    'untraced_ms': untraced_ms,
    'conv_flops': flops,
    'gflops_per_s': flops / untraced_ms / 1e6,
    'custom_call_ms': sum(r['ms'] for r in rows),
    'other_ms': other_ms,
    'classes': rows,
  }


def median_of(rounds: list[dict]) -> dict:
  """One `profile` result from several of the same program: medians of the
  untraced, per-class and non-conv times (rates recomputed from them)."""
  first = rounds[0]['classes']

  def key(r):
    return r['kernel'], *(
      tuple(r[k]) for k in ('input_hwc', 'weight', 'output_hwc')
    )

  by_key = [{key(r): r for r in res['classes']} for res in rounds]
  rows = [
    {**r, 'ms': float(np.median([b[key(r)]['ms'] for b in by_key]))}
    for r in first
  ]
  return _summary(
    float(np.median([r['untraced_ms'] for r in rounds])),
    float(np.median([r['other_ms'] for r in rounds])),
    rows,
  )


def main(argv=None) -> dict:
  p = argparse.ArgumentParser()
  p.add_argument('--model', default='resnet56')
  p.add_argument('--mode', default='inner', choices=('inner', 'inner+stream'))
  p.add_argument('--factor', type=int, default=4)
  p.add_argument('--round-to', type=int, default=1)
  p.add_argument('--batch', type=int, default=128)
  p.add_argument('--repeats', type=int, default=5)
  p.add_argument(
    '--rounds',
    type=int,
    default=5,
    help='interleaved profiles of each network; medians are reported',
  )
  p.add_argument(
    '--name',
    type=common.file_stem,
    default='layer_profile',
    help='results file stem under benchmarks/results/',
  )
  a = p.parse_args(argv)
  hostmem.retain_freed_memory()  # before the first JAX computation
  model, variables, _, _, variants, unreachable = (
    pruned_speedup.pruned_variants(a.model, a.mode, (a.factor,), (a.round_to,))
  )
  if unreachable:
    raise SystemExit(unreachable[0]['why'])
  ((variant, (pm, pv, _)),) = variants.items()
  nets = {'full': (model, variables), variant: (pm, pv)}
  profilers = {
    k: profiler(m, v, a.batch, a.repeats) for k, (m, v) in nets.items()
  }
  runs = {k: [] for k in nets}
  for _ in range(a.rounds):  # interleaved: the machine's states hit both
    for k, prof in profilers.items():
      runs[k].append(prof())
  res = {k: median_of(r) for k, r in runs.items()}
  if not res['full']['conv_flops']:
    raise SystemExit(
      'No native convolution in the compiled program, nothing to attribute: '
      f'the oneDNN kernel is not in use ({onednn.status()["reason"]}).'
    )
  full_rate = res['full']['gflops_per_s']
  for name, r in res.items():
    print(
      f'{name}: {r["untraced_ms"]:.1f} ms, {r["gflops_per_s"]:.0f} GFLOP/s '
      f'({r["gflops_per_s"] / full_rate:.2f} of the full network), '
      f'other ops {r["other_ms"]:.1f} ms'
    )
    common.print_table(
      [
        (
          row['kernel'],
          'x'.join(map(str, row['input_hwc'])),
          'x'.join(map(str, row['weight'])),
          'x'.join(map(str, row['output_hwc'])),
          row['calls'],
          f'{row["ms"]:.2f}',
          f'{row["gflops_per_s"] or 0:.0f}',
          f'{row["lane_gflops_per_s"]:.0f}' if row['lane_gflops_per_s'] else '',
        )
        for row in r['classes']
      ],
      (
        'kernel',
        'input HxWxC',
        'weight',
        'output',
        'calls',
        'ms',
        'GFLOP/s',
        'O to 16',
      ),
    )
  mix = stage_mix_efficiency(res['full'], res[variant])
  print(f"{variant} at the full network's per-stage rates: {mix:.2f}")
  path = common.write(
    a.name,
    {
      'load_average_start': list(common.START_LOAD),
      'loaded': common.loaded(),
      'args': vars(a),
      'variant': variant,
      'efficiency': res[variant]['gflops_per_s'] / full_rate,
      'stage_mix_efficiency': mix,
      'results': res,
    },
  )
  print(f'wrote {path}')
  return res


if __name__ == '__main__':
  main()
