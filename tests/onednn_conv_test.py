"""Tests for pfa_jax.onednn: oneDNN convolutions == lax's (float64 checked)."""

import functools
import os
import subprocess
import sys
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from absl.testing import absltest
from absl.testing import parameterized
from jax import lax

from pfa_jax import conv
from pfa_jax import onednn
from pfa_jax import optim
from pfa_jax import steps

_DN = ('NHWC', 'HWIO', 'NHWC')
_TOL = 1e-5


def _rel_err(a, b):
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def _normal(shape, seed):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _reference_bias_act(x, k, b, r, strides, pads, relu):
  """`conv_bias_act`'s result from lax in float64 (``r`` may be None)."""
  with jax.enable_x64():
    args = (
      None if a is None else jnp.asarray(a, jnp.float64) for a in (x, k, b, r)
    )
    return np.asarray(onednn._bias_act_reference(*args, strides, pads, relu))


def _folded_relu_err(x, k, b, r):
  """Relative error of `conv_bias_act` (stride 1, 'SAME', residual ``r``,
  ReLU) against lax's in float64."""
  got = jax.jit(
    lambda x, k, b, r: onednn.conv_bias_act(
      x, k, b, (1, 1), 'SAME', residual=r, relu=True
    )
  )(x, k, b, r)
  want = _reference_bias_act(x, k, b, r, (1, 1), ((1, 1), (1, 1)), True)
  return _rel_err(got, want)


def _onednn_vjp(x, k, ct, strides, padding):
  def fn(x, k):
    return onednn.conv_general_dilated(
      x, k, strides, padding, dimension_numbers=_DN
    )

  y, vjp_fn = jax.vjp(jax.jit(fn), x, k)
  return (y, *vjp_fn(ct))


def _reference_vjp(x, k, ct, strides, padding):
  """Output and both gradients of lax's convolution, in float64."""
  with jax.enable_x64():
    x, k, ct = (jnp.asarray(a, jnp.float64) for a in (x, k, ct))

    def fn(x, k):
      return lax.conv_general_dilated(
        x, k, strides, padding, dimension_numbers=_DN
      )

    y, vjp_fn = jax.vjp(fn, x, k)
    return tuple(np.asarray(a) for a in (y, *vjp_fn(ct)))


def _out_shape(x_shape, k_shape, strides, padding):
  return jax.eval_shape(
    lambda x, k: lax.conv_general_dilated(
      x, k, strides, padding, dimension_numbers=_DN
    ),
    jax.ShapeDtypeStruct(x_shape, jnp.float32),
    jax.ShapeDtypeStruct(k_shape, jnp.float32),
  ).shape


def _train(model, init, batch, num_steps, hlo_check=None):
  """``num_steps`` library train steps (SGD momentum + weight decay) from
  ``init``; returns (params, batch_stats, last loss)."""
  config = ml_collections.ConfigDict(
    {
      'optim': {
        'name': 'sgd',
        'weight_decay': 5e-4,
        'bn_l1': 0.0,
        'momentum': 0.9,
        'nesterov': False,
      }
    }
  )
  lr_fn = optim.learning_rate_schedule(
    base_lr=0.1, schedule='constant', num_steps=num_steps
  )
  state = steps.create_train_state(
    jax.random.PRNGKey(0),
    config,
    model,
    batch['image'].shape[1:],
    lr_fn=lr_fn,
    variables=init,
  )
  step = jax.jit(functools.partial(steps.train_step, lr_fn=lr_fn))
  if hlo_check is not None:
    hlo_check(step.lower(state, batch, jax.random.PRNGKey(1)).as_text())
  for _ in range(num_steps):
    state, metrics = step(state, batch, jax.random.PRNGKey(1))
  return state.params, state.batch_stats, metrics['loss']


