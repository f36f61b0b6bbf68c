"""Training/evaluation throughput of pfa_jax models vs a PyTorch reference.

Run from the repository root::

  python -m benchmarks.train_throughput            # all three models
  python -m benchmarks.train_throughput --models simple_cnn --steps 3

Times the library's own jitted `pfa_jax.steps.train_step` (state donated;
SGD momentum + weight decay from `pfa_jax.optim`; softmax CE; BN
batch_stats carried) and `steps.eval_step` for SimpleCNN, VGG-16 (CIFAR) and
ResNet-56 at batch 128 on 32x32x3 float32 inputs, for each `conv_impl` in
`--impls` ('xla' = lax's convolution, 'fast' = `pfa_jax.conv`, 'onednn' =
`pfa_jax.onednn`), and the same three architectures in PyTorch eager
(float32, channels_last, 2 threads; its convolutions are oneDNN's) when
torch is importable (`make bench-deps`), in its own process: each
framework's idle thread pool would otherwise spin on the cores while the
other runs. Both processes get `pfa_jax.hostmem.retain_freed_memory` (glibc
keeps freed memory mapped; both frameworks allocate with ``malloc`` and
both gain); ``--torch-default-malloc`` leaves PyTorch's on glibc's defaults. Repetitions are interleaved
round-robin over all (framework, model, mode) cells because this shared
2-core machine's speed drifts by up to 2.5x within minutes; medians are
reported, with the images timed per cell (equal on both sides) and the load
average before and after each repetition. ``"loaded": true`` marks a run
started on a busy machine (``benchmarks.common.loaded``: the 1-minute load
average above 1 before it did any work): its absolute img/s are low, its
within-run ratios still comparable. Also measures a plain
float32 matmul's GFLOP/s (the peak reference) and each model's achieved
GFLOP/s (XLA's forward FLOP count x 3 for training, x 1 for eval).

``--device gpu`` times the same on one GPU: JAX with ``conv_impl='xla'``
only (XLA:GPU's convolutions are cuDNN's; 'fast' and 'onednn' are CPU
kernels), PyTorch eager on ``cuda`` (channels_last, ``cudnn.benchmark``),
each side synchronised around its timed region, with 50 steps per cell, 5
repetitions and no ``--gap`` by default; no CPU levers (thread count,
retained memory). ``--precision`` is the same on both sides: 'highest'
(JAX ``default_matmul_precision('highest')``, torch TF32 off for matmuls and
cuDNN) or 'tf32' (JAX's default precision, torch TF32 on); on CPU it is
'highest'. There is no bfloat16 mode: the models have no compute-dtype
option, and bfloat16 JAX against float32 PyTorch would compare nothing. JAX
initialises the GPU first and keeps its default memory preallocation (75%);
PyTorch's process uses what is left. The peak reference is an 8192^2 matmul
there. Without a CUDA-enabled PyTorch, ``--device gpu`` stops with an error
(``--no-torch`` times JAX alone)::

  PFA_JAX_BENCH_RESULTS=$OUT python -m benchmarks.train_throughput --device gpu

Writes ``train_throughput.json`` (``train_throughput_gpu.json`` with
``--device gpu``) under ``benchmarks/results/``, or under the folder that
``PFA_JAX_BENCH_RESULTS`` names; ``--out`` overrides.
"""

import argparse
import contextlib
import datetime
import functools
import json
import os
import platform
import statistics
import sys
import time

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from benchmarks import common
from pfa_jax import conv
from pfa_jax import hostmem
from pfa_jax import models
from pfa_jax import onednn
from pfa_jax import optim
from pfa_jax import sharding
from pfa_jax import steps

MODEL_NAMES = ('simple_cnn', 'vgg16_cifar', 'resnet56')
# Per device: the defaults of the options left unset, the JSON's file name,
# the peak reference matmul's size and PyTorch's device. A GPU step takes
# milliseconds: more steps per cell, and no idle gap (no spinning CPU pools
# to wait out; an idle GPU would clock down).
_DEVICE = {
  'cpu': {
    'defaults': {
      'impls': 'xla,fast,onednn',
      'steps': 2,
      'repeats': 3,
      'gap': 3.0,
    },
    'out': 'train_throughput.json',
    'matmul_n': 2048,
    'torch': 'cpu',
  },
  'gpu': {
    'defaults': {'impls': 'xla', 'steps': 50, 'repeats': 5, 'gap': 0.0},
    'out': 'train_throughput_gpu.json',
    'matmul_n': 8192,
    'torch': 'cuda',
  },
}
_LR, _MOMENTUM, _WD = 0.05, 0.9, 5e-4

