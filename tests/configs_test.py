"""Every config (and its runlocal variant) builds, dumps to JSON, and names
a registered model and dataset."""

import glob
import importlib
import json
import os

from absl.testing import absltest
from absl.testing import parameterized

from configs import common
from pfa_jax import compress
from pfa_jax import input_pipeline
from pfa_jax import methods
from pfa_jax import models

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_NAMES = sorted(
  os.path.basename(p)[:-3]
  for p in glob.glob(os.path.join(_ROOT, 'configs', '*.py'))
  if not os.path.basename(p).startswith(('_', 'common'))
)


class ConfigsTest(parameterized.TestCase):
  def test_the_issue_configs_exist(self):
    for name in (
      'simple_cnn_cifar10',
      'simple_cnn_cifar100',
      'vgg16_cifar10',
      'vgg16_cifar100',
      'resnet56_cifar10',
      'resnet56_cifar100',
      'vgg16_imagenet',
      'resnet34_imagenet',
    ):
      self.assertIn(name, _NAMES)

  @parameterized.parameters(*_NAMES)
  def test_builds_and_dumps(self, name):
    mod = importlib.import_module(f'configs.{name}')
    for arg in (None, 'runlocal') if name != 'demo_cifar10' else (None,):
      with self.subTest(arg=arg):
        c = mod.get_config(arg)
        json.loads(c.to_json())
        self.assertIn(c.model.name, models.MODELS)
        input_pipeline.get_spec(c.input.dataset)
        self.assertIsInstance(c.recipes, tuple)
        compress.validate(c)  # every method, recipe and option
        # --config.method=<any registered method> works on every config
        # (not on cf_/fcp_ ones: their recipes and options are CF's / FCP's).
        own = name.startswith(('cf_', 'fcp_'))
        for method in () if own else methods.METHODS:
          with c.unlocked():
            c.method = method
          self.assertNotEmpty(compress.validate(c), method)

  def test_vgg_cpu_scale(self):
    from configs import vgg16_cifar10  # noqa: PLC0415

    c = vgg16_cifar10.get_config('cpu')
    m = models.get_model(c.model.name, num_classes=10, **c.model.kw)
    self.assertEqual((m.widths[0], m.widths[12], m.dropout), (16, 128, 0.0))
    self.assertEqual((c.num_epochs, c.optim.schedule), (5.0, 'cosine'))
    # A half-epoch fine-tune must not inherit the 0.5-epoch warm-up (it
    # would end at the peak learning rate).
    self.assertEqual(c.finetune.optim.warmup_epochs, 0.0)
    self.assertEqual(c.finetune.optim.schedule, 'cosine')
    compress.validate(c)

  def test_parse_arg(self):
    a = common.parse_arg('runlocal,job=compress', runlocal=False, job='train')
    self.assertTrue(a.runlocal)
    self.assertEqual(a.job, 'compress')
    with self.assertRaisesRegex(ValueError, "'bogus'"):
      common.parse_arg('bogus=1', runlocal=False)


if __name__ == '__main__':
  absltest.main()