class OnednnConvTest(parameterized.TestCase):
  def setUp(self):
    super().setUp()
    if not onednn.available():
      pytest.skip(f'oneDNN kernel not built: {onednn.status()["reason"]}')

  def assert_matches_lax(self, x_shape, k_shape, strides, padding, seed=0):
    x = _normal(x_shape, seed)
    k = _normal(k_shape, seed + 1) / np.sqrt(np.prod(k_shape[:3]))
    ct = _normal(_out_shape(x_shape, k_shape, strides, padding), seed + 2)
    got = _onednn_vjp(x, k, ct, strides, padding)
    want = _reference_vjp(x, k, ct, strides, padding)
    for name, a, b in zip(('out', 'd_input', 'd_kernel'), got, want):
      self.assertEqual(a.shape, b.shape, name)
      self.assertEqual(a.dtype, jnp.float32, name)
      self.assertLess(_rel_err(a, b), _TOL, name)

  @parameterized.named_parameters(
    # name, (N, H, W, Cin), (KH, KW, Cin, Cout), strides, padding
    ('1x1', (2, 8, 8, 16), (1, 1, 16, 32), (1, 1), 'SAME'),
    ('1x1_stride2_valid_odd', (2, 9, 9, 8), (1, 1, 8, 12), (2, 2), 'VALID'),
    ('3x3_same_rgb', (2, 8, 8, 3), (3, 3, 3, 16), (1, 1), 'SAME'),
    ('3x3_valid_odd', (3, 9, 7, 5), (3, 3, 5, 6), (1, 1), 'VALID'),
    ('3x3_stride2_same_odd', (2, 9, 9, 8), (3, 3, 8, 8), (2, 2), 'SAME'),
    ('3x3_stride2_valid', (2, 8, 8, 8), (3, 3, 8, 4), (2, 2), 'VALID'),
    ('3x3_explicit_pad', (2, 8, 8, 8), (3, 3, 8, 8), (1, 1), ((1, 2), (0, 1))),
    ('3x3_map2x2', (2, 2, 2, 16), (3, 3, 16, 16), (1, 1), 'SAME'),
    ('5x3_mixed_strides', (1, 11, 10, 4), (5, 3, 4, 7), (2, 1), 'SAME'),
  )
  def test_matches_lax(self, x_shape, k_shape, strides, padding):
    self.assert_matches_lax(x_shape, k_shape, strides, padding)

  # Narrow outputs (C <= onednn.PACK_MAX, stride 1 across the width) run
  # as a packed forward: P output columns of C channels are one column of
  # P * C lanes, P * C <= 16, with at least 8 packed columns: P = 8 (C = 1,
  # W_out 64), 4 (C = 2-4, W_out 32), 2 (W_out 24: 6 columns at P = 4;
  # C = 8), none (odd W_out, or W_out 8); with a 5-wide kernel, row stride
  # 2, asymmetric pads and VALID.
  @parameterized.named_parameters(
    ('c1_p8', (1, 3, 64, 8), (3, 3, 8, 1), (1, 1), 'SAME', 8),
    ('c2_p4', (2, 3, 32, 16), (3, 3, 16, 2), (1, 1), 'SAME', 4),
    ('c3_p4', (2, 4, 32, 5), (3, 3, 5, 3), (1, 1), 'SAME', 4),
    ('c4_p4_kw5', (1, 4, 32, 4), (3, 5, 4, 4), (1, 1), 'SAME', 4),
    ('c4_p2', (2, 3, 24, 8), (3, 3, 8, 4), (1, 1), 'SAME', 2),
    ('c8_p2', (2, 3, 16, 8), (3, 3, 8, 8), (1, 1), 'SAME', 2),
    ('c4_odd', (2, 3, 15, 8), (3, 3, 8, 4), (1, 1), 'SAME', 1),
    ('c4_few_columns', (2, 4, 8, 8), (3, 3, 8, 4), (1, 1), 'SAME', 1),
    ('c2_rows_stride2', (2, 9, 32, 8), (3, 3, 8, 2), (2, 1), 'SAME', 4),
    ('c3_pads', (2, 4, 33, 4), (3, 3, 4, 3), (1, 1), ((1, 0), (2, 1)), 2),
    ('c4_valid', (2, 4, 34, 8), (3, 3, 8, 4), (1, 1), 'VALID', 4),
  )
  @mock.patch.dict(os.environ, {'PFA_JAX_ONEDNN_NARROW_MAX': '0'})
  def test_narrow_output_is_packed(self, x_shape, k_shape, strides, padding, p):
    pads = (
      lax.padtype_to_pads(x_shape[1:3], k_shape[:2], strides, padding)
      if isinstance(padding, str)
      else padding
    )
    self.assertEqual(onednn.pack_factor(x_shape, k_shape, strides, pads), p)
    self.assert_matches_lax(x_shape, k_shape, strides, padding)
    x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
    k = jax.ShapeDtypeStruct(k_shape, jnp.float32)
    hlo = (
      jax.jit(
        lambda x, k: onednn.conv_general_dilated(
          x, k, strides, padding, dimension_numbers=_DN
        )
      )
      .lower(x, k)
      .as_text()
    )
    if p > 1:  # the oneDNN call's result has W_out / p columns of p * C
      n, ho, wo, c = _out_shape(x_shape, k_shape, strides, padding)
      self.assertIn(f'tensor<{n}x{ho}x{wo // p}x{p * c}xf32>', hlo)
    with mock.patch.dict(os.environ, {'PFA_JAX_ONEDNN_PACK_MAX': '0'}):
      self.assertEqual(onednn.pack_factor(x_shape, k_shape, strides, pads), 1)
      self.assert_matches_lax(x_shape, k_shape, strides, padding)

  # Outputs of <= 8 channels run the narrow kernel (native/narrow_conv.cc):
  # its row path (stride 1 across the width, >= 16 output columns; 16 and 32
  # pixels a step, a last step that ends mid-vector, transposed rows reused
  # across output rows, row strides) and its channel path (column strides,
  # narrow maps; input channels not a multiple of 16: masked loads). Every
  # output width 1-8 (each its own template), 1x1 / 5x5 / 3x5 kernels,
  # asymmetric pads.
  @parameterized.named_parameters(
    ('o1_s2', (2, 9, 11, 16), (3, 3, 16, 1), (2, 2), 'SAME'),
    ('o2_c16', (2, 5, 32, 16), (3, 3, 16, 2), (1, 1), 'SAME'),
    ('o3_c40_odd_w', (1, 6, 13, 40), (3, 3, 40, 3), (1, 1), 'SAME'),
    ('o4_c32', (2, 4, 16, 32), (3, 3, 32, 4), (1, 1), 'SAME'),
    ('o5_map8', (2, 8, 8, 64), (3, 3, 64, 5), (1, 1), 'SAME'),
    ('o6_c20_s2', (1, 10, 10, 20), (5, 5, 20, 6), (2, 2), 'SAME'),
    ('o7_1x1_valid', (1, 6, 9, 33), (1, 1, 33, 7), (1, 1), 'VALID'),
    ('o8_pads', (1, 12, 17, 48), (3, 5, 48, 8), (2, 1), ((2, 0), (1, 3))),
    ('o8_c8_cols_s2', (2, 7, 9, 8), (3, 3, 8, 8), (1, 2), 'VALID'),
    ('o4_rows_c16_w32', (2, 6, 32, 16), (3, 3, 16, 4), (1, 1), 'SAME'),
    ('o8_rows_c12_w40', (2, 5, 40, 12), (3, 3, 12, 8), (1, 1), 'SAME'),
    ('o3_rows_c4_w19', (1, 12, 17, 4), (3, 3, 4, 3), (2, 1), ((2, 0), (1, 3))),
    ('o2_rows_c20_w16_5x5', (2, 7, 16, 20), (5, 5, 20, 2), (1, 1), 'SAME'),
    ('o7_rows_c33_w33', (1, 3, 35, 33), (3, 3, 33, 7), (1, 1), 'VALID'),
    ('o1_rows_c16_1x1', (2, 3, 48, 16), (1, 1, 16, 1), (1, 1), 'SAME'),
    # 9-15 outputs: the row path only (onednn.ROW_MAX), one vector of
    # pixels per step from 15 outputs (2 O + 3 > 32 registers).
    ('o9_rows_c16_w32', (2, 4, 32, 16), (3, 3, 16, 9), (1, 1), 'SAME'),
    ('o12_rows_c4_w19', (1, 5, 19, 4), (3, 3, 4, 12), (1, 1), 'SAME'),
    ('o14_rows_c20_w40_s2', (1, 9, 40, 20), (3, 3, 20, 14), (2, 1), 'SAME'),
    ('o15_rows_c24_w33', (2, 4, 35, 24), (3, 3, 24, 15), (1, 1), 'VALID'),
  )
  def test_narrow_kernel_matches_lax(self, x_shape, k_shape, strides, padding):
    if not onednn.narrow_available():
      pytest.skip('narrow kernel not built (no AVX-512)')
    pads = (
      lax.padtype_to_pads(x_shape[1:3], k_shape[:2], strides, padding)
      if isinstance(padding, str)
      else padding
    )
    self.assertEqual(onednn.forward_algo(x_shape, k_shape, strides, pads), 0)
    self.assert_matches_lax(x_shape, k_shape, strides, padding)

    def hlo():
      return (
        jax.jit(
          lambda x, k: onednn.conv_general_dilated(
            x, k, strides, padding, dimension_numbers=_DN
          )
        )
        .lower(
          jax.ShapeDtypeStruct(x_shape, jnp.float32),
          jax.ShapeDtypeStruct(k_shape, jnp.float32),
        )
        .as_text()
      )

    self.assertIn('pfa_jax_narrow_conv_fwd', hlo())
    with mock.patch.dict(os.environ, {'PFA_JAX_ONEDNN_NARROW_MAX': '0'}):
      self.assertNotEqual(
        onednn.forward_algo(x_shape, k_shape, strides, pads), 0
      )
      self.assertNotIn('pfa_jax_narrow_conv_fwd', hlo())

  @parameterized.named_parameters(
    # Too few input channels for the narrow kernel (3; 4 off the row path);
    # 16 outputs is oneDNN's own width.
    ('c3_o8_packs', (1, 4, 32, 3), (3, 3, 3, 8), 2),
    ('c4_o4_map8', (1, 8, 8, 4), (3, 3, 4, 4), 1),
    ('o16_plain', (1, 8, 8, 64), (3, 3, 64, 16), 1),
    ('o16_rows', (1, 8, 32, 16), (3, 3, 16, 16), 1),
    # 9-15 outputs off the row path (8 columns; 3 inputs).
    ('o12_map8', (1, 8, 8, 16), (3, 3, 16, 12), 1),
    ('o12_rows_c3', (1, 8, 32, 3), (3, 3, 3, 12), 1),
  )
  def test_forward_algo_keeps_onednn_elsewhere(self, x_shape, k_shape, want):
    pads = ((1, 1), (1, 1))
    self.assertEqual(onednn.forward_algo(x_shape, k_shape, (1, 1), pads), want)

  # conv_bias_act (BN folded at inference): relu(conv + b [+ residual]) on
  # oneDNN (sum + eltwise post-ops) and on the narrow kernel's two paths and
  # every row-path width, against lax in float64. Inputs of both signs, so
  # that the ReLU cuts about half of the outputs.
  @parameterized.named_parameters(
    ('onednn_o16', (2, 6, 32, 16), 16, (1, 1), 'dnnl'),
    ('rows_o1', (2, 4, 40, 16), 1, (1, 1), 'narrow'),
    ('rows_o3_c4', (1, 5, 19, 4), 3, (1, 1), 'narrow'),
    ('rows_o8', (2, 4, 32, 16), 8, (1, 1), 'narrow'),
    ('rows_o10_c12', (2, 4, 33, 12), 10, (1, 1), 'narrow'),
    ('rows_o13_w16', (2, 4, 16, 16), 13, (1, 1), 'narrow'),
    ('rows_o15', (2, 3, 32, 24), 15, (1, 1), 'narrow'),
    ('channels_o4_map8', (2, 8, 8, 32), 4, (1, 1), 'narrow'),
    ('channels_o8_s2', (2, 9, 11, 16), 8, (2, 2), 'narrow'),
    ('onednn_o12_map8', (2, 8, 8, 16), 12, (1, 1), 'dnnl'),
  )
  def test_conv_bias_act_matches_lax(self, x_shape, out, strides, target):
    if not onednn.narrow_available():
      pytest.skip('narrow kernel not built (no AVX-512)')
    k_shape = (3, 3, x_shape[3], out)
    x = _normal(x_shape, 0)
    k = _normal(k_shape, 1) / np.sqrt(np.prod(k_shape[:3]))
    b = _normal((out,), 2)
    y_shape = _out_shape(x_shape, k_shape, strides, 'SAME')
    r = _normal(y_shape, 3)
    pads = lax.padtype_to_pads(x_shape[1:3], (3, 3), strides, 'SAME')
    narrow = onednn.forward_algo(x_shape, k_shape, strides, pads) == 0
    self.assertEqual(narrow, target == 'narrow')
    # Every case is small: run single-threaded on the calling thread by
    # default, and handed to the team thread with the threshold at 0.
    cases = [
      (residual, relu, inline)
      for residual in (None, r)
      for relu in (False, True)
      for inline in (True, False)
    ]
    for residual, relu, inline in cases:
      setting = {} if inline else {'PFA_JAX_ONEDNN_INLINE_MFLOPS': '0'}
      with (
        self.subTest(residual=residual is not None, relu=relu, inline=inline),
        mock.patch.dict(os.environ, setting),
      ):
        f = jax.jit(
          lambda x, k, b, r, relu=relu: onednn.conv_bias_act(
            x, k, b, strides, 'SAME', residual=r, relu=relu
          )
        )
        text = f.lower(x, k, b, residual).as_text()
        self.assertIn(f'pfa_jax_{target}_conv_fwd_bias', text)
        self.assertEqual('threads = 1 : i64' in text, inline)
        got = f(x, k, b, residual)
        want = _reference_bias_act(x, k, b, residual, strides, pads, relu)
        self.assertEqual(got.shape, want.shape)
        if relu:  # about half cut: the ReLU is exercised
          self.assertBetween(float(np.mean(np.asarray(want) == 0)), 0.2, 0.8)
        self.assertLess(_rel_err(got, want), _TOL)

  def test_call_threads_follows_the_flops(self):
    # 2 N Ho Wo kh kw C O = 2 * 1 * 8 * 8 * 3 * 3 * 16 * 16 = 294,912.
    x_shape, w_shape, out_hw = (1, 8, 8, 16), (3, 3, 16, 16), (8, 8)
    self.assertLessEqual(0.294912, onednn.INLINE_MFLOPS)
    self.assertEqual(onednn.call_threads(x_shape, w_shape, out_hw), 1)
    for setting, want in (
      ('0.294912', 1),  # at the threshold: inline
      ('0.2949', onednn.THREADS),
      ('0', onednn.THREADS),
      ('1e9', 1),
    ):
      with mock.patch.dict(
        os.environ, {'PFA_JAX_ONEDNN_INLINE_MFLOPS': setting}
      ):
        self.assertEqual(
          onednn.call_threads(x_shape, w_shape, out_hw), want, setting
        )
    # The batch counts: 16 images of the same layer are 4.7 MFLOP.
    self.assertEqual(
      onednn.call_threads((16, 8, 8, 16), w_shape, out_hw), onednn.THREADS
    )
    # So do the weights: 208 -> 200 on a 2 x 2 map is 3.0 MFLOP (inline by
    # FLOPs) but 1.5 MB of weights (9 * 208 * 200 * 4 bytes) > 256 KiB;
    # 72 -> 64 (166 KB) is inline.
    self.assertEqual(
      onednn.call_threads((1, 2, 2, 208), (3, 3, 208, 200), (2, 2)),
      onednn.THREADS,
    )
    self.assertEqual(
      onednn.call_threads((1, 2, 2, 72), (3, 3, 72, 64), (2, 2)), 1
    )
    for bad in ('x', '-1', 'nan'):
      with (
        mock.patch.dict(os.environ, {'PFA_JAX_ONEDNN_INLINE_MFLOPS': bad}),
        self.assertRaisesRegex(
          ValueError, f"PFA_JAX_ONEDNN_INLINE_MFLOPS must be .*'{bad}'"
        ),
      ):
        onednn.call_threads(x_shape, w_shape, out_hw)

  def test_plain_weights_follow_the_output_pixels(self):
    self.assertEqual(onednn.PLAIN_PIXELS, 64)
    self.assertTrue(onednn.plain_weights(1, (8, 8)))  # 64 pixels
    self.assertFalse(onednn.plain_weights(1, (8, 9)))
    self.assertFalse(onednn.plain_weights(2, (8, 8)))
    self.assertTrue(onednn.plain_weights(16, (2, 2)))
    for setting, want in (('0', False), ('128', True)):
      with mock.patch.dict(
        os.environ, {'PFA_JAX_ONEDNN_PLAIN_PIXELS': setting}
      ):
        self.assertEqual(onednn.plain_weights(2, (8, 8)), want, setting)
    for bad, message in (('x', 'an integer'), ('-1', '>= 0')):
      with (
        mock.patch.dict(os.environ, {'PFA_JAX_ONEDNN_PLAIN_PIXELS': bad}),
        self.assertRaisesRegex(
          ValueError, f'PFA_JAX_ONEDNN_PLAIN_PIXELS must be {message}'
        ),
      ):
        onednn.plain_weights(1, (2, 2))

  @parameterized.named_parameters(
    ('dnnl_2x2', (1, 2, 2, 24), 32, 'dnnl'),
    ('dnnl_res_4x4', (2, 4, 4, 16), 48, 'dnnl'),
    ('split_3x16', (1, 3, 16, 8), 20, 'split'),
  )
  def test_plain_weights_match_lax_and_the_blocked_call(
    self, x_shape, out, target
  ):
    # Small outputs read the HWIO weights unreordered (plain_weights); the
    # same layer with the setting off reorders them; both match float64
    # lax, with and without a residual, and are separate cache entries.
    if target == 'split' and not onednn.narrow_available():
      pytest.skip('narrow kernel not built (no AVX-512)')
    k_shape = (3, 3, x_shape[3], out)
    x = _normal(x_shape, 60)
    k = _normal(k_shape, 61) / np.sqrt(np.prod(k_shape[:3]))
    b = _normal((out,), 62)
    r = _normal((*x_shape[:3], out), 63)
    pads = ((1, 1), (1, 1))
    for residual in (None, r):
      outs = {}
      off = {'PFA_JAX_ONEDNN_PLAIN_PIXELS': '0'}
      for name, env in (('plain', {}), ('blocked', off)):
        with self.subTest(residual=residual is not None, weights=name):
          with mock.patch.dict(os.environ, env):
            f = jax.jit(
              lambda x, k, b, r: onednn.conv_bias_act(
                x, k, b, (1, 1), 'SAME', residual=r, relu=True
              )
            )
            text = f.lower(x, k, b, residual).as_text()
            self.assertIn(f'pfa_jax_{target}_conv_fwd_bias', text)
            self.assertIn(
              f'plain_weights = {str(name == "plain").lower()}', text
            )
            size = onednn.cache_size()
            outs[name] = f(x, k, b, residual)
            self.assertEqual(onednn.cache_size(), size + 1)
          want = _reference_bias_act(x, k, b, residual, (1, 1), pads, True)
          self.assertLess(_rel_err(outs[name], want), _TOL)
      np.testing.assert_allclose(outs['plain'], outs['blocked'], atol=1e-5)

  def test_inline_and_team_calls_get_their_own_primitives(self):
    # oneDNN fixes a primitive's thread count at creation: the same layer
    # run on the calling thread (1 thread) and on the team thread (all
    # cores) is two cache entries where there is more than one core, and
    # one where there is one; the outputs agree.
    x, k, b = _normal((1, 5, 7, 24), 20), _normal((3, 3, 24, 32), 21), None
    b = _normal((32,), 22)
    outs = {}
    for name, setting in (('inline', '1e9'), ('team', '0')):
      with mock.patch.dict(
        os.environ, {'PFA_JAX_ONEDNN_INLINE_MFLOPS': setting}
      ):
        f = jax.jit(
          lambda x, k, b: onednn.conv_bias_act(x, k, b, (1, 1), 'SAME')
        )
        size = onednn.cache_size()
        outs[name] = jax.block_until_ready(f(x, k, b))
        outs[name + '_new_entries'] = onednn.cache_size() - size
    self.assertEqual(outs['inline_new_entries'], 1)
    cores = onednn.THREADS or len(os.sched_getaffinity(0))
    self.assertEqual(outs['team_new_entries'], int(cores > 1))
    pads = ((1, 1), (1, 1))
    want = _reference_bias_act(x, k, b, None, (1, 1), pads, False)
    for name in ('inline', 'team'):
      self.assertLess(_rel_err(outs[name], want), _TOL, name)

  def test_independent_inline_calls_in_one_program(self):
    # Calls on the calling thread bypass the team thread's one-at-a-time
    # rule, so XLA may run independent ones at once on its own threads:
    # each still matches float64 lax (oneDNN, the narrow kernel, the split).
    if not onednn.narrow_available():
      pytest.skip('narrow kernel not built (no AVX-512)')
    layers = [((1, 6, 32, 8), 16), ((1, 6, 32, 8), 6), ((1, 6, 32, 8), 20)]
    args = []
    for i, (x_shape, out) in enumerate(layers):
      k_shape = (3, 3, x_shape[3], out)
      args.append(
        (
          _normal(x_shape, 30 + i),
          _normal(k_shape, 40 + i) / np.sqrt(np.prod(k_shape[:3])),
          _normal((out,), 50 + i),
        )
      )

    def f(args):
      return [
        onednn.conv_bias_act(x, k, b, (1, 1), 'SAME', relu=True)
        for x, k, b in args
      ]

    text = jax.jit(f).lower(args).as_text()
    for target in ('dnnl', 'narrow', 'split'):
      self.assertIn(f'pfa_jax_{target}_conv_fwd_bias', text)
    self.assertEqual(text.count('threads = 1 : i64'), 3)
    for _ in range(5):  # repeated: a race would not show every time
      got = jax.jit(f)(args)
      for (x, k, b), y in zip(args, got, strict=True):
        pads = ((1, 1), (1, 1))
        want = _reference_bias_act(x, k, b, None, (1, 1), pads, True)
        self.assertLess(_rel_err(y, want), _TOL)

  # The channel-tail split (tail_split): oneDNN on the first 16 m outputs,
  # the narrow row kernel on the last t, merged per pixel; against float64
  # lax and against the same layer run whole by oneDNN (split off).
  @parameterized.named_parameters(
    ('o17_w32', (2, 4, 32, 16), 17, (1, 1)),
    ('o20_c4_w21', (2, 5, 21, 4), 20, (1, 1)),  # a partial pixel vector
    ('o36_c13_w16', (2, 3, 16, 13), 36, (1, 1)),
    ('o24_w40_s21', (2, 7, 40, 8), 24, (2, 1)),
  )
  def test_tail_split_matches_lax(self, x_shape, out, strides):
    if not onednn.narrow_available():
      pytest.skip('narrow kernel not built (no AVX-512)')
    k_shape = (3, 3, x_shape[3], out)
    x = _normal(x_shape, 10)
    k = _normal(k_shape, 11) / np.sqrt(np.prod(k_shape[:3]))
    b = _normal((out,), 12)
    y_shape = _out_shape(x_shape, k_shape, strides, 'SAME')
    r = _normal(y_shape, 13)
    pads = lax.padtype_to_pads(x_shape[1:3], (3, 3), strides, 'SAME')
    self.assertEqual(
      onednn.tail_split(x_shape, k_shape, strides, pads), out % 16
    )
    for residual in (None, r):
      for relu in (False, True):
        with self.subTest(residual=residual is not None, relu=relu):

          def f(x, k, b, r, relu=relu):
            return onednn.conv_bias_act(
              x, k, b, strides, 'SAME', residual=r, relu=relu
            )

          text = jax.jit(f).lower(x, k, b, residual).as_text()
          suffix = '_res' if residual is not None else ''
          self.assertIn(f'pfa_jax_split_conv_fwd_bias{suffix}(', text)
          self.assertIn('threads = 1 : i64', text)  # small: inline
          got = jax.jit(f)(x, k, b, residual)
          with mock.patch.dict(
            os.environ, {'PFA_JAX_ONEDNN_INLINE_MFLOPS': '0'}
          ):
            team = jax.jit(lambda *a: f(*a))  # a fresh trace
            self.assertNotIn(
              'threads = 1 : i64', team.lower(x, k, b, residual).as_text()
            )
            team = team(x, k, b, residual)
          with mock.patch.dict(os.environ, {'PFA_JAX_ONEDNN_TAIL_MAX': '0'}):
            whole = jax.jit(lambda *a: f(*a))  # a fresh trace
            self.assertIn(
              'pfa_jax_dnnl_conv_fwd_bias',
              whole.lower(x, k, b, residual).as_text(),
            )
            whole = whole(x, k, b, residual)
          want = _reference_bias_act(x, k, b, residual, strides, pads, relu)
          if relu:
            self.assertBetween(float(np.mean(np.asarray(want) == 0)), 0.2, 0.8)
          self.assertLess(_rel_err(got, want), _TOL)
          self.assertLess(_rel_err(got, whole), _TOL)
          self.assertLess(_rel_err(team, want), _TOL)

  def test_tail_split_every_tail_width(self):
    # Tails 1-8 (TAIL_MAX) of 16 + t outputs at 32 columns (two pixel
    # vectors a row), residual and ReLU: every instantiated tail kernel.
    if not onednn.narrow_available():
      pytest.skip('narrow kernel not built (no AVX-512)')
    for t in range(1, onednn.TAIL_MAX + 1):
      out = 16 + t
      x = _normal((1, 3, 32, 6), t)
      k = _normal((3, 3, 6, out), t + 1) / 7
      b = _normal((out,), t + 2)
      r = _normal((1, 3, 32, out), t + 3)
      pads = ((1, 1), (1, 1))
      self.assertEqual(onednn.tail_split(x.shape, k.shape, (1, 1), pads), t)
      with self.subTest(tail=t):
        self.assertLess(_folded_relu_err(x, k, b, r), _TOL)

  @parameterized.named_parameters(
    ('no_tail', (1, 8, 32, 16), (3, 3, 16, 32), (1, 1)),
    ('narrow_itself', (1, 8, 32, 16), (3, 3, 16, 12), (1, 1)),
    ('tail_past_max', (1, 8, 32, 16), (3, 3, 16, 25), (1, 1)),
    ('three_inputs', (1, 8, 32, 3), (3, 3, 3, 20), (1, 1)),
    ('map_under_16', (1, 8, 8, 16), (3, 3, 16, 20), (1, 1)),
    ('stride_across', (1, 8, 64, 16), (3, 3, 16, 20), (1, 2)),
  )
  def test_tail_split_only_where_it_applies(self, x_shape, k_shape, strides):
    pads = ((1, 1), (1, 1))
    self.assertEqual(onednn.tail_split(x_shape, k_shape, strides, pads), 0)

  def test_tail_split_follows_its_setting(self):
    shapes = ((1, 8, 32, 16), (3, 3, 16, 20), (1, 1), ((1, 1),) * 2)
    if not onednn.narrow_available():
      pytest.skip('narrow kernel not built (no AVX-512)')
    self.assertEqual(onednn.tail_split(*shapes), 4)
    for setting, want in (('0', 0), ('3', 0), ('4', 4), ('99', 4)):
      with mock.patch.dict(os.environ, {'PFA_JAX_ONEDNN_TAIL_MAX': setting}):
        self.assertEqual(onednn.tail_split(*shapes), want, setting)
    with mock.patch.dict(os.environ, {'PFA_JAX_ONEDNN_TAIL_MAX': 'x'}):
      with self.assertRaisesRegex(
        ValueError, r"PFA_JAX_ONEDNN_TAIL_MAX must be an integer, got 'x'"
      ):
        onednn.tail_split(*shapes)

  def test_tail_split_under_vmap_and_a_kept_residual(self):
    # vmap: one split call per variant (the kernel's group loop). The
    # residual is returned as well, so XLA must give the output its own
    # buffer (the call copies the residual in) and keep the residual intact.
    if not onednn.narrow_available():
      pytest.skip('narrow kernel not built (no AVX-512)')
    x = _normal((3, 2, 4, 16, 8), 20)
    k = _normal((3, 3, 3, 8, 19), 21) / 8
    b = _normal((3, 19), 22)
    r = _normal((3, 2, 4, 16, 19), 23)

    def f(x, k, b, r):
      y = onednn.conv_bias_act(x, k, b, (1, 1), 'SAME', residual=r, relu=True)
      return y, r

    fn = jax.jit(jax.vmap(f))
    self.assertIn(
      'pfa_jax_split_conv_fwd_bias_res', fn.lower(x, k, b, r).as_text()
    )
    got, kept = fn(x, k, b, r)
    np.testing.assert_array_equal(kept, r)
    with jax.enable_x64():
      want = jax.vmap(
        lambda *a: onednn._bias_act_reference(*a, (1, 1), ((1, 1),) * 2, True)
      )(*(jnp.asarray(a, jnp.float64) for a in (x, k, b, r)))
    self.assertLess(_rel_err(got, want), _TOL)

  def test_row_path_stores_every_width(self):
    # The row path's NHWC store (native StoreRow): log2(P) interleave levels
    # for P = 1, 2, 4, 8, 16 and the compaction of O < P channels, for every
    # width 1-15, with 21 output columns (a full vector of 16 pixels and a
    # partial one of 5), through the folded epilogue, against float64 lax.
    if not onednn.narrow_available():
      pytest.skip('narrow kernel not built (no AVX-512)')
    for out in range(1, 16):
      x = _normal((2, 3, 21, 8), out)
      k = _normal((3, 3, 8, out), out + 1) / 6
      b = _normal((out,), out + 2)
      r = _normal((2, 3, 21, out), out + 3)
      pads = ((1, 1), (1, 1))
      self.assertEqual(onednn.forward_algo(x.shape, k.shape, (1, 1), pads), 0)
      with self.subTest(out=out):
        self.assertLess(_folded_relu_err(x, k, b, r), _TOL)

  def test_narrow_kernel_under_vmap(self):
    if not onednn.narrow_available():
      pytest.skip('narrow kernel not built (no AVX-512)')
    # K stacked variants, each its own kernel: one narrow call per variant.
    x = _normal((3, 2, 8, 8, 16), 0)
    k = _normal((3, 3, 3, 16, 4), 1) / 12

    def fn(conv_fn):
      return lambda x, k: conv_fn(x, k, (1, 1), 'SAME', dimension_numbers=_DN)

    got = jax.jit(jax.vmap(fn(onednn.conv_general_dilated)))(x, k)
    with jax.enable_x64():
      want = jax.vmap(fn(lax.conv_general_dilated))(
        jnp.asarray(x, jnp.float64), jnp.asarray(k, jnp.float64)
      )
    self.assertLess(_rel_err(got, want), _TOL)

  def test_bad_narrow_setting_is_named(self):
    with mock.patch.dict(os.environ, {'PFA_JAX_ONEDNN_NARROW_MAX': '-'}):
      with self.assertRaisesRegex(
        ValueError, r"PFA_JAX_ONEDNN_NARROW_MAX must be an integer, got '-'"
      ):
        onednn.forward_algo((1, 4, 8, 16), (3, 3, 16, 2), (1, 1), ((1, 1),) * 2)

  def test_bad_pack_setting_is_named(self):
    with mock.patch.dict(os.environ, {'PFA_JAX_ONEDNN_PACK_MAX': 'eight'}):
      with self.assertRaisesRegex(
        ValueError, r"PFA_JAX_ONEDNN_PACK_MAX must be an integer, got 'eight'"
      ):
        onednn.pack_factor((1, 4, 32, 8), (3, 3, 8, 2), (1, 1), ((1, 1),) * 2)

  def test_random_shapes(self):
    rng = np.random.default_rng(7)
    for i in range(6):
      kh, kw = rng.choice([1, 3], 2)
      sh, sw = rng.choice([1, 2], 2)
      h, w = rng.integers(max(kh, kw), 11, 2)
      x_shape = (
        int(rng.integers(1, 4)),
        int(h),
        int(w),
        int(rng.integers(1, 9)),
      )
      k_shape = (int(kh), int(kw), x_shape[3], int(rng.integers(1, 9)))
      padding = str(rng.choice(['SAME', 'VALID']))
      with self.subTest(x=x_shape, k=k_shape, s=(sh, sw), p=padding):
        self.assert_matches_lax(
          x_shape, k_shape, (int(sh), int(sw)), padding, seed=i
        )

  def test_vmap(self):
    # K stacked variants (pfa_jax.batched): batched and shared kernels.
    x = _normal((3, 2, 7, 7, 4), 0)
    k = _normal((3, 3, 3, 4, 5), 1) / 6

    def loss(conv_fn):
      def fn(x, k):
        y = conv_fn(x, k, (2, 2), 'SAME', dimension_numbers=_DN)
        return jnp.sum(jnp.sin(y))

      return jax.grad(fn, (0, 1))

    got = jax.jit(jax.vmap(loss(onednn.conv_general_dilated)))(x, k)
    want = jax.vmap(loss(lax.conv_general_dilated))(x, k)
    for a, b in zip(got, want):
      self.assertLess(_rel_err(a, b), _TOL)
    got = jax.vmap(loss(onednn.conv_general_dilated), (0, None))(x, k[0])
    want = jax.vmap(loss(lax.conv_general_dilated), (0, None))(x, k[0])
    for a, b in zip(got, want):
      self.assertEqual(a.shape, b.shape)
      self.assertLess(_rel_err(a, b), _TOL)

  def test_small_maps_go_to_pfa_jax_conv(self):
    # 16 outputs: oneDNN's forward, not the narrow kernel's.
    x, k = _normal((3, 2, 2, 16), 0), _normal((3, 3, 16, 16), 1)

    def fn(x, k):
      return onednn.conv_general_dilated(
        x, k, (1, 1), 'SAME', dimension_numbers=_DN
      )

    with mock.patch.dict(os.environ):
      os.environ.pop('PFA_JAX_ONEDNN_SMALL_MAP', None)
      self.assertEqual(onednn.small_map(), 0)  # the default: all on oneDNN
    for env, native in (('4', False), ('0', True), ('3', True)):
      with mock.patch.dict(os.environ, {'PFA_JAX_ONEDNN_SMALL_MAP': env}):
        f = jax.jit(functools.partial(fn))  # read at trace: a fresh trace
        text = f.lower(x, k).as_text()
        got = f(x, k)
      self.assertEqual('pfa_jax_dnnl_conv_fwd' in text, native, env)
      want = lax.conv_general_dilated(
        x, k, (1, 1), 'SAME', dimension_numbers=_DN, precision='highest'
      )
      self.assertLess(_rel_err(got, want), _TOL, env)
    # A 3x3 map (9 pixels) stays on oneDNN under a threshold of 4.
    x3 = _normal((3, 3, 3, 16), 2)
    with mock.patch.dict(os.environ, {'PFA_JAX_ONEDNN_SMALL_MAP': '4'}):
      f = jax.jit(functools.partial(fn))
      self.assertIn('pfa_jax_dnnl_conv_fwd', f.lower(x3, k).as_text())

  def test_uses_ffi_and_caches_primitives(self):
    x, k = _normal((2, 6, 6, 4), 0), _normal((3, 3, 4, 4), 1)

    def fn(x, k):
      return onednn.conv_general_dilated(
        x, k, (1, 1), 'SAME', dimension_numbers=_DN
      )

    grad_fn = jax.value_and_grad(lambda x, k: jnp.sum(fn(x, k) ** 2), (0, 1))
    hlo = jax.jit(grad_fn).lower(x, k)
    text = hlo.as_text()
    for target in ('fwd', 'bwd_data', 'bwd_weights'):
      self.assertIn(f'pfa_jax_dnnl_conv_{target}', text)
    jax.block_until_ready(fn(x, k))
    size = onednn.cache_size()
    jax.block_until_ready(fn(x + 1, k))
    self.assertEqual(onednn.cache_size(), size)

  def test_auto_mesh_batch_sharded(self):
    # The partitioner replicates the custom call's operands: still correct.
    mesh = jax.make_mesh(
      (jax.device_count(),), ('data',), axis_types=(jax.sharding.AxisType.Auto,)
    )
    n = 2 * jax.device_count()
    x, k = _normal((n, 5, 5, 3), 0), _normal((3, 3, 3, 4), 1)
    ct = _normal((n, 5, 5, 4), 2)
    xs = jax.device_put(
      x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
    )
    got = _onednn_vjp(xs, k, ct, (1, 1), 'SAME')
    want = _reference_vjp(x, k, ct, (1, 1), 'SAME')
    for a, b in zip(got, want):
      self.assertLess(_rel_err(a, b), _TOL)

  def test_explicit_batch_sharding_falls_back(self):
    # jit + NamedSharding on an Explicit mesh: pfa_jax.conv's path instead.
    mesh = jax.make_mesh(
      (2,),
      ('data',),
      axis_types=(jax.sharding.AxisType.Explicit,),
      devices=jax.devices()[:2],
    )
    spec = jax.sharding.PartitionSpec
    x, k = _normal((4, 5, 5, 3), 0), _normal((3, 3, 3, 4), 1)
    ct = _normal((4, 5, 5, 4), 2)
    xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, spec('data')))
    ks = jax.device_put(k, jax.sharding.NamedSharding(mesh, spec()))

    def fn(x, k):
      return onednn.conv_general_dilated(
        x, k, (1, 1), 'SAME', dimension_numbers=_DN
      )

    self.assertNotIn('pfa_jax_dnnl', jax.jit(fn).lower(xs, ks).as_text())
    y, vjp_fn = jax.vjp(jax.jit(fn), xs, ks)
    got = (y, *vjp_fn(jax.device_put(ct, y.sharding)))
    want = _reference_vjp(x, k, ct, (1, 1), 'SAME')
    for a, b in zip(got, want):
      self.assertLess(_rel_err(a, b), _TOL)

  def test_tiny_model_trains_like_xla(self):
    class Tiny(nn.Module):
      conv_fn: object

      @nn.compact
      def __call__(self, x, train=False):
        c = dict(conv_general_dilated=self.conv_fn, use_bias=False)
        x = nn.Conv(8, (3, 3), **c)(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.relu(x)
        x = nn.Conv(8, (3, 3), strides=(2, 2), **c)(x)
        x = nn.relu(nn.Conv(6, (1, 1), **c)(x))
        return nn.Dense(3)(x.mean(axis=(1, 2)))

    batch = {
      'image': _normal((4, 9, 9, 3), 0),
      'label': np.array([0, 1, 2, 1], np.int32),
      'mask': np.ones(4, np.float32),
    }
    init = Tiny(lax.conv_general_dilated).init(
      jax.random.PRNGKey(0), batch['image']
    )
    params = {
      impl: _train(Tiny(conv.get_conv(impl)), init, batch, 3)
      for impl in ('xla', 'onednn')
    }
    flat = [jax.tree.leaves(params[i]) for i in ('xla', 'onednn')]
    for a, b in zip(*flat):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)

  def test_materialize_is_the_identity_and_a_fusion_boundary(self):
    x = _normal((3, 4, 4, 5), 0)
    g = _normal((3, 4, 4, 5), 1)
    np.testing.assert_array_equal(jax.jit(onednn.materialize)(x), x)
    _, vjp_fn = jax.vjp(onednn.materialize, jnp.asarray(x))
    np.testing.assert_array_equal(vjp_fn(jnp.asarray(g))[0], g)
    np.testing.assert_array_equal(
      jax.vmap(onednn.materialize)(jnp.stack([x, g])), np.stack([x, g])
    )

    def chain(x, barrier):
      # A residual stream: without a boundary XLA fuses it all into one
      # loop, re-computing every level from the input.
      y = x
      for i in range(6):
        y = barrier(jnp.maximum(y * (1.0 + i) - 0.5, 0.0) + x)
      return y.sum()

    def fusions(barrier):
      hlo = (
        jax.jit(jax.grad(functools.partial(chain, barrier=barrier)))
        .lower(x)
        .compile()
        .as_text()
      )
      return hlo.count(' fusion('), hlo.count('pfa_jax_materialize')

    self.assertEqual(fusions(lambda y: y)[1], 0)
    plain, bounded = fusions(lambda y: y)[0], fusions(onednn.materialize)
    self.assertGreaterEqual(bounded[1], 6)  # forward and backward
    self.assertGreater(bounded[0], plain)
    grad = jax.grad(functools.partial(chain, barrier=onednn.materialize))
    want = jax.grad(functools.partial(chain, barrier=lambda y: y))
    np.testing.assert_allclose(grad(x), want(x), rtol=1e-6)

  def test_resnet_trains_like_xla(self):
    from pfa_jax import models  # noqa: PLC0415

    batch = {
      'image': _normal((4, 8, 8, 3), 0),
      'label': np.array([0, 1, 2, 1], np.int32),
      'mask': np.ones(4, np.float32),
    }
    m = models.get_model('resnet8', num_classes=3, conv_impl='xla')
    init = models.init(m, jax.random.key(0), (8, 8, 3))

    def has_boundaries(hlo):
      # Every BN (+ residual) + ReLU is one fused kernel per direction, so
      # the blocks' outputs are fusion boundaries without materialize.
      # resnet8: stem + 3 blocks x 2 convs; 3 of the 7 BNs take a residual.
      self.assertEqual(hlo.count('custom_call @pfa_jax_bn_train_fwd('), 4)
      self.assertEqual(hlo.count('custom_call @pfa_jax_bn_train_fwd_res('), 3)
      self.assertEqual(hlo.count('custom_call @pfa_jax_bn_train_bwd('), 4)
      self.assertEqual(hlo.count('custom_call @pfa_jax_bn_train_bwd_res('), 3)
      self.assertNotIn('pfa_jax_materialize', hlo)

    out = {
      impl: _train(
        models.get_model('resnet8', num_classes=3, conv_impl=impl),
        init,
        batch,
        2,
        hlo_check=has_boundaries if impl == 'onednn' else None,
      )
      for impl in ('xla', 'onednn')
    }
    for a, b in zip(*(jax.tree.leaves(out[i]) for i in ('xla', 'onednn'))):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


