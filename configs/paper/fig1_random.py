"""Fig. 1: random architectures at PFA's footprints (the empirical bound).

For each footprint of a PFA recipe on the trained SimpleCNN (8 energies +
KL), N random architectures (``pfa_jax.sampling``: parameters within ±1%)
are trained from scratch and from filter selection (PFA's Pearson selection
at the random widths, starting from the base model's weights), all with the
base model's schedule. Their best is the empirical upper bound, their mean
the random line; the figure reports the change in accuracy vs the base.

  python -m experiments.sweep --config configs/paper/fig1_random.py:cpu \
    --workdir runs/fig1_random_cpu
  python -m experiments.sweep --summarize runs/fig1_random_cpu
  python -m experiments.figures.fig1_random runs/fig1_random_cpu/summary.json

The same sweep holds the paper's Fig. 1 PFA points (``study.widths =
'pfa'``): every recipe's own widths, from scratch and from PFA's selection,
one point per seed in ``PFA_SEEDS`` (the seed sets the data order and the
scratch init), plus the control ``recipe='full'`` (all filters, the base
model trained for the variants' extra epochs). All share the one base model
(seed 0) in ``<workdir>/_base``. ``experiments/figures/fig1_random.py``
draws both from one summary.

Args (comma list): one scale, ``runlocal`` (a minutes-long smoke), ``cpu``
(default; the whole study in <= 60 min on 2 CPU cores) or ``paper`` (300
per footprint, the paper's schedule; GPU/TPU); ``cifar100``; ``n=<N>`` and
``k=<K>`` override the variants per footprint and per point; ``path=``
``auto|vmap|masked|sliced`` forces the training path (``auto`` picks the
faster one for this backend, see ``experiments/random_study.py``);
``random=False`` / ``pfa=False`` leave out the random or the PFA points.

CPU scale: SimpleCNN at 1/4 width (24/48 filters), dropout off, a
4,000-image train subset (2 epochs at batch 100 = 80 steps, cosine lr 0.1
with 0.2 epochs of warm-up), 2,000 test images, N = 5 per footprint and init
(90 variants, one point of K = 5 per footprint and init), the base model
trained with 3 seeds for its spread. Cost: 90 x 8,000 = 720k training
images. On a quiet 2-core machine SimpleCNN-1/3 trains at ~170 img/s (the
demo), so 1/4 width at >= 250 img/s dense: ~50 min with sequential masked
or sliced runs, plus ~5 min for the base seeds, footprints and Pearson
orders. benchmarks/results/vmap_train_cpu.json (measured at load ~8, so
~5x slower) shows vmap does not pay on this CPU; the study's 'auto' path
follows it. ``n=`` scales the study linearly.

Paper scale: full width, dropout 0.5, the paper's 50 epochs at batch 512
(lr 0.1, x0.1 at 30), the whole train and test splits, N = 300 in groups of
K = 50. Dropout bits differ between masked and sliced shapes; the masked
(vmap) runs are the same experiment in distribution (pfa_jax.batched).
"""

import ml_collections

from configs import common
from configs import simple_cnn_cifar10

# The paper's §4.1 energies (its Fig. 1).
ENERGIES = (0.8, 0.85, 0.93, 0.95, 0.96, 0.97, 0.98, 0.99)
RECIPES = ('kl',) + tuple(f'energy:{e}' for e in ENERGIES)
INITS = ('scratch', 'selection')
BASE_SEEDS = (0, 1, 2)
PFA_SEEDS = (0, 1, 2)  # data orders (and scratch inits) of each PFA point


def _args(arg):
  a = common.parse_arg(
    arg,
    runlocal=False,
    cpu=False,
    paper=False,
    cifar100=False,
    n=0,
    k=0,
    path='auto',
    random=True,
    pfa=True,
  )
  if a.runlocal + a.cpu + a.paper > 1:
    raise ValueError('Choose one scale: runlocal, cpu or paper.')
  a.scale = 'runlocal' if a.runlocal else 'paper' if a.paper else 'cpu'
  return a


def get_config(arg=None):
  a = _args(arg)
  c = simple_cnn_cifar10.get_config()
  c.runner = 'experiments.random_study:run'
  if a.cifar100:
    c.input.dataset = 'cifar100'
  c.study = ml_collections.ConfigDict(
    {
      'part': 'group',  # 'base' (train one base seed) | 'group' (K variants)
      'recipe': 'kl',  # the PFA recipe whose footprint the variants match
      'init': 'scratch',  # 'scratch' | 'selection'
      'widths': 'random',  # 'random' (sampled) | 'pfa' (the recipe's own)
      'group': 0,  # which K-variant group of the N at this footprint
      'num_variants': 300,  # N per footprint and init
      'group_size': 50,  # K variants per point
      'base_seed': 0,  # the one base model (shared with the PFA figure)
      'base_workdir': '',  # '' = <sweep root>/_base
      'path': a.path,  # 'auto' | 'vmap' | 'masked' | 'sliced'
      'tol': 0.01,
    }
  )
  c.compress.num_batches = 0  # statistics over the whole (sub)set
  if a.scale == 'paper':
    c.model.kw.dropout = 0.5
  else:
    c.model.kw.width_mult = 0.25
    c.model.kw.dropout = 0.0  # too few epochs for dropout to pay off
    c.input.batch_size = 100
    c.input.eval_batch_size = 500
    c.input.train_subset = 4000
    c.input.eval_subset = 2000
    c.input.shuffle_buffer = 4000
    c.num_epochs = 2.0
    c.optim = common.cosine_optim(warmup_epochs=0.2)
    c.log_every_steps = 50
    c.eval_every_epochs = 0.0  # only at the end
    c.ckpt_every_steps = 0
    c.compress.num_batches = 10
    c.compress.batch_size = 250
    c.study.num_variants = 5
    c.study.group_size = 5
  if a.scale == 'runlocal':
    c.input.train_subset = 1000
    c.input.eval_subset = 500
    c.compress.num_batches = 2
    c.study.num_variants = 2
    c.study.group_size = 2
  if a.n:
    c.study.num_variants = a.n
  if a.k:
    c.study.group_size = a.k
  c.study.group_size = min(c.study.group_size, c.study.num_variants)
  return c


def get_sweep(arg=None):
  a = _args(arg)
  c = get_config(arg)
  seeds = BASE_SEEDS[:1] if a.scale == 'runlocal' else BASE_SEEDS
  recipes = ('kl', 'energy:0.9') if a.scale == 'runlocal' else RECIPES
  points = [{'study.part': 'base', 'seed': s} for s in seeds]
  groups = -(-c.study.num_variants // c.study.group_size)
  if a.random:
    for r in recipes:
      for init in INITS:
        for g in range(groups):
          points.append(
            {'study.recipe': r, 'study.init': init, 'study.group': g}
          )
  if a.pfa:  # seed-major, so a partial sweep covers every recipe
    for s in seeds:
      for r in ('full',) + recipes:
        for init in ('selection',) if r == 'full' else INITS:
          points.append(
            {
              'study.widths': 'pfa',
              'study.recipe': r,
              'study.init': init,
              'seed': s,
            }
          )
  return points