# --------------------------------------------------------------------------
# JAX


def _optim_config():
  return ml_collections.ConfigDict(
    {
      'optim': {
        'name': 'sgd',
        'weight_decay': _WD,
        'bn_l1': 0.0,
        'momentum': _MOMENTUM,
        'nesterov': False,
      }
    }
  )


def conv_path(impl, device='cpu'):
  """What computes the convolutions for ``impl`` (for the JSON)."""
  if device == 'gpu':
    return {'xla': 'lax.conv_general_dilated (XLA:GPU, cuDNN)'}.get(impl, impl)
  if impl == 'onednn':
    if onednn.available():
      return 'oneDNN 3.2 (onednn-cpu-gomp) via XLA FFI, custom_vjp'
    return f'pfa_jax.conv fallback ({onednn.status()["reason"][:200]})'
  return {
    'xla': 'lax.conv_general_dilated (XLA:CPU)',
    'fast': 'pfa_jax.conv: XLA conv fwd/dgrad + im2col GEMM wgrad',
    'auto': f'{conv.get_conv("auto").__module__}.conv_general_dilated',
  }.get(impl, impl)


def make_jax_runner(
  name,
  impl,
  batch,
  variables,
  num_classes=10,
  seed=0,
  donate=True,
  data_parallel=False,
):
  """Returns {'train': fn(steps) -> s, 'eval': ...} for the library's steps.

  Training is `pfa_jax.steps.train_step` (jitted, state donated) on a
  `pfa_jax.steps.TrainState` built by `steps.create_train_state` with the
  library's optimizer (`optim.create_optimizer`: weight decay + SGD
  momentum); evaluation is the training loop's own eval step
  (`pfa_jax.steps.eval_step_for`: `steps.eval_step` with BN folded into the
  convs on the oneDNN path, ``fold=True``).
  """
  model = models.get_model(name, num_classes=num_classes, conv_impl=impl)
  return make_model_runner(
    model, variables, batch, num_classes, seed, donate, data_parallel
  )


def make_model_runner(
  model,
  variables,
  batch,
  num_classes=10,
  seed=0,
  donate=True,
  data_parallel=False,
  fold=True,
):
  """`make_jax_runner` for any (model, variables), e.g. a pruned network.

  ``fold=False`` times the unfolded `steps.eval_step` (the A/B of folding).
  """
  variables = jax.tree.map(jnp.copy, variables)  # train_step donates its state
  lr_fn = optim.learning_rate_schedule(
    base_lr=_LR, schedule='constant', num_steps=1
  )
  state = steps.create_train_state(
    jax.random.PRNGKey(0),
    _optim_config(),
    model,
    (32, 32, 3),
    lr_fn=lr_fn,
    variables=variables,
  )
  rng = np.random.default_rng(seed)
  batch_ = {
    'image': jnp.asarray(rng.standard_normal((batch, 32, 32, 3), np.float32)),
    'label': jnp.asarray(rng.integers(0, num_classes, batch), jnp.int32),
    'mask': jnp.ones((batch,), jnp.float32),
  }
  key = jax.random.PRNGKey(1)
  if data_parallel:  # batch sharded over all (host) devices, state replicated
    mesh = sharding.make_mesh()
    batch_ = jax.device_put(batch_, sharding.data_sharding(mesh))
    state, key = jax.device_put((state, key), sharding.replicated(mesh))

  p_train = jax.jit(
    functools.partial(steps.train_step, lr_fn=lr_fn),
    donate_argnums=0 if donate else (),
  )
  # A fresh function per runner: runners traced under different switches
  # (benchmarks.native_levers) must not share jit's trace cache.
  eval_fn = steps.eval_step_for(model) if fold else steps.eval_step
  p_eval = jax.jit(lambda state, batch: eval_fn(state, batch))
  holder = [state]

  def run_train(num_steps):
    t0 = time.perf_counter()
    for _ in range(num_steps):
      holder[0], metrics = p_train(holder[0], batch_, key)
    jax.block_until_ready((holder[0], metrics))
    return time.perf_counter() - t0

  def run_eval(num_steps):
    t0 = time.perf_counter()
    for _ in range(num_steps):
      out = p_eval(holder[0], batch_)
    jax.block_until_ready(out)
    return time.perf_counter() - t0

  return {'train': run_train, 'eval': run_eval}


