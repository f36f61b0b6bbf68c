"""Network Slimming (Liu et al. 2017): sparse training, then one |γ| cut.

Both steps in one job (``job='all'``): train with the L1 penalty s·|γ| on
every BN scale (s = 1e-4 for VGG, 1e-5 for ResNet; METHODS §4), then prune
by one global |γ| threshold and fine-tune. Paper scale (GPU/TPU):

  python -m pfa_jax.main --config configs/slim_cifar10.py:model=vgg16 \
    --workdir runs/slim_vgg16_cifar10
  python -m pfa_jax.main --config configs/slim_cifar10.py:model=resnet56 \
    --workdir runs/slim_resnet56_cifar10

CPU smoke run: ``:model=vgg16,runlocal``. Other cuts:
``--config.recipes='("prune:0.5", "params:0.3")'``.
"""

from configs import common
from configs import resnet56_cifar10
from configs import vgg16_cifar10

_BASES = {
  'vgg16': (vgg16_cifar10, 1e-4, ('prune:0.7',)),  # Liu et al.'s 70% cut
  'resnet56': (resnet56_cifar10, 1e-5, ('prune:0.4',)),
}


def get_config(arg=None):
  args = common.parse_arg(arg, model='vgg16', runlocal=False, job='all')
  if args.model not in _BASES:
    raise ValueError(
      f'model must be one of {sorted(_BASES)}, got {args.model!r}.'
    )
  base, strength, cuts = _BASES[args.model]
  c = base.get_config('runlocal' if args.runlocal else None)
  c.job = args.job
  c.optim.bn_l1 = strength
  c.method = 'slim'
  c.method_recipes.slim = cuts
  return c
