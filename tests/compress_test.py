"""End-to-end compress on mock CIFAR-10 with a tiny SimpleCNN."""

import argparse
import io
import json
import os
import tempfile
from contextlib import redirect_stdout

import numpy as np
import tensorflow_datasets as tfds
from absl.testing import absltest

from configs import simple_cnn_cifar10
from pfa_jax import compress
from pfa_jax import costs
from pfa_jax import input_pipeline
from pfa_jax import main as pfa_main
from pfa_jax import models
from pfa_jax import plan as plan_lib
from pfa_jax import recipes


def _tiny_config(
  workdir_recipes=('kl', 'energy:0.9', 'params:0.5', 'l1@flops:0.5'),
):
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
  c.compress.num_batches = 3
  c.compress.batch_size = 16
  c.compress.recalibrate_batches = 2
  c.recipes = tuple(workdir_recipes)
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
    self.assertEqual(
      set(r['recipes']),
      {'pfa_kl', 'pfa_energy_0.9', 'pfa_params_0.5', 'l1_flops_0.5'},
    )
    self.assertEqual(r['recipes']['pfa_kl']['num_examples'], 48)
    self.assertEqual(r['tap'], 'post_act')
    self.assertEqual(r['distill'], {'weight': 0.0, 'temperature': 4.0})
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
          'accuracy_recalibrated',
          'accuracy_finetuned',
          'method',
          'recipe',
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
        for f in ('config.json', 'metrics.jsonl', 'result.json', 'plan.json'):
          self.assertTrue(os.path.exists(os.path.join(ft, f)), f)
        # The saved plan replays to the same network.
        with open(os.path.join(ft, 'plan.json')) as f:
          plan = plan_lib.Plan.from_json(json.load(f))
        self.assertEqual(
          {n: [int(i) for i in k] for n, k in plan.keep.items()}, rec['kept']
        )
    l1 = r['recipes']['l1_flops_0.5']
    self.assertLessEqual(l1['flops'], 0.5 * r['full']['flops'])
    for f in ('config.json', 'metrics.jsonl', 'result.json'):
      self.assertTrue(os.path.exists(os.path.join(self.workdir, 'train', f)))

  def test_recipes_match_float64_reference(self):
    with open(os.path.join(self.workdir, 'compress', 'result.json')) as f:
      r = json.load(f)
    ref_spectra = {}
    for n, c in self.ref_covs.items():
      lam = np.clip(np.linalg.eigvalsh(c)[::-1], 0, None)
      ref_spectra[n] = lam / lam.sum() if lam.sum() > 0 else np.eye(len(lam))[0]
    self.assertEqual(r['recipes']['pfa_kl']['widths'], recipes.kl(ref_spectra))
    self.assertEqual(
      r['recipes']['pfa_energy_0.9']['widths'],
      recipes.energy(ref_spectra, 0.9),
    )
    # The params target: largest tau meeting half the full footprint.
    rec = r['recipes']['pfa_params_0.5']
    self.assertLessEqual(rec['params'], 0.5 * r['full']['params'])

  def test_evaluate_job_matches_compress_full_accuracy(self):
    with open(os.path.join(self.workdir, 'evaluate', 'result.json')) as f:
      r = json.load(f)
    with open(os.path.join(self.workdir, 'compress', 'result.json')) as f:
      full = json.load(f)['full']
    self.assertEqual(r['accuracy'], full['accuracy'])
    self.assertEqual(r['count'], 40)  # eval_subset, every example once
    self.assertEqual(r['accuracy'], self.evaluated['accuracy'])

  def test_class_subset_cuts_the_head(self):
    c = self.config.copy_and_resolve_references()
    c.input.classes = (3, 5)
    c.recipes = ('keep:1.0',)
    c.finetune.num_epochs = 0.0
    c.compress.source = os.path.join(self.workdir, 'train')
    model, variables, _, _ = compress.checkpoint.restore_model(
      c.compress.source
    )
    with tfds.testing.mock_data(num_examples=64):
      # A 10-way model scored on relabelled 2-class data: refused, by name.
      with self.assertRaisesRegex(ValueError, 'has 10 outputs.*2 classes'):
        compress.train.evaluate_model(c, model, variables)
      r = compress.compress(c, tempfile.mkdtemp())
      test = list(
        input_pipeline.get_split_iter(c, 'test', augment=False, batch_size=16)
      )
    self.assertEqual(r['head'], {'classes': [3, 5], 'from_outputs': 10})
    # Reference: the full model's logits of classes 3 and 5, argmax.
    hits, count = 0, 0
    for b in test:
      logits = np.asarray(model.apply(variables, b['image']))[:, [3, 5]]
      m = np.asarray(b['mask'], bool)
      hits += int((logits.argmax(-1) == np.asarray(b['label']))[m].sum())
      count += int(m.sum())
    self.assertGreater(count, 0)
    self.assertAlmostEqual(r['full']['accuracy'], hits / count, places=6)

  def test_bad_options_fail_before_restoring(self):
    # An empty workdir: nothing to restore, so any error is the validation's.
    for field, value, pattern in [
      ('method', 'magnitude', "Unknown method 'magnitude'"),
      ('method_kw.select', 'magnitude', "select.*'magnitude'"),
      ('method_kw.global_ranking', True, "global_ranking.*'pfa'"),
      ('method_kw.stats_dtype', 'float16', 'stats_dtype.*float16'),
      ('method_kw.stats_dtype', 'float64', 'JAX_ENABLE_X64'),
      ('method_kw.compensation', 'exact', "compensation.*'exact'"),
      ('compress.recalibrate_batches', -1, 'recalibrate_batches'),
    ]:
      with self.subTest(field=field, value=value):
        c = _tiny_config()
        with c.unlocked():
          parent, _, key = field.rpartition('.')
          (c[parent] if parent else c)[key] = value
          if field == 'method_kw.select':
            c.method = 'random'
            c.recipes = ('params:0.5',)
        with self.assertRaisesRegex(ValueError, pattern):
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
    # The committed summary records the load average and marks a run that
    # started on a busy machine (its own threads raise the end load).
    for load, loaded in (((0.4, 2.5), False), ((1.6, 2.5), True)):
      out = tempfile.mkdtemp()
      args = argparse.Namespace(summary_dir=out, config_arg=None)
      with redirect_stdout(io.StringIO()):
        demo._save_summary(args, r, 12.0, load)  # noqa: SLF001
      with open(os.path.join(out, 'demo_cifar10.json')) as f:
        saved = json.load(f)
      self.assertEqual(
        (saved['load_average'], saved['loaded']), (list(load), loaded)
      )
      with open(os.path.join(out, 'demo_cifar10.md')) as f:
        self.assertEqual('(a loaded machine)' in f.read(), loaded)

  def test_bad_recipes_fail_early(self):
    for spec, pattern in [
      ('energy:1.5', r'energy must lie in \(0, 1\]'),
      ('energy:0', 'positive'),
      ('kl:2', 'Unknown recipe'),
      ('flops', "no named recipe 'flops'"),
      ('size:3', 'Unknown recipe'),
      ('prune:0.5', "'pfa' does not accept recipe 'prune:0.5'"),
      ('l1@kl', "'l1' does not accept recipe 'kl'"),
    ]:
      with self.subTest(spec):
        c = _tiny_config(('kl', spec))
        with self.assertRaisesRegex(ValueError, pattern):
          compress.compress(c, tempfile.mkdtemp())

  def test_impossible_target_is_named(self):
    model, variables, _, _ = compress.checkpoint.restore_model(
      os.path.join(self.workdir, 'train')
    )
    with self.assertRaisesRegex(ValueError, "'params:10'.*below the smallest"):
      compress.methods.prune(
        'l1', model, variables, recipe='params:10', input_shape=(32, 32, 3)
      )


if __name__ == '__main__':
  absltest.main()