def forward_flops(name, variables, batch, num_classes=10):
  """XLA's forward FLOP count per image (lax convolutions; no compile)."""
  model = models.get_model(name, num_classes=num_classes, conv_impl='xla')
  x = jax.ShapeDtypeStruct((batch, 32, 32, 3), jnp.float32)
  lowered = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(
    variables, x
  )
  cost = lowered.cost_analysis()
  if isinstance(cost, list):  # older jax returned one dict per device
    cost = cost[0]
  return float((cost or {}).get('flops', 0.0)) / batch


# --------------------------------------------------------------------------
# PyTorch reference (same architectures, channels_last, eager)


def make_torch_runner(name, batch, num_classes=10, seed=0, device='cpu'):
  """Returns {'train': fn(steps) -> s, 'eval': ..., 'num_params': int}.

  ``device`` is torch's ('cpu' or 'cuda'); on 'cuda' each timed region
  starts and ends with ``torch.cuda.synchronize()``. ``num_params`` counts
  the trainable parameters (BN running statistics are buffers), to compare
  with the JAX model's ``params``.
  """
  import torch  # noqa: PLC0415
  from torch import nn as tnn  # noqa: PLC0415

  def conv_bn(cin, cout, k=3, s=1, pad=1, relu=True):
    layers = [
      tnn.Conv2d(cin, cout, k, s, pad, bias=False),
      tnn.BatchNorm2d(cout, momentum=0.1, eps=1e-5),
    ]
    return tnn.Sequential(*layers, *([tnn.ReLU(inplace=True)] if relu else []))

  def simple_cnn():
    w = (96, 96, 96, 192, 192, 192, 192, 192)
    mods, cin = [], 3
    for i, c in enumerate(w):
      k, s = (1, 1) if i == 7 else (3, 2 if i in (2, 5) else 1)
      pad = 0 if i in (6, 7) else 1
      mods.append(conv_bn(cin, c, k, s, pad))
      if i in (2, 5):
        mods.append(tnn.Dropout(0.5))
      cin = c
    mods += [
      tnn.Conv2d(cin, num_classes, 1),
      tnn.AdaptiveAvgPool2d(1),
      tnn.Flatten(),
    ]
    return tnn.Sequential(*mods)

  def vgg16():
    w = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
    mods, cin = [], 3
    for i, c in enumerate(w):
      mods.append(conv_bn(cin, c))
      if i in (1, 3, 6, 9, 12):
        mods.append(tnn.MaxPool2d(2))
      else:
        mods.append(tnn.Dropout(0.3 if i == 0 else 0.4))
      cin = c
    mods += [
      tnn.Flatten(),
      tnn.Dropout(0.5),
      tnn.Linear(512, 512, bias=False),
      tnn.BatchNorm1d(512),
      tnn.ReLU(inplace=True),
      tnn.Dropout(0.5),
      tnn.Linear(512, num_classes),
    ]
    return tnn.Sequential(*mods)

  class Block(tnn.Module):
    def __init__(self, cin, cout, stride):
      super().__init__()
      self.body = tnn.Sequential(
        conv_bn(cin, cout, s=stride), conv_bn(cout, cout, relu=False)
      )
      self.stride, self.pad = stride, cout - cin

    def forward(self, x):
      sc = x
      if self.stride > 1:  # option A: subsample, zero-pad channels
        sc = x[:, :, ::2, ::2]
        p = self.pad // 2
        sc = tnn.functional.pad(sc, (0, 0, 0, 0, p, self.pad - p))
      return torch.relu(self.body(x) + sc)

  def resnet56():
    mods, cin = [conv_bn(3, 16)], 16
    for s, c in enumerate((16, 32, 64)):
      for b in range(9):
        mods.append(Block(cin, c, 2 if (s > 0 and b == 0) else 1))
        cin = c
    mods += [
      tnn.AdaptiveAvgPool2d(1),
      tnn.Flatten(),
      tnn.Linear(64, num_classes),
    ]
    return tnn.Sequential(*mods)

  torch.manual_seed(seed)
  net = {'simple_cnn': simple_cnn, 'vgg16_cifar': vgg16, 'resnet56': resnet56}
  model = net[name]().to(device=device, memory_format=torch.channels_last)
  opt = torch.optim.SGD(
    model.parameters(), lr=_LR, momentum=_MOMENTUM, weight_decay=_WD
  )
  x = torch.randn(batch, 3, 32, 32, device=device)
  x = x.to(memory_format=torch.channels_last)
  y = torch.randint(0, num_classes, (batch,), device=device)
  loss_fn = tnn.CrossEntropyLoss()
  sync = _torch_sync(torch, device)

  def run_train(steps):
    model.train()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
      opt.zero_grad(set_to_none=True)
      loss = loss_fn(model(x), y)
      loss.backward()
      opt.step()
    loss.item()
    sync()
    return time.perf_counter() - t0

  def run_eval(steps):
    model.eval()
    sync()
    t0 = time.perf_counter()
    with torch.no_grad():
      for _ in range(steps):
        out = (model(x).argmax(-1) == y).sum()
    out.item()
    sync()
    return time.perf_counter() - t0

  return {
    'train': run_train,
    'eval': run_eval,
    'num_params': sum(p.numel() for p in model.parameters()),
  }


