"""Tests for pfa_jax.sampling: footprint tolerance, spread, reproducibility.

References: :func:`pfa_jax.costs.count` (an abstract trace of the real
network with the sampled widths) for every cost; counts of distinct widths
for the spread.
"""

import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

from pfa_jax import costs
from pfa_jax import models
from pfa_jax import sampling
from pfa_jax.models import structure

_SHAPE = (32, 32, 3)


def _model(name):
  return models.get_model(name, num_classes=10)


def _exact(model, widths, metric='params'):
  return costs.count(structure.with_widths(model, widths), _SHAPE)[metric]


def _inner(model):
  return [n for n in model.structure().names if not n.startswith('stream')]


class CostModelTest(parameterized.TestCase):
  @parameterized.parameters(
    'simple_cnn', 'vgg16_cifar', 'resnet8', 'resnet_tiny_imagenet'
  )
  def test_closed_form_equals_costs_count(self, name):
    model = _model(name)
    cm = sampling.cost_model(model, _SHAPE)
    rng = np.random.default_rng(3)
    for _ in range(3):
      w = np.asarray([rng.integers(1, c + 1) for c in cm.full])
      widths = dict(zip(cm.names, (int(x) for x in w)))
      self.assertEqual(cm(w, 'params'), _exact(model, widths))
      self.assertEqual(cm(w, 'flops'), _exact(model, widths, 'flops'))


