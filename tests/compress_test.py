"""End-to-end compress on mock CIFAR-10 with a tiny SimpleCNN."""

import json
import os
import tempfile

import numpy as np
import tensorflow_datasets as tfds
from absl.testing import absltest

from configs import simple_cnn_cifar10
from pfa_jax import compress
from pfa_jax import costs
from pfa_jax import input_pipeline
from pfa_jax import main as pfa_main
from pfa_jax import models
from pfa_jax import recipes


def _tiny_config(workdir_recipes=('kl', 'energy:0.9', 'params:0.5')):
  c = simple_cnn_cifar10.get_config('runlocal,job=all')
  c.model.kw.width_mult = 1 / 24  # widths 4 / 8
  c.model.kw.conv_impl = 'xla'
  c.input.train_subset = 64
  c.input.eval_subset = 40
  c.input.batch_size = 16
  c.input.eval_batch_size = 16
  c.input.shuffle_buffer = 64
  c.num_epochs = 1.0
  c.log_every_steps = 2
  c.ckpt_every_steps = 4
  c.pfa.num_batches = 3
  c.pfa.batch_size = 16
  c.pfa.recipes = list(workdir_recipes)
  c.finetune.num_epochs = 0.5
  return c


class CompressTest(absltest.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.workdir = tempfile.mkdtemp()
    cls.config = _tiny_config()
    with tfds.testing.mock_data(num_examples=64):
      cls.out = pfa_main.run(cls.config, cls.workdir)
      eval_config = cls.config.copy_and_resolve_references()
      eval_config.job = 'evaluate'
      cls.evaluated = pfa_main.run(eval_config, cls.workdir)['evaluate']
      # An independent reference: float64 numpy statistics of the same data.
      model, variables, _, _ = compress.checkpoint.restore_model(
        os.path.join(cls.workdir, 'train')
      )
      batches = list(
        input_pipeline.get_split_iter(
          cls.config, 'train', augment=False, batch_size=16, num_batches=3
        )
      )
    resp = {}
    for b in batches:
      _, r = models.responses(model, variables, b['image'])
      for n, x in r.items():
        resp.setdefault(n, []).append(np.asarray(x, np.float64)[b['mask']])
    cls.ref_covs = {
      n: np.cov(np.concatenate(v), rowvar=False) for n, v in resp.items()
    }
    cls.model = model

  def test_result_json_is_complete(self):
    with open(os.path.join(self.workdir, 'compress', 'result.json')) as f:
      r = json.load(f)
    self.assertEqual(set(r['recipes']), {'kl', 'energy_0.9', 'params_0.5'})
    self.assertEqual(r['data']['num_examples'], 48)
    self.assertEqual(r['data']['tap'], 'post_act')
    for key in ('git_commit', 'pfa_jax_version', 'timings', 'arch', 'full'):
      self.assertIn(key, r)
    for name, rec in r['recipes'].items():
      with self.subTest(name):
        for key in (
          'widths',
          'kept',
          'params',
          'flops',
          'params_ratio',
          'flops_ratio',
          'accuracy_pruned',
          'accuracy_finetuned',
        ):
          self.assertIn(key, rec)
        for layer, kept in rec['kept'].items():
          self.assertEqual(len(kept), rec['widths'][layer])
          self.assertEqual(kept, sorted(set(kept)))
        pruned = models.with_widths(self.model, rec['widths'])
        self.assertEqual(
          costs.count(pruned, (32, 32, 3))['params'], rec['params']
        )
        ft = os.path.join(self.workdir, 'compress', name)
        for f in ('config.json', 'metrics.jsonl', 'result.json'):
          self.assertTrue(os.path.exists(os.path.join(ft, f)), f)
    for f in ('config.json', 'metrics.jsonl', 'result.json'):
      self.assertTrue(os.path.exists(os.path.join(self.workdir, 'train', f)))

  def test_recipes_match_float64_reference(self):
    with open(os.path.join(self.workdir, 'compress', 'result.json')) as f:
      r = json.load(f)
    ref_spectra = {}
    for n, c in self.ref_covs.items():
      lam = np.clip(np.linalg.eigvalsh(c)[::-1], 0, None)
      ref_spectra[n] = lam / lam.sum() if lam.sum() > 0 else np.eye(len(lam))[0]
    self.assertEqual(r['recipes']['kl']['widths'], recipes.kl(ref_spectra))
    self.assertEqual(
      r['recipes']['energy_0.9']['widths'], recipes.energy(ref_spectra, 0.9)
    )
    # The params target: largest tau meeting half the full footprint.
    rec = r['recipes']['params_0.5']
    self.assertLessEqual(rec['params'], 0.5 * r['full']['params'])

  def test_evaluate_job_matches_compress_full_accuracy(self):
    with open(os.path.join(self.workdir, 'evaluate', 'result.json')) as f:
      r = json.load(f)
    with open(os.path.join(self.workdir, 'compress', 'result.json')) as f:
      full = json.load(f)['full']
    self.assertEqual(r['accuracy'], full['accuracy'])
    self.assertEqual(r['count'], 40)  # eval_subset, every example once
    self.assertEqual(r['accuracy'], self.evaluated['accuracy'])

  def test_analysed_groups_modes(self):
    model = models.get_model('resnet8', num_classes=10)
    inner = compress.analysed_groups(model, 'inner')
    both = compress.analysed_groups(model, 'inner+stream')
    self.assertEqual(inner, [f'stage{s}_block0/conv1' for s in (1, 2, 3)])
    self.assertEqual(both, inner + ['stream1', 'stream2', 'stream3'])
    with self.assertRaisesRegex(ValueError, "'streams'"):
      compress.analysed_groups(model, 'streams')

  def test_keep_sets_random_and_errors(self):
    full = {'a': 10, 'b': 6}
    widths = {'a': 3, 'b': 6}
    keep = compress.keep_sets('random', widths, {}, full, seed=1)
    self.assertEqual({n: len(k) for n, k in keep.items()}, widths)
    for k, w in zip(keep.values(), full.values()):
      self.assertTrue(np.all(np.diff(k) > 0) and k.max() < w)
    again = compress.keep_sets('random', widths, {}, full, seed=1)
    np.testing.assert_array_equal(keep['a'], again['a'])
    orders = {'a': np.arange(10)[::-1], 'b': np.arange(6)}
    pfa = compress.keep_sets('pfa', widths, orders, full, seed=0)
    np.testing.assert_array_equal(pfa['a'], [0, 1, 2])  # removed 9, 8, ...
    with self.assertRaisesRegex(ValueError, "'magnitude'"):
      compress.keep_sets('magnitude', widths, orders, full, seed=0)
    c = _tiny_config()
    c.pfa.select = 'magnitude'
    with self.assertRaisesRegex(ValueError, "pfa.select.*'magnitude'"):
      compress.compress(c, tempfile.mkdtemp())

  def test_demo_table_and_plots_from_result_file(self):
    from experiments import demo  # noqa: PLC0415
    from experiments.figures import demo_plots  # noqa: PLC0415

    with open(os.path.join(self.workdir, 'compress', 'result.json')) as f:
      r = json.load(f)
    text = demo.table(r)
    lines = text.splitlines()
    self.assertLen(lines, 2 + 1 + len(r['recipes']))
    self.assertIn(f'{r["full"]["params"]:,}', lines[2])
    for name, rec in r['recipes'].items():
      row = next(line for line in lines if line.startswith(name + ' '))
      self.assertIn(f'{rec["accuracy_finetuned"]:.4f}', row)
    for path in demo_plots.draw(self.workdir):
      with open(path, 'rb') as f:
        self.assertEqual(f.read(8), b'\x89PNG\r\n\x1a\n')

  def test_bad_recipes_fail_early(self):
    for spec, pattern in [
      ('energy:1.5', 'tau'),
      ('kl:2', 'Unknown recipe'),
      ('flops', 'number'),
      ('size:3', 'Unknown recipe'),
    ]:
      with self.subTest(spec):
        c = _tiny_config((spec,))
        with self.assertRaisesRegex(ValueError, pattern):
          if spec == 'energy:1.5':
            recipes.energy({'a': np.array([1.0])}, 1.5)
          else:
            compress.compress(c, tempfile.mkdtemp())

  def test_impossible_target_is_named(self):
    spectra = {'conv1': np.array([0.5, 0.5])}
    model = models.get_model('simple_cnn', num_classes=10, width_mult=1 / 24)
    with self.assertRaisesRegex(ValueError, "'params:10'.*impossible"):
      compress.recipe_widths('params:10', spectra, model, (32, 32, 3))


if __name__ == '__main__':
  absltest.main()
