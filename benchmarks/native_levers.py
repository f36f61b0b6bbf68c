"""What each native CPU lever gives, alone and inside a training step.

  python -m benchmarks.native_levers [--repeats 5] [--steps 3]

Three parts, every comparison interleaved in one run:

* ops: each native kernel against the jnp/XLA reference it replaces
  (jitted, forward + backward where there is one, median of ``--repeats``):
  fused BN + residual + ReLU (`pfa_jax.fused_bn`), 2x2 max-pool
  (`pfa_jax.pool`), dropout (`pfa_jax.dropout`);
* steps: the library's training step (`benchmarks.train_throughput`'s runner)
  with a lever on and off, both compiled in this process (the switches are
  read when a step is traced): fused BN on ResNet-56, native pool and native
  dropout on VGG-16;
* memory: ResNet-56's training step in two child processes, with and without
  `pfa_jax.hostmem.retain_freed_memory` (it must be set before JAX starts),
  reporting page faults per step (``getrusage``) and img/s.

Writes ``benchmarks/results/native_levers.json``.
"""

import argparse
import json
import os
import resource
import subprocess
import sys

import jax
import jax.numpy as jnp

from benchmarks import common
from pfa_jax import dropout
from pfa_jax import fused_bn
from pfa_jax import hostmem
from pfa_jax import models
from pfa_jax import pool

_BATCH = 128


def _ms(fn, *args, repeats):
  jax.block_until_ready(fn(*args))
  return 1e3 * common.median_time(
    lambda: jax.block_until_ready(fn(*args)), repeats
  )


def _grad_fn(f):
  """Forward + backward of ``sum(f(x) * c)`` with respect to ``x``."""
  return jax.jit(lambda x, c: jax.grad(lambda x: jnp.sum(f(x) * c))(x))


def ops(repeats):
  k = jax.random.split(jax.random.key(0), 3)
  rows = []
  for shape, residual in (
    ((_BATCH, 32, 32, 16), True),
    ((_BATCH, 32, 32, 64), False),
  ):
    x = jax.random.normal(k[0], shape)
    r = jax.random.normal(k[1], shape) if residual else None
    s, b = jnp.ones(shape[-1]), jnp.zeros(shape[-1])
    pair = {}
    for name, f in (
      ('native', fused_bn.train),
      ('xla', fused_bn.reference_train),
    ):
      g = _grad_fn(lambda x, f=f, s=s, b=b, r=r: f(x, s, b, residual=r)[0])
      pair[name] = _ms(g, x, x, repeats=repeats)
    rows.append(
      ('fused_bn fwd+bwd' + (' +residual' if residual else ''), shape, pair)
    )
  x = jax.random.normal(k[0], (_BATCH, 32, 32, 64))
  c = jax.random.normal(k[2], (_BATCH, 16, 16, 64))
  pair = {
    name: _ms(_grad_fn(f), x, c, repeats=repeats)
    for name, f in (('native', pool.max_pool_2x2), ('xla', pool.reference))
  }
  rows.append(('max_pool_2x2 fwd+bwd', x.shape, pair))
  key = jax.random.key(1)
  pair = {
    name: _ms(
      jax.jit(lambda x, key, f=f: f(x, key, 0.3)), x, key, repeats=repeats
    )
    for name, f in (('native', dropout.dropout), ('xla', dropout.reference))
  }
  rows.append(('dropout(0.3) fwd', x.shape, pair))
  return [
    {
      'op': op,
      'shape': list(shape),
      'native_ms': p['native'],
      'xla_ms': p['xla'],
      'speedup': p['xla'] / p['native'],
    }
    for op, shape, p in rows
  ]


def _runner(name):
  from benchmarks import train_throughput  # noqa: PLC0415

  model = models.get_model(name, num_classes=10, conv_impl='xla')
  variables = models.init(model, jax.random.key(0), (32, 32, 3))
  return train_throughput.make_jax_runner(name, 'onednn', _BATCH, variables)


# (model, switch, value on, value off, mode)
STEP_LEVERS = (
  ('resnet56', 'PFA_JAX_FUSED_BN', '1', '0', 'train'),
  ('vgg16_cifar', 'PFA_JAX_FAST_POOL', '1', '0', 'train'),
  ('vgg16_cifar', 'PFA_JAX_FAST_DROPOUT', '1', '0', 'train'),
  ('vgg16_cifar', 'PFA_JAX_ONEDNN_SMALL_MAP', '4', '0', 'train'),
  ('vgg16_cifar', 'PFA_JAX_ONEDNN_SMALL_MAP', '4', '0', 'eval'),
)


