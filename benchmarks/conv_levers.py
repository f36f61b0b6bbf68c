"""Which CPU settings help JAX training throughput (levers vs a baseline).

Run from the repository root::

  python -m benchmarks.conv_levers                       # ResNet-56, train
  python -m benchmarks.conv_levers --models simple_cnn,resnet56

Each lever is one `benchmarks.train_throughput` subprocess (XLA flags must be
set before jax is imported): conv_impl 'fast', batch 128, train steps only,
no torch. The baseline runs first and last to bracket the machine's speed
drift; each lever is reported relative to the mean of the baseline runs.

Levers: two host devices with the batch sharded (data parallelism over the
two cores), single-threaded Eigen, no buffer donation, batch 64 / 256, and
the weight-gradient chunk size of `pfa_jax.conv`.

With ``--part layers`` it instead times single 3x3 conv layers (forward,
input gradient, weight gradient) at batch 128 for lax, `pfa_jax.conv`,
`pfa_jax.onednn` and PyTorch (oneDNN, channels_last), interleaved, in GFLOP/s against a plain
float32 matmul, and writes ``benchmarks/results/conv_layers.json``.

With ``--part narrow`` it times the forward 3x3 convolutions of a pruned
ResNet-56 block (full-width stream in, narrow inner out, and back) against
the full-width layer, `pfa_jax.onednn` and PyTorch, and writes
``benchmarks/results/conv_narrow.json``: whether a layer with 1/4 of the
FLOPs takes 1/4 of the time (issue 12 section 3). With ``--part pack`` it
times 1-8-channel outputs with and without `pfa_jax.onednn.pack_factor`'s
packed forward, and writes ``benchmarks/results/conv_pack.json``. With
``--part narrow_kernel`` it times the three forwards of a narrow-output layer
(oneDNN plain, packed, `native/narrow_conv.cc`) against each other and
records `pfa_jax.onednn.forward_algo`'s choice, in
``benchmarks/results/conv_narrow_kernel.json``. With ``--part narrow_wide``
it times 4-16-channel outputs on oneDNN and on the narrow kernel, plain
forward and folded inference (`conv_bias_act`: bias + ReLU) on inputs of
both signs, and the narrow kernel's folded call again on inputs of one
sign (a data-dependent epilogue shows as a gap), in
``benchmarks/results/conv_narrow_wide.json``. With ``--part tail_split``
it times the folded call (`conv_bias_act`: bias + ReLU) of layers of
16 m + t outputs with the channel tail split off
(`pfa_jax.onednn.tail_split`: oneDNN on 16 m channels, the narrow kernel on
t) against the whole layer on oneDNN, interleaved, in
``benchmarks/results/conv_tail_split.json``. With ``--part inline`` it
times batch-1 folded calls run single-threaded on the calling thread
against the same calls handed to the team thread
(`pfa_jax.onednn.call_threads`), interleaved, in
``benchmarks/results/conv_inline.json``.

Writes ``benchmarks/results/conv_levers.json``.
"""

import argparse
import datetime
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile

from pfa_jax import hostmem

_RESULTS = os.path.join(os.path.dirname(__file__), 'results')
_OUT = os.path.join(_RESULTS, 'conv_levers.json')
# (name, H=W, Cin, Cout, stride) at batch 128: VGG-16 / ResNet-56 layers.
LAYERS = (
  ('vgg_32x32x64', 32, 64, 64, 1),
  ('vgg_16x16x128', 16, 128, 128, 1),
  ('vgg_8x8x256', 8, 256, 256, 1),
  ('vgg_4x4x512', 4, 512, 512, 1),
  ('vgg_2x2x512', 2, 512, 512, 1),
  ('resnet_32x32x16', 32, 16, 16, 1),
  ('resnet_32to16_s2', 32, 16, 32, 2),
)

