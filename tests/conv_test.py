"""Tests for pfa_jax.conv: same function and gradients as lax's convolution."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized
from jax import lax

from pfa_jax import conv

_DN = ('NHWC', 'HWIO', 'NHWC')
_TOL = 1e-5


def _rel_err(a, b):
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def _normal(shape, seed):
  # numpy, not jax.random: XLA:CPU can take tens of seconds to compile
  # threefry for some odd shapes.
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _inputs(n, h, w, cin, kh, kw, cout, seed=0):
  x = _normal((n, h, w, cin), seed)
  k = _normal((kh, kw, cin, cout), seed + 1) / np.sqrt(kh * kw * cin)
  return x, k


def _vjp(fn, x, k, seed=1):
  y, vjp_fn = jax.vjp(fn, x, k)
  ct = _normal(y.shape, seed)
  return (y,) + vjp_fn(ct)


class ConvTest(parameterized.TestCase):
  def assert_close(self, got, want, tol=_TOL):
    for name, a, b in zip(
      ('out', 'd_input', 'd_kernel'), got, want, strict=True
    ):
      self.assertEqual(a.shape, b.shape, name)
      self.assertLess(_rel_err(a, b), tol, name)

  @parameterized.named_parameters(
    # name, (N, H, W, Cin), (KH, KW, Cout), strides, padding
    ('1x1', (2, 8, 8, 16), (1, 1, 32), (1, 1), 'SAME'),
    ('1x1_stride2', (2, 8, 8, 16), (1, 1, 32), (2, 2), 'VALID'),
    ('3x3_same_rgb', (2, 8, 8, 3), (3, 3, 16), (1, 1), 'SAME'),
    ('3x3_valid', (2, 9, 7, 8), (3, 3, 12), (1, 1), 'VALID'),
    ('3x3_stride2_same', (2, 8, 8, 16), (3, 3, 32), (2, 2), 'SAME'),
    ('3x3_stride2_odd', (2, 9, 9, 8), (3, 3, 8), (2, 2), 'SAME'),
    ('3x3_stride2_valid', (2, 9, 9, 8), (3, 3, 8), (2, 2), 'VALID'),
    ('3x3_explicit_pad', (2, 8, 8, 8), (3, 3, 8), (1, 1), ((1, 2), (0, 1))),
    ('5x5_same', (2, 12, 12, 4), (5, 5, 8), (1, 1), 'SAME'),
    ('map4x4_512', (2, 4, 4, 512), (3, 3, 512), (1, 1), 'SAME'),
    ('map2x2_512', (2, 2, 2, 512), (3, 3, 512), (1, 1), 'SAME'),
    ('map1x1_256', (2, 1, 1, 256), (3, 3, 128), (1, 1), 'SAME'),
    ('map2x2_stride2', (2, 4, 4, 64), (3, 3, 64), (2, 2), 'SAME'),
    ('map32_chunked', (8, 32, 32, 64), (3, 3, 64), (1, 1), 'SAME'),
  )
  def test_matches_lax(self, x_shape, k_shape, strides, padding):
    x, k = _inputs(*x_shape, *k_shape)

    def want_fn(x, k):
      return lax.conv_general_dilated(
        x, k, strides, padding, dimension_numbers=_DN
      )

    def got_fn(x, k):
      return conv.conv_general_dilated(
        x, k, strides, padding, dimension_numbers=_DN
      )

    # One compile per case: eager op-by-op dispatch would compile every op.
    got, want = jax.jit(lambda x, k: (_vjp(got_fn, x, k), _vjp(want_fn, x, k)))(
      x, k
    )
    self.assert_close(got, want)

  def test_chunked_weight_grad(self):
    # A tiny chunk budget forces the lax.scan path over batch chunks.
    x, k = _inputs(6, 8, 8, 8, 3, 3, 8)
    fn = lambda x, k: conv.conv_general_dilated(
      x, k, (1, 1), 'SAME', None, None, _DN
    )
    old = conv.CHUNK_BYTES
    conv.CHUNK_BYTES = 8 * 8 * 72 * 4 * 2  # 2 images per chunk
    try:
      got = jax.jit(lambda x, k: _vjp(fn, x, k))(x, k)
    finally:
      conv.CHUNK_BYTES = old
    ref = lambda x, k: lax.conv_general_dilated(
      x, k, (1, 1), 'SAME', dimension_numbers=_DN
    )
    self.assert_close(got, jax.jit(lambda x, k: _vjp(ref, x, k))(x, k))

  def test_vmap(self):
    x, k = _inputs(6, 6, 6, 8, 3, 3, 8)
    x = x.reshape(3, 2, 6, 6, 8)

    def loss(fn):
      def f(x, k):
        y = fn(x, k, (1, 1), 'SAME', dimension_numbers=_DN)
        return jnp.sum(jnp.sin(y))

      return jax.vmap(jax.grad(f, argnums=(0, 1)), in_axes=(0, None))

    got, want = jax.jit(
      lambda x, k: (
        loss(conv.conv_general_dilated)(x, k),
        loss(lax.conv_general_dilated)(x, k),
      )
    )(x, k)
    for a, b in zip(got, want, strict=True):
      self.assertLess(_rel_err(a, b), _TOL)

  def test_explicit_batch_sharding(self):
    # jit + NamedSharding on an Explicit mesh (jax.make_mesh's default), as
    # in data-parallel training; lax.scan cannot chunk a sharded batch.
    mesh = jax.make_mesh((2,), ('data',), devices=jax.devices()[:2])
    spec = jax.sharding.PartitionSpec
    x, k = _inputs(4, 8, 8, 8, 3, 3, 16)
    x = jax.device_put(x, jax.sharding.NamedSharding(mesh, spec('data')))
    k = jax.device_put(k, jax.sharding.NamedSharding(mesh, spec()))

    def vjp_of(fn):
      def f(x, k):
        return fn(x, k, (1, 1), 'SAME', dimension_numbers=_DN)

      return lambda x, k: _vjp(f, x, k)

    got, want = jax.jit(
      lambda x, k: (
        vjp_of(conv.conv_general_dilated)(x, k),
        vjp_of(lax.conv_general_dilated)(x, k),
      )
    )(x, k)
    self.assert_close(got, want)

  def test_fallback_dilation_and_groups(self):
    x, _ = _inputs(2, 8, 8, 8, 3, 3, 8)
    kg = _normal((3, 3, 4, 8), 3)
    for kw in (
      dict(rhs_dilation=(2, 2)),
      dict(lhs_dilation=(2, 1), padding=((1, 1), (1, 1))),
      dict(feature_group_count=2),
    ):
      with self.subTest(str(kw)):
        k = (
          kg if 'feature_group_count' in kw else _inputs(1, 1, 1, 8, 3, 3, 8)[1]
        )
        kw = dict(padding='SAME', dimension_numbers=_DN) | kw
        got = conv.conv_general_dilated(x, k, (1, 1), **kw)
        want = lax.conv_general_dilated(x, k, (1, 1), **kw)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)

  def test_fallback_nchw(self):
    x = _normal((2, 4, 8, 8), 0)
    k = _normal((6, 4, 3, 3), 1)
    got = conv.conv_general_dilated(x, k, (1, 1), 'SAME')
    want = lax.conv_general_dilated(x, k, (1, 1), 'SAME')
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)

  @parameterized.parameters(
    ((3, 3), (1, 1), 'SAME', 16),
    ((3, 3), (2, 2), 'SAME', 8),
    ((1, 1), (2, 2), 'VALID', 8),
    ((3, 3), (1, 1), 'SAME', 2),
  )
  def test_flax_module(self, kernel_size, strides, padding, hw):
    x, _ = _inputs(2, hw, hw, 8, 1, 1, 1)
    default = nn.Conv(16, kernel_size, strides, padding)
    fast = nn.Conv(
      16,
      kernel_size,
      strides,
      padding,
      conv_general_dilated=conv.get_conv('fast'),
    )
    kernel = _normal(kernel_size + (8, 16), 2) / 8.0
    variables = {'params': {'kernel': kernel, 'bias': _normal((16,), 3)}}

    def run(module):
      def f(variables, x):
        return module.apply(variables, x)

      y, vjp_fn = jax.vjp(f, variables, x)
      ct = _normal(y.shape, 1)
      d_vars, d_x = vjp_fn(ct)
      return y, d_x, d_vars['params']['kernel'], d_vars['params']['bias']

    got, want = jax.jit(lambda: (run(fast), run(default)))()
    for a, b in zip(got, want, strict=True):
      self.assertLess(_rel_err(a, b), _TOL)

  def test_get_conv(self):
    self.assertIs(conv.get_conv('xla'), lax.conv_general_dilated)
    self.assertIs(conv.get_conv('fast'), conv.conv_general_dilated)
    # Tests run on the CPU backend.
    self.assertIs(conv.get_conv('auto'), conv.conv_general_dilated)
    hash(conv.get_conv('auto'))

  def test_get_conv_unknown(self):
    with self.assertRaisesRegex(ValueError, 'winograd'):
      conv.get_conv('winograd')


if __name__ == '__main__':
  absltest.main()
