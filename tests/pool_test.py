"""Tests for pfa_jax.pool: native 2x2 max-pooling == flax's, both ways."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import absltest

from pfa_jax import onednn
from pfa_jax import pool


def _naive(x):
  """Numpy max over each 2x2 window, and the first winner's position."""
  n, h, w, c = x.shape
  win = x.reshape(n, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4)
  win = win.reshape(n, h // 2, w // 2, c, 4)
  return win.max(-1), win.argmax(-1)  # argmax: first maximum


class PoolTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    if not onednn.available():
      pytest.skip(f'native kernel not built: {onednn.status()["reason"]}')

  def test_forward_and_gradient_match(self):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 6, 8, 5)).astype(np.float32)
    g = rng.standard_normal((3, 3, 4, 5)).astype(np.float32)
    y, vjp = jax.vjp(jax.jit(pool.max_pool_2x2), x)
    want_y, arg = _naive(x)
    np.testing.assert_array_equal(y, want_y)
    np.testing.assert_array_equal(y, pool.reference(x))
    dx = np.asarray(vjp(g)[0])
    # The naive scatter: each window's cotangent to its winner.
    want = np.zeros((3, 3, 4, 5, 4), np.float32)
    np.put_along_axis(want, arg[..., None], g[..., None], axis=-1)
    want = want.reshape(3, 3, 4, 5, 2, 2).transpose(0, 1, 4, 2, 5, 3)
    np.testing.assert_array_equal(dx, want.reshape(x.shape))
    ref_dx = jax.vjp(pool.reference, x)[1](g)[0]
    np.testing.assert_array_equal(dx, ref_dx)  # no ties in random data

  def test_ties_go_to_the_first_maximum(self):
    x = np.zeros((1, 2, 2, 2), np.float32)
    x[0, 1, 0, 1] = x[0, 1, 1, 1] = 3.0  # channel 1: tie at (1,0), (1,1)
    g = np.array([[[[5.0, 7.0]]]], np.float32)
    dx = np.asarray(jax.vjp(pool.max_pool_2x2, x)[1](g)[0])
    self.assertEqual(dx[0, 0, 0, 0], 5.0)  # all-zero window: (0,0) wins
    self.assertEqual(dx[0, 1, 0, 1], 7.0)
    self.assertEqual(dx[0, 1, 1, 1], 0.0)
    self.assertEqual(dx.sum(), g.sum())

  def test_vmap_and_fallback(self):
    x = np.random.default_rng(1).standard_normal((2, 3, 4, 4, 3))
    x = x.astype(np.float32)
    got = jax.vmap(pool.max_pool_2x2)(x)
    np.testing.assert_array_equal(got, np.stack([_naive(v)[0] for v in x]))
    odd = jnp.ones((1, 5, 4, 2), jnp.float32)
    self.assertFalse(pool.eligible(odd))
    hlo = jax.jit(pool.max_pool_2x2).lower(odd).as_text()
    self.assertNotIn('pfa_jax_max_pool2', hlo)
    np.testing.assert_array_equal(pool.max_pool_2x2(odd), pool.reference(odd))


if __name__ == '__main__':
  absltest.main()