# name -> (extra XLA_FLAGS, extra train_throughput args)
LEVERS = {
  'data_parallel_2_host_devices': (
    '--xla_force_host_platform_device_count=2',
    ['--data-parallel'],
  ),
  'eigen_single_thread': ('--xla_cpu_multi_thread_eigen=false', []),
  'no_donation': ('', ['--no-donate']),
  'batch_64': ('', ['--batch', '64']),
  'batch_256': ('', ['--batch', '256']),
  'chunk_1MiB': ('', ['--chunk-bytes', str(2**20)]),
  'chunk_16MiB': ('', ['--chunk-bytes', str(16 * 2**20)]),
}


def _run(xla_flags, extra, args):
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, 'r.json')
    cmd = [
      sys.executable,
      '-m',
      'benchmarks.train_throughput',
      '--models',
      args.models,
      '--impls',
      'fast',
      '--modes',
      'train',
      '--no-torch',
      '--steps',
      str(args.steps),
      '--repeats',
      str(args.repeats),
      '--out',
      out,
      *extra,
    ]
    env = dict(os.environ)
    env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + ' ' + xla_flags).strip()
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    with open(out) as f:
      rep = json.load(f)
  return {
    m: r['train']['jax_fast']['median_img_s']
    for m, r in rep['results_img_s'].items()
  }


def _median_time(fn, reps):
  import time  # noqa: PLC0415

  fn()
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts)


def _jax_layer_fns(x, w, g, s):
  """{(impl, op): (jitted fn, args)} for one layer."""
  import jax  # noqa: PLC0415

  from pfa_jax import conv  # noqa: PLC0415

  fns = {}
  for impl in ('xla', 'fast', 'onednn'):
    f = conv.get_conv(impl)

    def fwd(x, w, f=f):
      return f(x, w, (s, s), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

    def d_input(w, g, fwd=fwd):
      return jax.vjp(lambda x_: fwd(x_, w), x)[1](g)[0]

    def d_weight(x, g, fwd=fwd):
      return jax.vjp(lambda w_: fwd(x, w_), w)[1](g)[0]

    fns[(impl, 'fwd')] = (jax.jit(fwd), (x, w))
    fns[(impl, 'd_input')] = (jax.jit(d_input), (w, g))
    fns[(impl, 'd_weight')] = (jax.jit(d_weight), (x, g))
  return fns


def _torch_layer_fns(torch, x, w, g, s):
  """{('torch', op): fn} for one layer (oneDNN, channels_last)."""
  tx = torch.from_numpy(x).permute(0, 3, 1, 2)  # channels_last view
  tw = torch.from_numpy(w).permute(3, 2, 0, 1)
  tw = tw.contiguous(memory_format=torch.channels_last)
  tg = torch.from_numpy(g).permute(0, 3, 1, 2)
  conv_bwd = torch.ops.aten.convolution_backward

  def bwd(mask):
    return lambda: conv_bwd(
      tg, tx, tw, None, [s, s], [1, 1], [1, 1], False, [0, 0], 1, mask
    )

  return {
    ('torch', 'fwd'): lambda: torch.nn.functional.conv2d(tx, tw, None, s, 1),
    ('torch', 'd_input'): bwd([True, False, False]),
    ('torch', 'd_weight'): bwd([False, True, False]),
  }


def layer_table(reps=3, batch=128):
  """GFLOP/s of fwd / d_input / d_weight per layer, lax / fast / onednn / torch."""
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  try:
    import torch  # noqa: PLC0415

    torch.set_num_threads(2)
  except ImportError:
    torch = None
  n = 2048
  a = jax.numpy.ones((n, n))
  mm = jax.jit(lambda a: a @ a)
  peak = 2 * n**3 / _median_time(lambda: mm(a).block_until_ready(), reps) / 1e9
  rows = {}
  for name, hw, cin, cout, s in LAYERS:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, hw, hw, cin), np.float32)
    w = rng.standard_normal((3, 3, cin, cout), np.float32)
    ho = (hw + s - 1) // s
    g = rng.standard_normal((batch, ho, ho, cout), np.float32)
    gflop = 2 * batch * ho * ho * 9 * cin * cout / 1e9
    calls = {
      k: (lambda f=f, a=args: jax.block_until_ready(f(*a)))
      for k, (f, args) in _jax_layer_fns(x, w, g, s).items()
    }
    if torch is not None:
      calls.update(_torch_layer_fns(torch, x, w, g, s))
    times = {k: [] for k in calls}
    for call in calls.values():
      call()  # compile / warm up
    for _ in range(reps):  # interleaved
      for k, call in calls.items():
        times[k].append(_median_time(call, 1))
    rows[name] = {
      f'{impl}_{op}': {
        'ms': round(1e3 * statistics.median(v), 2),
        'gflops': round(gflop / statistics.median(v), 1),
      }
      for (impl, op), v in times.items()
    }
    print(name, {k: v['gflops'] for k, v in rows[name].items()}, flush=True)
  report = {
    'benchmark': 'conv_layers',
    'date': datetime.datetime.now().isoformat(timespec='seconds'),
    'batch': batch,
    'matmul_2048_gflops': round(peak, 1),
    'layers_gflops_and_ms': rows,
    'load_average_end': list(os.getloadavg()),
  }
  print('matmul GFLOP/s', round(peak, 1))
  with open(os.path.join(_RESULTS, 'conv_layers.json'), 'w') as f:
    json.dump(report, f, indent=1)


