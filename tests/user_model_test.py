"""A user's own model class by import path: registry, architectures, the CLI.

References: the class itself (``experiments/user_model.py``, plain flax), a
traced count of the pruned network's parameters, and a checkpoint restored
in a fresh Python process, which can only find the class by importing it.
"""

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds
from absl.testing import absltest

from configs import simple_cnn_cifar10
from experiments import user_model
from pfa_jax import checkpoint
from pfa_jax import costs
from pfa_jax import discover
from pfa_jax import main as pfa_main
from pfa_jax import models

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PATH = 'experiments.user_model:BranchyCNN'


class ResNet(nn.Module):
  """A user's class that shares a name with one of this package's."""

  widths: tuple[int, ...] = (4,)
  num_classes: int = 2

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.relu(nn.Conv(self.widths[0], (3, 3), name='conv')(x))
    return nn.Dense(self.num_classes, name='out')(jnp.mean(h, (1, 2)))

  def structure(self):
    return discover.cached(self, (1, 8, 8, 3)).structure


class WithFunctions(nn.Module):
  """A user's class with fields JSON cannot hold (an activation, a dtype)."""

  widths: tuple[int, ...] = (4,)
  num_classes: int = 2
  act: Callable = nn.relu
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.Conv(self.widths[0], (3, 3), dtype=self.dtype, name='conv')(x)
    h = self.act(h)
    return nn.Dense(self.num_classes, name='out')(jnp.mean(h, (1, 2)))

  def structure(self):
    return discover.cached(self, (1, 8, 8, 3)).structure


class NoTrain(nn.Module):
  """A user's class whose __call__ takes no ``train`` argument."""

  widths: tuple[int, ...] = (4,)
  num_classes: int = 2

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Conv(self.widths[0], (3, 3))(x))
    return nn.Dense(self.num_classes)(jnp.mean(h, (1, 2)))

  def structure(self):
    return discover.cached(self, (1, 8, 8, 3)).structure


class NoDefaultWidths(nn.Module):
  """A user's class whose widths have no default."""

  widths: tuple[int, ...] | None = None
  num_classes: int = 2

  @nn.compact
  def __call__(self, x, train: bool = False):
    return nn.Dense(self.num_classes)(jnp.mean(x, (1, 2)))

  def structure(self):
    return discover.cached(self, (1, 8, 8, 3)).structure


class RegistryTest(absltest.TestCase):
  def test_import_path_builds_the_class(self):
    m = models.get_model(_PATH, num_classes=7, width_mult=0.5, conv_impl='auto')
    self.assertIsInstance(m, user_model.BranchyCNN)
    self.assertEqual(m.num_classes, 7)
    want = tuple(max(1, round(w * 0.5)) for w in user_model.BranchyCNN().widths)
    self.assertEqual(m.widths, want)

  def test_errors_name_what_is_wrong(self):
    cases = [
      ('vgg19', r"Unknown model 'vgg19'.*'module:Class'"),
      ('no_such_module_here:Net', "cannot import module 'no_such_module_here'"),
      ('experiments.user_model:Nope', "has no flax module class 'Nope'"),
      ('flax.linen:Dense', r"lacks a 'widths' field, a 'num_classes' field"),
      ('__main__:Net', 'exists only in that process'),
      (f'{__name__}:NoTrain', r'lacks a `train` argument to __call__'),
      (f'{__name__}:NoDefaultWidths', 'its widths field has no default'),
    ]
    for name, pattern in cases:
      with self.subTest(name), self.assertRaisesRegex(ValueError, pattern):
        models.get_model(name, num_classes=3)

  def test_conv_impl_other_than_auto_is_not_dropped(self):
    with self.assertRaisesRegex(ValueError, r"no field\(s\) \['conv_impl'\]"):
      models.get_model(_PATH, num_classes=3, conv_impl='xla')

  def test_arch_round_trip(self):
    mine = ResNet(widths=(3,))
    arch = models.arch_of(mine)
    # Not this package's ResNet, though the class names are the same.
    self.assertEqual(arch['class'], f'{__name__}:ResNet')
    self.assertEqual(models.from_arch(arch), mine)
    ours = models.get_model('resnet8', num_classes=3)
    self.assertEqual(models.arch_of(ours)['class'], 'ResNet')
    self.assertEqual(models.from_arch(models.arch_of(ours)), ours)


