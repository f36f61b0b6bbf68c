"""Schedules: the step lists (pure) and a tiny layer-by-layer / FCP run."""

import json
import math
import os
import tempfile

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from absl.testing import absltest

from configs import common
from configs import simple_cnn_cifar10
from pfa_jax import checkpoint
from pfa_jax import costs
from pfa_jax import main as pfa_main
from pfa_jax import models
from pfa_jax import plan as plan_lib
from pfa_jax import schedules
from pfa_jax import slicing
from pfa_jax import train

_SHAPE = (32, 32, 3)


class StepListTest(absltest.TestCase):
  def test_vgg_layer_order_and_widths(self):
    m = models.get_model('vgg16_cifar', num_classes=10)
    full = models.widths_of(m)
    rates = [0.3] + [0.2] * 4 + [0.3] * 2 + [0.4] + [0.85] * 4 + [0.0] * 2
    text = 'rates:[0.3]+[0.2]*4+[0.3]*2+[0.4]+[0.85]*4+[0.]*2'
    widths = schedules.target_widths(m, text, groups='all')
    steps = schedules.cf_layer_steps(m, widths)
    # Deepest first; conv13 and fc1 (rate 0) are not steps.
    self.assertEqual(
      [s.groups for s in steps], [(f'conv{i}',) for i in range(12, 0, -1)]
    )
    for s in steps:
      (g,) = s.groups
      i = int(g[4:]) - 1
      c = full[g]
      self.assertEqual(s.widths, {g: c - math.ceil(round(c * rates[i], 9))})
    self.assertEqual(steps[0].name, '00_conv12')

  def test_resnet56_first_convs_from_the_last_block(self):
    m = models.get_model('resnet56', num_classes=10)
    widths = schedules.target_widths(m, 'rates:[0.3]*9+[0.4]*9+[0.5]*9')
    steps = schedules.cf_layer_steps(m, widths)
    expect = [
      (f'stage{s}_block{b}/conv1',) for s in (3, 2, 1) for b in range(8, -1, -1)
    ]
    self.assertEqual([s.groups for s in steps], expect)
    by_stage = {1: 16 - 5, 2: 32 - 13, 3: 64 - 32}  # C - ceil(C r) by hand
    for s in steps:
      (g,) = s.groups
      self.assertEqual(s.widths[g], by_stage[int(g[5])])
    self.assertEqual(steps[0].name, '00_stage3_block8-conv1')

  def test_streams_are_never_steps(self):
    m = models.get_model('resnet8', num_classes=10)
    with self.assertRaisesRegex(ValueError, 'stream1'):
      schedules.cf_layer_steps(m, {'stream1': 8})

  def test_fcp_rounds_stop_at_the_target(self):
    m = models.get_model('simple_cnn', num_classes=10, width_mult=1 / 6)
    full = models.widths_of(m)
    target = 0.6 * costs.count(m, _SHAPE)['params']
    steps = schedules.fcp_round_steps(
      m, 'params:0.6', groups='all', num_pairs=2, input_shape=_SHAPE
    )
    self.assertGreater(len(steps), 1)
    prev = dict(full)

    def params(w):
      return costs.count(models.with_widths(m, w), _SHAPE)['params']

    for i, s in enumerate(steps):
      # Every layer drops min(n, C // 2) of its current C.
      self.assertEqual(
        s.widths, {g: w - min(s.num_pairs, w // 2) for g, w in prev.items()}
      )
      self.assertEqual(s.num_pairs, 2 if i < len(steps) - 1 else s.num_pairs)
      (self.assertLessEqual if i == len(steps) - 1 else self.assertGreater)(
        params(s.widths), target
      )
      prev = s.widths
    # The last round drops the fewest pairs that reach the target.
    last = steps[-1]
    if last.num_pairs > 1:
      before = steps[-2].widths if len(steps) > 1 else full
      fewer = {
        g: w - min(last.num_pairs - 1, w // 2) for g, w in before.items()
      }
      self.assertGreater(params(fewer), target)

  def test_fcp_rounds_reject_bad_requests(self):
    m = models.get_model('simple_cnn', num_classes=10, width_mult=1 / 24)
    kw = dict(groups='all', input_shape=_SHAPE)
    with self.assertRaisesRegex(ValueError, 'params/FLOPs'):
      schedules.fcp_round_steps(m, 'keep:0.5', num_pairs=1, **kw)
    with self.assertRaisesRegex(ValueError, 'num_pairs'):
      schedules.fcp_round_steps(m, 'params:0.5', num_pairs=0, **kw)
    with self.assertRaisesRegex(ValueError, 'width 1'):
      schedules.fcp_round_steps(m, 'params:100', num_pairs=4, **kw)


class ConfigCheckTest(absltest.TestCase):
  def test_bad_schedule_config_fails_before_restoring(self):
    for field, value, pattern in [
      ('schedule.kind', 'spiral', 'schedule.kind'),
      ('method', 'pfa', "runs method 'cf'"),
    ]:
      with self.subTest(field):
        c = _tiny_config('layer')
        parent, _, key = field.rpartition('.')
        (c[parent] if parent else c)[key] = value
        if value == 'pfa':
          c.recipes = ('kl',)
          c.method_kw.num_batches = 5  # cf's; pfa refuses a changed one
        with self.assertRaisesRegex(ValueError, pattern):
          schedules.run(c, tempfile.mkdtemp())
        # The same through the CLI's job dispatch (config.job='schedule').
        c.job = 'schedule'
        with self.assertRaisesRegex(ValueError, pattern):
          pfa_main.run(c, tempfile.mkdtemp())
    c = _tiny_config('rounds')
    c.recipes = ('keep:0.5',)
    with self.assertRaisesRegex(ValueError, 'params/FLOPs'):
      schedules.run(c, tempfile.mkdtemp())


def _tiny_config(kind):
  c = simple_cnn_cifar10.get_config('runlocal,job=train')
  c.model.kw.width_mult = 1 / 24  # widths 4 / 8
  c.model.kw.conv_impl = 'xla'
  c.input.train_subset = 64
  c.input.eval_subset = 40
  c.input.batch_size = 16
  c.input.eval_batch_size = 40
  c.input.shuffle_buffer = 64
  c.num_epochs = 1.0
  c.log_every_steps = 2
  c.ckpt_every_steps = 4
  c.compress.num_batches = 2
  c.compress.batch_size = 16
  c.compress.recalibrate_batches = 1
  c.finetune.num_epochs = 0.25
  c.schedule = common.schedule(kind)
  if kind == 'layer':
    c.method = 'cf'
    c.method_kw.num_batches = 2
    c.recipes = ('rates:[0.]+[0.5]+[0.]*3+[0.5]+[0.]*2',)  # conv2, conv6
  else:
    c.method = 'fcp'
    c.recipes = ('params:0.93',)
    c.method_kw.num_pairs = 1
    c.method_kw.epochs = 0.25
  return c


@pytest.mark.slow  # about 80 s of CPU (two schedules, nine trainings)
class RunTest(absltest.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.workdir = tempfile.mkdtemp()
    cls.config = _tiny_config('layer')
    with tfds.testing.mock_data(num_examples=64):
      pfa_main.run(cls.config, cls.workdir)
      cls.out = schedules.run(cls.config, os.path.join(cls.workdir, 'sched'))
      cls.mtimes = cls._mtimes()
      cls.again = schedules.run(cls.config, os.path.join(cls.workdir, 'sched'))
      cls.fcp_config = _tiny_config('rounds')
      cls.fcp = schedules.run(cls.fcp_config, os.path.join(cls.workdir, 'fcp'))
      cls.checks = cls._replay()

  @classmethod
  def _mtimes(cls):
    root = os.path.join(cls.workdir, 'sched', 'cf_rates')
    return {
      d: os.path.getmtime(os.path.join(root, d, 'result.json'))
      for d in ('00_conv6', '01_conv2')
    }

  @classmethod
  def _replay(cls):
    """Each step's plan.json on the previous step's restored net."""
    root = os.path.join(cls.workdir, 'sched', 'cf_rates')
    prev = checkpoint.restore_model(os.path.join(cls.workdir, 'train'))
    out = []
    for d in ('00_conv6', '01_conv2'):
      with open(os.path.join(root, d, 'plan.json')) as f:
        plan = plan_lib.Plan.from_json(json.load(f))
      pruned, pvars = slicing.prune(prev[0], prev[1], plan)
      ev = train.evaluate_model(cls.config, pruned, pvars)
      nxt = checkpoint.restore_model(os.path.join(root, d))
      with open(os.path.join(root, d, 'result.json')) as f:
        row = json.load(f)
      out.append((d, pruned, pvars, ev, nxt, row))
      prev = nxt
    return out

  def test_steps_in_documented_order(self):
    root = os.path.join(self.workdir, 'sched', 'cf_rates')
    with open(os.path.join(root, 'steps.json')) as f:
      steps = json.load(f)
    self.assertEqual([s['groups'] for s in steps], [['conv6'], ['conv2']])
    self.assertEqual([s['widths'] for s in steps], [{'conv6': 4}, {'conv2': 2}])
    self.assertEqual(
      self.out['recipes']['cf_rates']['steps'], ['00_conv6', '01_conv2']
    )
    for d in ('00_conv6', '01_conv2'):
      for f in ('config.json', 'metrics.jsonl', 'result.json', 'plan.json'):
        self.assertTrue(os.path.exists(os.path.join(root, d, f)), (d, f))

  def test_plans_apply_and_results_reload_without_widths(self):
    full = {
      'conv1': 4,
      'conv2': 4,
      'conv3': 4,
      **dict.fromkeys(('conv4', 'conv5', 'conv6', 'conv7', 'conv8'), 8),
    }
    expect = [dict(full, conv6=4), dict(full, conv6=4, conv2=2)]
    for (d, pruned, pvars, ev, nxt, row), want in zip(self.checks, expect):
      with self.subTest(d):
        self.assertEqual(models.widths_of(pruned), want)
        # restore_model rebuilt the net from its checkpoint alone.
        self.assertEqual(models.widths_of(nxt[0]), want)
        self.assertEqual(row['widths'], want)
        shapes = lambda t: [np.shape(x) for x in jax.tree.leaves(t)]  # noqa: E731
        self.assertEqual(shapes(pvars['params']), shapes(nxt[1]['params']))
        # The saved plan is the applied one: same sliced accuracy.
        self.assertAlmostEqual(ev['accuracy'], row['accuracy_pruned'], 6)

  def test_finished_steps_are_skipped(self):
    self.assertEqual(self._mtimes(), self.mtimes)
    a = self.out['recipes']['cf_rates']
    b = self.again['recipes']['cf_rates']
    self.assertEqual(a['rows'], b['rows'])
    self.assertEqual(a['widths'], b['widths'])

  def test_fcp_round_drops_its_trained_pairs(self):
    rec = self.fcp['recipes']['fcp_params_0.93']
    self.assertNotEmpty(rec['rows'])
    full_params = self.fcp['full']['params']
    self.assertLessEqual(rec['params'], 0.93 * full_params)
    root = os.path.join(self.workdir, 'fcp', 'fcp_params_0.93')
    for row in rec['rows']:
      d = os.path.join(root, row['step']['name'])
      self.assertTrue(os.path.exists(os.path.join(d, 'regularize', 'ckpt')))
      with open(os.path.join(d, 'plan.json')) as f:
        plan = plan_lib.Plan.from_json(json.load(f))
      for g, w in row['step']['widths'].items():
        self.assertLen(plan.keep.get(g, range(w)), w)
      self.assertIn('accuracy_regularized', row)


if __name__ == '__main__':
  absltest.main()
