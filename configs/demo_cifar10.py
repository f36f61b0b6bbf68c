"""`make demo`: SimpleCNN on CIFAR-10, trained, PFA-compressed, fine-tuned.

A CPU-sized version of the paper's ablation pipeline (configs/
simple_cnn_cifar10.py is the full one): the same All-CNN-C + BN topology at a
third of the width (32/64 filters), 4 epochs with a cosine schedule instead of
50 with steps, then PFA-KL and PFA-En at two energies, each fine-tuned for
half an epoch. About 20 minutes on a 2-core CPU; the full model reaches >= 70%.

  python -m experiments.demo --workdir workdirs/demo
"""

from configs import common
from configs import simple_cnn_cifar10


def get_config(arg=None):
  args = common.parse_arg(arg, job='all', epochs=4.0, finetune_epochs=0.5)
  c = simple_cnn_cifar10.get_config()
  c.job = args.job
  c.model.kw.width_mult = 1 / 3
  c.model.kw.dropout = 0.0  # Too few epochs for dropout 0.5 to pay off.
  c.input.batch_size = 128
  c.num_epochs = args.epochs
  c.optim = common.cosine_optim(warmup_epochs=0.5)
  c.log_every_steps = 50
  c.eval_every_epochs = 4.0
  c.ckpt_every_steps = 200
  c.compress.num_batches = 20  # 10,000 training images for the statistics
  c.method_recipes.pfa = (
    'kl',
    'energy:0.9',
    'energy:0.95',
  )
  c.finetune.num_epochs = args.finetune_epochs
  c.finetune.optim = common.cosine_finetune_optim()
  return c
