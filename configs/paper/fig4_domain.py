"""Fig. 4: compression with domain adaptation, CIFAR-100 -> class subsets.

VGG-16 trained on CIFAR-100, then for each subset (R1, R2: 10 classes; S1-S4:
2 classes; random with fixed seeds, ``experiments.fig4.SUBSETS``) four
strategies, each trained on the subset for ``fig4.subset_epochs``: full
scratch, full fine (the base, head cut to the subset), PFA scratch (PFA-KL's
widths from the subset's statistics, re-initialised) and PFA fine.

  python -m experiments.sweep --config configs/paper/fig4_domain.py:cpu \
    --workdir runs/fig4_cpu
  python -m experiments.sweep --summarize runs/fig4_cpu

Args: one scale, ``runlocal``, ``cpu`` (default) or ``paper``.

CPU scale: ``configs/vgg16_cifar100.py:cpu`` (width 1/4, no dropout, 5
cosine epochs on the whole train split) as the base; 10 epochs on each
subset. Paper scale: full VGG-16 and its 160-epoch schedule, and the same
schedule on the subsets. Not run here yet.
"""

import ml_collections

from configs import common
from configs import vgg16_cifar100

SUBSETS = ('R1', 'R2', 'S1', 'S2', 'S3', 'S4')
STRATEGIES = ('full_scratch', 'full_fine', 'pfa_scratch', 'pfa_fine')


def _args(arg):
  a = common.parse_arg(arg, runlocal=False, cpu=False, paper=False)
  if a.runlocal + a.cpu + a.paper > 1:
    raise ValueError('Choose one scale: runlocal, cpu or paper.')
  a.scale = 'runlocal' if a.runlocal else 'paper' if a.paper else 'cpu'
  return a


def get_config(arg=None):
  a = _args(arg)
  c = vgg16_cifar100.get_config(
    {'cpu': 'cpu', 'runlocal': 'runlocal', 'paper': None}[a.scale]
  )
  c.runner = 'experiments.fig4:run'
  c.fig4 = ml_collections.ConfigDict(
    {
      'part': 'subset',  # 'base' | 'subset'
      'subset': 'R1',
      'strategy': 'pfa_fine',
      'subset_epochs': {'cpu': 10.0, 'runlocal': 1.0, 'paper': 160.0}[a.scale],
      'base_workdir': '',  # '' = <sweep root>/_base
    }
  )
  return c


def get_sweep(arg=None):
  _args(arg)
  points = [{'fig4.part': 'base'}]
  for s in SUBSETS:
    for strategy in STRATEGIES:
      points.append({'fig4.subset': s, 'fig4.strategy': strategy})
  return points