def _torch_sync(torch, device):
  """Waits for ``device``'s queued work (CUDA); a no-op on the CPU."""
  if device == 'cuda':
    return torch.cuda.synchronize
  return lambda: None


# --------------------------------------------------------------------------
# Peak reference


def matmul_gflops(n=2048, reps=3):
  """GFLOP/s of a float32 [n, n] @ [n, n] in XLA (median of reps)."""
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32))
  mm = jax.jit(lambda a: a @ a)
  mm(a).block_until_ready()
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    mm(a).block_until_ready()
    ts.append(time.perf_counter() - t0)
  return 2 * n**3 / statistics.median(ts) / 1e9


def torch_matmul_gflops(n=2048, reps=3, device='cpu'):
  """`matmul_gflops` in PyTorch on ``device`` ('cpu' or 'cuda')."""
  import torch  # noqa: PLC0415

  sync = _torch_sync(torch, device)
  a = torch.randn(n, n, device=device)
  a @ a
  sync()
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    a @ a
    sync()
    ts.append(time.perf_counter() - t0)
  return 2 * n**3 / statistics.median(ts) / 1e9


# --------------------------------------------------------------------------


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--device', choices=tuple(_DEVICE), default='cpu')
  p.add_argument(
    '--precision',
    choices=('highest', 'tf32'),
    default='highest',
    help="float32 matmuls and convs on the GPU, both sides ('highest' on CPU)",
  )
  p.add_argument('--models', default=','.join(MODEL_NAMES))
  p.add_argument(
    '--impls', default=None, help="default: xla,fast,onednn (gpu: 'xla')"
  )
  p.add_argument('--modes', default='train,eval')
  p.add_argument('--batch', type=int, default=128)
  p.add_argument(
    '--steps', type=int, default=None, help='steps per repetition (2; gpu: 50)'
  )
  p.add_argument('--repeats', type=int, default=None, help='3 (gpu: 5)')
  p.add_argument(
    '--warmup-rounds',
    type=int,
    default=2,
    help='untimed rounds over all cells first (the heap reaches its size)',
  )
  p.add_argument(
    '--gap',
    type=float,
    default=None,
    help="idle seconds before each cell, so that the other process's "
    'spinning thread pools are asleep (session 11: with 1 s, 2 of 6 JAX '
    'ResNet-56 training repetitions ran at ~100 instead of ~330 img/s; '
    'results/train_throughput_session11.log). Default 3 (gpu: 0)',
  )
  p.add_argument('--no-torch', action='store_true')
  p.add_argument(
    '--torch-default-malloc',
    action='store_true',
    help="leave PyTorch's process on glibc's default malloc settings "
    '(default: the same retain_freed_memory as the JAX side)',
  )
  p.add_argument(
    '--out',
    default=None,
    help="JSON path ('' = don't write; default: see the module docstring)",
  )
  p.add_argument('--note', action='append', default=[])
  # Levers (see benchmarks/conv_levers.py).
  p.add_argument('--no-donate', action='store_true')
  p.add_argument(
    '--data-parallel',
    action='store_true',
    help='shard the batch over all devices (set XLA_FLAGS='
    '--xla_force_host_platform_device_count=2 before starting)',
  )
  p.add_argument('--chunk-bytes', type=int, default=None)
  p.add_argument('--small-map', type=int, default=None)
  args = p.parse_args(argv)
  for key, value in _DEVICE[args.device]['defaults'].items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  if args.out is None:
    args.out = os.path.join(common.RESULTS, _DEVICE[args.device]['out'])
  if args.device == 'gpu' and set(args.impls.split(',')) - {'xla', ''}:
    p.error(
      f"--device gpu times conv_impl 'xla' only, got --impls {args.impls}"
    )
  return args