class SampleWidthsTest(parameterized.TestCase):
  @parameterized.product(
    name=('simple_cnn', 'vgg16_cifar', 'resnet8', 'resnet_tiny_imagenet'),
    target=(0.15, 0.5, 0.85),
  )
  def test_within_tolerance_every_model(self, name, target):
    model = _model(name)
    full = costs.count(model, _SHAPE)['params']
    w = sampling.sample_widths(model, _SHAPE, target, 7, check=False)
    self.assertEqual(set(w), set(model.structure().names))
    got = _exact(model, w)
    self.assertLessEqual(abs(got - target * full), 0.01 * target * full)
    for n, v in w.items():
      self.assertBetween(v, 1, structure.widths_of(model)[n])

  @parameterized.parameters('inner', 'inner+stream')
  def test_resnet56_both_modes(self, mode):
    model = _model('resnet56')
    groups = _inner(model) if mode == 'inner' else None
    full = costs.count(model, _SHAPE)['params']
    target = 0.6 if mode == 'inner' else 0.3
    w = sampling.sample_widths(model, _SHAPE, target, 0, groups=groups)
    expected = set(groups) if groups else set(model.structure().names)
    self.assertEqual(set(w), expected)
    got = _exact(model, w)
    self.assertLessEqual(abs(got - target * full), 0.01 * target * full)

  def test_absolute_target_and_flops(self):
    model = _model('simple_cnn')
    w = sampling.sample_widths(model, _SHAPE, 400_000, 1)
    self.assertLessEqual(abs(_exact(model, w) - 400_000), 4_000)
    full = costs.count(model, _SHAPE)['flops']
    w = sampling.sample_widths(model, _SHAPE, 0.4, 1, metric='flops')
    got = _exact(model, w, 'flops')
    self.assertLessEqual(abs(got - 0.4 * full), 0.01 * 0.4 * full)

  def test_every_layer_varies_and_keeps_the_footprint(self):
    model = _model('simple_cnn')
    full = costs.count(model, _SHAPE)['params']
    samples = [
      sampling.sample_widths(model, _SHAPE, 0.3, s, check=False)
      for s in range(20)
    ]
    for name in model.structure().names:
      values = [s[name] for s in samples]
      # Many distinct widths per layer, spanning a wide range.
      self.assertGreaterEqual(len(set(values)), 8, (name, values))
      full_w = structure.widths_of(model)[name]
      self.assertGreater(max(values) - min(values), 0.3 * full_w, name)
    for s in samples:
      self.assertLessEqual(abs(_exact(model, s) - 0.3 * full), 0.003 * full)

  def test_resnet_inner_and_stream_widths_vary(self):
    model = _model('resnet8')
    samples = [
      sampling.sample_widths(model, _SHAPE, 0.4, s, check=False)
      for s in range(12)
    ]
    for name in model.structure().names:
      self.assertGreater(len({s[name] for s in samples}), 3, name)

  def test_same_seed_same_widths(self):
    model = _model('resnet8')
    a = sampling.sample_widths(model, _SHAPE, 0.4, 5, check=False)
    b = sampling.sample_widths(model, _SHAPE, 0.4, 5, check=False)
    c = sampling.sample_widths(model, _SHAPE, 0.4, 6, check=False)
    self.assertEqual(a, b)
    self.assertNotEqual(a, c)
    gen = np.random.default_rng(5)
    self.assertEqual(
      a, sampling.sample_widths(model, _SHAPE, 0.4, gen, check=False)
    )

  def test_seed_keyword_and_round_to(self):
    model = _model('simple_cnn')
    a = sampling.sample_widths(model, _SHAPE, 0.4, seed=5, check=False)
    self.assertEqual(
      a, sampling.sample_widths(model, _SHAPE, 0.4, 5, check=False)
    )
    with self.assertRaisesRegex(TypeError, 'exactly one'):
      sampling.sample_widths(model, _SHAPE, 0.4)
    full = costs.count(model, _SHAPE)['params']
    full_w = structure.widths_of(model)
    for s in range(4):
      w = sampling.sample_widths(model, _SHAPE, 0.4, seed=s, round_to=8)
      for n, v in w.items():
        self.assertTrue(v % 8 == 0 or v == full_w[n], (n, v))
      self.assertLessEqual(abs(_exact(model, w) - 0.4 * full), 0.004 * full)

  def test_min_width_respected(self):
    model = _model('simple_cnn')
    w = sampling.sample_widths(
      model, _SHAPE, 0.1, 2, min_width={'conv1': 40}, check=False
    )
    self.assertGreaterEqual(w['conv1'], 40)

  def test_errors_name_the_problem(self):
    model = _model('simple_cnn')
    with self.assertRaisesRegex(ValueError, 'outside what widths'):
      sampling.sample_widths(model, _SHAPE, 1e-5, 0)
    with self.assertRaisesRegex(ValueError, "'conv99'"):
      sampling.sample_widths(model, _SHAPE, 0.5, 0, groups=['conv99'])
    with self.assertRaisesRegex(ValueError, 'metric'):
      sampling.sample_widths(model, _SHAPE, 0.5, 0, metric='bytes')
    with self.assertRaisesRegex(ValueError, 'tol'):
      sampling.sample_widths(model, _SHAPE, 0.5, 0, tol=0.0)
    with self.assertRaisesRegex(ValueError, "'conv1'.*min_width"):
      sampling.sample_widths(model, _SHAPE, 0.5, 0, min_width={'conv1': 0})
    with self.assertRaisesRegex(TypeError, 'seed'):
      sampling.sample_widths(model, _SHAPE, 0.5, 'zero')


class RandomKeepTest(absltest.TestCase):
  def test_sorted_sized_reproducible(self):
    full = {'a': 10, 'b': 4}
    k = sampling.random_keep(full, {'a': 3, 'b': 4}, 0)
    self.assertLen(k['a'], 3)
    self.assertTrue(np.all(np.diff(k['a']) > 0))
    np.testing.assert_array_equal(k['b'], np.arange(4))
    k2 = sampling.random_keep(full, {'a': 3, 'b': 4}, 0)
    np.testing.assert_array_equal(k['a'], k2['a'])
    with self.assertRaisesRegex(ValueError, "'a'"):
      sampling.random_keep(full, {'a': 11}, 0)


if __name__ == '__main__':
  absltest.main()
