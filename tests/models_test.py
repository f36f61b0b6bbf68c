"""Model registry, architecture round-trip and PFA response taps."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized
from flax import traverse_util
from jax import lax

from pfa_jax import models
from pfa_jax.models import layers


def _conv1_reference(variables, x, tap):
  """SimpleCNN conv1's response, computed independently in float64 numpy."""
  p = variables['params']['conv1']
  bs = variables['batch_stats']['conv1']['bn']
  y = lax.conv_general_dilated(
    jnp.asarray(x, jnp.float32),
    p['conv']['kernel'],
    (1, 1),
    'SAME',
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
    precision=lax.Precision.HIGHEST,
  )
  y = np.asarray(y, np.float64)
  if tap == 'pre_bn':
    return y.max(axis=(1, 2))
  y = (y - np.asarray(bs['mean'])) / np.sqrt(np.asarray(bs['var']) + 1e-5)
  y = y * np.asarray(p['bn']['scale']) + np.asarray(p['bn']['bias'])
  if tap == 'post_act':
    y = np.maximum(y, 0.0)
  return y.max(axis=(1, 2))


class ModelsTest(parameterized.TestCase):
  def test_get_model_errors_name_the_problem(self):
    with self.assertRaisesRegex(ValueError, "Unknown model 'vgg19'"):
      models.get_model('vgg19', num_classes=10)
    with self.assertRaisesRegex(ValueError, r"no field\(s\) \['depth'\]"):
      models.get_model('simple_cnn', num_classes=10, depth=3)
    with self.assertRaisesRegex(KeyError, "'fc9'"):
      models.get_model('vgg16_cifar', num_classes=10, widths={'fc9': 3})
    with self.assertRaisesRegex(ValueError, "'conv2'.*>= 1"):
      models.get_model('simple_cnn', num_classes=10, widths={'conv2': 0})

  @parameterized.parameters(
    (dict(widths=(0,) * 8), r"group 'conv1' must be an int >= 1, got 0"),
    (dict(widths=(96,) * 7 + (2.5,)), r"group 'conv8'.*got 2\.5"),
    (dict(widths=(96,) * 7), r'needs 8 widths \(conv1, .*conv8\), got 7'),
    (dict(width_mult=0.0), r'width_mult must be a finite number > 0, got 0'),
    (dict(width_mult=float('nan')), 'width_mult'),
    (dict(num_classes=0), r'num_classes must be an int >= 1, got 0'),
    (dict(num_classes=2.0), 'num_classes'),
  )
  def test_bad_model_arguments_are_named(self, kw, pattern):
    kw = {'num_classes': 10, **kw}
    with self.assertRaisesRegex(ValueError, pattern):
      models.get_model('simple_cnn', **kw)

  def test_resnet_widths_count_names_groups(self):
    with self.assertRaisesRegex(ValueError, r"'resnet8' needs 6 widths"):
      models.get_model('resnet8', num_classes=10, widths=(4, 4))

  def test_numpy_int_widths_stay_json(self):
    m = models.get_model(
      'simple_cnn', num_classes=10, widths=tuple(np.arange(1, 9))
    )
    self.assertEqual(m.widths, tuple(range(1, 9)))
    self.assertIs(type(m.widths[0]), int)

  def test_input_too_small_names_the_layer(self):
    m = models.get_model('simple_cnn', num_classes=10, width_mult=0.125)
    with self.assertRaisesRegex(
      ValueError, r'8x8x3 is too small for SimpleCNN: layer conv7/conv'
    ):
      models.init(m, jax.random.key(0), (8, 8, 3))
    self.assertEqual(models.check_input(m, (12, 12, 3)), (12, 12, 3))
    with self.assertRaisesRegex(ValueError, r'\(H, W, C\)'):
      models.check_input(m, (32, 32))
    with self.assertRaisesRegex(ValueError, r'\(H, W, C\)'):
      models.check_input(m, (32, 0, 3))

  def test_widths_as_tree_and_multiplier(self):
    m = models.get_model(
      'simple_cnn', num_classes=10, width_mult=0.5, widths={'conv8': 7}
    )
    self.assertEqual(m.widths, (48, 48, 48, 96, 96, 96, 96, 7))
    self.assertEqual(models.widths_of(m)['conv8'], 7)

  @parameterized.parameters(
    'simple_cnn', 'vgg16_cifar', 'vgg16_imagenet', 'resnet56', 'resnet34'
  )
  def test_arch_round_trip(self, name):
    m = models.get_model(name, num_classes=7, width_mult=0.5, tap='post_bn')
    self.assertEqual(models.from_arch(models.arch_of(m)), m)

  def test_vgg_dropout_scale(self):
    # dropout=0 makes train mode deterministic in the dropout rng; the
    # default (cifar.torch's rates) does not.
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))

    def logits(dropout, seed):
      m = models.get_model(
        'vgg16_cifar', num_classes=10, width_mult=1 / 16, dropout=dropout
      )
      v = models.init(m, jax.random.key(1), (32, 32, 3))
      out, _ = m.apply(
        v,
        x,
        train=True,
        rngs={'dropout': jax.random.key(seed)},
        mutable=['batch_stats'],
      )
      return np.asarray(out)

    np.testing.assert_array_equal(logits(0.0, 2), logits(0.0, 3))
    self.assertGreater(np.abs(logits(1.0, 2) - logits(1.0, 3)).max(), 1e-3)

  def test_from_arch_unknown_class(self):
    with self.assertRaisesRegex(ValueError, "'AlexNet'"):
      models.from_arch({'class': 'AlexNet', 'kwargs': {}})

  @parameterized.parameters('pre_bn', 'post_bn', 'post_act')
  def test_response_tap_matches_reference(self, tap):
    m = models.get_model(
      'simple_cnn', num_classes=10, width_mult=0.125, tap=tap, conv_impl='xla'
    )
    v = models.init(m, jax.random.key(0), (16, 16, 3))
    rng = np.random.default_rng(0)
    v['batch_stats'] = jax.tree.map(
      lambda a: a + rng.uniform(0.1, 1.0, a.shape).astype(np.float32),
      v['batch_stats'],
    )
    v['params'] = jax.tree.map(
      lambda a: a + 0.1 * rng.standard_normal(a.shape).astype(np.float32),
      v['params'],
    )
    x = rng.standard_normal((3, 16, 16, 3)).astype(np.float32)
    logits, resp = models.responses(m, v, x)
    self.assertEqual(list(resp), [f'conv{i}' for i in range(1, 9)])
    self.assertEqual(resp['conv4'].shape, (3, m.widths[3]))
    np.testing.assert_allclose(
      resp['conv1'], _conv1_reference(v, x, tap), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_array_equal(logits, m.apply(v, x))

  def test_stream_response_is_stage_output(self):
    m = models.get_model('resnet8', num_classes=10, conv_impl='xla')
    v = models.init(m, jax.random.key(0), (8, 8, 3))
    x = (
      np.random.default_rng(1).standard_normal((2, 8, 8, 3)).astype(np.float32)
    )
    _, resp = models.responses(m, v, x)
    # The last stage's output, spatially averaged, feeds the classifier.
    _, inter = m.apply(
      v, x, capture_intermediates=True, mutable=['intermediates']
    )
    out = inter['intermediates']['stage3_block0']['__call__'][0]
    np.testing.assert_allclose(resp['stream3'], out.max(axis=(1, 2)), rtol=1e-6)

  @parameterized.product(
    name=('simple_cnn', 'vgg16_cifar', 'resnet8', 'resnet_tiny_imagenet'),
    tap=('pre_bn', 'post_act'),
  )
  def test_only_group_responses_are_computed(self, name, tap):
    # Collecting statistics spends no pass on a layer that is no group's
    # response point: every sown response is a group's (ResNet's stage-last
    # conv2 sows the stream's response, which the stream tap reuses).
    m = models.get_model(name, num_classes=10, conv_impl='xla', tap=tap)
    size = 64 if name == 'resnet_tiny_imagenet' else 32
    v = models.init(m, jax.random.key(0), (size, size, 3))
    x = np.random.default_rng(0).standard_normal((2, size, size, 3))
    _, state = m.apply(
      models.model_variables(v),
      x.astype(np.float32),
      mutable=[layers.RESPONSES],
    )
    flat = traverse_util.flatten_dict(state[layers.RESPONSES], sep='/')
    sown = {k.removesuffix('/out'): r[-1] for k, r in flat.items()}
    _, resp = models.responses(m, v, x.astype(np.float32))
    self.assertEqual(sorted(resp), sorted(m.structure().names))
    for key, r in sown.items():
      if key in resp:
        continue
      self.assertTrue(
        tap == 'post_act' and key.endswith('/conv2'),
        f'{name}: {key!r} sows a response no group reads',
      )
      stage = key.split('_')[0].removeprefix('stage')
      np.testing.assert_array_equal(r, resp[f'stream{stage}'])

  def test_option_a_shortcut_is_an_exact_copy_and_its_gradient_a_scatter(self):
    from pfa_jax.models import resnet  # pylint: disable=g-import-not-at-top

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 6, 6, 5)).astype(np.float32)
    cmap = np.array([-1, 3, 0, -1, 4, 4, 1], np.int32)  # repeats and zeros
    g = rng.standard_normal((2, 3, 3, 7)).astype(np.float32)
    sub = x[:, ::2, ::2, :]
    want = np.where(cmap < 0, 0.0, sub[..., np.maximum(cmap, 0)])
    # Gradient of <g, shortcut(x)>: scatter-add of g into the kept pixels.
    want_grad = np.zeros_like(x)
    for j, c in enumerate(cmap):
      if c >= 0:
        want_grad[:, ::2, ::2, c] += g[..., j]
    f = jax.jit(resnet._option_a)  # pylint: disable=protected-access
    np.testing.assert_array_equal(f(x, cmap), want)
    grad = jax.grad(lambda x: jnp.vdot(g, f(x, cmap)))(x)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(
      f(x, np.asarray(resnet.option_a_map(5, 9), np.int32))[..., 2:7], sub
    )


if __name__ == '__main__':
  absltest.main()