# (H=W, stream width, inner widths): ResNet-56's stages at batch 128.
NARROW = ((32, 16, (4, 8, 16)), (16, 32, (8, 16, 32)), (8, 64, (16, 32, 64)))


def narrow_table(reps=7, batch=128):
  """Forward time of stream -> inner and inner -> stream convs, by width."""
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  try:
    import torch  # noqa: PLC0415

    torch.set_num_threads(2)
  except ImportError:
    torch = None
  rows = []
  for hw, full, inners in NARROW:
    for inner in inners:
      pairs = ((full, inner), (inner, full)) if inner < full else ((full,) * 2,)
      for cin, cout in pairs:
        rng = np.random.default_rng(0)
        x = rng.standard_normal((batch, hw, hw, cin), np.float32)
        w = rng.standard_normal((3, 3, cin, cout), np.float32)
        g = np.zeros((batch, hw, hw, cout), np.float32)
        f, args = _jax_layer_fns(x, w, g, 1)[('onednn', 'fwd')]
        calls = {'onednn': lambda f=f, a=args: jax.block_until_ready(f(*a))}
        if torch is not None:
          calls['torch'] = _torch_layer_fns(torch, x, w, g, 1)[('torch', 'fwd')]
        for call in calls.values():
          for _ in range(3):  # first calls: primitive creation, page faults
            call()
        times = {k: [] for k in calls}
        for _ in range(reps):  # interleaved
          for k, call in calls.items():
            times[k].append(_median_time(call, 1))
        gflop = 2 * batch * hw * hw * 9 * cin * cout / 1e9
        row = {
          'hw': hw,
          'cin': cin,
          'cout': cout,
          'flops_of_full': inner / full,
        }
        for k, v in times.items():
          ms = 1e3 * statistics.median(v)
          row[f'{k}_ms'] = round(ms, 3)
          row[f'{k}_gflops'] = round(gflop / ms * 1e3, 1)
        rows.append(row)
  for row in rows:  # time relative to the same stage's full-width layer
    ref = next(
      r for r in rows if r['hw'] == row['hw'] and r['cin'] == r['cout']
    )
    for k in ('onednn', 'torch'):
      if f'{k}_ms' in row:
        row[f'{k}_time_of_full'] = round(row[f'{k}_ms'] / ref[f'{k}_ms'], 3)
  cols = [k for k in rows[0] if k != 'hw']
  print(' '.join(f'{k:>16s}' for k in ['hw', *cols]))
  for row in rows:
    print(' '.join(f'{row.get(k, ""):>16}' for k in ['hw', *cols]))
  report = {
    'benchmark': 'conv_narrow',
    'date': datetime.datetime.now().isoformat(timespec='seconds'),
    'command': 'python -m benchmarks.conv_levers --part narrow',
    'batch': batch,
    'rows': rows,
    'load_average_end': list(os.getloadavg()),
  }
  with open(os.path.join(_RESULTS, 'conv_narrow.json'), 'w') as f:
    json.dump(report, f, indent=1)