def _load():
  try:
    return [round(v, 2) for v in os.getloadavg()]
  except OSError:
    return None


def _torch_info(torch, device='cpu'):
  """Torch's conv library as its build config reports it (and its GPU)."""
  cfg = torch.__config__.show()
  dnn = [
    ln.strip() for ln in cfg.splitlines() if 'oneDNN' in ln or 'MKL-DNN' in ln
  ]
  info = {
    'version': torch.__version__,
    'device': device,
    'dtype': str(torch.get_default_dtype()).removeprefix('torch.'),
    'threads': torch.get_num_threads(),
    'mkldnn_enabled': bool(torch.backends.mkldnn.is_available()),
    'onednn': dnn[0][:120] if dnn else None,
  }
  if device == 'cuda':
    info.update(
      cuda_device=torch.cuda.get_device_name(),
      cuda=torch.version.cuda,
      cudnn=torch.backends.cudnn.version(),
      cudnn_benchmark=torch.backends.cudnn.benchmark,
      matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
      cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
    )
  return info


def _torch_conv_path(info):
  """What computes PyTorch's convolutions, from `_torch_info` (for the JSON)."""
  if info['device'] == 'cuda':
    bench = info['cudnn_benchmark']
    return f'torch eager, cuDNN {info["cudnn"]} (benchmark: {bench})'
  return f'torch eager, {info["onednn"]}'


def set_torch_precision(torch, precision):
  """Sets torch's TF32 switches for ``precision``; returns the one now set.

  'highest': TF32 off for CUDA matmuls and cuDNN convolutions, 'tf32': on.
  The switches are read back: 'mixed' if they disagree. They act on CUDA
  only; the CPU's float32 is full precision either way.
  """
  torch.backends.cuda.matmul.allow_tf32 = precision == 'tf32'
  torch.backends.cudnn.allow_tf32 = precision == 'tf32'
  matmul = torch.backends.cuda.matmul.allow_tf32
  if matmul != torch.backends.cudnn.allow_tf32:
    return 'mixed'
  return 'tf32' if matmul else 'highest'


def _torch_worker(
  conn,
  names,
  batch,
  modes,
  retain_memory=True,
  device='cpu',
  precision='highest',
  matmul_n=2048,
):
  """PyTorch's side, in its own process: builds the runners, then times cells.

  With ``retain_memory`` it gets the same glibc setting as the JAX side
  (`pfa_jax.hostmem.retain_freed_memory`): PyTorch's CPU allocator is
  ``malloc`` too, and gains from it as well (measured: SimpleCNN training
  82 -> 100 img/s, ResNet-56 166 -> 176).

  Both frameworks run their own OpenMP / thread pools. In one process, the
  pool of whichever ran last keeps spinning while the other runs (measured:
  JAX's ResNet-56 training at 127 img/s with torch imported and interleaved
  in-process, 181 img/s without). Here the idle side blocks on a pipe.

  On 'cuda' (``device`` is torch's) it sets ``cudnn.benchmark`` and the TF32
  switches for ``precision`` instead of the CPU's thread count; it reports
  an error if torch has no CUDA.
  """
  retained = hostmem.retain_freed_memory() if retain_memory else False
  try:
    import torch  # noqa: PLC0415
  except ImportError as e:
    conn.send(('import_error', str(e)))
    return
  if device == 'cuda':
    if not torch.cuda.is_available():
      msg = (
        f'torch {torch.__version__} (CUDA build: {torch.version.cuda}) sees '
        'no CUDA device: torch.cuda.is_available() is False'
      )
      conn.send(('error', msg))
      return
    torch.backends.cudnn.benchmark = True
    precision = set_torch_precision(torch, precision)
  else:
    torch.set_num_threads(2)
  cells = {
    name: make_torch_runner(name, batch, device=device) for name in names
  }
  for runners in cells.values():  # warm up
    for mode in modes:
      runners[mode](1)
  info = {
    **_torch_info(torch, device),
    'precision': precision,
    'num_params': {name: r['num_params'] for name, r in cells.items()},
    'retain_freed_memory': retained,
  }
  conn.send(('ready', info))
  while True:
    msg = conn.recv()
    if msg is None:
      return
    if msg == 'matmul':
      conn.send(torch_matmul_gflops(matmul_n, device=device))
    else:
      name, mode, steps = msg
      conn.send(cells[name][mode](steps))


