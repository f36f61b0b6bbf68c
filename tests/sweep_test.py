"""Tests for experiments.sweep: expand, name, skip, fail, slice, aggregate.

A fake runner (a module written to a temp dir) records its calls, so the
tests can tell a skipped point from a rerun one; one real tiny point goes
through ``pfa_jax.main.run`` on tfds mock data.
"""

import csv
import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
from contextlib import redirect_stdout

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl.testing import absltest

from experiments import random_study
from experiments import sweep
from experiments.figures import fig1_random as fig1

_RUNNER = """
import json, os
CALLS = []

def run(config, workdir):
  CALLS.append(workdir)
  if config.fail and not os.environ.get('SWEEP_TEST_HEAL'):
    raise RuntimeError(f'boom at lr={config.lr}')
  return [{'acc': config.lr * 10 + k, 'k': k, 'nested': {'x': 1}}
          for k in range(config.k)]
"""

_CONFIG = """
import ml_collections

def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.runner = 'sweep_fake_runner:run'
  c.lr = 0.1
  c.k = 2
  c.fail = False
  c.optim = ml_collections.ConfigDict({'lr': 0.5})
  c.version = int(arg or 0)
  return c

def get_sweep(arg=None):
  return [
    {'lr': 0.1, 'optim.lr': 0.5},
    {'lr': 0.2, 'optim.lr': 0.5},
    {'lr': 0.3, 'optim.lr': 0.5, 'fail': True},
    {'lr': 0.4, 'optim.lr': 0.5, 'k': 3},
    {'lr': 0.5, 'optim.lr': 0.5},
  ]
"""


class SweepTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    self.root = tempfile.mkdtemp()
    with open(os.path.join(self.root, 'sweep_fake_runner.py'), 'w') as f:
      f.write(textwrap.dedent(_RUNNER))
    self.config = os.path.join(self.root, 'cfg.py')
    with open(self.config, 'w') as f:
      f.write(textwrap.dedent(_CONFIG))
    sys.path.insert(0, self.root)
    sys.modules.pop('sweep_fake_runner', None)
    import sweep_fake_runner  # noqa: PLC0415

    self.calls = sweep_fake_runner.CALLS
    self.workdir = os.path.join(self.root, 'runs')
    os.environ.pop('SWEEP_TEST_HEAL', None)

  def tearDown(self):
    sys.path.remove(self.root)
    os.environ.pop('SWEEP_TEST_HEAL', None)
    super().tearDown()

  def _main(self, *args):
    out = io.StringIO()
    with redirect_stdout(out):
      rc = sweep.main(list(args))
    return rc, out.getvalue()

  def test_names_are_readable_slugs_plus_config_hash(self):
    module, arg = sweep.load_config_module(self.config + ':0')
    points = sweep.expand(module, arg)
    self.assertLen(points, 5)
    name = points[0]['name']
    # Colliding leaf keys ('lr' and 'optim.lr') keep their full key.
    self.assertTrue(name.startswith('lr=0.1_optim.lr=0.5-'), name)
    self.assertEqual(name.rpartition('-')[2], points[0]['hash'])
    self.assertLen(points[0]['hash'], sweep.HASH_LEN)
    self.assertEqual(points[0]['config'].lr, 0.1)
    # The hash is of the resolved config: another arg changes every hash.
    other = sweep.expand(module, '1')
    self.assertNotEqual(other[0]['hash'], points[0]['hash'])
    self.assertEqual(sweep.expand(module, '0')[0]['hash'], points[0]['hash'])

  def test_a_field_added_later_keeps_old_hashes_at_its_neutral_value(self):
    old = {'input': {'dataset': 'cifar10'}, 'seed': 1}
    text = json.dumps(old, sort_keys=True, default=repr)
    before = hashlib.sha256(text.encode()).hexdigest()[: sweep.HASH_LEN]
    config = ml_collections.ConfigDict(old)
    self.assertEqual(sweep.config_hash(config), before)
    config.input.source = 'tfds'  # the field's neutral value
    self.assertEqual(sweep.config_hash(config), before)
    config.input.source = 'npz'
    self.assertNotEqual(sweep.config_hash(config), before)
    self.assertEqual(config.input.source, 'npz')  # the config is not edited

  def test_unknown_override_key_raises_naming_it(self):
    module, _ = sweep.load_config_module(self.config)
    base = module.get_config()
    with self.assertRaisesRegex(ValueError, "'optim.lrr'.*'lrr'"):
      sweep.apply_overrides(base, {'optim.lrr': 1.0})
    with self.assertRaisesRegex(ValueError, "'model'"):
      sweep.apply_overrides(base, {'model.name': 'x'})

  def test_run_skip_fail_retry_and_summarize(self):
    rc, out = self._main('--config', self.config, '--workdir', self.workdir)
    self.assertEqual(rc, 1)  # one point failed
    self.assertLen(self.calls, 5)
    self.assertIn('[5/5]', out)
    self.assertIn('ETA', out)
    self.assertIn('FAILED RuntimeError: boom at lr=0.3', out)
    dirs = sorted(os.listdir(self.workdir))
    self.assertIn(sweep.MANIFEST, dirs)
    failed_dir = [d for d in dirs if d.startswith('lr=0.3')][0]
    with open(os.path.join(self.workdir, failed_dir, sweep.FAILED)) as f:
      failed = json.load(f)
    self.assertIn('boom', failed['error'])
    self.assertIn('Traceback', failed['traceback'])
    ok_dir = [d for d in dirs if d.startswith('lr=0.4')][0]
    with open(os.path.join(self.workdir, ok_dir, sweep.RESULT)) as f:
      res = json.load(f)
    self.assertEqual(res['status'], 'complete')
    self.assertEqual(res['hash'], ok_dir.rpartition('-')[2])
    self.assertLen(res['rows'], 3)  # a point with K = 3 rows
    self.assertEqual(res['rows'][1]['nested.x'], 1)

    # Rerun: complete and failed points are skipped.
    rc, out = self._main('--config', self.config, '--workdir', self.workdir)
    self.assertLen(self.calls, 5)
    self.assertIn('4 complete, 1 failed (skipped), 0 to run', out)

    # --retry_failed reruns only the failed point; it now succeeds.
    os.environ['SWEEP_TEST_HEAL'] = '1'
    rc, _ = self._main(
      '--config', self.config, '--workdir', self.workdir, '--retry_failed'
    )
    self.assertEqual(rc, 0)
    self.assertLen(self.calls, 6)
    self.assertTrue(self.calls[-1].endswith(failed_dir))
    self.assertFalse(
      os.path.exists(os.path.join(self.workdir, failed_dir, sweep.FAILED))
    )

    rc, out = self._main('--summarize', self.workdir)
    with open(os.path.join(self.workdir, 'summary.csv')) as f:
      table = list(csv.DictReader(f))
    self.assertLen(table, 2 + 2 + 2 + 3 + 2)
    for col in ('lr', 'optim.lr', 'point', 'hash', 'row', 'acc', 'k'):
      self.assertIn(col, table[0])
    rows_04 = [r for r in table if r['lr'] == '0.4']
    self.assertEqual([r['k'] for r in rows_04], ['0', '1', '2'])
    self.assertAlmostEqual(float(rows_04[2]['acc']), 0.4 * 10 + 2)
    with open(os.path.join(self.workdir, 'summary.json')) as f:
      summary = json.load(f)
    self.assertEqual(summary['num_points'], 5)
    self.assertEqual(summary['num_points_complete'], 5)
    # Provenance on every row: the checkout's commit, the rerun command.
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    head = subprocess.run(
      ['git', 'rev-parse', 'HEAD'], cwd=repo, capture_output=True, text=True
    ).stdout.strip()
    for r in summary['rows']:
      self.assertEqual(r['commit'].removesuffix('-dirty'), head or 'unknown')
      self.assertEqual(
        r['command'],
        f'python -m experiments.sweep --config {self.config} '
        f'--workdir {self.workdir}',
      )

  def test_changed_config_reruns_and_stale_points_leave_the_summary(self):
    self._main('--config', self.config + ':0', '--workdir', self.workdir)
    self.assertLen(self.calls, 5)
    self._main('--config', self.config + ':1', '--workdir', self.workdir)
    self.assertLen(self.calls, 10)  # every hash changed
    self._main('--summarize', self.workdir)
    with open(os.path.join(self.workdir, 'summary.json')) as f:
      summary = json.load(f)
    self.assertEqual(summary['num_points_complete'], 4)  # lr=0.3 failed
    module, _ = sweep.load_config_module(self.config)
    hashes = {p['hash'] for p in sweep.expand(module, '1')}
    self.assertTrue(all(r['hash'] in hashes for r in summary['rows']))

  def test_incomplete_or_mismatched_result_runs_again(self):
    module, _ = sweep.load_config_module(self.config)
    points = sweep.expand(module, None)
    sweep.run_sweep(points[:2], self.workdir, log=lambda s: None)
    self.assertLen(self.calls, 2)
    path0 = os.path.join(self.workdir, points[0]['name'], sweep.RESULT)
    with open(path0, 'w') as f:
      f.write('{"status": "compl')  # killed mid-write by a non-atomic writer
    path1 = os.path.join(self.workdir, points[1]['name'], sweep.RESULT)
    with open(path1) as f:
      res = json.load(f)
    res['hash'] = 'deadbeef00'
    with open(path1, 'w') as f:
      json.dump(res, f)
    counts = sweep.run_sweep(points[:2], self.workdir, log=lambda s: None)
    self.assertLen(self.calls, 4)
    self.assertEqual(counts['complete'], 2)

  def test_task_slices_are_disjoint_and_cover(self):
    module, _ = sweep.load_config_module(self.config)
    points = sweep.expand(module, None)
    slices = [sweep.task_slice(points, i, 3) for i in range(3)]
    names = [p['name'] for s in slices for p in s]
    self.assertCountEqual(names, [p['name'] for p in points])
    self.assertEqual([p['index'] for p in slices[1]], [1, 4])
    with self.assertRaisesRegex(ValueError, 'task_index=3'):
      sweep.task_slice(points, 3, 3)
    # Run one slice through the CLI: only its points run.
    rc, out = self._main(
      '--config',
      self.config,
      '--workdir',
      self.workdir,
      '--task_index',
      '1',
      '--num_tasks',
      '3',
    )
    self.assertEqual(rc, 0)
    self.assertLen(self.calls, 2)
    self.assertIn('task 1/3 runs 2', out)

  def test_claims_let_workers_share_a_root(self):
    module, arg = sweep.load_config_module(self.config)
    points = sweep.expand(module, arg)
    held, stale = points[0], points[1]
    # A live worker on this host (our parent process) holds point 0; a dead
    # one held point 1.
    dead = subprocess.Popen(['true'])
    dead.wait()
    for p, pid in ((held, os.getppid()), (stale, dead.pid)):
      d = os.path.join(self.workdir, p['name'])
      os.makedirs(d)
      with open(os.path.join(d, sweep.CLAIM), 'w') as f:
        json.dump({'host': socket.gethostname(), 'pid': pid}, f)
    self.assertFalse(sweep.claim(self.workdir, held))
    self.assertTrue(sweep.claim(self.workdir, stale))  # taken over
    self.assertTrue(sweep.claim(self.workdir, stale))  # ours now
    sweep.release(self.workdir, stale)
    counts = sweep.run_sweep(points, self.workdir, log=lambda s: None)
    self.assertEqual(counts['skipped'], 1)
    self.assertNotIn(os.path.join(self.workdir, held['name']), self.calls)
    self.assertLen(self.calls, len(points) - 1)
    for p in points[1:]:  # claims are released after each point
      self.assertFalse(
        os.path.exists(os.path.join(self.workdir, p['name'], sweep.CLAIM))
      )

  def test_slurm_array_defaults(self):
    self.assertEqual(sweep.slurm_defaults({}), (0, 1))
    env = {
      'SLURM_ARRAY_TASK_ID': '7',
      'SLURM_ARRAY_TASK_MIN': '5',
      'SLURM_ARRAY_TASK_COUNT': '4',
    }
    self.assertEqual(sweep.slurm_defaults(env), (2, 4))
    env.update(SLURM_ARRAY_TASK_ID='9', SLURM_ARRAY_TASK_STEP='2')
    self.assertEqual(sweep.slurm_defaults(env), (2, 4))

  def test_dry_run_lists_and_writes_nothing(self):
    rc, out = self._main(
      '--config', self.config, '--workdir', self.workdir, '--dry_run'
    )
    self.assertEqual(rc, 0)
    self.assertEqual(out.count(' todo '), 5)
    self.assertIn(os.path.join(self.workdir, 'lr=0.1_optim.lr=0.5-'), out)
    self.assertEqual(self.calls, [])
    self.assertFalse(os.path.exists(self.workdir))


