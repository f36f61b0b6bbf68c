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
  # 'tfds' (TFDS + tf.data), or 'npz': CIFAR from decoded arrays in NumPy,
  # no TensorFlow (data_dir/<dataset>_arrays.npz; pfa_jax/array_input.py).
  c.input.source = 'tfds'
  c.input.data_dir = ''  # '' = TFDS default / $TFDS_DATA_DIR
  c.input.batch_size = 128
  c.input.eval_batch_size = 512
  c.input.train_subset = 0  # 0 = the whole train split
  c.input.eval_subset = 0
  c.input.classes = ()  # () = all classes; else a subset, relabelled 0..k-1
  c.input.augment = True
  c.input.shuffle_buffer = 50_000
  c.input.image_size = 32

  c.num_epochs = 160.0
  c.optim = optim(lr=0.1, weight_decay=5e-4, boundaries=(80, 120))
  c.log_every_steps = 100
  c.eval_every_epochs = 10.0
  c.ckpt_every_steps = 1000
  c.keep_ckpts = 2

  # Compression: one method, a tuple of recipes (each may name another
  # method as 'method@recipe', e.g. 'l1@params:0.5').
  c.method = 'pfa'
  c.recipes = ()  # () = method_recipes[method]
  c.method_recipes = method_recipes()
  c.method_kw = method_kw()
  c.compress = compress()
  c.finetune = finetune()
  c.distill = distill()
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
      'boundaries': tuple(boundaries),  # epochs, for 'step'
      'decay_factor': 0.1,
      'warmup_epochs': warmup_epochs,
      'bn_l1': 0.0,  # Network Slimming's s (1e-4 VGG, 1e-5 ResNet)
    }
  )


def cosine_optim(warmup_epochs: float) -> ml_collections.ConfigDict:
  """SGD + Nesterov, lr 0.1 cosine after a linear warm-up, weight decay 5e-4:
  the short CPU-scale schedule (demo, ``:cpu`` variants, the random study)."""
  return optim(
    lr=0.1,
    weight_decay=5e-4,
    schedule='cosine',
    nesterov=True,
    warmup_epochs=warmup_epochs,
  )


def cosine_finetune_optim() -> ml_collections.ConfigDict:
  """The short CPU-scale fine-tune: lr 0.02 cosine to 0, no warm-up.

  A fine-tune of a fraction of an epoch must not reuse a training schedule
  with a longer warm-up: it would end at (or near) the peak learning rate.
  """
  return optim(lr=0.02, weight_decay=5e-4, schedule='cosine', nesterov=True)


def compress() -> ml_collections.ConfigDict:
  """The compression job's data and bookkeeping (the method is top level)."""
  return ml_collections.ConfigDict(
    {
      # Where the trained model's checkpoint is; '' = <workdir>/train.
      'source': '',
      # Data the methods read (statistics, compensation, recalibration):
      # split, batches (0 = whole split), batch size.
      'split': 'train',
      'num_batches': 0,
      'batch_size': 512,
      # BN recalibration after slicing, before evaluation and fine-tuning:
      # the first N of those batches (0 = off). Accuracy is reported both
      # right after slicing and after recalibration.
      'recalibrate_batches': 10,
      # Seed of methods that draw (random) and of scratch init.
      'seed': 0,
    }
  )


def method_recipes() -> ml_collections.ConfigDict:
  """Each method's recipes when ``config.recipes`` is empty.

  So ``--config.method=l1`` works on every config without also naming
  recipes; model configs set ``method_recipes.pfa`` to the paper's.
  """
  return ml_collections.ConfigDict(
    {
      'pfa': ('kl', 'energy:0.9', 'energy:0.95'),
      'l1': ('prune:0.5', 'params:0.5'),
      'slim': ('prune:0.5',),
      'random': ('params:0.5',),
      'cf': ('params:0.5',),
      'fcp': ('params:0.5',),
    }
  )


def method_kw() -> ml_collections.ConfigDict:
  """Every option and method hyperparameter, declared with its type.

  Declared here so that ``--config.method_kw.<key>=...`` works under
  ``lock_config``. A key that the chosen method does not read must keep its
  default (the job refuses it otherwise, naming it).
  """
  return ml_collections.ConfigDict(
    {
      # Which groups are pruned: 'all', 'inner' (ResNets: no residual
      # streams; the FP/CF convention), 'inner+stream'.
      'groups': 'all',
      'min_width': 1,
      'round_to': 1,  # kept widths rounded up to a multiple (budget holds)
      'init': 'selection',  # or 'scratch' (same widths, re-initialised)
      'compensation': 'none',  # or 'ls' (least-squares next-layer fold)
      'ridge': 1e-3,  # LS ridge, relative to trace(Σ_kk) / n_kept
      # pfa / random(select='pfa'): accumulator dtype ('float32'|'float64').
      'stats_dtype': 'float32',
      # l1: one threshold on layer-normalised scores for params/FLOPs targets.
      'global_ranking': False,
      # random: keep-sets 'random' or 'pfa' (Pearson selection); tolerance.
      'select': 'random',
      'tol': 0.01,
      'num_batches': 5,  # cf: batches for the similarity D
      'lam': 0.1,  # fcp: λ of λ·Σ_pairs (1 − corr)
      'num_pairs': 0,  # fcp: pairs per layer and round (schedules.py)
      'epochs': 2.0,  # fcp: regularised epochs per round (schedules.py)
    }
  )


def schedule(kind: str = 'layer') -> ml_collections.ConfigDict:
  """``config.job='schedule'``: CF layer by layer or FCP rounds (schedules.py)."""
  return ml_collections.ConfigDict({'kind': kind, 'max_rounds': 100})


def distill() -> ml_collections.ConfigDict:
  """Knowledge distillation from the unpruned model while fine-tuning.

  Off by default (weight 0): it confounds comparisons between methods, so
  every result records these values.
  """
  return ml_collections.ConfigDict({'weight': 0.0, 'temperature': 4.0})


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
  c.optim.boundaries = (1.5,)
  c.log_every_steps = 8
  c.eval_every_epochs = 1.0
  c.ckpt_every_steps = 32
  c.compress.num_batches = 4
  c.compress.batch_size = 256
  c.compress.recalibrate_batches = 2
  c.finetune.num_epochs = 1.0
  c.finetune.optim.boundaries = (0.5,)
  return c
