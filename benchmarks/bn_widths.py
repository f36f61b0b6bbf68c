"""Fused BN at narrow widths: rows as whole-vector periods, on against off.

  python -m benchmarks.bn_widths [--rounds 7] [--widths 4,8,...]

A pruned network's widths are rarely multiples of 16. The native BN kernel
(``pfa_jax/native/bn_act.cc``) used to walk an [M, C] map row by row, so
every row of C < 16 channels (or the last vector of any other width) left
lanes idle: at 4-12 channels an inference pass took 4.5-5.7x the 16-channel
one, on fewer bytes. It now walks rows of q C channels, q = 16 / gcd(C, 16)
(``fused_bn.set_periodic``). This benchmark times both walks of the same
compiled programs, interleaved, in one process:

* ``kernels``: inference (ReLU; + residual; + spatial max) and the training
  forward + backward at [128, 32, 32, C], per width. Besides the on/off
  ratio it reports time per byte against the 16-channel pass (1.0: a narrow
  pass costs what its bytes do).
* ``models``: the library's own jitted ``steps.train_step`` and
  ``steps.eval_step`` (batch 128) of full ResNet-56 (every width a multiple
  of 16: the control) and of PFA-pruned ResNet-56s from
  ``benchmarks.pruned_speedup`` (synthetic spectra, ``round_to=1``).

Writes ``benchmarks/results/bn_widths.json`` (``loaded`` when the machine
was busy at the start).
"""

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from benchmarks import pruned_speedup
from benchmarks import train_throughput
from pfa_jax import fused_bn
from pfa_jax import hostmem
from pfa_jax import onednn

WIDTHS = (4, 8, 11, 12, 16, 24, 40, 64)
MODELS = (
  ('resnet56', 'inner+stream', 1, 'full'),
  ('resnet56', 'inner', 4, '4x_round1'),
  ('resnet56', 'inner+stream', 2, '2x_round1'),
  ('resnet56', 'inner+stream', 4, '4x_round1'),
)


def _ab(fns, rounds, reps):
  """{name: (on_s, off_s)}: medians over interleaved rounds of both walks."""
  for f in fns.values():  # compile and warm both walks
    for on in (True, False):
      fused_bn.set_periodic(on)
      f()
  t = {k: {True: [], False: []} for k in fns}
  try:
    for _ in range(rounds):
      for on in (True, False):
        fused_bn.set_periodic(on)
        for k, f in fns.items():
          t[k][on].append(common.median_time(f, reps))
  finally:
    fused_bn.set_periodic(True)
  return {
    k: (float(np.median(v[True])), float(np.median(v[False])))
    for k, v in t.items()
  }


