"""Fig. 4 (domain adaptation) sweep: subsets, expansion, and a tiny run."""

import io
import json
import os
import tempfile
from contextlib import redirect_stdout

import pytest
import tensorflow_datasets as tfds
from absl.testing import absltest

from experiments import fig4
from experiments import sweep
from experiments.figures import fig4 as fig4_figure

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_FIG4 = os.path.join(_ROOT, 'configs', 'paper', 'fig4_domain.py')

_TINY = f"""
import importlib.util

_spec = importlib.util.spec_from_file_location('fig4c', {_FIG4!r})
fig4c = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fig4c)

def get_config(arg=None):
  c = fig4c.get_config('runlocal')
  c.model.kw.width_mult = 1 / 16
  c.input.train_subset = 0
  c.input.eval_subset = 0
  c.input.batch_size = 8
  c.input.eval_batch_size = 8
  c.num_epochs = 1.0
  c.compress.num_batches = 2
  c.compress.batch_size = 8
  c.compress.recalibrate_batches = 1
  return c

def get_sweep(arg=None):
  return [{{'fig4.part': 'base'}}] + [
    {{'fig4.subset': 'R1', 'fig4.strategy': s}}
    for s in ('full_scratch', 'full_fine', 'pfa_scratch', 'pfa_fine')
  ]
"""


