"""Where a pruned network's inference time goes, layer class by layer class.

  python -m benchmarks.layer_profile [--model resnet56] [--mode inner]
      [--factor 4] [--round-to 1] [--batch 128] [--repeats 5]

Issue 12 section 3 asks for a pruned network's speed-up to be >= 0.8x its
FLOPs reduction, which is the same as its GFLOP/s being >= 0.8x the full
network's. This benchmark shows which layers fall short. The full network
and one PFA-pruned variant (``benchmarks.pruned_speedup.pruned_variants``:
the same synthetic statistics and target search) run the library's
inference path (``models.for_inference``) under ``jax.profiler``. Each
compiled custom call (a oneDNN or narrow-kernel convolution) is matched by
its HLO name to its trace events, and calls are grouped by (kernel, input
shape, weight shape). Per class: the calls, the ms per forward pass, and
GFLOP/s from the shapes (2 N Ho Wo O kh kw C). ``other_ms`` is everything
XLA ran outside those calls. Writes ``benchmarks/results/layer_profile.json``.
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


def _trace_events(run, repeats: int) -> list[dict]:
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d):
      for _ in range(repeats):
        run()
    (path,) = glob.glob(f'{d}/**/*.trace.json.gz', recursive=True)
    with gzip.open(path) as f:
      return json.load(f)['traceEvents']


def profile(model, variables, batch: int, repeats: int) -> dict:
  """Per-class times of one network's jitted inference forward pass."""
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
  untraced = common.median_time(run, repeats)
  per_op = collections.Counter()
  for e in _trace_events(run, repeats):
    if e.get('ph') == 'X' and 'dur' in e and not e['name'].startswith(_NOT_OPS):
      per_op[e['name']] += e['dur'] / 1e3 / repeats  # ms per forward pass
  classes = {}
  for name, call in calls.items():
    ops = call['operands'] + [(), ()]
    key = (call['target'], ops[0][1:], ops[1], call['out'][1:])
    c = classes.setdefault(key, {'calls': 0, 'ms': 0.0, 'flops': 0})
    c['calls'] += 1
    c['ms'] += per_op.get(name, 0.0)
    c['flops'] += conv_flops(call)
  rows = [
    {
      'kernel': k[0],
      'input_hwc': list(k[1]),
      'weight': list(k[2]),
      'output_hwc': list(k[3]),
      **v,
      'gflops_per_s': v['flops'] / v['ms'] / 1e6 if v['ms'] else None,
    }
    for k, v in sorted(classes.items(), key=lambda kv: -kv[1]['ms'])
  ]
  flops = sum(r['flops'] for r in rows)
  return {
    'untraced_ms': untraced * 1e3,
    'conv_flops': flops,
    'gflops_per_s': flops / untraced / 1e9,
    'custom_call_ms': sum(r['ms'] for r in rows),
    'other_ms': sum(v for k, v in per_op.items() if k not in calls),
    'classes': rows,
  }


def main(argv=None) -> dict:
  p = argparse.ArgumentParser()
  p.add_argument('--model', default='resnet56')
  p.add_argument('--mode', default='inner', choices=('inner', 'inner+stream'))
  p.add_argument('--factor', type=int, default=4)
  p.add_argument('--round-to', type=int, default=1)
  p.add_argument('--batch', type=int, default=128)
  p.add_argument('--repeats', type=int, default=5)
  a = p.parse_args(argv)
  hostmem.retain_freed_memory()  # before the first JAX computation
  model, variables, _, _, variants, unreachable = (
    pruned_speedup.pruned_variants(a.model, a.mode, (a.factor,), (a.round_to,))
  )
  if unreachable:
    raise SystemExit(unreachable[0]['why'])
  ((variant, (pm, pv, _)),) = variants.items()
  nets = {'full': (model, variables), variant: (pm, pv)}
  res = {k: profile(m, v, a.batch, a.repeats) for k, (m, v) in nets.items()}
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
        )
        for row in r['classes']
      ],
      ('kernel', 'input HxWxC', 'weight', 'output', 'calls', 'ms', 'GFLOP/s'),
    )
  path = common.write(
    'layer_profile',
    {
      'load_average_start': list(common.START_LOAD),
      'loaded': common.loaded(),
      'args': vars(a),
      'variant': variant,
      'efficiency': res[variant]['gflops_per_s'] / full_rate,
      'results': res,
    },
  )
  print(f'wrote {path}')
  return res


if __name__ == '__main__':
  main()