def kernel_fns(c, n=128, hw=32, seed=0):
  """The four fused-BN passes at [n, hw, hw, c], each a blocking thunk."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((n, hw, hw, c)), jnp.float32)
  r = jnp.asarray(rng.standard_normal((n, hw, hw, c)), jnp.float32)
  s = jnp.asarray(rng.uniform(0.5, 2.0, c), jnp.float32)
  b = jnp.asarray(rng.standard_normal(c), jnp.float32)
  kw = dict(relu=True, eps=1e-5)
  infer = jax.jit(lambda x: fused_bn.infer(x, s, b, b, s, **kw))
  infer_res = jax.jit(
    lambda x, r: fused_bn.infer(x, s, b, b, s, residual=r, **kw)
  )
  infer_max = jax.jit(lambda x: fused_bn.infer_with_max(x, s, b, b, s, **kw))
  train = jax.jit(
    jax.grad(lambda x, s: jnp.vdot(fused_bn.train(x, s, b, **kw)[0], r), (0, 1))
  )
  return {
    'infer': lambda: jax.block_until_ready(infer(x)),
    'infer_res': lambda: jax.block_until_ready(infer_res(x, r)),
    'infer_max': lambda: jax.block_until_ready(infer_max(x)),
    'train_fwd_bwd': lambda: jax.block_until_ready(train(x, s)),
  }


def run_kernels(widths, rounds, reps, n=128, hw=32):
  rows = []
  for c in widths:
    for op, (on, off) in _ab(kernel_fns(c, n, hw), rounds, reps).items():
      rows.append(
        {
          'channels': c,
          'op': op,
          'shape': [n, hw, hw, c],
          'on_s': on,
          'off_s': off,
          'speedup': off / on,
        }
      )
  per_byte = {r['op']: r['on_s'] / 16 for r in rows if r['channels'] == 16}
  for r in rows:
    if r['op'] in per_byte:
      r['per_byte_vs_16'] = r['on_s'] / r['channels'] / per_byte[r['op']]
  return rows


def run_models(cases, rounds, steps, batch=128):
  rows = []
  for name, mode, factor, variant in cases:
    model, variables, _, full_flops, variants, _ = (
      pruned_speedup.pruned_variants(
        name, mode, () if variant == 'full' else (factor,), (1,)
      )
    )
    if variant != 'full':
      model, variables, flops = variants[variant]
    else:
      flops = full_flops
    runner = train_throughput.make_model_runner(model, variables, batch)
    fns = {m: (lambda f=runner[m]: f(steps)) for m in ('train', 'eval')}
    for m, (on, off) in _ab(fns, rounds, 1).items():
      rows.append(
        {
          'model': name,
          'mode': mode,
          'variant': variant,
          'step': m,
          'batch': batch,
          'steps': steps,
          'flops_reduction': full_flops / flops,
          'on_img_s': batch * steps / on,
          'off_img_s': batch * steps / off,
          'speedup': off / on,
        }
      )
  return rows


def main(argv=None):
  hostmem.retain_freed_memory()  # before the first JAX computation
  p = argparse.ArgumentParser()
  p.add_argument('--widths', default=','.join(map(str, WIDTHS)))
  p.add_argument('--rounds', type=int, default=7)
  p.add_argument('--reps', type=int, default=20)
  p.add_argument('--steps', type=int, default=3, help='model steps per timing')
  p.add_argument('--parts', default='kernels,models')
  a = p.parse_args(argv)
  if not onednn.available():
    raise SystemExit(f'native kernels not built: {onednn.status()["reason"]}')
  load0 = os.getloadavg()
  parts = a.parts.split(',')
  kernels = models_ = []
  if 'kernels' in parts:
    widths = [int(w) for w in a.widths.split(',')]
    kernels = run_kernels(widths, a.rounds, a.reps)
    common.print_table(
      [
        (
          r['channels'],
          r['op'],
          f'{r["off_s"] * 1e3:.3f}',
          f'{r["on_s"] * 1e3:.3f}',
          f'{r["speedup"]:.2f}x',
          f'{r.get("per_byte_vs_16", float("nan")):.2f}',
        )
        for r in kernels
      ],
      ('C', 'op', 'rows ms', 'periods ms', 'speed-up', 'per byte / C=16'),
    )
  if 'models' in parts:
    models_ = run_models(MODELS, a.rounds, a.steps)
    common.print_table(
      [
        (
          r['model'],
          r['mode'],
          r['variant'],
          r['step'],
          f'{r["flops_reduction"]:.2f}x',
          f'{r["off_img_s"]:.0f}',
          f'{r["on_img_s"]:.0f}',
          f'{r["speedup"]:.2f}x',
        )
        for r in models_
      ],
      (
        'model',
        'mode',
        'variant',
        'step',
        'FLOPs red.',
        'rows img/s',
        'periods img/s',
        'speed-up',
      ),
    )
  path = common.write(
    'bn_widths',
    {
      'command': ' '.join(
        [
          'python -m benchmarks.bn_widths',
          *(sys.argv[1:] if argv is None else argv),
        ]
      ),
      'load_avg': [load0, os.getloadavg()],
      'loaded': common.loaded(),
      'rounds': a.rounds,
      'dtype': 'float32',
      'kernels': kernels,
      'models': models_,
    },
  )
  print(f'wrote {path}')


if __name__ == '__main__':
  main()
