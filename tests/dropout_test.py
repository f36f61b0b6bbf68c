"""Tests for pfa_jax.dropout: the native counter-hash dropout.

References: the binomial law of the kept count, the closed-form scaling,
linearity (the gradient is the same mask), and flax's own Dropout for the
layer's semantics (deterministic, rng collection).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import absltest
from absl.testing import parameterized

from pfa_jax import dropout
from pfa_jax import onednn
from pfa_jax.models import layers


class DropoutTest(parameterized.TestCase):
  def setUp(self):
    super().setUp()
    if not onednn.available():
      pytest.skip(f'native kernel not built: {onednn.status()["reason"]}')

  @parameterized.parameters(0.1, 0.3, 0.5, 0.9)
  def test_kept_fraction_and_scale(self, rate):
    x = jnp.asarray(
      np.random.default_rng(0).uniform(1, 2, (64, 8, 8, 17)), jnp.float32
    )
    y = np.asarray(
      jax.jit(lambda x: dropout.dropout(x, jax.random.key(3), rate))(x)
    )
    kept = y != 0
    n, p = kept.size, 1 - rate
    self.assertLess(abs(kept.sum() - n * p), 5 * np.sqrt(n * p * (1 - p)))
    np.testing.assert_allclose(y[kept], np.asarray(x)[kept] / p, rtol=1e-6)
    # Neighbours (the two halves of one hash) are uncorrelated.
    flat = kept.reshape(-1).astype(np.float64)
    r = np.corrcoef(flat[0::2], flat[1::2])[0, 1]
    self.assertLess(abs(r), 5 / np.sqrt(n / 2))

  def test_keys_and_determinism(self):
    x = jnp.ones((4096,), jnp.float32)
    k = jax.random.key(0)
    a, b = dropout.dropout(x, k, 0.5), dropout.dropout(x, k, 0.5)
    np.testing.assert_array_equal(a, b)
    c = dropout.dropout(x, jax.random.fold_in(k, 1), 0.5)
    agree = float(jnp.mean((a != 0) == (c != 0)))
    self.assertLess(abs(agree - 0.5), 0.05)  # independent masks agree half

  def test_gradient_is_the_same_mask(self):
    x = jnp.asarray(
      np.random.default_rng(1).normal(size=(8, 5, 5, 3)), jnp.float32
    )
    k = jax.random.key(7)
    c = jnp.asarray(np.random.default_rng(2).normal(size=x.shape), jnp.float32)
    y = dropout.dropout(x, k, 0.4)
    g = jax.grad(lambda x: jnp.sum(dropout.dropout(x, k, 0.4) * c))(x)
    want = np.where(np.asarray(y) != 0, np.asarray(c) / 0.6, 0.0)
    np.testing.assert_allclose(g, want, rtol=1e-6)

  def test_vmap_uses_each_key(self):
    x = jnp.ones((3, 1000), jnp.float32)
    keys = jax.random.split(jax.random.key(0), 3)
    got = jax.vmap(lambda x, k: dropout.dropout(x, k, 0.5))(x, keys)
    for i in range(3):
      np.testing.assert_array_equal(got[i], dropout.dropout(x[i], keys[i], 0.5))
    self.assertFalse(np.array_equal(got[0], got[1]))

  def test_bad_rate_and_fallbacks(self):
    with self.assertRaisesRegex(
      ValueError, r'rate must be in \[0, 1\), got 1.0'
    ):
      dropout.dropout(jnp.ones(3), jax.random.key(0), 1.0)
    x = jnp.ones((8,), jnp.bfloat16)
    hlo = jax.jit(lambda x: dropout.dropout(x, jax.random.key(0), 0.5)).lower(x)
    self.assertNotIn('pfa_jax_dropout', hlo.as_text())

  def test_layer_semantics_match_flax(self):
    x = jnp.ones((16, 4, 4, 8), jnp.float32)
    for native in (False, True):
      m = layers.Dropout(0.5, native=native)
      np.testing.assert_array_equal(m.apply({}, x, deterministic=True), x)
      y = m.apply(
        {}, x, deterministic=False, rngs={'dropout': jax.random.key(1)}
      )
      self.assertLess(abs(float(jnp.mean(y != 0)) - 0.5), 0.05)
      self.assertTrue(np.all((np.asarray(y) == 0) | (np.asarray(y) == 2.0)))
    # As the models build it: deterministic given to the constructor.
    fixed = layers.Dropout(0.5, deterministic=True, native=True)
    np.testing.assert_array_equal(fixed.apply({}, x), x)
    hlo = jax.jit(
      lambda x: layers.Dropout(0.5, deterministic=False, native=True).apply(
        {}, x, rngs={'dropout': jax.random.key(1)}
      )
    ).lower(x)
    self.assertIn('pfa_jax_dropout', hlo.as_text())


if __name__ == '__main__':
  absltest.main()
