"""Tests for BN folded into the conv at inference (layers.ConvBN.fold_bn).

The reference is the same network with ``fold_bn=False`` on lax's
convolutions (``conv_impl='xla'``: conv -> flax BN -> add -> ReLU), with
batch statistics and BN parameters far from their initial values, so that
the fold (``k * s``, ``bias - mean * s``) is not the identity.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import absltest
from absl.testing import parameterized

from pfa_jax import costs
from pfa_jax import models
from pfa_jax import onednn
from pfa_jax import slicing
from pfa_jax import steps
from pfa_jax.methods import compensation
from pfa_jax.models import layers

_SHAPE = (16, 16, 3)


def _perturbed(variables, seed=0):
  """BN scale/bias/mean random, var in [0.2, 1.4]: a non-trivial fold."""
  rng = np.random.default_rng(seed)

  def f(path, a):
    key = jax.tree_util.keystr(path)
    if '/bn' not in key.replace("']['", '/') and "'bn'" not in key:
      return a
    noise = rng.standard_normal(a.shape).astype(np.float32)
    if "'var'" in key:
      return jnp.asarray(0.2 + 1.2 * rng.random(a.shape), jnp.float32)
    return a + 0.3 * noise

  return jax.tree_util.tree_map_with_path(f, variables)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


class FoldBnTest(parameterized.TestCase):
  def setUp(self):
    super().setUp()
    if not onednn.available():
      pytest.skip(f'oneDNN kernel not built: {onednn.status()["reason"]}')

  def _check(self, model, variables, x):
    folded = model.clone(conv_impl='onednn', fold_bn=True)
    text = (
      jax.jit(lambda v, x: folded.apply(v, x, train=False))
      .lower(variables, x)
      .as_text()
    )
    self.assertIn('pfa_jax_dnnl_conv_fwd_bias', text)
    self.assertNotIn('pfa_jax_bn_infer', text)  # no separate BN pass left
    got = jax.jit(lambda v, x: folded.apply(v, x, train=False))(variables, x)
    ref = model.clone(conv_impl='xla', fold_bn=False)
    want = ref.apply(variables, x, train=False)
    self.assertLess(_rel(got, want), 1e-5)
    return text

  @parameterized.named_parameters(
    ('resnet8', 'resnet8', {}, _SHAPE),  # residual adds: the sum post-op
    ('vgg16', 'vgg16_cifar', {'dropout': 0.0}, (32, 32, 3)),
    ('simple_cnn', 'simple_cnn', {}, _SHAPE),
  )
  def test_folded_inference_matches_conv_then_bn(self, name, kw, shape):
    model = models.get_model(name, num_classes=10, **kw)
    variables = _perturbed(models.init(model, jax.random.key(0), shape))
    x = jax.random.normal(jax.random.key(1), (2, *shape))
    text = self._check(model, variables, x)
    if name == 'resnet8':
      self.assertIn('pfa_jax_dnnl_conv_fwd_bias_res', text)

  def test_pruned_network_runs_the_narrow_kernel_with_the_epilogue(self):
    # Inner widths 2-6: the narrow kernel's fused targets, with and without
    # the residual (row path at 16 columns, channel path at 8 and 4).
    model = models.get_model('resnet8', num_classes=10)
    variables = _perturbed(models.init(model, jax.random.key(0), _SHAPE), 1)
    keep = {}
    for g, w in models.widths_of(model).items():
      if 'conv1' in g:
        keep[g] = np.arange(0, w, 4)[: max(2, w // 8)]
    pm, pv = slicing.prune(model, variables, keep)
    x = jax.random.normal(jax.random.key(2), (2, *_SHAPE))
    text = self._check(pm, pv, x)
    self.assertIn('pfa_jax_narrow_conv_fwd_bias', text)

  def test_pruned_network_splits_channel_tails(self):
    # Odd widths at 32 x 32 and 16 x 16 (36 = 32 + 4, 20 = 16 + 4, 41 = 32 +
    # 9): the split target where the tail is at most TAIL_MAX (conv2's and
    # conv3's), oneDNN whole elsewhere (conv1: 3 inputs; conv4: tail 9).
    model = models.get_model('vgg16_cifar', num_classes=10, dropout=0.0)
    variables = _perturbed(
      models.init(model, jax.random.key(0), (32, 32, 3)), 3
    )
    keep = {
      'conv1': np.arange(36),
      'conv2': np.arange(1, 41, 2),
      'conv3': np.arange(20),
      'conv4': np.arange(41),
    }
    pm, pv = slicing.prune(model, variables, keep)
    x = jax.random.normal(jax.random.key(4), (2, 32, 32, 3))
    text = self._check(pm, pv, x)
    if onednn.narrow_available():
      self.assertEqual(text.count('pfa_jax_split_conv_fwd_bias('), 2)

  def test_gradients_flow_through_the_folded_call(self):
    model = models.get_model('resnet8', num_classes=10)
    variables = _perturbed(models.init(model, jax.random.key(0), _SHAPE), 2)
    x = jax.random.normal(jax.random.key(3), (2, *_SHAPE))

    def loss(m):
      return lambda p: jnp.sum(
        m.apply({**variables, 'params': p}, x, train=False) ** 2
      )

    folded = model.clone(conv_impl='onednn', fold_bn=True)
    got = jax.grad(loss(folded))(variables['params'])
    want = jax.grad(loss(model.clone(conv_impl='xla')))(variables['params'])
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      self.assertLess(_rel(a, b), 1e-4)

  def test_collecting_responses_does_not_fold(self):
    model = models.get_model('resnet8', num_classes=10, conv_impl='onednn')
    variables = models.init(model, jax.random.key(0), _SHAPE)
    folded = model.clone(fold_bn=True)
    x = jax.random.normal(jax.random.key(4), (2, *_SHAPE))
    _, got = folded.apply(variables, x, train=False, mutable=layers.RESPONSES)
    _, want = model.apply(variables, x, train=False, mutable=layers.RESPONSES)
    self.assertEqual(
      jax.tree.structure(got), jax.tree.structure(want)
    )  # every response still sown
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)

  def test_tools_that_intercept_nn_conv_see_the_unfolded_network(self):
    model = models.get_model('resnet8', num_classes=10)
    folded = model.clone(fold_bn=True)
    self.assertEqual(costs.count(folded, _SHAPE), costs.count(model, _SHAPE))
    variables = models.init(model, jax.random.key(0), _SHAPE)
    x = jax.random.normal(jax.random.key(5), (2, *_SHAPE))
    path = 'stage1_block0/conv2/conv'
    ins, _ = compensation.capture(folded, variables, x, inputs_of=[path])
    want, _ = compensation.capture(model, variables, x, inputs_of=[path])
    np.testing.assert_allclose(ins[path], want[path], rtol=1e-6, atol=1e-6)

  def test_training_loops_eval_step_folds(self):
    model = models.get_model('resnet8', num_classes=10, conv_impl='onednn')
    variables = _perturbed(models.init(model, jax.random.key(0), _SHAPE), 3)
    state = steps.TrainState.create(
      apply_fn=model.apply,
      params=variables['params'],
      tx=optax.sgd(0.1),
      batch_stats=variables['batch_stats'],
      extra_vars={
        k: v for k, v in variables.items() if k not in ('params', 'batch_stats')
      },
    )
    rng = np.random.default_rng(0)
    batch = {
      'image': jnp.asarray(rng.standard_normal((4, *_SHAPE)), jnp.float32),
      'label': jnp.asarray(rng.integers(0, 10, 4), jnp.int32),
      'mask': jnp.asarray([1, 1, 1, 0], jnp.float32),
    }
    fn = jax.jit(steps.eval_step_for(model))
    self.assertIn(
      'pfa_jax_dnnl_conv_fwd_bias', fn.lower(state, batch).as_text()
    )
    got = fn(state, batch)
    want = steps.eval_step(state, batch)  # conv -> BN, unfolded
    self.assertEqual(float(got['count']), 3.0)
    self.assertEqual(float(got['correct']), float(want['correct']))
    self.assertLess(_rel(got['loss_sum'], want['loss_sum']), 1e-5)


if __name__ == '__main__':
  absltest.main()
