"""Two versions of the narrow-output kernel, timed in one process.

  python -m benchmarks.narrow_ab --base REV [--batch 128] [--rounds 11]
      [--buffers 1,8] [--shapes 32:16:8:1,32:8:8:0] [--name narrow_ab]

``pfa_jax/native/narrow_conv.cc`` at git revision ``REV`` (A) and in the
working tree (B) are compiled into one executable (``narrow_ab.cc``) that
calls them in turn on the pruned ResNet-56 layer shapes of
`benchmarks.layer_profile` (3x3, stride 1, folded epilogue), with the
input either reused (``buffers`` 1: in cache) or rotated through 8 copies
(not in cache, as inside a network). On this project's shared 2-core VM
process-to-process timings move by 10-30%, so a kernel change is judged
here, interleaved, and then in `benchmarks.pruned_speedup`. Reports B's
time over A's per shape and input state and A's and B's largest output
difference; ``--shapes`` replaces the default shapes (``side:in:out:res``,
comma-separated); writes ``benchmarks/results/{name}.json``. Needs g++ and
AVX-512.
"""

import argparse
import json
import os
import shutil
import subprocess
import tempfile

import jax
import numpy as np

from benchmarks import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL = 'pfa_jax/native/narrow_conv.cc'
HARNESS = os.path.join(ROOT, 'benchmarks', 'narrow_ab.cc')
# (map side, in, out, residual): ResNet-56 4x's narrow-kernel layers.
SHAPES = (
  (32, 16, 3, 0),
  (32, 16, 4, 0),
  (32, 16, 5, 0),
  (32, 16, 6, 0),
  (32, 16, 7, 0),
  (16, 32, 6, 0),
  (16, 32, 7, 0),
  (32, 16, 13, 1),
)


def source_at(rev: str) -> str:
  """``narrow_conv.cc`` at git revision ``rev`` (ValueError if unknown)."""
  p = subprocess.run(
    ['git', 'show', f'{rev}:{KERNEL}'],
    cwd=ROOT,
    capture_output=True,
    text=True,
  )
  if p.returncode:
    raise ValueError(f'no {KERNEL} at revision {rev!r}: {p.stderr.strip()}')
  return p.stdout


def build(a_src: str, b_src: str, out: str) -> str:
  """Compiles the harness with sources ``a_src``, ``b_src`` (paths)."""
  cxx = os.environ.get('CXX') or shutil.which('g++')
  if not cxx:
    raise SystemExit('narrow_ab needs a C++ compiler (g++ or $CXX)')
  cmd = [
    cxx,
    '-O3',
    '-march=native',
    '-fopenmp',
    '-std=c++17',
    '-w',
    '-I',
    jax.ffi.include_dir(),
    f'-DPFA_AB_A="{a_src}"',
    f'-DPFA_AB_B="{b_src}"',
    HARNESS,
    '-o',
    out,
  ]
  p = subprocess.run(cmd, capture_output=True, text=True)
  if p.returncode:
    raise SystemExit(f'narrow_ab build failed:\n{p.stderr[-2000:]}')
  return out


def run(
  a_text: str, b_text: str, *, batch: int, rounds: int, buffers, shapes=SHAPES
) -> list[dict]:
  """Rows of (shape, buffers) with A's and B's median seconds."""
  rows = []
  with tempfile.TemporaryDirectory() as d:
    paths = []
    for name, text in (('a.cc', a_text), ('b.cc', b_text)):
      paths.append(os.path.join(d, name))
      with open(paths[-1], 'w') as f:
        f.write(text)
    exe = build(*paths, os.path.join(d, 'narrow_ab'))
    for nb in buffers:
      args = [exe, str(rounds), str(batch), str(nb)]
      args += [','.join(map(str, s)) for s in shapes]
      p = subprocess.run(args, capture_output=True, text=True)
      if p.returncode:
        raise SystemExit(f'narrow_ab failed: {p.stderr.strip()}')
      for line in p.stdout.splitlines():
        r = json.loads(line)
        flops = 2 * batch * r['hw'] ** 2 * 9 * r['cin'] * r['cout']
        rows.append(
          {
            **r,
            'buffers': nb,
            'b_over_a': r['b_s'] / r['a_s'],
            'a_gflops_per_s': flops / r['a_s'] / 1e9,
            'b_gflops_per_s': flops / r['b_s'] / 1e9,
          }
        )
  return rows


def parse_shapes(text: str) -> tuple[tuple[int, int, int, int], ...]:
  """``'32:16:8:1,16:8:8:0'`` -> ((32, 16, 8, 1), (16, 8, 8, 0))."""
  shapes = []
  for item in text.split(','):
    try:
      side, cin, cout, res = (int(v) for v in item.split(':'))
    except ValueError:
      raise ValueError(
        f'shape {item!r} is not side:in:out:res (four integers)'
      ) from None
    if min(side, cin, cout) < 1 or cout > 16 or res not in (0, 1):
      raise ValueError(
        f'shape {item!r}: side and in >= 1, out in 1..16, res 0 or 1'
      )
    shapes.append((side, cin, cout, res))
  return tuple(shapes)


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser()
  p.add_argument('--base', required=True, help='git revision of A')
  p.add_argument('--batch', type=int, default=128)
  p.add_argument('--rounds', type=int, default=11)
  p.add_argument('--buffers', default='1,8')
  p.add_argument(
    '--shapes', default=None, help='side:in:out:res,... (default: SHAPES)'
  )
  p.add_argument('--name', type=common.file_stem, default='narrow_ab')
  a = p.parse_args(argv)
  try:
    shapes = parse_shapes(a.shapes) if a.shapes else SHAPES
  except ValueError as e:
    p.error(str(e))
  try:
    a_text = source_at(a.base)
  except ValueError as e:
    p.error(str(e))
  with open(os.path.join(ROOT, KERNEL)) as f:
    b_text = f.read()
  try:
    buffers = [int(b) for b in a.buffers.split(',')]
  except ValueError:
    p.error(f'--buffers is a comma-separated list of counts, got {a.buffers!r}')
  if min(buffers) < 1 or a.batch < 1 or a.rounds < 1:
    p.error('--buffers, --batch and --rounds must be >= 1')
  rows = run(
    a_text,
    b_text,
    batch=a.batch,
    rounds=a.rounds,
    buffers=buffers,
    shapes=shapes,
  )
  common.print_table(
    [
      (
        f'{r["hw"]}x{r["hw"]}',
        f'{r["cin"]}->{r["cout"]}',
        r['buffers'],
        f'{r["a_gflops_per_s"]:.0f}',
        f'{r["b_gflops_per_s"]:.0f}',
        f'{r["b_over_a"]:.3f}',
        f'{r["max_abs_diff"]:.1e}',
      )
      for r in rows
    ],
    ('map', 'conv', 'buffers', 'A GFLOP/s', 'B GFLOP/s', 'B/A time', 'diff'),
  )
  by_state = {
    nb: float(np.median([r['b_over_a'] for r in rows if r['buffers'] == nb]))
    for nb in buffers
  }
  path = common.write(
    a.name,
    {
      'load_average_start': list(common.START_LOAD),
      'loaded': common.loaded(),
      'args': vars(a),
      'b': 'working tree',
      'median_b_over_a_by_buffers': {str(k): v for k, v in by_state.items()},
      'results': rows,
    },
  )
  print(f'wrote {path}')
  return rows


if __name__ == '__main__':
  main()