class Fig4Test(absltest.TestCase):
  def test_subsets_are_fixed_distinct_draws(self):
    for name, (k, _) in fig4.SUBSETS.items():
      c = fig4.subset_classes(name)
      self.assertLen(set(c), k)
      self.assertEqual(c, fig4.subset_classes(name))  # same seed, same draw
      self.assertTrue(all(0 <= i < 100 for i in c))
    self.assertNotEqual(fig4.subset_classes('S1'), fig4.subset_classes('S2'))
    with self.assertRaisesRegex(ValueError, 'Unknown subset'):
      fig4.subset_classes('R9')

  def test_sweep_expands(self):
    module, _ = sweep.load_config_module(_FIG4)
    for arg in ('cpu', 'paper', 'runlocal'):
      self.assertLen(sweep.expand(module, arg), 1 + 6 * 4)
    self.assertEqual(module.get_config('cpu').input.dataset, 'cifar100')

  @pytest.mark.slow
  def test_tiny_sweep(self):
    root = tempfile.mkdtemp()
    cfg = os.path.join(root, 'tiny_fig4.py')
    with open(cfg, 'w') as f:
      f.write(_TINY)
    workdir = os.path.join(root, 'runs')
    with tfds.testing.mock_data(num_examples=400):
      with redirect_stdout(io.StringIO()):
        self.assertEqual(sweep.main(['--config', cfg, '--workdir', workdir]), 0)
        sweep.main(['--summarize', workdir])
    with open(os.path.join(workdir, 'summary.json')) as f:
      rows = json.load(f)['rows']
    by = {r.get('strategy', 'base'): r for r in rows}
    classes = list(fig4.subset_classes('R1'))
    for s in fig4.STRATEGIES:
      self.assertEqual(json.loads(by[s]['classes']), classes)
      self.assertBetween(by[s]['accuracy'], 0.0, 1.0)
    # Footprints are against the full net with its head cut to the subset.
    self.assertEqual(by['full_fine']['footprint'], 1.0)
    self.assertLess(by['pfa_fine']['footprint'], 1.0)
    self.assertEqual(by['pfa_fine']['widths'], by['pfa_scratch']['widths'])
    with redirect_stdout(io.StringIO()):
      stem = fig4_figure.main(
        [os.path.join(workdir, 'summary.json'), '--out_dir', root]
      )
    with open(stem + '.json') as f:
      (r1,) = json.load(f)['subsets']
    self.assertEqual(r1['footprint'], by['pfa_fine']['footprint'])
    self.assertTrue(os.path.getsize(stem + '.png') > 0)

  def test_figure_reads_the_summary_and_checks_the_claim(self):
    widths = {'conv1': 4, 'conv2': 8}

    def row(subset, strategy, k, footprint, acc):
      return {
        'part': 'subset',
        'subset': subset,
        'strategy': strategy,
        'classes': json.dumps(list(range(k))),
        'class_names': json.dumps([f'c{i}' for i in range(k)]),
        'paper_footprint': fig4.PAPER_FOOTPRINT[subset],
        'footprint': footprint,
        'widths': json.dumps(
          widths if strategy == 'full_fine' else {'conv1': 2, 'conv2': k}
        ),
        'accuracy': acc,
        'commit': 'abc',
      }

    rows = [{'part': 'base', 'accuracy': 0.5, 'params': 100}]
    for subset, k, fp in (('R1', 10, 0.30), ('S1', 2, 0.35), ('S2', 2, 0.2)):
      for i, strategy in enumerate(fig4.STRATEGIES):
        f = 1.0 if strategy.startswith('full') else fp
        rows.append(row(subset, strategy, k, f, 0.1 * (i + 1)))
    root = tempfile.mkdtemp()
    path = os.path.join(root, 'summary.json')
    with open(path, 'w') as f:
      json.dump({'rows': rows, 'sweep': 'x', 'num_points': 13}, f)
    with redirect_stdout(io.StringIO()):
      stem = fig4_figure.main([path, '--out_dir', root, '--name', 'f'])
    with open(stem + '.json') as f:
      agg = json.load(f)
    self.assertEqual([s['subset'] for s in agg['subsets']], ['R1', 'S1', 'S2'])
    self.assertEqual(agg['subsets'][0]['footprint'], 0.30)
    self.assertEqual(agg['subsets'][1]['widths'], {'conv1': 2, 'conv2': 2})
    self.assertEqual(agg['subsets'][0]['full_widths'], widths)
    self.assertEqual(
      agg['subsets'][2]['accuracy'],
      {s: 0.1 * (i + 1) for i, s in enumerate(fig4.STRATEGIES)},
    )
    # S2: pfa_fine 0.4 vs full_fine 0.2 on 200 test images: 2 sigma is
    # 2 * sqrt(0.4 * 0.6 / 200 + 0.2 * 0.8 / 200) = 8.94 pp, so +20 pp is
    # above; R1 pfa_fine 0.4 vs pfa_scratch 0.3 on 1000: 4.24 pp, above.
    c = agg['subsets'][2]['comparisons']['pfa_fine-full_fine']
    self.assertAlmostEqual(c['diff_pp'], 20.0)
    self.assertAlmostEqual(c['two_sigma_pp'], 8.944, places=3)
    self.assertEqual(c['verdict'], 'above')
    c = agg['subsets'][0]['comparisons']['pfa_fine-pfa_scratch']
    self.assertAlmostEqual(c['two_sigma_pp'], 4.243, places=3)
    self.assertEqual(c['verdict'], 'above')
    # 90% vs 88% on 200 images: 2 sigma = 6.25 pp, a tie.
    tie = fig4_figure._compare({'pfa_fine': 0.9, 'full_fine': 0.88}, 2)  # noqa: SLF001
    self.assertEqual(tie['pfa_fine-full_fine']['verdict'], 'tie')
    self.assertAlmostEqual(tie['pfa_fine-full_fine']['two_sigma_pp'], 6.25, 2)
    ours = agg['claim_10_class_keep_more']['footprint']
    # R1 0.30 is below S1 0.35: the claim fails for ours, by hand.
    self.assertFalse(ours['every_10_above_every_2'])
    self.assertAlmostEqual(ours['mean_2_class'], (0.35 + 0.2) / 2)
    # The paper's own numbers (R1 28.9% > S1 26.5%, S2 23.3%) pass it.
    self.assertTrue(
      agg['claim_10_class_keep_more']['paper_footprint'][
        'every_10_above_every_2'
      ]
    )
    with open(stem + '.md') as f:
      md = f.read()
    self.assertIn(
      '| R1 | 10 | 30.0% | 28.9% | 10.00 | 20.00 | 30.00 | 40.00 |', md
    )


if __name__ == '__main__':
  absltest.main()
