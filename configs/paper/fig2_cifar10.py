"""Fig. 2: PFA against FP (L1), Network Slimming and Central Filter.

Every method at the same parameter targets (so footprints match by
construction), plus PFA's own parameter-free recipes, each fine-tuned with
the same schedule from the same base model; NS prunes its own
sparse-trained base (``slim_base``, its cost is a row of the summary).
Accuracy change is against the plain base model. FLOPs are multiply-adds
in the HRank/CHIP/CF convention (ResNet-56: 125.49M; Torch-Pruning counts
127.12M).

  python -m experiments.sweep --config configs/paper/fig2_cifar10.py:cpu \
    --workdir runs/fig2_vgg16_cpu
  python -m experiments.sweep --summarize runs/fig2_vgg16_cpu
  python -m experiments.figures.fig2 runs/fig2_vgg16_cpu/summary.json \
    --name fig2_vgg16_cpu

Args (comma list): ``model=vgg16|resnet56``; one scale: ``runlocal``,
``cpu`` (default) or ``paper``; ``cifar100``.

CPU scale (VGG-16): ``configs/vgg16_cifar10.py:cpu`` (width 1/4, no
dropout, 5 cosine epochs on the whole train split), targets params 0.25
and 0.5 and FLOPs 0.5 for every method plus PFA-KL and PFA-En(0.95),
fine-tuned for half an epoch. ResNet-56's CPU scale is ResNet-20 (same
blocks, 3 per stage, full width), with the same schedule.

Paper scale: the full networks and schedules of configs/vgg16_cifar10.py
and configs/resnet56_cifar10.py (fine-tuning as long as training), targets
params 0.2, 0.4 and 0.6 and FLOPs 0.3 and 0.5 plus PFA-KL and PFA-En at
0.9, 0.95, 0.98.
"""

import ml_collections

from configs import common
from configs import resnet56_cifar10
from configs import vgg16_cifar10

METHODS = ('pfa', 'l1', 'slim', 'cf')
_BASES = {
  'vgg16': (vgg16_cifar10, 1e-4),  # NS strength s (METHODS §4)
  'resnet56': (resnet56_cifar10, 1e-5),
}


def _args(arg):
  a = common.parse_arg(
    arg,
    model='vgg16',
    runlocal=False,
    cpu=False,
    paper=False,
    cifar100=False,
  )
  if a.runlocal + a.cpu + a.paper > 1:
    raise ValueError('Choose one scale: runlocal, cpu or paper.')
  if a.model not in _BASES:
    raise ValueError(f'model must be one of {sorted(_BASES)}, got {a.model!r}.')
  a.scale = 'runlocal' if a.runlocal else 'paper' if a.paper else 'cpu'
  return a


def get_config(arg=None):
  a = _args(arg)
  module, slim_l1 = _BASES[a.model]
  c = module.get_config(
    'cpu' if a.scale == 'cpu' and a.model == 'vgg16' else None
  )
  if a.cifar100:
    c.input.dataset = 'cifar100'
  if a.model == 'resnet56' and a.scale == 'cpu':
    c.model.name = 'resnet20'
    vgg16_cifar10.cpu_scale(c, width_mult=1.0, dropout=None)
  if a.scale == 'runlocal':
    common.runlocal(c)
    c.model.kw.width_mult = 0.125
    if a.model == 'resnet56':
      c.model.name = 'resnet8'
  c.runner = 'experiments.fig2:run'
  c.fig2 = ml_collections.ConfigDict(
    {
      'part': 'compress',  # 'base' | 'slim_base' | 'compress'
      'method': 'pfa',
      'recipe': 'kl',
      'slim_l1': slim_l1,
      'base_workdir': '',  # '' = <sweep root>/_base
      'slim_base_workdir': '',  # '' = <sweep root>/_base_slim
    }
  )
  return c


def recipes(scale: str) -> list[tuple[str, str]]:
  """``(method, recipe)`` of every compress point at ``scale``.

  Every method at the same parameter targets and at the same FLOPs targets,
  so footprints match by construction on both axes, plus PFA's own
  parameter-free recipes.
  """
  if scale == 'paper':
    targets, flops, own = (
      (0.2, 0.4, 0.6),
      (0.3, 0.5),
      ('kl', 'energy:0.9', 'energy:0.95', 'energy:0.98'),
    )
  elif scale == 'cpu':
    targets, flops, own = (0.25, 0.5), (0.5,), ('kl', 'energy:0.95')
  else:
    targets, flops, own = (0.5,), (), ('kl',)
  out = [('pfa', r) for r in own]
  for t in targets:
    out += [(m, f'params:{t}') for m in METHODS]
  for t in flops:
    out += [(m, f'flops:{t}') for m in METHODS]
  return out


def get_sweep(arg=None):
  a = _args(arg)
  points = [{'fig2.part': 'base'}, {'fig2.part': 'slim_base'}]
  for method, recipe in recipes(a.scale):
    points.append({'fig2.method': method, 'fig2.recipe': recipe})
  return points
