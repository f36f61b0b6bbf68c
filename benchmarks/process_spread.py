"""How much a pruned network's speed moves from process to process.

  python -m benchmarks.process_spread [--processes 6] [--no-aslr-ab]
      [--model resnet56] [--mode inner+stream] [--factor 4] [--round-to 8]
      [--batch 128] [--rounds 5] [--name process_spread]

Session 18 found the pruned ResNet-56's inference time per process: one of
four `benchmarks.layer_profile` processes ran ~20% faster than the other
three, with the full network alike in all four. This benchmark measures that
spread directly: each of ``--processes`` fresh processes builds the full
network and one PFA-pruned variant (`benchmarks.pruned_speedup.pruned_variants`),
times both jitted inference forwards interleaved (``--rounds`` rounds of 5
calls, medians) and reports the pruned time, the full time and the
efficiency (speed-up over FLOPs reduction). Unless ``--no-aslr-ab``, every
other process runs under ``setarch -R`` (no address-space randomization), in
alternation, so both kinds see the same machine states; each record says
which (``benchmarks.common.address_randomization``, from inside the child).
Writes ``benchmarks/results/<name>.json``.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys

from benchmarks import common

_CHILD = '--child'
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(a) -> dict:
  """One process's timings (runs inside the child)."""
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  from benchmarks import pruned_speedup  # noqa: PLC0415
  from pfa_jax import hostmem  # noqa: PLC0415
  from pfa_jax import models  # noqa: PLC0415

  hostmem.retain_freed_memory()  # before the first JAX computation
  model, variables, _, full_flops, variants, unreachable = (
    pruned_speedup.pruned_variants(a.model, a.mode, (a.factor,), (a.round_to,))
  )
  if unreachable:
    raise SystemExit(unreachable[0]['why'])
  ((_, (pm, pv, flops)),) = variants.items()
  x = np.random.default_rng(1).standard_normal((a.batch, *pruned_speedup.SHAPE))
  x = x.astype(np.float32)
  fwd = {
    name: jax.jit(
      lambda v, x, m=m: models.for_inference(m).apply(v, x, train=False)
    )
    for name, m in (('full', model), ('pruned', pm))
  }
  args = {'full': variables, 'pruned': pv}
  times = {k: [] for k in fwd}
  for _ in range(a.rounds):  # interleaved
    for k, f in fwd.items():
      times[k].append(pruned_speedup._time(f, args[k], x, 5))  # noqa: SLF001
  ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
  reduction = full_flops / flops
  return {
    'full_ms': ms['full'],
    'pruned_ms': ms['pruned'],
    'flops_reduction': reduction,
    'efficiency': ms['full'] / ms['pruned'] / reduction,
    'address_randomization': common.address_randomization(),
  }


def _summary(records: list[dict]) -> dict:
  out = {}
  for key in ('efficiency', 'pruned_ms', 'full_ms'):
    v = [r[key] for r in records]
    out[key] = {'min': min(v), 'median': statistics.median(v), 'max': max(v)}
  return out


def main(argv=None) -> dict:
  p = argparse.ArgumentParser()
  p.add_argument('--processes', type=int, default=6)
  p.add_argument('--no-aslr-ab', action='store_true')
  p.add_argument('--model', default='resnet56')
  p.add_argument('--mode', default='inner+stream')
  p.add_argument('--factor', type=int, default=4)
  p.add_argument('--round-to', type=int, default=8)
  p.add_argument('--batch', type=int, default=128)
  p.add_argument('--rounds', type=int, default=5)
  p.add_argument('--name', type=common.file_stem, default='process_spread')
  p.add_argument(_CHILD, action='store_true', help=argparse.SUPPRESS)
  a = p.parse_args(argv)
  if a.child:
    print(json.dumps(child(a)))
    return {}
  if min(a.processes, a.batch, a.rounds, a.factor, a.round_to) < 1:
    p.error('--processes, --batch, --rounds, --factor and --round-to >= 1')
  setarch = shutil.which('setarch')
  aslr_ab = not a.no_aslr_ab
  if aslr_ab and setarch is None:
    p.error('setarch is not on PATH: run with --no-aslr-ab')
  cmd = [sys.executable, '-m', 'benchmarks.process_spread', _CHILD]
  for flag in ('model', 'mode', 'factor', 'round_to', 'batch', 'rounds'):
    cmd += [f'--{flag.replace("_", "-")}', str(getattr(a, flag))]
  records = []
  for i in range(a.processes):
    no_aslr = aslr_ab and i % 2 == 1
    prefix = [setarch, 'x86_64', '-R'] if no_aslr else []
    out = subprocess.run(
      prefix + cmd, capture_output=True, text=True, check=False, cwd=ROOT
    )
    if out.returncode:
      raise SystemExit(f'process {i} failed:\n{out.stderr[-2000:]}')
    records.append(json.loads(out.stdout.strip().splitlines()[-1]))
    r = records[-1]
    print(
      f'process {i}: ASLR {r["address_randomization"]}, full '
      f'{r["full_ms"]:.1f} ms, pruned {r["pruned_ms"]:.1f} ms, efficiency '
      f'{r["efficiency"]:.3f}',
      flush=True,
    )
  groups = {'all': records}
  if aslr_ab:
    for on in (True, False):
      groups[f'aslr_{"on" if on else "off"}'] = [
        r for r in records if r['address_randomization'] is on
      ]
  summary = {k: _summary(v) for k, v in groups.items() if v}
  common.print_table(
    [
      (
        k,
        len(groups[k]),
        *(f'{s["efficiency"][q]:.3f}' for q in s['efficiency']),
      )
      for k, s in summary.items()
    ],
    ('processes', 'n', 'eff. min', 'eff. median', 'eff. max'),
  )
  result = {
    'load_average_start': list(common.START_LOAD),
    'loaded': common.loaded(),
    'args': {k: v for k, v in vars(a).items() if k != 'child'},
    'records': records,
    'summary': summary,
  }
  print(f'wrote {common.write(a.name, result)}')
  return result


if __name__ == '__main__':
  main()