# (H=W, input width): ResNet-56's stages; outputs of 1-8 channels.
PACK = ((32, 16), (16, 32), (8, 64))


def pack_table(
  reps=7, batch=128, couts=(1, 2, 3, 4, 5, 6, 8), stages=PACK, path=None
):
  """Narrow-output forward, packed (``onednn.pack_factor``) against not.

  Both programs are traced once, with ``PFA_JAX_ONEDNN_PACK_MAX`` 8 and 0,
  and timed interleaved; also the forward + both gradients (the packed
  layer's gradients are the plain layer's primitives).
  """
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  from pfa_jax import onednn  # noqa: PLC0415

  def conv(x, w):
    return onednn.conv_general_dilated(
      x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')
    )

  def grads(x, w):
    return jax.grad(lambda x, w: jnp.sum(conv(x, w) ** 2), (0, 1))(x, w)

  rows = []
  for hw, cin in stages:
    for cout in couts:
      rng = np.random.default_rng(0)
      x = jnp.asarray(rng.standard_normal((batch, hw, hw, cin), np.float32))
      w = jnp.asarray(rng.standard_normal((3, 3, cin, cout), np.float32))
      calls = {}
      # Packing against oneDNN's plain forward: the narrow kernel off.
      os.environ['PFA_JAX_ONEDNN_NARROW_MAX'] = '0'
      for tag, env in (('packed', '8'), ('plain', '0')):
        os.environ['PFA_JAX_ONEDNN_PACK_MAX'] = env
        for part, fn in (('fwd', conv), ('fwd_bwd', grads)):
          # A fresh function: jit's trace cache would hand back the program
          # traced under the other setting.
          c = jax.jit(lambda x, w, fn=fn: fn(x, w)).lower(x, w).compile()
          calls[(tag, part)] = lambda c=c, a=(x, w): jax.block_until_ready(
            c(*a)
          )
      os.environ.pop('PFA_JAX_ONEDNN_PACK_MAX')
      os.environ.pop('PFA_JAX_ONEDNN_NARROW_MAX')
      for call in calls.values():
        for _ in range(3):
          call()
      times = {k: [] for k in calls}
      for _ in range(reps):
        for k, call in calls.items():
          times[k].append(_median_time(call, 3))
      ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
      p = onednn.pack_factor(x.shape, w.shape, (1, 1), ((1, 1), (1, 1)))
      rows.append(
        {
          'hw': hw,
          'cin': cin,
          'cout': cout,
          'pack_factor_at_max8': p,
          **{f'{t}_{part}_ms': round(v, 3) for (t, part), v in ms.items()},
          'fwd_speedup': round(ms[('plain', 'fwd')] / ms[('packed', 'fwd')], 3),
          'fwd_bwd_speedup': round(
            ms[('plain', 'fwd_bwd')] / ms[('packed', 'fwd_bwd')], 3
          ),
        }
      )
      print(rows[-1])
  return _write_rows('conv_pack', 'pack', batch, rows, path)


# (H=W, Cin, Cout, stride): pruned ResNet-56 / VGG-16 layers with <= 8 outputs.
NARROW_KERNEL = (
  (32, 16, 1, 1),
  (32, 16, 2, 1),
  (32, 16, 3, 1),
  (32, 16, 4, 1),
  (32, 16, 6, 1),
  (32, 16, 8, 1),
  (32, 12, 4, 1),
  (16, 32, 4, 1),
  (16, 32, 8, 1),
  (8, 64, 4, 1),
  (8, 64, 8, 1),
  (32, 16, 8, 2),
  (16, 32, 8, 2),
  (32, 64, 8, 1),
)


