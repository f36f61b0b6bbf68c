"""Tests for pfa_jax.fused_bn: the native BN + residual + ReLU kernel.

References: batch norm written out in numpy float64 (forward), and the
gradient of that same function by JAX autodiff in float64 (backward), which
the kernel's hand-derived backward must match.
"""

import os
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import absltest
from absl.testing import parameterized

from pfa_jax import fused_bn
from pfa_jax import onednn
from pfa_jax import recalibrate
from pfa_jax.models import layers

EPS = 1e-5


def _rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def _np_train(x, scale, bias, residual, relu):
  """Float64 training BN: biased variance over all but the last axis."""
  x = np.asarray(x, np.float64)
  axes = tuple(range(x.ndim - 1))
  mean, var = x.mean(axes), x.var(axes)
  z = (x - mean) / np.sqrt(var + EPS) * scale + bias
  if residual is not None:
    z = z + residual
  return (np.maximum(z, 0) if relu else z), mean, var


def _x64_grads(fn, args, ct):
  with jax.enable_x64():
    args = [None if a is None else jnp.asarray(a, jnp.float64) for a in args]
    _, vjp = jax.vjp(fn, *args)
    grads = vjp(jax.tree.map(lambda c: jnp.asarray(c, jnp.float64), ct))
    return [None if g is None else np.asarray(g) for g in grads]


def _data(shape, seed, offset=0.0):
  rng = np.random.default_rng(seed)
  c = shape[-1]
  x = (rng.standard_normal(shape) * 2.0 + offset).astype(np.float32)
  r = rng.standard_normal(shape).astype(np.float32)
  s = rng.standard_normal(c).astype(np.float32)
  b = rng.standard_normal(c).astype(np.float32)
  g = rng.standard_normal(shape).astype(np.float32)
  return x, r, s, b, g


