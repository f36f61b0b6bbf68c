"""Shared config pieces: the base ConfigDict, arg parsing, paper schedules.

Every config file exposes ``get_config(arg=None)``. ``arg`` is a comma list
parsed by :func:`parse_arg`, e.g. ``configs/vgg16_cifar10.py:runlocal`` or
``...:runlocal,job=compress``. Dotted overrides go through flags:
``--config.optim.lr=0.05``.
"""

import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses ``'runlocal,job=compress'`` into a ConfigDict over ``defaults``.

  A bare word sets a boolean default to True. Values are cast to the
  default's type; unknown keys raise ValueError naming them.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, _, value = item.partition('=')
    if key not in defaults:
      raise ValueError(
        f'Unknown config argument {key!r}; known: {sorted(defaults)}.'
      )
    kind = type(defaults[key])
    if not value:
      if kind is not bool:
        raise ValueError(f'Config argument {key!r} needs a value.')
      out[key] = True
    elif kind is bool:
      out[key] = value.lower() in ('1', 'true', 'yes')
    else:
      out[key] = kind(value)
  return out


def base(dataset: str, model: str) -> ml_collections.ConfigDict:
  """Defaults shared by every experiment (CIFAR sizes; override per file)."""
  c = ml_collections.ConfigDict()
  c.job = 'train'  # 'train' | 'compress' | 'evaluate' | 'all'
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.name = model
  # Extra module fields for get_model: widths, width_mult, tap, conv_impl...
  c.model.kw = ml_collections.ConfigDict({'conv_impl': 'auto'})

  c.input = ml_collections.ConfigDict()
  c.input.dataset = dataset
  c.input.data_dir = ''  # '' = TFDS default / $TFDS_DATA_DIR
  c.input.batch_size = 128
  c.input.eval_batch_size = 512
  c.input.train_subset = 0  # 0 = the whole train split
  c.input.eval_subset = 0
  c.input.classes = []  # [] = all classes; else a subset, relabelled 0..k-1
  c.input.augment = True
  c.input.shuffle_buffer = 50_000
  c.input.image_size = 32

  c.num_epochs = 160.0
  c.optim = optim(lr=0.1, weight_decay=5e-4, boundaries=(80, 120))
  c.log_every_steps = 100
  c.eval_every_epochs = 10.0
  c.ckpt_every_steps = 1000
  c.keep_ckpts = 2

  c.pfa = pfa()
  c.finetune = finetune()
  return c


def optim(
  *,
  lr: float,
  weight_decay: float,
  boundaries=(),
  schedule: str = 'step',
  nesterov: bool = False,
  warmup_epochs: float = 0.0,
) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
    {
      'name': 'sgd',
      'lr': lr,
      'momentum': 0.9,
      'nesterov': nesterov,
      'weight_decay': weight_decay,
      'schedule': schedule,  # 'constant' | 'step' | 'cosine'
      'boundaries': list(boundaries),  # epochs, for 'step'
      'decay_factor': 0.1,
      'warmup_epochs': warmup_epochs,
      'bn_l1': 0.0,  # Network Slimming's s (1e-4 VGG, 1e-5 ResNet)
    }
  )


def pfa() -> ml_collections.ConfigDict:
  """PFA compression settings (METHODS §1)."""
  return ml_collections.ConfigDict(
    {
      # Where the trained model's checkpoint is; '' = <workdir>/train.
      'source': '',
      # Data for the response statistics: split, batches (0 = whole split).
      'split': 'train',
      'num_batches': 0,
      'batch_size': 512,
      # Accumulator dtype of the streaming covariance ('float32'|'float64').
      'stats_dtype': 'float32',
      # Which groups PFA prunes. For ResNets, 'inner' prunes the first conv of
      # each block; 'inner+stream' also prunes each stage's residual stream.
      'resnet_mode': 'inner',
      # Recipes, each a string: 'kl', 'energy:0.9', 'params:0.5' (fraction of
      # the full model, or an absolute count if > 1), 'flops:0.4'.
      'recipes': ['kl', 'energy:0.9', 'energy:0.95'],
      # Which filters to keep: 'pfa' (Pearson selection), 'random', or
      # 'scratch' (same widths, re-initialised).
      'select': 'pfa',
      'seed': 0,
    }
  )


def finetune() -> ml_collections.ConfigDict:
  """Fine-tuning of each compressed model (reuses the train loop)."""
  c = ml_collections.ConfigDict()
  c.num_epochs = 40.0
  c.optim = optim(lr=0.01, weight_decay=5e-4, boundaries=(20, 30))
  return c


def runlocal(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks a config so it finishes in minutes on a 2-core CPU."""
  c.input.train_subset = 2048
  c.input.eval_subset = 1000
  c.input.batch_size = 64
  c.input.eval_batch_size = 256
  c.input.shuffle_buffer = 2048
  c.num_epochs = 2.0
  c.optim.boundaries = [1.5]
  c.log_every_steps = 8
  c.eval_every_epochs = 1.0
  c.ckpt_every_steps = 32
  c.pfa.num_batches = 4
  c.pfa.batch_size = 256
  c.finetune.num_epochs = 1.0
  c.finetune.optim.boundaries = [0.5]
  return c