_FIG1 = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
  'configs',
  'paper',
  'fig1_random.py',
)


class Fig1StudyTest(absltest.TestCase):
  def test_sweep_expands_for_every_scale(self):
    module, _ = sweep.load_config_module(_FIG1)
    # base seeds + recipes x inits x ceil(N / K) random groups + PFA
    # points (recipes x inits + the 'full' control) x seeds
    for arg, want in (
      ('runlocal', 1 + 2 * 2 * 1 + (2 * 2 + 1) * 1),
      ('cpu', 3 + 9 * 2 * 1 + (9 * 2 + 1) * 3),
      ('paper', 3 + 9 * 2 * 6 + (9 * 2 + 1) * 3),
      ('cpu,n=12,k=4', 3 + 9 * 2 * 3 + (9 * 2 + 1) * 3),
      ('cpu,pfa=false', 3 + 9 * 2 * 1),
      ('cpu,random=false', 3 + (9 * 2 + 1) * 3),
    ):
      points = sweep.expand(module, arg)
      self.assertLen(points, want, arg)
      self.assertEqual(
        points[0]['config'].runner, 'experiments.random_study:run'
      )
    c = module.get_config('paper,cifar100')
    self.assertEqual(c.input.dataset, 'cifar100')
    self.assertEqual(c.study.num_variants, 300)
    with self.assertRaisesRegex(ValueError, 'one scale'):
      module.get_config('cpu,paper')

  def test_choose_path_from_benchmark(self):
    def row(k, vmap, masked, sliced, c_sliced):
      return {
        'K': k,
        'vmap': {'step_s_all_variants': vmap, 'compile_s': 10.0},
        'masked': {'step_s_all_variants': masked, 'compile_s': 10.0},
        'sliced': {'step_s_all_variants': sliced, 'compile_s': c_sliced},
      }

    bench = {'rows': [row(4, 4.0, 2.0, 1.0, 40.0)]}
    # Long runs amortise the sliced compiles; short ones do not.
    self.assertEqual(
      random_study.choose_path('auto', 4, 1000, bench=bench), 'sliced'
    )
    self.assertEqual(
      random_study.choose_path('auto', 4, 10, bench=bench), 'masked'
    )
    bench = {'rows': [row(4, 0.5, 2.0, 1.0, 40.0)]}
    self.assertEqual(
      random_study.choose_path('auto', 4, 10, bench=bench), 'vmap'
    )
    self.assertEqual(
      random_study.choose_path('sliced', 4, 10, bench=bench), 'sliced'
    )
    # vmap is judged at the next measured K, never extrapolated from K = 1.
    bench = {
      'rows': [row(1, 0.1, 1.0, 1.0, 100.0), row(4, 40.0, 4.0, 4.0, 100.0)]
    }
    self.assertEqual(
      random_study.choose_path('auto', 2, 10, bench=bench), 'masked'
    )
    with self.assertRaisesRegex(ValueError, 'study.path'):
      random_study.choose_path('fast', 4, 10)

  def test_expected_max_is_the_bootstrap_expectation(self):
    rng = np.random.default_rng(0)
    x = rng.normal(size=7)
    self.assertAlmostEqual(fig1.expected_max(x, 1), x.mean())
    self.assertAlmostEqual(fig1.expected_max(x, 10_000), x.max(), places=6)
    draws = rng.choice(x, size=(200_000, 3)).max(axis=1)
    self.assertAlmostEqual(fig1.expected_max(x, 3), draws.mean(), places=2)
    with self.assertRaisesRegex(ValueError, 'n >= 1'):
      fig1.expected_max(x, 0)

  def test_aggregate_and_files(self):
    rows = [
      {'part': 'base', 'seed': s, 'accuracy': a}
      for s, a in ((0, 0.70), (1, 0.72), (2, 0.71))
    ]
    deltas = {'scratch': [-0.05, -0.02, -0.03], 'selection': [0.0, 0.01]}
    for init, ds in deltas.items():
      for d in ds:
        rows.append(
          {
            'init': init,
            'recipe': 'kl',
            'footprint': 0.4,
            'params': 100,
            'accuracy': 0.70 + d,
            'delta_accuracy': d,
            'base_accuracy': 0.70,
          }
        )
    pfa = {
      ('selection', 'kl'): [0.02, 0.03, 0.025],
      ('scratch', 'kl'): [-0.01, -0.012, -0.011],
      ('selection', 'full'): [0.01, 0.011, 0.012],
    }
    for (init, recipe), ds in pfa.items():
      for seed, d in enumerate(ds):
        rows.append(
          {
            'widths_from': 'pfa',
            'init': init,
            'recipe': recipe,
            'seed': 7,
            'data_seed': seed,
            'footprint': 1.0 if recipe == 'full' else 0.41,
            'params': 100,
            'accuracy': 0.70 + d,
            'delta_accuracy': d,
            'base_accuracy': 0.70,
          }
        )
    agg = fig1.aggregate({'rows': rows})
    # PFA points are not random curves; the control is kept apart.
    self.assertEqual(sum(c['n'] for c in agg['curves']), 5)
    self.assertEqual(agg['control']['seeds'], [0, 1, 2])
    self.assertAlmostEqual(agg['control']['mean_pp'], 1.1)
    c = agg['claims']
    # Hand values: selection 2.5 ± 0.5 pp, scratch -1.1 ± 0.1, control
    # 1.1 ± 0.1; pooled sigma(sel, scr) = sqrt((0.25 + 0.01) / 2).
    (sel,) = [r for r in c['c2_selection_vs_scratch'] if r['widths'] == 'pfa']
    self.assertAlmostEqual(sel['selection_minus_scratch_pp'], 3.6)
    self.assertAlmostEqual(sel['sigma_pp'], np.sqrt(0.13))
    self.assertEqual(sel['verdict'], 'win')
    (rnd,) = [
      r for r in c['c2_selection_vs_scratch'] if r['widths'] == 'random_mean'
    ]
    # random: selection 0.5 ± 0.71 vs scratch -3.33 ± 1.53 pp: 3.83 > 2.38
    self.assertAlmostEqual(rnd['selection_minus_scratch_pp'], 23 / 6)
    self.assertEqual(rnd['verdict'], 'win')
    beats = {r['init']: r for r in c['c3_compressed_vs_full']}
    self.assertEqual(beats['selection']['vs_base'], 'win')
    self.assertAlmostEqual(beats['selection']['vs_control_pp'], 1.4)
    self.assertEqual(beats['selection']['vs_control'], 'win')
    self.assertEqual(beats['scratch']['vs_base'], 'loss')
    self.assertEqual(fig1.verdict(0.5, 0.25), 'indistinguishable')
    self.assertEqual(fig1.verdict(-0.51, 0.25), 'loss')
    self.assertEqual(fig1.verdict(5.0, 0.0, n=1), 'too few seeds')
    self.assertAlmostEqual(agg['base']['mean'], 0.71)
    self.assertAlmostEqual(
      agg['base']['std'], np.std([0.7, 0.72, 0.71], ddof=1)
    )
    (scratch,) = [c for c in agg['curves'] if c['init'] == 'scratch']
    self.assertEqual(scratch['n'], 3)
    self.assertAlmostEqual(scratch['mean_pp'], -100 * 0.1 / 3)
    self.assertAlmostEqual(scratch['best_pp'], -2.0)
    self.assertAlmostEqual(
      scratch['std_pp'], np.std([-5, -2, -3], ddof=1), places=6
    )
    out = tempfile.mkdtemp()
    path = os.path.join(out, 'summary.json')
    with open(path, 'w') as f:
      json.dump({'rows': rows}, f)
    fig1.main([path, '--out_dir', out, '--name', 'f'])
    for ext in ('json', 'md', 'png'):
      self.assertTrue(os.path.exists(os.path.join(out, f'f.{ext}')), ext)
    with open(os.path.join(out, 'f.md')) as f:
      self.assertIn('| selection | kl |', f.read())