class OnednnFallbackTest(parameterized.TestCase):
  """Paths that never reach the kernel (run with or without it)."""

  def test_get_conv(self):
    self.assertIs(conv.get_conv('onednn'), onednn.conv_general_dilated)
    self.assertIn('onednn', conv.CONV_IMPLS)
    # Several devices (conftest's 8): the Auto-mesh partitioner would
    # replicate the custom call, so 'auto' keeps pfa_jax.conv.
    self.assertGreater(jax.device_count(), 1)
    self.assertIs(conv.get_conv('auto'), conv.conv_general_dilated)

  def test_ineligible_calls_match_lax(self):
    x, k = _normal((2, 7, 7, 4), 0), _normal((3, 3, 4, 6), 1)
    cases = {
      'float64': dict(dtype=np.float64),
      'dilation': dict(rhs_dilation=(2, 2)),
      'nchw': dict(dimension_numbers=('NCHW', 'OIHW', 'NCHW'), nchw=True),
    }
    for name, kw in cases.items():
      with self.subTest(name), jax.enable_x64():
        dtype = kw.pop('dtype', np.float32)
        nchw = kw.pop('nchw', False)
        xi = x.transpose(0, 3, 1, 2) if nchw else x
        ki = k.transpose(3, 2, 0, 1) if nchw else k
        xi, ki = xi.astype(dtype), ki.astype(dtype)
        kw.setdefault('dimension_numbers', _DN)
        got = onednn.conv_general_dilated(xi, ki, (1, 1), 'SAME', **kw)
        want = lax.conv_general_dilated(xi, ki, (1, 1), 'SAME', **kw)
        self.assertEqual(got.dtype, want.dtype)
        self.assertLess(_rel_err(got, want), _TOL)

  def test_a_failed_build_is_tried_once(self):
    # In a fresh process whose compiler fails: available() is False twice,
    # with the build's error as the reason, and the build ran once.
    code = (
      'from unittest import mock\n'
      'from pfa_jax import native, onednn\n'
      "err = OSError('no compiler here')\n"
      "with mock.patch.object(native, 'build', side_effect=err) as b:\n"
      '  a = [onednn.available(), onednn.available()]\n'
      "  print(a, b.call_count, onednn.status()['reason'])\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
      [sys.executable, '-c', code],
      capture_output=True,
      text=True,
      check=True,
      cwd=root,
      env={**os.environ, 'PFA_JAX_ONEDNN_ROOT': '/nonexistent'},
    )
    self.assertEqual(
      out.stdout.strip().splitlines()[-1], '[False, False] 1 no compiler here'
    )

  def test_status(self):
    status = onednn.status()
    self.assertIn('built', status)
    self.assertIsInstance(onednn.available(), bool)


if __name__ == '__main__':
  absltest.main()
