"""VGG-16 (fully convolutional, no BN) on ImageNet (paper Table 1: 1.4x smaller, +2.4 pp).

ImageNet must be prepared by hand (manual download) into a TFDS data_dir:
  tfds build imagenet2012 --manual_dir=... --data_dir=$TFDS_DATA_DIR
Full scale (GPU/TPU):
  python -m pfa_jax.main --config configs/vgg16_imagenet.py --workdir runs/vgg16_imagenet \
    --config.job=all
``runlocal`` swaps in a tiny net and 64x64 crops, for a CPU smoke run on a
prepared data_dir (the test-suite builds it without data).
"""

from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, runlocal=False, job='train')
  c = common.base('imagenet2012', 'vgg16_imagenet')
  c.job = args.job
  c.input.image_size = 224
  c.input.eval_batch_size = 256
  c.input.shuffle_buffer = 10_000
  c.eval_every_epochs = 1.0
  c.ckpt_every_steps = 5000
  # Simonyan & Zisserman 2015: batch 256, SGD momentum 0.9, lr 0.01 x0.1 on
  # plateaus (~74 epochs); we use steps at 30 and 60 of 74, wd 5e-4.
  c.num_epochs = 74.0
  c.input.batch_size = 256
  c.optim = common.optim(lr=0.01, weight_decay=5e-4, boundaries=(30, 60))
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
    c.model.kw.width_mult = 1 / 16
  return c