class FusedBnTest(parameterized.TestCase):
  def setUp(self):
    super().setUp()
    if not onednn.available():
      pytest.skip(f'native kernel not built: {onednn.status()["reason"]}')

  # Narrow and non-multiple-of-16 widths run as rows of q C channels (q =
  # 16 / gcd(C, 16)) plus the M % q rows left over: C = 12 (q 4, 105 rows =
  # 26 periods + 1), C = 5 (q 16, 162 rows = 10 + 2); (7, 3) has fewer rows
  # than a period, 130 channels a period too wide (8 x 130 > 1024).
  @parameterized.product(
    shape=[(4, 5, 6, 16), (7, 3), (2, 3, 3, 130), (3, 5, 7, 12), (2, 9, 9, 5)],
    residual=[False, True],
    relu=[False, True],
  )
  def test_train_matches_float64(self, shape, residual, relu):
    x, r, s, b, g = _data(shape, seed=len(shape))
    res = r if residual else None
    y, mean, var = jax.jit(
      lambda x, r, s, b: fused_bn.train(x, s, b, residual=r, relu=relu)
    )(x, res, s, b)
    want_y, want_mean, want_var = _np_train(x, s, b, res, relu)
    self.assertLess(_rel_err(y, want_y), 1e-6)
    # The mean's error on the scale of the data (a mean near 0 has no
    # relative precision to speak of).
    self.assertLess(np.max(np.abs(mean - want_mean) / np.sqrt(want_var)), 1e-6)
    self.assertLess(_rel_err(var, want_var), 1e-6)

    def loss(x, r, s, b):
      return fused_bn.train(x, s, b, residual=r, relu=relu)[0]

    got = jax.jit(lambda *a: jax.vjp(loss, *a)[1](g))(x, res, s, b)

    def ref(x, r, s, b):
      return fused_bn.reference_train(x, s, b, residual=r, relu=relu)[0]

    want = _x64_grads(ref, [x, res, s, b], g)
    for name, a, w in zip(('dx', 'dres', 'dscale', 'dbias'), got, want):
      if w is None:
        self.assertIsNone(a)
      else:
        self.assertLess(_rel_err(a, w), 1e-5, name)

  def test_large_mean_is_well_conditioned(self):
    # mean/std = 100: E[x^2] - E[x]^2 in float32 would lose every digit.
    x, _, s, b, _ = _data((64, 4, 4, 8), seed=3, offset=200.0)
    _, mean, var = fused_bn.train(x, s, b, relu=False)
    _, want_mean, want_var = _np_train(x, s, b, None, False)
    self.assertLess(_rel_err(mean, want_mean), 1e-6)
    self.assertLess(_rel_err(var, want_var), 1e-5)

  # Channel blocks as in test_infer_with_max_matches_float64; 3 * 5 * 9 =
  # 135 rows is two full 64-row tiles and a partial one, and with 5, 8 or
  # 24 channels (q = 16, 2, 2 rows a period) leaves a partial period.
  @parameterized.product(
    channels=(5, 8, 24, 48, 64, 130),
    relu=(True, False),
    residual=(False, True),
  )
  def test_infer_matches_float64(self, channels, relu, residual):
    x, r, s, b, g = _data((3, 5, 9, channels), seed=5)
    res = r if residual else None
    mean = np.linspace(-1, 1, channels).astype(np.float32)
    var = np.linspace(0.5, 3, channels).astype(np.float32)
    y = jax.jit(
      lambda x, r: fused_bn.infer(x, s, b, mean, var, residual=r, relu=relu)
    )(x, res)
    z = (x.astype(np.float64) - mean) / np.sqrt(var + EPS) * s + b
    z = z + (res if residual else 0)
    self.assertLess(_rel_err(y, np.maximum(z, 0) if relu else z), 1e-6)

    def f(x, s, m):
      return fused_bn.infer(x, s, b, m, var, residual=res, relu=relu)

    def ref(x, s, m):
      return fused_bn.reference_infer(x, s, b, m, var, residual=res, relu=relu)

    got = jax.vjp(f, x, s, mean)[1](g)
    for a, w in zip(got, _x64_grads(ref, [x, s, mean], g)):
      self.assertLess(_rel_err(a, w), 1e-5)

  # The kernel walks blocks of up to 64 channels, 1-4 vectors of 16 with the
  # last one partial or full: 5 (1, partial), 16 (1, full), 20 (2, partial),
  # 48 (3, full), 64 (4, full), 101 (64 + 3 partial), 124 (64 + 4 partial);
  # each with and without a residual add (a ResNet block's output). With
  # 4 x 4 maps a sample is whole periods of q = 16 / gcd(C, 16) rows (the
  # max folded back from q C lanes) except at 101 channels (16 x 101 > 1024);
  # with 4 x 3 only for q | 12 (20, 124 channels).
  @parameterized.product(
    channels=(5, 12, 16, 20, 48, 64, 101, 124),
    hw=((4, 3), (4, 4)),
    relu=(True, False),
    residual=(False, True),
  )
  def test_infer_with_max_matches_float64(self, channels, hw, relu, residual):
    x, r, s, b, g = _data((5, *hw, channels), seed=13)
    r = r if residual else None
    mean = np.linspace(-1, 1, channels).astype(np.float32)
    var = np.linspace(0.5, 3, channels).astype(np.float32)
    kw = dict(relu=relu)

    def f(x, r):
      return fused_bn.infer_with_max(x, s, b, mean, var, residual=r, **kw)

    def ref(x, r):
      return fused_bn.reference_infer_with_max(
        x, s, b, mean, var, residual=r, **kw
      )

    if residual:
      self.assertIn(
        'pfa_jax_bn_infer_max_res', jax.jit(f).lower(x, r).as_text()
      )
    y, m = jax.jit(f)(x, r)
    z = (x.astype(np.float64) - mean) / np.sqrt(var + EPS) * s + b
    z = z + r if residual else z
    z = np.maximum(z, 0) if relu else z
    self.assertLess(_rel_err(y, z), 1e-6)
    self.assertLess(_rel_err(m, z.max(axis=(1, 2))), 1e-6)
    cot = (g, g[:, 0, 0])
    if residual:
      got = jax.vjp(f, x, r)[1](cot)
      want = _x64_grads(ref, [x, r], cot)
    else:
      got = jax.vjp(lambda x: f(x, None), x)[1](cot)
      want = _x64_grads(lambda x: ref(x, None), [x], cot)
    for a, w in zip(got, want):
      self.assertLess(_rel_err(a, w), 1e-5)

  def test_periodic_and_row_walks_agree(self):
    # 12 channels (q = 4) over 5 * 3 * 7 = 105 rows (26 periods + 1), and
    # 3 x 4 maps (12 rows: whole periods per sample) for the max: the elementwise
    # passes compute the same float32 ops either way, so agree bit for bit;
    # the sums only change order.
    x, r, s, b, g = _data((5, 3, 7, 12), seed=21)
    x4, r4 = x[:, :, :4], r[:, :, :4]
    mean = np.linspace(-1, 1, 12).astype(np.float32)
    var = np.linspace(0.5, 3, 12).astype(np.float32)
    infer = jax.jit(lambda x, r: fused_bn.infer(x, s, b, mean, var, residual=r))
    with_max = jax.jit(
      lambda x, r: fused_bn.infer_with_max(x, s, b, mean, var, residual=r)
    )
    train = jax.jit(
      lambda x, r: jax.vjp(
        lambda x, s: fused_bn.train(x, s, b, residual=r)[0], x, s
      )[1](g)
    )
    got = {}
    try:
      for on in (True, False):
        fused_bn.set_periodic(on)
        got[on] = jax.device_get(
          (infer(x, r), with_max(x4, r4), train(x, r), fused_bn.train(x, s, b))
        )
    finally:
      fused_bn.set_periodic(True)
    (y1, m1, t1, f1), (y0, m0, t0, f0) = got[True], got[False]
    np.testing.assert_array_equal(y1, y0)
    np.testing.assert_array_equal(m1[0], m0[0])
    np.testing.assert_array_equal(m1[1], m0[1])
    for a, w in zip(jax.tree.leaves((t1, f1)), jax.tree.leaves((t0, f0))):
      self.assertLess(_rel_err(a, w), 1e-6)

  @parameterized.parameters('simple_cnn', 'resnet8')
  def test_model_responses_match_the_xla_path(self, name):
    from pfa_jax import models  # noqa: PLC0415

    hw = 32 if name == 'simple_cnn' else 8
    x = np.random.default_rng(0).standard_normal((3, hw, hw, 3))
    x = x.astype(np.float32)
    kw = dict(num_classes=3)
    if name == 'simple_cnn':
      kw['width_mult'] = 0.125
    ref = models.get_model(name, conv_impl='xla', **kw)
    native = models.get_model(name, conv_impl='onednn', **kw)
    v = models.init(ref, jax.random.key(0), (hw, hw, 3))
    fn = jax.jit(lambda v, x: models.responses(native, v, x))
    hlo = fn.lower(v, x).as_text()
    self.assertIn('pfa_jax_bn_infer_max', hlo)
    if name == 'resnet8':  # every block's output response, from its BN pass
      self.assertIn('pfa_jax_bn_infer_max_res', hlo)
    got, want = fn(v, x), models.responses(ref, v, x)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)

  def test_vmap_keeps_variants_apart(self):
    x, r, s, b, _ = _data((3, 4, 5, 5, 8), seed=7)  # 3 variants
    scales = np.stack([s, -2 * s, s + 1])
    got = jax.vmap(lambda x, r, s: fused_bn.train(x, s, b, residual=r)[0])(
      x, r, scales
    )
    for i in range(3):
      want = _np_train(x[i], scales[i], b, r[i], True)[0]
      self.assertLess(_rel_err(got[i], want), 1e-6)
    # Unbatched scale/bias are broadcast to every variant.
    shared = jax.vmap(lambda x: fused_bn.train(x, s, b)[1])(x)
    np.testing.assert_allclose(shared, x.mean((1, 2, 3)), rtol=1e-5, atol=1e-6)

  def test_team_thread_and_inline_agree_exactly(self):
    x, r, s, b, g = _data((8, 6, 6, 32), seed=9)

    def run():
      y, vjp = jax.vjp(
        lambda x: fused_bn.train(x, s, b, residual=r)[0], jnp.asarray(x)
      )
      return np.asarray(y), np.asarray(vjp(g)[0])

    try:
      onednn.set_team_thread(False)
      inline = run()
    finally:
      onednn.set_team_thread(True)
    for a, b_ in zip(run(), inline):
      np.testing.assert_array_equal(a, b_)

  def test_not_eligible_falls_back(self):
    x, _, s, b, _ = _data((2, 3, 3, 4), seed=11)
    self.assertFalse(fused_bn.eligible(jnp.asarray(x, jnp.bfloat16)))
    y = fused_bn.train(jnp.asarray(x, jnp.bfloat16), s, b)[0]
    self.assertEqual(y.dtype, jnp.float32)  # bf16 x f32 scale promotes
    hlo = jax.jit(lambda x: fused_bn.train(x, s, b)[0]).lower(
      jnp.asarray(x, jnp.bfloat16)
    )
    self.assertNotIn('pfa_jax_bn', hlo.as_text())


