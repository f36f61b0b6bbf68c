"""FCP (filter-correlation pairs; Singh et al. 2020) rounds on CIFAR-10.

Args: ``model=vgg16|resnet56``, ``runlocal``, ``job=...``.

  python -m pfa_jax.main --config configs/fcp_cifar10.py:model=vgg16 \
    --workdir runs/vgg16_cifar10

reads ``<workdir>/train`` and runs ``config.job='schedule'`` with
``schedule.kind='rounds'`` (pfa_jax/schedules.py): each round picks
``method_kw.num_pairs`` disjoint pairs per layer from the weights, trains
``method_kw.epochs`` epochs with ``method_kw.lam · Σ_pairs (1 − corr)``
added, drops one filter of each pair with its least-squares fold, and
fine-tunes ``finetune.num_epochs``; rounds stop at the params/FLOPs recipe.
Only the paper's abstract is public, so λ, N, the epochs and the fine-tune
schedule are our choices (METHODS §3), not the authors'. The fine-tune is
CF's (lr 1e-3, wd 5e-3); checkpoints are never selected by test accuracy.
"""

from configs import cf_cifar10
from configs import common
from configs import resnet56_cifar10
from configs import vgg16_cifar10

# Pairs per layer and round: about 1/16 of the narrowest pruned layer's
# width at full scale (VGG 64, ResNet-56 16 -> at least 1).
NUM_PAIRS = {'vgg16': 8, 'resnet56': 2}


def get_config(arg=None):
  args = common.parse_arg(
    arg, model='vgg16', recipe='params:0.5', runlocal=False, job='schedule'
  )
  if args.model not in NUM_PAIRS:
    raise ValueError(f'model must be one of {sorted(NUM_PAIRS)}: {args.model}')
  mod = vgg16_cifar10 if args.model == 'vgg16' else resnet56_cifar10
  c = mod.get_config('runlocal' if args.runlocal else None)
  c.job = args.job
  c.method = 'fcp'
  c.method_kw.groups = 'inner'
  c.recipes = (args.recipe,)
  c.method_kw.lam = 0.1
  c.method_kw.num_pairs = NUM_PAIRS[args.model]
  c.method_kw.epochs = 2.0
  c.input.batch_size = 128
  c.finetune = cf_cifar10.cf_finetune(2.0)
  c.schedule = common.schedule('rounds')
  if args.runlocal:
    c.input.batch_size = 64
    c.compress.batch_size = 64
    c.method_kw.num_pairs = 2
    c.method_kw.epochs = 0.25
    c.finetune.num_epochs = 0.25
    c.finetune.optim.boundaries = (0.2,)
  return c