def narrow_kernel_table(reps=7, batch=128, layers=NARROW_KERNEL, path=None):
  """Narrow-output forwards: oneDNN plain, packed and the narrow kernel.

  Each algorithm is `onednn._conv` with its static choice (1 = plain, P =
  `pack_factor`, 0 = narrow), timed interleaved; ``chosen`` is
  `onednn.forward_algo`'s pick and ``chosen_vs_best_other`` its time
  against the fastest of the others.
  """
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  from pfa_jax import onednn  # noqa: PLC0415

  if not onednn.narrow_available():
    raise SystemExit(f'narrow kernel not built: {onednn.status()}')
  rows = []
  for hw, cin, cout, s in layers:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, hw, hw, cin), np.float32))
    w = jnp.asarray(rng.standard_normal((3, 3, cin, cout), np.float32))
    pads = ((1, 1), (1, 1))
    p = onednn.pack_factor(x.shape, w.shape, (s, s), pads)
    algos = {'plain': 1, 'narrow': 0, **({f'pack{p}': p} if p > 1 else {})}
    st = (s, s)
    calls = {}
    for name, algo in algos.items():
      c = (
        jax.jit(
          lambda x, w, st=st, p=pads, a=algo: onednn._conv(x, w, st, p, a)
        )
        .lower(x, w)
        .compile()
      )
      calls[name] = lambda c=c, x=x, w=w: jax.block_until_ready(c(x, w))
    ms = _interleaved_ms(calls, reps)
    chosen = onednn.forward_algo(x.shape, w.shape, (s, s), pads)
    chosen = {0: 'narrow', 1: 'plain'}.get(chosen, f'pack{chosen}')
    flops = 2 * batch * (hw // s) ** 2 * 9 * cin * cout
    rows.append(
      {
        'hw': hw,
        'cin': cin,
        'cout': cout,
        'stride': s,
        **{f'{k}_ms': round(v, 3) for k, v in ms.items()},
        'narrow_gflops': round(flops / ms['narrow'] / 1e6, 1),
        'chosen': chosen,
        'chosen_vs_best_other': round(
          min(v for k, v in ms.items() if k != chosen) / ms[chosen], 3
        ),
      }
    )
    print(rows[-1], flush=True)
  return _write_rows('conv_narrow_kernel', 'narrow_kernel', batch, rows, path)


# (H=W, Cin, Cout): pruned ResNet-56 layers of 4-15 outputs (stride 1), and
# 16-output controls.
NARROW_WIDE = (
  (32, 16, 4),
  (32, 16, 8),
  (32, 16, 9),
  (32, 16, 10),
  (32, 16, 12),
  (32, 16, 14),
  (32, 16, 16),
  (32, 10, 10),
  (32, 12, 10),
  (32, 10, 12),
  (32, 4, 12),
  (32, 8, 12),
  (16, 16, 13),
  (16, 32, 14),
  (16, 24, 15),
  (16, 16, 16),
)


def _write_rows(name, part, batch, rows, path=None):
  """Writes one ``--part``'s rows with the run's context; returns the rows."""
  from benchmarks import common  # noqa: PLC0415

  report = {
    'benchmark': name,
    'date': datetime.datetime.now().isoformat(timespec='seconds'),
    'command': f'python -m benchmarks.conv_levers --part {part}',
    'machine': common.machine(),
    'batch': batch,
    'load_average_start': list(common.START_LOAD),
    'loaded': common.loaded(),
    'rows': rows,
    'load_average_end': list(os.getloadavg()),
  }
  with open(path or os.path.join(_RESULTS, f'{name}.json'), 'w') as f:
    json.dump(report, f, indent=1)
  return rows


def _interleaved_ms(calls, reps):
  """Median ms of each blocking call: warmed up, then ``reps`` interleaved
  rounds of a 5-call median each."""
  for call in calls.values():
    call()
  times = {k: [] for k in calls}
  for _ in range(reps):
    for k, call in calls.items():
      times[k].append(_median_time(call, 5))
  return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def _block(fn, *args):
  import jax  # noqa: PLC0415

  return jax.block_until_ready(fn(*args))


def _folded_calls(key, settings, x, w, b):
  """Blocking calls of the folded 3x3 layer (bias + ReLU), one per setting.

  ``settings``: name -> (value of environment variable ``key``, a string
  the traced program must contain, or None). Each is a fresh trace: the
  settings are read at trace time.
  """
  import jax  # noqa: PLC0415

  from benchmarks import common  # noqa: PLC0415
  from pfa_jax import onednn  # noqa: PLC0415

  calls = {}
  for name, (value, marker) in settings.items():
    with common.env(key, value):
      fold = jax.jit(
        lambda x, w, b: onednn.conv_bias_act(x, w, b, (1, 1), 'SAME', relu=True)
      ).lower(x, w, b)
    if marker is not None and marker not in fold.as_text():
      raise RuntimeError(f'{x.shape} -> {w.shape[-1]}: no {marker} call')
    calls[name] = functools.partial(_block, fold.compile(), x, w, b)
  return calls


def _folded_inputs(batch, hw, cin, cout):
  """A post-ReLU map (x >= 0), 3x3 weights and a bias of both signs."""
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  rng = np.random.default_rng(0)
  x = np.maximum(rng.standard_normal((batch, hw, hw, cin)), 0)
  w = rng.standard_normal((3, 3, cin, cout)) / (3 * cin**0.5)
  b = rng.standard_normal(cout)
  return tuple(jnp.asarray(a, np.float32) for a in (x, w, b))


def narrow_wide_table(reps=7, batch=128, layers=NARROW_WIDE, path=None):
  """oneDNN against the narrow kernel for 4-16 outputs, forward and folded.

  Each setting is a fresh trace (the switch is read at trace time):
  ``PFA_JAX_ONEDNN_NARROW_MAX=0`` for oneDNN, 16 for the narrow kernel.
  Inputs: post-ReLU maps (x >= 0), weights and bias of both signs, so the
  folded call's ReLU cuts about half; ``narrow_fold_one_sign_ms`` repeats
  the narrow folded call with |w|, |b| (no output is cut).
  """
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from benchmarks import common  # noqa: PLC0415
  from pfa_jax import onednn  # noqa: PLC0415

  if not onednn.narrow_available():
    raise SystemExit(f'narrow kernel not built: {onednn.status()}')
  pads = ((1, 1), (1, 1))
  rows = []
  for hw, cin, cout in layers:
    x, w, b = _folded_inputs(batch, hw, cin, cout)
    calls = {}
    for name, env in (('onednn', '0'), ('narrow', '16')):
      with common.env('PFA_JAX_ONEDNN_NARROW_MAX', env):
        algo = onednn.forward_algo(x.shape, w.shape, (1, 1), pads)
        fwd = jax.jit(lambda x, w, a=algo: onednn._conv(x, w, (1, 1), pads, a))
        fold = jax.jit(
          lambda x, w, b: onednn.conv_bias_act(
            x, w, b, (1, 1), 'SAME', relu=True
          )
        )
        fwd = fwd.lower(x, w).compile()
        fold = fold.lower(x, w, b).compile()
      calls[f'{name}_fwd'] = functools.partial(_block, fwd, x, w)
      calls[f'{name}_fold'] = functools.partial(_block, fold, x, w, b)
      if name == 'narrow':
        calls['narrow_fold_one_sign'] = functools.partial(
          _block, fold, x, jnp.abs(w), jnp.abs(b)
        )
    ms = _interleaved_ms(calls, reps)
    flops = 2 * batch * hw * hw * 9 * cin * cout
    rows.append(
      {
        'hw': hw,
        'cin': cin,
        'cout': cout,
        **{f'{k}_ms': round(v, 3) for k, v in ms.items()},
        'fwd_onednn_over_narrow': round(ms['onednn_fwd'] / ms['narrow_fwd'], 3),
        'fold_onednn_over_narrow': round(
          ms['onednn_fold'] / ms['narrow_fold'], 3
        ),
        'narrow_fwd_gflops': round(flops / ms['narrow_fwd'] / 1e6, 1),
        'chosen': 'narrow'
        if onednn.forward_algo(x.shape, w.shape, (1, 1), pads) == 0
        else 'onednn',
      }
    )
    print(rows[-1], flush=True)
  return _write_rows('conv_narrow_wide', 'narrow_wide', batch, rows, path)


# (H=W, Cin, Cout) of --part tail_split: VGG-16 4x (PFA, no rounding) and
# ResNet-56 2x layers, and tails 1-12 at 32 x 32.
TAIL_SPLIT = (
  (32, 56, 52),
  (16, 52, 87),
  (16, 87, 85),
  (32, 56, 49),
  (32, 56, 50),
  (32, 56, 54),
  (32, 56, 56),
  (32, 64, 60),
  (32, 64, 36),
  (32, 16, 23),
  (16, 16, 17),
  (16, 24, 23),
  (16, 24, 24),
  (16, 13, 24),
)


def tail_split_table(reps=7, batch=128, layers=TAIL_SPLIT, path=None):
  """The folded call with its channel tail split off, against it whole.

  Each setting is a fresh trace (read at trace time):
  ``PFA_JAX_ONEDNN_TAIL_MAX`` 15 (split) and 0 (whole, oneDNN). Inputs as
  in :func:`narrow_wide_table` (post-ReLU maps, weights of both signs).
  """
  from pfa_jax import onednn  # noqa: PLC0415

  if not onednn.narrow_available():
    raise SystemExit(f'narrow kernel not built: {onednn.status()}')
  pads = ((1, 1), (1, 1))
  rows = []
  for hw, cin, cout in layers:
    x, w, b = _folded_inputs(batch, hw, cin, cout)
    calls = _folded_calls(
      'PFA_JAX_ONEDNN_TAIL_MAX',
      {'whole': ('0', 'dnnl_conv'), 'split': ('15', 'split_conv')},
      x,
      w,
      b,
    )
    ms = _interleaved_ms(calls, reps)
    flops = 2 * batch * hw * hw * 9 * cin * cout
    rows.append(
      {
        'hw': hw,
        'cin': cin,
        'cout': cout,
        'tail': cout % 16,
        **{f'{k}_ms': round(v, 3) for k, v in ms.items()},
        'split_over_whole': round(ms['split'] / ms['whole'], 3),
        'whole_gflops': round(flops / ms['whole'] / 1e6, 1),
        'split_gflops': round(flops / ms['split'] / 1e6, 1),
        'chosen': 'split'
        if onednn.tail_split(x.shape, w.shape, (1, 1), pads)
        else 'whole',
      }
    )
    print(rows[-1], flush=True)
  return _write_rows('conv_tail_split', 'tail_split', batch, rows, path)


# (H=W, Cin, Cout) of --part inline: batch-1 layers of a pruned and the
# full ResNet-56 and VGG-16-CIFAR, 0.3-75 MFLOP a call (2 x 2, 208 -> 200:
# VGG-16 2x round 8's two inline calls).
INLINE = (
  (32, 3, 8),
  (2, 208, 200),
  (2, 512, 512),
  (8, 16, 16),
  (32, 8, 8),
  (16, 16, 16),
  (32, 16, 8),
  (32, 8, 16),
  (16, 32, 32),
  (32, 16, 16),
  (8, 64, 64),
  (4, 128, 128),
  (16, 64, 64),
  (32, 32, 32),
  (32, 64, 64),
)


def inline_table(reps=7, batch=1, layers=INLINE, path=None):
  """The folded call on the calling thread against the team thread.

  Each setting is a fresh trace (`pfa_jax.onednn.call_threads` reads
  ``PFA_JAX_ONEDNN_INLINE_MFLOPS`` at trace time): 1e9 (every call
  single-threaded on the calling thread) and 0 (every call handed to the
  team thread, `THREADS` threads). Inputs as in :func:`narrow_wide_table`
  (post-ReLU maps, weights of both signs); each row records the kernel
  (`forward_algo`: narrow or oneDNN) and which way the default threshold
  (`INLINE_MFLOPS`) sends the call.
  """
  from pfa_jax import onednn  # noqa: PLC0415

  if not onednn.available():
    raise SystemExit(f'oneDNN kernel not built: {onednn.status()}')
  pads = ((1, 1), (1, 1))
  rows = []
  for hw, cin, cout in layers:
    x, w, b = _folded_inputs(batch, hw, cin, cout)
    calls = _folded_calls(
      'PFA_JAX_ONEDNN_INLINE_MFLOPS',
      {'inline': ('1e9', None), 'team': ('0', None)},
      x,
      w,
      b,
    )
    ms = _interleaved_ms(calls, reps)
    flops = 2 * batch * hw * hw * 9 * cin * cout
    algo = onednn.forward_algo(x.shape, w.shape, (1, 1), pads)
    rows.append(
      {
        'hw': hw,
        'cin': cin,
        'cout': cout,
        'mflop': round(flops / 1e6, 3),
        'kernel': 'narrow' if algo == 0 else 'dnnl',
        **{f'{k}_us': round(1e3 * v, 1) for k, v in ms.items()},
        'inline_over_team': round(ms['inline'] / ms['team'], 3),
        'default': 'inline'
        if onednn.call_threads(x.shape, w.shape, (hw, hw)) == 1
        else 'team',
      }
    )
    print(rows[-1], flush=True)
  return _write_rows('conv_inline', 'inline', batch, rows, path)


def main(argv=None):
  hostmem.retain_freed_memory()  # before the first JAX computation
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--models', default='resnet56')
  p.add_argument('--steps', type=int, default=2)
  p.add_argument('--repeats', type=int, default=2)
  p.add_argument('--levers', default=','.join(LEVERS))
  p.add_argument('--out', default=_OUT)
  p.add_argument(
    '--part',
    default='levers',
    choices=(
      'levers',
      'layers',
      'narrow',
      'pack',
      'narrow_kernel',
      'narrow_wide',
      'tail_split',
      'inline',
    ),
  )
  args = p.parse_args(argv)
  if args.part == 'layers':
    layer_table()
    return
  if args.part == 'narrow':
    narrow_table()
    return
  if args.part == 'pack':
    pack_table()
    return
  if args.part == 'narrow_kernel':
    narrow_kernel_table()
    return
  if args.part == 'narrow_wide':
    narrow_wide_table()
    return
  if args.part == 'tail_split':
    tail_split_table()
    return
  if args.part == 'inline':
    inline_table()
    return

  baselines = [_run('', [], args)]
  print('baseline', baselines[-1], flush=True)
  raw = {}
  for name in args.levers.split(','):
    raw[name] = _run(*LEVERS[name], args)
    print(name, raw[name], flush=True)
  baselines.append(_run('', [], args))
  print('baseline', baselines[-1], flush=True)

  base = {m: statistics.mean(b[m] for b in baselines) for m in baselines[0]}
  rel = {
    name: {m: round(v / base[m], 3) for m, v in r.items()}
    for name, r in raw.items()
  }
  print('\nimg/s relative to baseline (fast, batch 128, donation, 1 device):')
  for name, r in rel.items():
    print(f'  {name:30s} {r}')
  report = {
    'benchmark': 'conv_levers',
    'date': datetime.datetime.now().isoformat(timespec='seconds'),
    'command': 'python -m benchmarks.conv_levers ' + ' '.join(sys.argv[1:]),
    'baseline_runs_img_s': baselines,
    'lever_img_s': raw,
    'relative_to_baseline': rel,
    'levers': {k: {'xla_flags': v[0], 'args': v[1]} for k, v in LEVERS.items()},
    'load_average_end': list(os.getloadavg()),
  }
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(report, f, indent=1)
    print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