class ShapeErrorTest(absltest.TestCase):
  """Wrong shapes are named before any kernel or XLA sees them."""

  def test_bad_operand_is_named(self):
    x = jnp.ones((2, 3, 3, 4))
    c4, c5 = jnp.ones(4), jnp.ones(5)
    with self.assertRaisesRegex(
      ValueError, r'bias has shape \(5,\), expected \(4,\)'
    ):
      fused_bn.train(x, c4, c5)
    with self.assertRaisesRegex(
      ValueError, r'residual has shape \(2, 3, 3, 5\)'
    ):
      fused_bn.train(x, c4, c4, residual=jnp.ones((2, 3, 3, 5)))
    with self.assertRaisesRegex(ValueError, r'var has shape \(5,\)'):
      fused_bn.infer(x, c4, c4, c4, c5)
    with self.assertRaisesRegex(ValueError, r'mean has shape \(\)'):
      fused_bn.infer_with_max(x, c4, c4, jnp.float32(0), c4)


class _Block(nn.Module):
  native: bool

  @nn.compact
  def __call__(self, x, train):
    h = nn.Conv(8, (3, 3), use_bias=False)(x)
    h = layers.BatchNorm(
      use_running_average=not train,
      momentum=0.9,
      relu=True,
      native=self.native,
      name='bn1',
    )(h)
    h = nn.Conv(8, (3, 3), use_bias=False)(h)
    return layers.BatchNorm(
      use_running_average=not train,
      momentum=0.9,
      relu=True,
      native=self.native,
      name='bn2',
    )(h, residual=x)


class BatchNormLayerTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    if not onednn.available():
      pytest.skip(f'native kernel not built: {onednn.status()["reason"]}')
    rng = np.random.default_rng(0)
    self.x = rng.standard_normal((4, 6, 6, 8)).astype(np.float32) + 0.5
    self.v = _Block(False).init(jax.random.key(0), self.x, True)

  def test_same_variables_and_function_as_flax(self):
    v_native = _Block(True).init(jax.random.key(0), self.x, True)
    self.assertEqual(jax.tree.structure(v_native), jax.tree.structure(self.v))
    for a, b in zip(jax.tree.leaves(v_native), jax.tree.leaves(self.v)):
      np.testing.assert_array_equal(a, b)
    for train in (True, False):
      outs = {}
      for native in (False, True):
        m = _Block(native)
        hlo = (
          jax.jit(
            lambda v, x, m=m, t=train: m.apply(v, x, t, mutable=['batch_stats'])
          )
          .lower(self.v, self.x)
          .as_text()
        )
        self.assertEqual('pfa_jax_bn' in hlo, native)
        outs[native] = m.apply(self.v, self.x, train, mutable=['batch_stats'])
      for a, b in zip(*(jax.tree.leaves(outs[n]) for n in (False, True))):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)

  def test_unfused_residual_is_still_a_fusion_boundary(self):
    # PFA_JAX_FUSED_BN=0 on the native path: flax's BN + add + ReLU, whose
    # output is materialised (onednn.materialize) so XLA cannot re-fuse the
    # residual chain into later blocks.
    with mock.patch.dict(os.environ, {'PFA_JAX_FUSED_BN': '0'}):
      hlo = (
        jax.jit(
          lambda v, x: _Block(True).apply(v, x, True, mutable=['batch_stats'])
        )
        .lower(self.v, self.x)
        .as_text()
      )
    self.assertNotIn('pfa_jax_bn', hlo)
    self.assertEqual(hlo.count('custom_call @pfa_jax_materialize('), 1)

  def test_recalibration_finds_the_layer(self):
    batches = [
      {'image': self.x, 'label': np.zeros(4, np.int32), 'mask': np.ones(4)}
    ]
    got = {
      n: recalibrate.recalibrate_bn(_Block(n), self.v, batches)
      for n in (False, True)
    }
    stats = [got[n]['batch_stats'] for n in (False, True)]
    for a, b in zip(*(jax.tree.leaves(s) for s in stats)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # ... and they are this batch's moments, not the initial (0, 1).
    h = np.asarray(stats[1]['bn1']['var'])
    self.assertFalse(np.allclose(h, 1.0))


if __name__ == '__main__':
  absltest.main()
