"""ResNet-56 (option A) on CIFAR-10 (paper Table 1).

Full scale (GPU/TPU), train then compress with every recipe:
  python -m pfa_jax.main --config configs/resnet56_cifar10.py --workdir runs/resnet56_cifar10 \
    --config.job=all
CPU smoke run (minutes): --config configs/resnet56_cifar10.py:runlocal

Fine-tuning reuses the training schedule, as the paper does (§4.1: "we use
the same parameters used to train the full model").
"""

from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, runlocal=False, job='train')
  c = common.base('cifar10', 'resnet56')
  c.job = args.job
  # He et al. 2016 §4.2: 164 epochs (64k iterations at batch 128), lr 0.1,
  # x0.1 at 82 and 123, weight decay 1e-4, momentum 0.9.
  c.num_epochs = 164.0
  c.optim = common.optim(lr=0.1, weight_decay=1e-4, boundaries=(82, 123))
  c.method_kw.groups = 'inner'  # or 'inner+stream' (METHODS §2)
  c.method_recipes.pfa = (
    'kl',
    'energy:0.9',
    'energy:0.95',
    'energy:0.98',
  )
  c.finetune.num_epochs = c.num_epochs
  c.finetune.optim = c.optim.copy_and_resolve_references()
  if args.runlocal:
    common.runlocal(c)
    c.model.name = 'resnet8'  # same blocks and shortcuts, 1 per stage
  return c
