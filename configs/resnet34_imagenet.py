"""ResNet-34 (option B projections) on ImageNet.

ImageNet must be prepared by hand (manual download) into a TFDS data_dir:
  tfds build imagenet2012 --manual_dir=... --data_dir=$TFDS_DATA_DIR
Full scale (GPU/TPU):
  python -m pfa_jax.main --config configs/resnet34_imagenet.py --workdir runs/resnet34_imagenet \
    --config.job=all
``runlocal`` swaps in a tiny net and 64x64 crops, for a CPU smoke run on a
prepared data_dir (the test-suite builds it without data).
"""

from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, runlocal=False, job='train')
  c = common.base('imagenet2012', 'resnet34')
  c.job = args.job
  c.input.image_size = 224
  c.input.eval_batch_size = 256
  c.input.shuffle_buffer = 10_000
  c.eval_every_epochs = 1.0
  c.ckpt_every_steps = 5000
  # He et al. 2016: batch 256, lr 0.1 x0.1 at 30 and 60 of 90, wd 1e-4.
  c.num_epochs = 90.0
  c.input.batch_size = 256
  c.optim = common.optim(lr=0.1, weight_decay=1e-4, boundaries=(30, 60))
  c.method_kw.groups = 'inner'

  c.method_recipes.pfa = (
    'kl',
    'energy:0.9',
    'energy:0.95',
  )
  c.compress.batch_size = 256
  c.compress.num_batches = 200  # 51,200 training images
  c.finetune.num_epochs = c.num_epochs
  c.finetune.optim = c.optim.copy_and_resolve_references()
  if args.runlocal:
    common.runlocal(c)
    c.input.image_size = 64
    c.model.name = 'resnet_tiny_imagenet'
  return c
