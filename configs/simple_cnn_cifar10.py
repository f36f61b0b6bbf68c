"""SimpleCNN (All-CNN-C + BN) on CIFAR-10: the paper's ablation net (§4.2, Fig. 3-4).

Full scale (GPU/TPU), train then compress with every recipe:
  python -m pfa_jax.main --config configs/simple_cnn_cifar10.py --workdir runs/simple_cnn_cifar10 \
    --config.job=all
CPU smoke run (minutes): --config configs/simple_cnn_cifar10.py:runlocal

Fine-tuning reuses the training schedule, as the paper does (§4.1: "we use
the same parameters used to train the full model").
"""

from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, runlocal=False, job='train')
  c = common.base('cifar10', 'simple_cnn')
  c.job = args.job
  # METHODS §2: 50 epochs, batch 512, SGD Nesterov 0.9, lr 0.1, x0.1 at 30.
  # Weight decay is unstated in the paper; 5e-4 is our choice.
  c.num_epochs = 50.0
  c.input.batch_size = 512
  c.optim = common.optim(
    lr=0.1, weight_decay=5e-4, boundaries=(30,), nesterov=True
  )
  c.eval_every_epochs = 5.0
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
    c.model.kw.width_mult = 0.25
  return c