class _TorchProcess:
  """Runners of a `_torch_worker` process: ``runner(name)[mode](steps) -> s``.

  Started with 'spawn', never 'fork': CUDA cannot be initialised in a
  forked child once the parent has touched it (JAX has, on the GPU).
  Raises ImportError if torch is missing, RuntimeError if it has no CUDA
  for ``device='cuda'``.
  """

  def __init__(self, names, batch, modes, retain_memory=True, **kw):
    import multiprocessing  # noqa: PLC0415

    ctx = multiprocessing.get_context('spawn')
    self._conn, child = ctx.Pipe()
    self._proc = ctx.Process(
      target=_torch_worker,
      args=(child, names, batch, modes, retain_memory),
      kwargs=kw,
      daemon=True,
    )
    self._proc.start()
    kind, self.info = self._conn.recv()
    if kind != 'ready':
      self._proc.join(timeout=30)
      raise (ImportError if kind == 'import_error' else RuntimeError)(self.info)

  def _ask(self, msg):
    self._conn.send(msg)
    return self._conn.recv()

  def matmul_gflops(self):
    return self._ask('matmul')

  def _time(self, name, mode, steps):
    return self._ask((name, mode, steps))

  def runner(self, name):
    return {
      mode: functools.partial(self._time, name, mode)
      for mode in ('train', 'eval')
    }

  def close(self):
    self._conn.send(None)
    self._proc.join(timeout=30)


def _check_torch_setup(torch_info, device, precision):
  """Raises unless PyTorch's process runs as the JAX side does."""
  want = {
    'device': _DEVICE[device]['torch'],
    'dtype': 'float32',
    'precision': precision,
  }
  got = {k: torch_info.get(k) for k in want}
  if got != want:
    raise RuntimeError(f'PyTorch runs with {got}, the JAX side with {want}')


def main(argv=None):
  args = parse_args(argv)
  gpu = args.device == 'gpu'
  # Before the first JAX computation; a CPU lever, not applied on the GPU.
  retained = False if gpu else hostmem.retain_freed_memory()
  if gpu and jax.default_backend() != 'gpu':
    raise SystemExit(
      f"--device gpu: JAX's default backend is {jax.default_backend()!r}, "
      f'not a GPU (jax {jax.__version__}, devices {jax.devices()}). '
      'Install jax with CUDA, or run with --device cpu.'
    )
  precision = args.precision if gpu else 'highest'
  # A trace-time setting: it must cover every call of a jitted step, or the
  # step is traced again with the default.
  with (
    jax.default_matmul_precision('highest')
    if gpu and precision == 'highest'
    else contextlib.nullcontext()
  ):
    return _benchmark(args, argv, precision, retained)


