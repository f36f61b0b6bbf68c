"""Runner of the Fig. 2 comparison (configs/paper/fig2_cifar10.py).

``run(config, workdir)`` is a sweep point (``config.runner``):

* ``fig2.part = 'base'``: trains the base model into the shared
  ``<sweep root>/_base`` (or ``fig2.base_workdir``), once; one row.
* ``fig2.part = 'slim_base'``: the same schedule with Network Slimming's
  L1 penalty on every BN scale (``optim.bn_l1 = fig2.slim_l1``), into
  ``<sweep root>/_base_slim``: NS prunes its own sparse-trained model, and
  its row says how much that training costs the full model.
* ``fig2.part = 'compress'``: one ``fig2.method @ fig2.recipe`` through the
  compress job (``pfa_jax.compress``) on its base (the slim base for
  ``slim``, the plain one otherwise): accuracy right after slicing, after BN
  recalibration and after fine-tuning, with params and FLOPs. Both changes
  are against the plain base model, so every method is compared with the
  same full network. One row.

Checkpoints are never selected by test accuracy: every number is the last
state's (the CF authors select by test accuracy; we do not).
"""

import json
import os

from experiments import base_model

PARTS = ('base', 'slim_base', 'compress')


def base_dir(config, workdir, slim: bool = False) -> str:
  root = os.path.dirname(os.path.abspath(workdir))
  if slim:
    return config.fig2.slim_base_workdir or os.path.join(root, '_base_slim')
  return config.fig2.base_workdir or os.path.join(root, '_base')


def ensure_base(config, workdir, slim: bool = False) -> tuple[str, dict]:
  """The (slim) base model's directory and train result (trains if absent)."""
  d = base_dir(config, workdir, slim)
  l1 = float(config.fig2.slim_l1) if slim else 0.0
  return d, base_model.trained(config, d, **{'optim.bn_l1': l1})


def run(config, workdir):
  part = config.fig2.part
  if part not in PARTS:
    raise ValueError(f'fig2.part must be one of {PARTS}, got {part!r}.')
  if part in ('base', 'slim_base'):
    _, res = ensure_base(config, workdir, slim=part == 'slim_base')
    return {
      'part': part,
      'accuracy': res['eval_accuracy'],
      'params': res['num_params'],
      'steps': res['steps'],
    }
  return _compress_point(config, workdir)


def _compress_point(config, workdir):
  from pfa_jax import compress  # noqa: PLC0415

  method, recipe = config.fig2.method, config.fig2.recipe
  _, base = ensure_base(config, workdir)
  d, _ = ensure_base(config, workdir, slim=method == 'slim')
  c = config.copy_and_resolve_references()
  c.job = 'compress'
  c.method = method
  c.recipes = (recipe,)
  c.compress.source = os.path.join(d, 'train')
  res = compress.compress(c, os.path.join(workdir, 'compress'))
  ((label, r),) = res['recipes'].items()
  base_acc = float(base['eval_accuracy'])
  row = {
    'part': 'compress',
    'method': method,
    'recipe': recipe,
    'label': label,
    'source_accuracy': res['full']['accuracy'],
    'base_accuracy': base_acc,
    'params': r['params'],
    'flops': r['flops'],
    'params_ratio': r['params_ratio'],
    'flops_ratio': r['flops_ratio'],
    'widths': json.dumps({n: len(k) for n, k in r['kept'].items()}),
  }
  for stage in ('pruned', 'recalibrated', 'finetuned'):
    acc = r.get(f'accuracy_{stage}')
    row[f'acc_{stage}'] = acc
    row[f'delta_{stage}'] = None if acc is None else acc - base_acc
  return row