class ArchTest(absltest.TestCase):
  def test_fields_json_cannot_hold_are_left_to_their_defaults(self):
    model = WithFunctions(widths=(3,))
    arch = models.arch_of(model)
    self.assertEqual(arch['kwargs'], {'widths': [3], 'num_classes': 2})
    self.assertEqual(json.loads(json.dumps(arch)), arch)
    x = jnp.ones((1, 8, 8, 3))
    v = model.init(jax.random.key(0), x)
    rebuilt = models.from_arch(arch)
    self.assertIs(rebuilt.act, nn.relu)
    np.testing.assert_array_equal(rebuilt.apply(v, x), model.apply(v, x))

  def test_a_field_no_checkpoint_can_record_is_named(self):
    with self.assertRaisesRegex(ValueError, r"field 'act' = .*gelu"):
      models.arch_of(WithFunctions(act=nn.gelu))


def _config(workdir_recipes):
  c = simple_cnn_cifar10.get_config('runlocal,job=all')
  c.model.name = _PATH
  c.model.kw.width_mult = 1 / 8
  c.input.train_subset = 32
  c.input.eval_subset = 16
  c.input.batch_size = 16
  c.input.eval_batch_size = 16
  c.input.shuffle_buffer = 32
  c.num_epochs = 1.0
  c.log_every_steps = 1
  c.ckpt_every_steps = 2
  c.compress.num_batches = 2
  c.compress.batch_size = 16
  c.compress.recalibrate_batches = 1
  c.recipes = tuple(workdir_recipes)
  c.finetune.num_epochs = 0.5
  return c


class PipelineTest(absltest.TestCase):
  def test_train_compress_and_restore_in_a_new_process(self):
    workdir = tempfile.mkdtemp()
    config = _config(('kl', 'l1@params:0.5'))
    with tfds.testing.mock_data(num_examples=32):
      out = pfa_main.run(config, workdir)
    self.assertEqual(out['train']['arch']['class'], _PATH)
    with open(os.path.join(workdir, 'compress', 'result.json')) as f:
      result = json.load(f)
    model, variables, _, _ = checkpoint.restore_model(
      os.path.join(workdir, 'train')
    )
    self.assertIsInstance(model, user_model.BranchyCNN)
    for name in ('pfa_kl', 'l1_params_0.5'):
      rec = result['recipes'][name]
      pruned = models.with_widths(model, rec['widths'])
      self.assertEqual(
        costs.count(pruned, (32, 32, 3))['params'], rec['params'], name
      )
    self.assertLessEqual(
      result['recipes']['l1_params_0.5']['params'],
      0.5 * result['full']['params'],
    )
    # A fresh process finds the fine-tuned pruned class by importing it.
    ft = os.path.join(workdir, 'compress', 'l1_params_0.5')
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3))
    x = x.astype(np.float32)
    np.save(os.path.join(workdir, 'x.npy'), x)
    code = (
      'import json, sys, numpy as np\n'
      'from pfa_jax import checkpoint\n'
      'm, v, arch, _ = checkpoint.restore_model(sys.argv[1])\n'
      'y = m.apply(v, np.load(sys.argv[2]))\n'
      'print(json.dumps({"class": arch["class"], "widths": list(m.widths),'
      ' "logits": np.asarray(y).tolist()}))\n'
    )
    proc = subprocess.run(
      [sys.executable, '-c', code, ft, os.path.join(workdir, 'x.npy')],
      cwd=_ROOT,
      capture_output=True,
      text=True,
      timeout=300,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
    )
    self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    self.assertEqual(got['class'], _PATH)
    m, v, _, _ = checkpoint.restore_model(ft)
    self.assertEqual(tuple(got['widths']), m.widths)
    self.assertEqual(
      got['widths'],
      [
        result['recipes']['l1_params_0.5']['widths'][g]
        for g in m.structure().names
      ],
    )
    np.testing.assert_allclose(
      np.asarray(got['logits']), np.asarray(m.apply(v, x)), rtol=1e-5, atol=1e-6
    )


if __name__ == '__main__':
  absltest.main()