class RealPointTest(absltest.TestCase):
  def test_one_tiny_point_through_main_run(self):
    root = tempfile.mkdtemp()
    cfg = os.path.join(root, 'tiny.py')
    with open(cfg, 'w') as f:
      f.write(
        textwrap.dedent("""
        from configs import simple_cnn_cifar10

        def get_config(arg=None):
          c = simple_cnn_cifar10.get_config('runlocal')
          c.model.kw.width_mult = 1 / 24
          c.input.train_subset = 32
          c.input.eval_subset = 32
          c.input.batch_size = 16
          c.input.eval_batch_size = 32
          c.num_epochs = 1.0
          c.eval_every_epochs = 0.0
          c.ckpt_every_steps = 0
          return c

        def get_sweep(arg=None):
          return [{'seed': 3}]
        """)
      )
    workdir = os.path.join(root, 'runs')
    with tfds.testing.mock_data(num_examples=64):
      with redirect_stdout(io.StringIO()):
        rc = sweep.main(['--config', cfg, '--workdir', workdir])
    self.assertEqual(rc, 0)
    (point,) = [d for d in os.listdir(workdir) if d.startswith('seed=3-')]
    with open(os.path.join(workdir, point, sweep.RESULT)) as f:
      res = json.load(f)
    (row,) = res['rows']
    self.assertEqual(row['train.steps'], 2)
    self.assertEqual(row['train.num_eval_examples'], 32)
    self.assertBetween(row['train.eval_accuracy'], 0.0, 1.0)
    self.assertTrue(
      os.path.exists(os.path.join(workdir, point, 'train', 'result.json'))
    )


