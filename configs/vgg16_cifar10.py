"""VGG-16 (cifar.torch) on CIFAR-10 (paper Table 1: 8x smaller, +0.4 pp).

Full scale (GPU/TPU), train then compress with every recipe:
  python -m pfa_jax.main --config configs/vgg16_cifar10.py --workdir runs/vgg16_cifar10 \
    --config.job=all
CPU smoke run (minutes): --config configs/vgg16_cifar10.py:runlocal
CPU scale (``:cpu``, ~15 min on 2 cores): width 1/4 (16..128 filters), no
dropout, 5 epochs with a cosine schedule on the whole train split; the base
model of the CPU-scale LS-compensation comparison and Fig. 2.

Fine-tuning reuses the training schedule, as the paper does (§4.1: "we use
the same parameters used to train the full model").
"""

from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, runlocal=False, cpu=False, job='train')
  c = common.base('cifar10', 'vgg16_cifar')
  c.job = args.job
  # The paper does not state VGG's schedule. We use the common 160-epoch
  # step schedule for VGG/ResNet on CIFAR (x0.1 at 80, 120), batch 128,
  # SGD momentum 0.9, weight decay 5e-4.
  c.num_epochs = 160.0
  c.optim = common.optim(lr=0.1, weight_decay=5e-4, boundaries=(80, 120))
  c.method_recipes.pfa = (
    'kl',
    'energy:0.9',
    'energy:0.95',
    'energy:0.98',
  )
  c.finetune.num_epochs = c.num_epochs
  c.finetune.optim = c.optim.copy_and_resolve_references()
  if args.cpu:
    cpu_scale(c)
  if args.runlocal:
    common.runlocal(c)
    c.model.kw.width_mult = 0.125
  return c


def cpu_scale(c, width_mult=0.25, dropout=0.0):
  """Width 1/4, no dropout, 5 cosine epochs: ~15 min on this 2-core CPU.

  ``dropout=None`` leaves the model's dropout field alone (models without
  one, e.g. ResNets).
  """
  c.model.kw.width_mult = width_mult
  if dropout is not None:
    c.model.kw.dropout = dropout
  c.num_epochs = 5.0
  c.optim = common.cosine_optim(warmup_epochs=0.5)
  c.log_every_steps = 50
  c.eval_every_epochs = 5.0
  c.ckpt_every_steps = 200
  c.compress.num_batches = 20
  c.finetune.num_epochs = 0.5
  c.finetune.optim = common.cosine_finetune_optim()
  return c
