"""Cost model tests: published baselines and hand counts."""

import jax
import numpy as np
from absl.testing import absltest

from pfa_jax import costs
from pfa_jax import models
from pfa_jax import slicing


def _simple_cnn_hand_count(w, classes=10, hw=32):
  """Hand count for SimpleCNN on hw x hw inputs (SAME pads, k=3)."""
  k = [9] * 7 + [1]
  cin = [3] + list(w[:7])
  spatial = [
    hw,
    hw,
    hw // 2,
    hw // 2,
    hw // 2,
    hw // 4,
    hw // 4 - 2,
    hw // 4 - 2,
  ]
  params = sum(k[i] * cin[i] * w[i] + 2 * w[i] for i in range(8))
  params += w[7] * classes + classes  # conv9: 1x1 with bias
  flops = sum(spatial[i] ** 2 * k[i] * cin[i] * w[i] for i in range(8))
  flops += spatial[7] ** 2 * w[7] * classes
  return params, flops


class CostsTest(absltest.TestCase):
  def test_closed_form_cost_fn_equals_traced_count(self):
    # cost_fn traces once and evaluates a closed form; count traces the
    # real pruned network. They must agree for any widths.
    rng = np.random.default_rng(0)
    for name, shape in (
      ('simple_cnn', (32, 32, 3)),
      ('vgg16_cifar', (32, 32, 3)),
      ('resnet20', (32, 32, 3)),
      ('resnet_tiny_imagenet', (32, 32, 3)),
    ):
      model = models.get_model(name, num_classes=7)
      full = models.widths_of(model)
      for metric in ('params', 'flops'):
        fn = costs.cost_fn(model, shape, metric)
        for _ in range(3):
          w = {n: int(rng.integers(1, c + 1)) for n, c in full.items()}
          pruned = models.with_widths(model, w)
          self.assertEqual(
            fn(w), costs.count(pruned, shape)[metric], (name, metric, w)
          )
      with self.assertRaisesRegex(KeyError, 'conv99'):
        costs.cost_fn(model, shape)({'conv99': 1})

  def test_simple_cnn_matches_hand_count(self):
    for w in [(96, 96, 96, 192, 192, 192, 192, 192), (5, 7, 3, 11, 2, 9, 4, 1)]:
      model = models.get_model('simple_cnn', num_classes=10, widths=w)
      params, flops = _simple_cnn_hand_count(w)
      self.assertEqual(
        costs.count(model, (32, 32, 3)), {'params': params, 'flops': flops}
      )

  def test_vgg16_cifar10_published(self):
    # Li et al. 2017 Table 2: 1.5e7 params, 3.13e8 FLOPs; METHODS: 14.98M,
    # 313.73M. We count BN scale/offset (+8.4K params) and not BN's per-element
    # ops (-0.28M "FLOPs"), so both agree to < 0.1%.
    c = costs.count(
      models.get_model('vgg16_cifar', num_classes=10), (32, 32, 3)
    )
    self.assertAlmostEqual(c['params'] / 14.98e6, 1.0, delta=1e-3)
    self.assertAlmostEqual(c['flops'] / 313.73e6, 1.0, delta=1e-3)

  def test_resnet56_cifar10_published(self):
    c = costs.count(models.get_model('resnet56', num_classes=10), (32, 32, 3))
    self.assertEqual(round(c['params'] / 1e4), 85)  # 0.85M
    self.assertEqual(round(c['flops'] / 1e4), 12549)  # 125.49M

  def test_pruning_shrinks_consumers(self):
    model = models.get_model('simple_cnn', num_classes=10)
    full = costs.count(model, (32, 32, 3))
    half = costs.count(models.with_widths(model, {'conv4': 96}), (32, 32, 3))
    # conv4 loses 96 filters (kernel 3x3x96 each, BN scale+offset); conv5
    # (192 filters) loses 96 input channels. Maps are 16x16.
    saved = 9 * 96 * 96 + 2 * 96 + 9 * 96 * 192
    self.assertEqual(full['params'] - half['params'], saved)
    self.assertEqual(
      full['flops'] - half['flops'], 16 * 16 * 9 * 96 * (96 + 192)
    )

  def test_cost_fn_matches_pruned_leaf_count(self):
    model = models.get_model('resnet8', num_classes=10)
    fn = costs.cost_fn(model, (16, 16, 3), 'params')
    widths = {'stream2': 7, 'stage3_block0/conv1': 5}
    variables = models.init(model, jax.random.key(0), (16, 16, 3))
    keep = {k: np.arange(v) for k, v in widths.items()}
    _, pv = slicing.prune(model, variables, keep)
    self.assertEqual(
      fn(widths), sum(p.size for p in jax.tree.leaves(pv['params']))
    )
    with self.assertRaisesRegex(ValueError, 'metric'):
      costs.cost_fn(model, (16, 16, 3), 'joules')


if __name__ == '__main__':
  absltest.main()
