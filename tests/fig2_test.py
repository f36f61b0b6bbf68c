"""Fig. 2 sweep (configs/paper/fig2_cifar10.py) end to end on a tiny VGG."""

import io
import json
import os
import tempfile
from contextlib import redirect_stdout

import pytest
import tensorflow_datasets as tfds
from absl.testing import absltest

from experiments import sweep
from experiments.figures import fig2 as fig2_figure
from pfa_jax import checkpoint
from pfa_jax import costs

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_FIG2 = os.path.join(_ROOT, 'configs', 'paper', 'fig2_cifar10.py')

_TINY = f"""
import importlib.util

_spec = importlib.util.spec_from_file_location('fig2', {_FIG2!r})
fig2 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fig2)

def get_config(arg=None):
  c = fig2.get_config('runlocal')
  c.model.kw.width_mult = 1 / 16
  c.input.train_subset = 64
  c.input.eval_subset = 64
  c.input.batch_size = 32
  c.input.eval_batch_size = 64
  c.num_epochs = 1.0
  c.finetune.num_epochs = 0.5
  c.compress.num_batches = 2
  c.compress.batch_size = 32
  c.compress.recalibrate_batches = 1
  return c

def get_sweep(arg=None):
  return [
    {{'fig2.part': 'base'}},
    {{'fig2.part': 'slim_base'}},
    {{'fig2.method': 'l1', 'fig2.recipe': 'params:0.5'}},
    {{'fig2.method': 'slim', 'fig2.recipe': 'params:0.5'}},
  ]
"""


class Fig2Test(absltest.TestCase):
  def test_sweep_expands(self):
    module, _ = sweep.load_config_module(_FIG2)
    # bases + PFA's own recipes + (params and FLOPs targets) x 4 methods
    cpu = sweep.expand(module, 'cpu')
    self.assertLen(cpu, 2 + 2 + (2 + 1) * 4)
    self.assertLen(sweep.expand(module, 'paper'), 2 + 4 + (3 + 2) * 4)
    flops = {
      p['overrides']['fig2.method']
      for p in cpu
      if p['overrides'].get('fig2.recipe') == 'flops:0.5'
    }
    self.assertEqual(flops, {'pfa', 'l1', 'slim', 'cf'})
    c = module.get_config('model=resnet56,cpu')
    self.assertEqual(c.model.name, 'resnet20')
    with self.assertRaisesRegex(ValueError, 'model must be one of'):
      module.get_config('model=alexnet')

  @pytest.mark.slow
  def test_tiny_sweep_points_and_figure(self):
    # ~1 min quiet (two tiny trainings, two compress jobs): slow-marked.
    root = tempfile.mkdtemp()
    cfg = os.path.join(root, 'tiny_fig2.py')
    with open(cfg, 'w') as f:
      f.write(_TINY)
    workdir = os.path.join(root, 'runs')
    with tfds.testing.mock_data(num_examples=64):
      with redirect_stdout(io.StringIO()):
        self.assertEqual(sweep.main(['--config', cfg, '--workdir', workdir]), 0)
        sweep.main(['--summarize', workdir])
    with open(os.path.join(workdir, 'summary.json')) as f:
      rows = json.load(f)['rows']
    by = {r.get('method', r['part']): r for r in rows}
    base, slim_base = by['base'], by['slim_base']
    # NS prunes its own sparse-trained base; everyone is compared with base.
    self.assertAlmostEqual(by['slim']['source_accuracy'], slim_base['accuracy'])
    self.assertAlmostEqual(by['l1']['source_accuracy'], base['accuracy'])
    model, _, _, _ = checkpoint.restore_model(
      os.path.join(workdir, '_base', 'train')
    )
    full = costs.count(model, (32, 32, 3))['params']
    for m in ('l1', 'slim'):
      r = by[m]
      self.assertLessEqual(r['params'], 0.5 * full)
      self.assertAlmostEqual(r['params_ratio'], r['params'] / full)
      self.assertAlmostEqual(
        r['delta_finetuned'], r['acc_finetuned'] - base['accuracy']
      )
    out = os.path.join(root, 'fig')
    fig2_figure.main(
      [os.path.join(workdir, 'summary.json'), '--out_dir', out, '--name', 'f']
    )
    for ext in ('json', 'md', 'png'):
      self.assertTrue(os.path.exists(os.path.join(out, f'f.{ext}')), ext)
    with open(os.path.join(out, 'f.json')) as f:
      agg = json.load(f)
    self.assertEqual({p['method'] for p in agg['points']}, {'l1', 'slim'})


if __name__ == '__main__':
  absltest.main()
