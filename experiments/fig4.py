"""Runner of Fig. 4, compression with domain adaptation (configs/paper/fig4_domain.py).

``run(config, workdir)`` is a sweep point (``config.runner``):

* ``fig4.part = 'base'``: the network trained on the whole dataset
  (CIFAR-100), once, in ``<sweep root>/_base``; one row.
* ``fig4.part = 'subset'``: one strategy on one class subset
  (``fig4.subset``, whose classes :func:`subset_classes` draws with a fixed
  seed); the data of every step is the subset's (``input.classes``):

  - ``full_scratch``: the full architecture trained from scratch;
  - ``full_fine``: the base, its head cut to the subset, fine-tuned;
  - ``pfa_scratch``: PFA-KL's widths from the subset's statistics on the
    base, trained from scratch (``method_kw.init = 'scratch'``);
  - ``pfa_fine``: PFA-KL on the subset, the kept filters fine-tuned.

  One row: the subset's classes (indices and names), footprint (params
  ratio against the base), widths and accuracy; PFA-KL's footprint is what
  the paper reports per subset (R1 28.9%, R2 29.5%, S1 26.5%, S2 23.3%, S3
  20.7%, S4 15.5%).

Decision: every strategy predicts only the subset's classes (a scratch net
has k outputs; a fine-tuned one has its head cut, ``slicing
.restrict_classes``). The paper's class lists are in its appendix, which we
do not have, so the subsets are random with fixed seeds and recorded.
"""

import json
import os

import numpy as np

from experiments import base_model

PARTS = ('base', 'subset')
STRATEGIES = ('full_scratch', 'full_fine', 'pfa_scratch', 'pfa_fine')
# name -> (number of classes, seed of the draw)
SUBSETS = {
  'R1': (10, 1),
  'R2': (10, 2),
  'S1': (2, 3),
  'S2': (2, 4),
  'S3': (2, 5),
  'S4': (2, 6),
}
PAPER_FOOTPRINT = {
  'R1': 0.289,
  'R2': 0.295,
  'S1': 0.265,
  'S2': 0.233,
  'S3': 0.207,
  'S4': 0.155,
}


def subset_classes(name: str, num_classes: int = 100) -> tuple[int, ...]:
  """The subset's class indices: a seeded draw without replacement, sorted."""
  if name not in SUBSETS:
    raise ValueError(f'Unknown subset {name!r}; known: {sorted(SUBSETS)}.')
  k, seed = SUBSETS[name]
  rng = np.random.default_rng(seed)
  return tuple(
    sorted(int(c) for c in rng.choice(num_classes, k, replace=False))
  )


def _class_names(config, classes) -> list[str]:
  try:
    import tensorflow_datasets as tfds  # noqa: PLC0415

    names = (
      tfds.builder(config.input.dataset, data_dir=config.input.data_dir or None)
      .info.features['label']
      .names
    )
    return [names[c] for c in classes]
  except Exception:  # noqa: BLE001  (names are a convenience, indices rule)
    return []


def run(config, workdir):
  part = config.fig4.part
  if part not in PARTS:
    raise ValueError(f'fig4.part must be one of {PARTS}, got {part!r}.')
  d = config.fig4.base_workdir or os.path.join(
    os.path.dirname(os.path.abspath(workdir)), '_base'
  )
  base = base_model.trained(config, d)
  if part == 'base':
    return {
      'part': 'base',
      'accuracy': base['eval_accuracy'],
      'params': base['num_params'],
    }
  return _subset_point(config, workdir, d, base)


def _subset_point(config, workdir, d, base):
  from pfa_jax import compress  # noqa: PLC0415
  from pfa_jax import main as pfa_main  # noqa: PLC0415

  st = config.fig4
  if st.strategy not in STRATEGIES:
    raise ValueError(
      f'fig4.strategy must be one of {STRATEGIES}, got {st.strategy!r}.'
    )
  from pfa_jax import input_pipeline  # noqa: PLC0415

  n_all = input_pipeline.get_spec(config.input.dataset).num_classes
  classes = subset_classes(st.subset, n_all)
  c = config.copy_and_resolve_references()
  c.input.classes = classes
  # Every strategy trains on the subset for the same number of epochs.
  c.num_epochs = c.finetune.num_epochs = float(st.subset_epochs)
  c.finetune.optim = c.optim.copy_and_resolve_references()
  row = {
    'part': 'subset',
    'subset': st.subset,
    'strategy': st.strategy,
    'classes': json.dumps(list(classes)),
    'class_names': json.dumps(_class_names(config, classes)),
    'paper_footprint': PAPER_FOOTPRINT[st.subset],
    'base_accuracy': base['eval_accuracy'],
  }
  if st.strategy == 'full_scratch':
    c.job = 'train'
    res = pfa_main.run(c, workdir)['train']
    return {
      **row,
      'footprint': res['num_params'] / base['num_params'],
      'accuracy': res['eval_accuracy'],
    }
  c.job = 'compress'
  c.method = 'pfa'
  c.recipes = ('keep:1.0',) if st.strategy == 'full_fine' else ('kl',)
  c.method_kw.init = 'scratch' if st.strategy == 'pfa_scratch' else 'selection'
  c.compress.source = os.path.join(d, 'train')
  res = compress.compress(c, os.path.join(workdir, 'compress'))
  ((_, r),) = res['recipes'].items()
  return {
    **row,
    'footprint': r['params_ratio'],
    'params': r['params'],
    'widths': json.dumps({n: len(k) for n, k in r['kept'].items()}),
    'accuracy_subset_full_head_cut': res['full']['accuracy'],
    'accuracy': r.get('accuracy_finetuned'),
  }