def _benchmark(args, argv, precision, retained):
  """`main` once the device is checked and JAX's precision set."""
  gpu = args.device == 'gpu'
  names = [m for m in args.models.split(',') if m]
  impls = [i for i in args.impls.split(',') if i]
  modes = [m for m in args.modes.split(',') if m]
  notes = list(args.note)
  if precision != args.precision:
    notes.append(f'--precision {args.precision} ignored on the CPU.')
  jax_precision = jax.config.jax_default_matmul_precision  # None: default
  matmul_n = _DEVICE[args.device]['matmul_n']
  if args.chunk_bytes is not None:
    conv.CHUNK_BYTES = args.chunk_bytes
  if args.small_map is not None:
    conv.SMALL_MAP = args.small_map
  if 'onednn' in impls and not onednn.available():
    notes.append(
      "oneDNN kernel unavailable, 'onednn' = pfa_jax.conv fallback: "
      + onednn.status()['reason'][:300]
    )
  torch_info = torch_proc = None
  if not args.no_torch:
    try:
      torch_proc = _TorchProcess(
        names,
        args.batch,
        modes,
        retain_memory=not (args.torch_default_malloc or gpu),
        device=_DEVICE[args.device]['torch'],
        precision=precision,
        matmul_n=matmul_n,
      )
      torch_info = torch_proc.info
    except ImportError as e:
      if gpu:
        raise SystemExit(
          f'--device gpu: torch not importable ({e}); --no-torch times JAX '
          'alone.'
        ) from e
      notes.append('torch not importable: PyTorch columns skipped.')
      print('NOTE: torch not importable (run `make bench-deps`); skipping.')
    except RuntimeError as e:  # torch without CUDA
      raise SystemExit(f'--device gpu: {e}; --no-torch times JAX alone.') from e
    if torch_info:
      _check_torch_setup(torch_info, args.device, precision)

  load_start = _load()
  cells, flops, num_params = {}, {}, {}  # (model, fw) -> runners
  t_setup = time.perf_counter()
  for name in names:
    # conv_impl does not change the variables: initialise once per model.
    model = models.get_model(name, num_classes=10)
    variables = models.init(model, jax.random.PRNGKey(0), (32, 32, 3))
    num_params[name] = {
      'jax': sum(x.size for x in jax.tree.leaves(variables['params'])),
      'torch': torch_info and torch_info['num_params'][name],
    }
    if torch_info and len(set(num_params[name].values())) != 1:
      raise RuntimeError(f'{name}: unequal parameter counts {num_params[name]}')
    flops[name] = forward_flops(name, variables, args.batch)
    for impl in impls:
      cells[(name, f'jax_{impl}')] = make_jax_runner(
        name,
        impl,
        args.batch,
        variables,
        donate=not args.no_donate,
        data_parallel=args.data_parallel,
      )
    if torch_info:
      cells[(name, 'torch')] = torch_proc.runner(name)
  for key, runners in cells.items():  # compile + warm up (torch: done)
    for mode in modes:
      if key[1] != 'torch':
        runners[mode](1)
  # Untimed rounds over every cell, both frameworks: with freed memory
  # retained the heap grows to its high-water mark over the first rounds,
  # page-faulting as it goes (measured: ResNet-56 train 153 img/s with 67k
  # faults/step in round 1, 190-225 with none later). A training run pays
  # that once; a timed repetition should not.
  for _ in range(args.warmup_rounds):
    for runners in cells.values():
      for mode in modes:
        runners[mode](args.steps)
  print(f'setup + compile: {time.perf_counter() - t_setup:.0f} s', flush=True)

  times = {(k, mode): [] for k in cells for mode in modes}
  images = {(k, mode): 0 for k in cells for mode in modes}
  peak = {'jax_matmul_gflops': [], 'torch_matmul_gflops': []}
  load = [_load()]
  for rep in range(args.repeats):
    peak['jax_matmul_gflops'].append(matmul_gflops(matmul_n))
    if torch_info:
      peak['torch_matmul_gflops'].append(torch_proc.matmul_gflops())
    for key, runners in cells.items():
      for mode in modes:
        time.sleep(args.gap)
        dt = runners[mode](args.steps)
        times[(key, mode)].append(args.batch * args.steps / dt)
        images[(key, mode)] += args.batch * args.steps
    load.append(_load())
    print(f'repetition {rep + 1}/{args.repeats} done', flush=True)
  load_end = _load()
  if torch_proc:
    torch_proc.close()
  loaded = common.loaded()

  med = {k: statistics.median(v) for k, v in times.items()}
  peak_med = {k: statistics.median(v) for k, v in peak.items() if v}
  results, ratios = {}, {}
  fws = [f'jax_{i}' for i in impls] + (['torch'] if torch_info else [])
  header = f'{"model":12s} {"mode":5s} ' + ' '.join(f'{f:>11s}' for f in fws)
  if torch_info:
    header += ' ' + ' '.join(f'{"r_" + i:>8s}' for i in impls)
  print(f'\nimages/s, batch {args.batch} (median of {args.repeats}):')
  print(header)
  for name in names:
    results[name] = {}
    ratios[name] = {}
    for mode in modes:
      row = {fw: med[((name, fw), mode)] for fw in fws}
      counts = {images[((name, fw), mode)] for fw in fws}
      if len(counts) != 1:
        raise RuntimeError(f'{name} {mode}: unequal sample counts {counts}')
      results[name][mode] = {
        fw: {
          'median_img_s': round(v, 2),
          'all_img_s': [round(t, 2) for t in times[((name, fw), mode)]],
          'images_timed': images[((name, fw), mode)],
        }
        for fw, v in row.items()
      }
      if flops.get(name):
        mult = 3 if mode == 'train' else 1
        for fw in fws:
          results[name][mode][fw]['achieved_gflops'] = round(
            mult * flops[name] * row[fw] / 1e9, 1
          )
      line = f'{name:12s} {mode:5s} ' + ' '.join(f'{row[f]:11.1f}' for f in fws)
      if torch_info:
        r = {i: row[f'jax_{i}'] / row['torch'] for i in impls}
        ratios[name][mode] = {
          f'jax_{i}/torch': round(v, 3) for i, v in r.items()
        }
        line += ' ' + ' '.join(f'{r[i]:8.2f}' for i in impls)
      print(line)
  print(
    f'matmul {matmul_n}^2 GFLOP/s: '
    + ', '.join(f'{k} {v:.1f}' for k, v in peak_med.items())
  )
  print(
    'forward GFLOP/image (XLA count): ',
    {k: round(v / 1e9, 3) for k, v in flops.items()},
  )
  print(f'load average start {load_start} end {load_end} loaded={loaded}')

  report = {
    'benchmark': 'train_throughput',
    'date': datetime.datetime.now().isoformat(timespec='seconds'),
    'command': 'python -m benchmarks.train_throughput '
    + ' '.join(sys.argv[1:] if argv is None else argv),
    'loaded': loaded,
    'machine': {
      'platform': platform.platform(),
      'processor': platform.processor(),
      'cpu_count': os.cpu_count(),
      'device': args.device,
      'device_kind': jax.devices()[0].device_kind,
      'jax_devices': [str(d) for d in jax.devices()],
      'load_average_start': load_start,
      'load_average_end': load_end,
      'load_average_per_repetition': load,
    },
    'versions': {
      'python': platform.python_version(),
      'jax': jax.__version__,
      'flax': flax.__version__,
      'optax': optax.__version__,
      'numpy': np.__version__,
      'torch': torch_info and torch_info['version'],
    },
    'settings': {
      'batch': args.batch,
      'steps_per_repetition': args.steps,
      'repetitions': args.repeats,
      'warmup_rounds': args.warmup_rounds,
      'device': args.device,
      'precision': precision,
      'jax_default_matmul_precision': jax_precision,
      'dtype': {'jax': 'float32', 'torch': torch_info and torch_info['dtype']},
      'input': '32x32x3 float32 NHWC (torch: NCHW channels_last)',
      'step': 'pfa_jax.steps.train_step / eval_step (jit, donate)',
      'optimizer': f'SGD lr={_LR} momentum={_MOMENTUM} wd={_WD}',
      'conv_path': {
        **{f'jax_{i}': conv_path(i, args.device) for i in impls},
        'torch': torch_info and _torch_conv_path(torch_info),
      },
      'onednn_threads': onednn.THREADS or 'OpenMP default',
      'retain_freed_memory': {
        'jax': retained,
        'torch': torch_info and torch_info['retain_freed_memory'],
      },
      'fused_bn': os.environ.get('PFA_JAX_FUSED_BN', '1') != '0',
      'team_thread': onednn.TEAM_THREAD,
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
      'torch': torch_info,
      'donate': not args.no_donate,
      'data_parallel': args.data_parallel,
      'conv_chunk_bytes': conv.CHUNK_BYTES,
      'conv_small_map': conv.SMALL_MAP,
    },
    'peak_reference_gflops': {k: round(v, 1) for k, v in peak_med.items()},
    'peak_reference_matmul_n': matmul_n,
    'num_params': num_params,
    'forward_gflop_per_image': {k: round(v / 1e9, 4) for k, v in flops.items()},
    'results_img_s': results,
    'ratios_jax_over_torch': ratios,
    'notes': notes,
  }
  if args.out:
    os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
    with open(args.out, 'w') as f:
      json.dump(report, f, indent=1)
    print(f'wrote {args.out}')
  return report


if __name__ == '__main__':
  main()