def steps(repeats, num_steps, levers=STEP_LEVERS):
  out = []
  for model, switch, on_value, off_value, mode in levers:
    runs = {}
    for value in (on_value, off_value):
      # The switch is read when the step is traced (its first call).
      with common.env(switch, value):
        runs[value] = _runner(model)[mode]
        runs[value](1)
    times = {v: [] for v in runs}
    for _ in range(repeats):
      for v, run in runs.items():
        times[v].append(_BATCH * num_steps / run(num_steps))
    on, off = (sorted(times[v])[repeats // 2] for v in (on_value, off_value))
    out.append(
      {
        'model': model,
        'mode': mode,
        'switch': f'{switch}={on_value} vs {off_value}',
        'on_img_s': on,
        'off_img_s': off,
        'gain': on / off - 1,
        'all_img_s': times,
      }
    )
  return out


def _child(num_steps):
  """One process's ResNet-56 step: img/s and page faults per step."""
  retained = hostmem.retain_freed_memory()
  run = _runner('resnet56')['train']
  run(1)
  for _ in range(3):  # the heap grows to its size over the first rounds
    run(num_steps)
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  t = run(num_steps)
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
  return {
    'retain_freed_memory': retained,
    'img_s': _BATCH * num_steps / t,
    'faults_per_step': faults / num_steps,
  }


def memory(num_steps):
  out = []
  for value in ('1', '0', '1', '0'):
    env = dict(os.environ, PFA_JAX_RETAIN_MEMORY=value)
    proc = subprocess.run(
      [
        sys.executable,
        '-m',
        'benchmarks.native_levers',
        '--child',
        '--steps',
        str(num_steps),
      ],
      env=env,
      capture_output=True,
      text=True,
      check=True,
    )
    out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
  return out


def _update_steps(args):
  """``--levers``: re-times those step levers; the rest of the JSON stays."""
  names = set(args.levers.split(','))
  rows = steps(
    args.repeats, args.steps, [lv for lv in STEP_LEVERS if lv[1] in names]
  )
  path = os.path.join(common.RESULTS, 'native_levers.json')
  with open(path) as f:
    report = json.load(f)
  keep = [r for r in report['steps'] if r['switch'].split('=')[0] not in names]
  for r in rows:
    r.update(
      load_average_start=list(common.START_LOAD),
      loaded=common.loaded(),
      command='python -m benchmarks.native_levers ' + ' '.join(sys.argv[1:]),
    )
    print(
      r['model'],
      r['mode'],
      r['switch'],
      f'{r["on_img_s"]:.1f}',
      f'{r["off_img_s"]:.1f}',
      f'{100 * r["gain"]:+.1f}%',
    )
  report['steps'] = keep + rows
  with open(path, 'w') as f:
    json.dump(report, f, indent=1)
  print('updated', path)
  return report


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--repeats', type=int, default=5)
  p.add_argument('--steps', type=int, default=3)
  p.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
  p.add_argument(
    '--levers',
    default='',
    help='comma-separated switches: time only these step levers, nothing '
    'else, and merge them into the JSON (default: every part)',
  )
  args = p.parse_args(argv)
  if args.child:
    print(json.dumps(_child(args.steps)))
    return None
  hostmem.retain_freed_memory()  # before the first JAX computation
  if args.levers:
    return _update_steps(args)
  report = {'ops': ops(args.repeats)}
  common.print_table(
    [
      (
        r['op'],
        'x'.join(map(str, r['shape'])),
        f'{r["native_ms"]:.2f}',
        f'{r["xla_ms"]:.2f}',
        f'{r["speedup"]:.1f}x',
      )
      for r in report['ops']
    ],
    ('op', 'shape', 'native ms', 'xla ms', 'speed-up'),
  )
  report['steps'] = steps(args.repeats, args.steps)
  common.print_table(
    [
      (
        r['model'],
        r['mode'],
        r['switch'],
        f'{r["on_img_s"]:.1f}',
        f'{r["off_img_s"]:.1f}',
        f'{100 * r["gain"]:+.0f}%',
      )
      for r in report['steps']
    ],
    ('model', 'mode', 'lever', 'on img/s', 'off img/s', 'gain'),
  )
  report['memory'] = memory(args.steps)
  common.print_table(
    [
      (
        r['retain_freed_memory'],
        f'{r["faults_per_step"]:.0f}',
        f'{r["img_s"]:.1f}',
      )
      for r in report['memory']
    ],
    ('retain_freed_memory', 'faults/step', 'ResNet-56 train img/s'),
  )
  report.update(
    command='python -m benchmarks.native_levers '
    + ' '.join(sys.argv[1:] if argv is None else argv),
    batch=_BATCH,
    load_average_start=list(common.START_LOAD),
    load_average_end=list(os.getloadavg()),
    loaded=common.loaded(),
  )
  print('wrote', common.write('native_levers', report))
  return report


if __name__ == '__main__':
  main()
