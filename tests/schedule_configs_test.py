"""CF/FCP configs: they build and validate, their recipes replay the authors',
and runlocal one-shot and layer-by-layer CF run end to end on mock data."""

import itertools
import json
import math
import os
import tempfile

import pytest
import tensorflow_datasets as tfds
from absl.testing import absltest
from absl.testing import parameterized

from configs import cf_cifar10
from configs import fcp_cifar10
from pfa_jax import compress
from pfa_jax import costs
from pfa_jax import main as pfa_main
from pfa_jax import models
from pfa_jax import schedules

_CF_ARGS = [
  ','.join(filter(None, (f'model={m}', f'schedule={s}', f'recipe={r}', rl)))
  for m, s, r, rl in itertools.product(
    ('vgg16', 'resnet56'), ('oneshot', 'layer'), (0, 1, 2), ('', 'runlocal')
  )
]
_FCP_ARGS = [
  f'model={m}{rl}'
  for m, rl in itertools.product(('vgg16', 'resnet56'), ('', ',runlocal'))
]


def _rates(text):
  """The authors' list expression, evaluated by Python itself."""
  return [float(x) for x in eval(text, {'__builtins__': {}})]  # noqa: S307


class ConfigsTest(parameterized.TestCase):
  @parameterized.parameters(
    *[(cf_cifar10, a) for a in _CF_ARGS + [None, 'runlocal']],
    *[(fcp_cifar10, a) for a in _FCP_ARGS + [None, 'runlocal']],
  )
  def test_builds_and_validates(self, mod, arg):
    c = mod.get_config(arg)
    json.loads(c.to_json())
    self.assertIn(c.model.name, models.MODELS)
    compress.validate(c)
    if c.job == 'schedule':
      schedules.check(c)
    else:
      self.assertEqual(c.job, 'compress')
    self.assertEqual(c.finetune.optim.lr, 1e-3)
    self.assertEqual(c.finetune.optim.weight_decay, 5e-3)

  def test_defaults(self):
    c = cf_cifar10.get_config()
    self.assertEqual(c.job, 'compress')
    self.assertEqual(c.recipes, ('rates:[0.3]*9+[0.4]*9+[0.5]*9',))
    self.assertEqual(c.finetune.num_epochs, 30.0)
    self.assertEqual(c.finetune.optim.boundaries, (5,))
    c = cf_cifar10.get_config('model=vgg16,schedule=layer')
    self.assertEqual(c.job, 'schedule')
    self.assertEqual(c.schedule.kind, 'layer')
    self.assertEqual(c.finetune.num_epochs, 6.0)
    self.assertEqual(c.input.batch_size, 128)
    with self.assertRaisesRegex(ValueError, 'model must be'):
      cf_cifar10.get_config('model=vgg19')
    with self.assertRaisesRegex(ValueError, 'schedule must be'):
      cf_cifar10.get_config('schedule=spiral')

  def test_our_strings_are_the_authors_on_our_layers(self):
    for a, ours, *_ in cf_cifar10.PUBLISHED['vgg16']:
      # Authors: conv1..conv12; ours: conv1..conv13, fc1.
      self.assertLen(_rates(a), 12)
      self.assertEqual(_rates(ours), _rates(a) + [0.0, 0.0])
    for a, ours, *_ in cf_cifar10.PUBLISHED['resnet56']:
      # Authors: stem, then (conv1, conv2) of 27 blocks.
      r = _rates(a)
      self.assertLen(r, 55)
      self.assertEqual(r[0], 0.0)
      self.assertEqual(set(r[2::2]), {0.0})
      self.assertEqual(_rates(ours), r[1::2])

  def test_replays_the_published_reductions(self):
    for name, model in (('vgg16', 'vgg16_cifar'), ('resnet56', 'resnet56')):
      m = models.get_model(model, num_classes=10)
      full = costs.count(m, (32, 32, 3))
      for _, ours, params_drop, flops_drop, _ in cf_cifar10.PUBLISHED[name]:
        with self.subTest(name=name, rates=ours):
          w = schedules.target_widths(m, f'rates:{ours}', groups='inner')
          c = costs.count(models.with_widths(m, w), (32, 32, 3))
          drop = {k: 100 * (1 - c[k] / full[k]) for k in c}
          self.assertAlmostEqual(drop['params'], params_drop, delta=0.75)
          self.assertAlmostEqual(drop['flops'], flops_drop, delta=0.75)


def _tiny(config):
  config.input.train_subset = 64
  config.input.eval_subset = 40
  config.input.batch_size = 16
  config.input.eval_batch_size = 40
  config.input.shuffle_buffer = 64
  config.model.kw.conv_impl = 'xla'
  config.num_epochs = 1.0
  config.log_every_steps = 2
  config.ckpt_every_steps = 4
  config.compress.num_batches = 2
  config.compress.batch_size = 16
  config.compress.recalibrate_batches = 1
  config.finetune.num_epochs = 0.25
  return config


# ResNet-8 widths 16/32/64, rates 0.3/0.4/0.5: C - ceil(C r) by hand.
_EXPECT = {
  'stage1_block0/conv1': 11,
  'stage2_block0/conv1': 19,
  'stage3_block0/conv1': 32,
}


class RunlocalTest(absltest.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.workdir = tempfile.mkdtemp()
    cls.config = _tiny(cf_cifar10.get_config('runlocal,job=all'))
    with tfds.testing.mock_data(num_examples=64):
      cls.out = pfa_main.run(cls.config, cls.workdir)

  def test_oneshot_cf_end_to_end(self):
    rec = self.out['compress']['recipes']['cf_rates']
    for g, w in _EXPECT.items():
      self.assertEqual(rec['widths'][g], w)
    for k in ('accuracy_pruned', 'accuracy_recalibrated', 'accuracy_finetuned'):
      self.assertBetween(rec[k], 0.0, 1.0)
    self.assertLess(rec['params'], self.out['compress']['full']['params'])

  @pytest.mark.slow  # three pruning + fine-tuning steps
  def test_layer_by_layer_cf_end_to_end(self):
    c = _tiny(cf_cifar10.get_config('schedule=layer,runlocal'))
    c.compress.source = os.path.join(self.workdir, 'train')
    with tfds.testing.mock_data(num_examples=64):
      out = schedules.run(c, os.path.join(self.workdir, 'schedule'))
    rec = out['recipes']['cf_rates']
    self.assertEqual(
      rec['steps'],
      [
        '00_stage3_block0-conv1',
        '01_stage2_block0-conv1',
        '02_stage1_block0-conv1',
      ],
    )
    for g, w in _EXPECT.items():
      self.assertEqual(rec['widths'][g], w)
    # Each step changes only its own layer.
    done = {}
    for row in rec['rows']:
      ((g, w),) = row['step']['widths'].items()
      done[g] = w
      for layer in _EXPECT:
        full = 16 * 2 ** (int(layer[5]) - 1)
        self.assertEqual(row['widths'][layer], done.get(layer, full))
    self.assertTrue(math.isfinite(rec['accuracy_finetuned']))


if __name__ == '__main__':
  absltest.main()