_TINY_STUDY = """
from configs.paper import fig1_random

def get_config(arg=None):
  c = fig1_random.get_config('runlocal')
  c.model.kw.width_mult = 1 / 12
  c.input.train_subset = 64
  c.input.eval_subset = 64
  c.input.batch_size = 32
  c.input.eval_batch_size = 64
  c.num_epochs = 1.0
  c.compress.num_batches = 2
  c.compress.batch_size = 32
  c.study.tol = 0.05
  return c

def get_sweep(arg=None):
  return [
    {'study.part': 'base', 'seed': 0},
    {'study.recipe': 'kl', 'study.init': 'scratch', 'study.group': 0},
    {'study.widths': 'pfa', 'study.recipe': 'kl', 'study.init': 'selection',
     'seed': 1},
    {'study.widths': 'pfa', 'study.recipe': 'full',
     'study.init': 'selection', 'seed': 1},
  ]
"""


class TinyStudyTest(absltest.TestCase):
  """The random study's points end to end on a tiny SimpleCNN."""

  def test_random_pfa_and_control_points(self):
    root = tempfile.mkdtemp()
    cfg = os.path.join(root, 'tiny_study.py')
    with open(cfg, 'w') as f:
      f.write(_TINY_STUDY)
    workdir = os.path.join(root, 'runs')
    with tfds.testing.mock_data(num_examples=64):
      with redirect_stdout(io.StringIO()):
        rc = sweep.main(['--config', cfg, '--workdir', workdir])
        self.assertEqual(rc, 0)
        sweep.main(['--summarize', workdir])
    with open(os.path.join(workdir, 'summary.json')) as f:
      rows = json.load(f)['rows']
    with open(os.path.join(workdir, '_base', 'footprints.json')) as f:
      kl = json.load(f)['kl']
    base = [r for r in rows if r.get('part') == 'base']
    rand = [r for r in rows if r.get('widths_from') == 'random']
    pfa = [r for r in rows if r.get('widths_from') == 'pfa']
    self.assertLen(base, 1)
    self.assertLen(rand, 2)  # runlocal: N = K = 2
    for r in rand:  # within the sampler's tolerance of PFA-KL's footprint
      self.assertLessEqual(abs(r['params'] / kl['params'] - 1), 0.05)
    self.assertNotEqual(rand[0]['widths'], rand[1]['widths'])
    (point,) = [r for r in pfa if r['recipe'] == 'kl']
    (control,) = [r for r in pfa if r['recipe'] == 'full']
    self.assertEqual(json.loads(point['widths']), list(kl['widths'].values()))
    self.assertEqual(point['params'], kl['params'])
    self.assertEqual(control['footprint'], 1.0)
    self.assertEqual((point['data_seed'], control['data_seed']), (1, 1))
    for r in rows:
      self.assertBetween(r['accuracy'], 0.0, 1.0)
    agg = fig1.aggregate({'rows': rows})
    self.assertEqual(agg['control']['footprint'], 1.0)
    self.assertEqual([p['recipe'] for p in agg['pfa']], ['kl'])


if __name__ == '__main__':
  absltest.main()
