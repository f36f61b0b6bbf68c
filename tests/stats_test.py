"""Tests for pfa_jax.stats against float64 NumPy references."""

import ctypes
import functools
import os
import shutil
import tempfile
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from pfa_jax import gram
from pfa_jax import native
from pfa_jax import stats


def _rel(a, b):
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def _data(seed, n, c, offset=0.0):
  rng = np.random.default_rng(seed)
  mix = rng.standard_normal((c, c)) / np.sqrt(c)
  x = offset + rng.standard_normal((n, c)) @ mix
  return x.astype(np.float32)


class StatsTest(parameterized.TestCase):
  @parameterized.parameters((1, 7), (5, 2), (64, 100), (300, 2500))
  def test_covariance_matches_np_cov(self, c, n):
    x = _data(0, n, c, offset=3.0)
    state = stats.update(stats.init(c), x)
    ref = np.cov(x.astype(np.float64), rowvar=False).reshape(c, c)
    got = stats.covariance(state)
    self.assertEqual(got.dtype, np.float64)
    self.assertLess(_rel(got, ref), 1e-6)
    np.testing.assert_allclose(got, got.T)
    np.testing.assert_allclose(stats.mean(state), x.mean(0), rtol=1e-5)
    self.assertEqual(stats.count(state), n)

  @parameterized.product(
    shape=((1, 1), (7, 0), (300, 33), (9, 64)), fold=(0, 1)
  )
  def test_blas_and_xla_packed_gram_paths_match_numpy(self, shape, fold):
    c, n = shape
    rng = np.random.default_rng(c)
    g = rng.standard_normal((c, c)).astype(np.float32)
    d = rng.standard_normal((c,)).astype(np.float32)
    y = rng.standard_normal((n, c)).astype(np.float32)
    g64 = g.astype(np.float64)
    lo = np.triu(g64 + y.T.astype(np.float64) @ y)
    hi = np.tril(g64, -1)
    if fold:  # current group moves into the strict lower part + diagonal
      want_g, want_d = hi + np.triu(lo, 1).T, d + np.diag(lo)
    else:
      want_g, want_d = hi + lo, d
    fold = jnp.asarray(bool(fold))
    g_copy = g.copy()
    got = [gram._gram_add_xla(g, d, y, fold, jax.lax.Precision.HIGHEST)]
    got.append(jax.jit(gram._gram_add_blas)(g, d, y, fold))  # native FFI
    with mock.patch.object(gram.native, 'syrk', return_value=None):
      got.append(jax.jit(gram._gram_add_blas)(g, d, y, fold))  # callback
    for got_g, got_d in got:
      np.testing.assert_allclose(got_g, want_g, rtol=1e-5, atol=1e-4)
      np.testing.assert_allclose(got_d, want_d, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(g, g_copy)  # no in-place writes to inputs

  def test_blas_threads_for_narrow_layers_is_one_thread(self):
    import threadpoolctl  # noqa: PLC0415

    from pfa_jax import gram  # noqa: PLC0415

    def blas_threads():
      return [
        i['num_threads']
        for i in threadpoolctl.threadpool_info()
        if i['user_api'] == 'blas'
      ]

    before = blas_threads()
    self.assertNotEmpty(before)  # SciPy's OpenBLAS is loaded by pfa_jax.gram
    with gram.blas_threads_for([64, 512, gram.SERIAL_BLAS_BELOW - 1]):
      self.assertEqual(set(blas_threads()), {1})
    self.assertEqual(blas_threads(), before)
    with gram.blas_threads_for([64, gram.SERIAL_BLAS_BELOW]):
      self.assertEqual(blas_threads(), before)

  def test_native_build_key_follows_sources_and_cpu(self):
    # Several sources make one library; with -march=native the CPU is part
    # of the cache key, so a home directory shared by two machines never
    # loads a library built for the other one.
    if not shutil.which(os.environ.get('CXX') or 'g++'):
      self.skipTest('no C++ compiler')
    tmp = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, tmp, True)
    a, b = os.path.join(tmp, 'a.cc'), os.path.join(tmp, 'b.cc')
    with open(a, 'w') as f:
      f.write('extern "C" int pfa_a() { return 1; }\n')
    with open(b, 'w') as f:
      f.write('extern "C" int pfa_b() { return 2; }\n')
    with mock.patch.dict(os.environ, {'PFA_JAX_NATIVE_DIR': tmp}):
      both = native.build((a, b), 'libt')
      lib = ctypes.CDLL(both)
      self.assertEqual((lib.pfa_a(), lib.pfa_b()), (1, 2))
      self.assertNotEqual(native.build(a, 'libt'), both)
      with mock.patch.object(native, '_cpu_fingerprint', return_value=b'cpu1'):
        one = native.build(a, 'libt', ('-march=native',))
      with mock.patch.object(native, '_cpu_fingerprint', return_value=b'cpu2'):
        two = native.build(a, 'libt', ('-march=native',))
    self.assertNotEqual(one, two)

  def test_a_failed_native_build_runs_the_compiler_once(self):
    # The compiler is a script that counts its runs and fails: the second
    # build of the same source raises the first error without running it.
    # Another source (a new cache key) is compiled afresh.
    tmp = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, tmp, True)
    runs, cxx = os.path.join(tmp, 'runs'), os.path.join(tmp, 'cxx')
    with open(cxx, 'w') as f:
      f.write(f'#!/bin/sh\necho run >> {runs}\necho "bad line 7" >&2\nexit 1\n')
    os.chmod(cxx, 0o755)
    srcs = [os.path.join(tmp, f'{n}.cc') for n in 'ab']
    for i, path in enumerate(srcs):
      with open(path, 'w') as f:
        f.write(f'int f{i}(;\n')
    env = {'PFA_JAX_NATIVE_DIR': tmp, 'CXX': cxx}
    with mock.patch.dict(os.environ, env), mock.patch.dict(native._failed):
      errors = []
      for path in (srcs[0], srcs[0], srcs[1]):
        with self.assertRaises(OSError) as ctx:
          native.build(path, 'libfail')
        errors.append(str(ctx.exception))
    with open(runs) as f:
      self.assertLen(f.read().split(), 2)  # a, then b; not a again
    self.assertIn('bad line 7', errors[0])
    self.assertEqual(errors[1], errors[0])
    self.assertIn(srcs[1], errors[2])

  def test_native_kernel_builds_here(self):
    # The machine has g++; the fallback is tested above. Skip only if the
    # reason is a missing compiler, so a broken build still fails.
    if native.syrk(np.float32) is None:
      reason = native.status()['reason']
      if 'no C++ compiler' in reason or 'PFA_JAX_NATIVE=0' in reason:
        self.skipTest(reason)
      self.fail(f'native build failed: {reason}')

  def test_two_level_fold_over_many_batches_matches_np_cov(self):
    c = 5
    x = _data(11, 40 * (stats.FOLD_BATCHES + 3), c, offset=4.0)
    state = stats.init(c)
    for chunk in np.split(x, stats.FOLD_BATCHES + 3):
      state = stats.update(state, chunk)
    self.assertEqual(int(state.batches), 3)  # one fold happened
    ref = np.cov(x.astype(np.float64), rowvar=False)
    self.assertLess(_rel(stats.covariance(state), ref), 1e-6)

  @parameterized.parameters(1e-30, 1e-21, 1e-3, 1e20, 1e30, 3e37)
  def test_scaled_responses_give_scaled_statistics(self, scale):
    x = _data(12, 200, 6, offset=2.0)
    xs = (x.astype(np.float64) * scale).astype(np.float32)
    self.assertTrue(np.all(np.isfinite(xs)) and np.all(xs != 0))
    state = stats.update(stats.init(6), xs[:90])
    state = stats.update(state, xs[90:])
    got = stats.covariance(state)  # no overflow / underflow / "non-finite"
    ref = np.cov(xs.astype(np.float64), rowvar=False)
    self.assertLess(_rel(got, ref), 1e-6)
    np.testing.assert_allclose(stats.mean(state), xs.mean(0, np.float64), 1e-5)

  def test_all_zero_first_batch_then_data(self):
    x = _data(13, 60, 3, offset=1.0) * np.float32(1e-25)
    x[:20] = 0.0
    state = stats.update(stats.init(3), x[:20])
    self.assertEqual(float(state.scale), 0.0)
    state = stats.update(state, x[20:])
    ref = np.cov(x.astype(np.float64), rowvar=False)
    self.assertLess(_rel(stats.covariance(state), ref), 1e-5)

  @parameterized.parameters(0, 1, 2)
  def test_merge_of_random_chunks_equals_one_pass(self, seed):
    rng = np.random.default_rng(seed)
    c = 12
    x = _data(seed, 300, c, offset=50.0)
    cuts = np.sort(rng.choice(np.arange(1, 300), size=8, replace=False))
    cuts = np.concatenate([[0, 0, 1], cuts, [299, 300, 300]])  # empty, size 1
    rows = np.arange(300)
    chunk_states = []
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
      # Each chunk is a masked view of x (one compile); a == b is empty.
      chunk_states.append(
        stats.update(stats.init(c), x, (rows >= a) & (rows < b))
      )
    one = stats.update(stats.init(c), x)
    # Merge in a random tree shape: associativity.
    while len(chunk_states) > 1:
      i = int(rng.integers(len(chunk_states) - 1))
      merged = stats.merge(chunk_states[i], chunk_states[i + 1])
      chunk_states[i : i + 2] = [merged]
    got = chunk_states[0]
    self.assertEqual(stats.count(got), 300)
    ref = np.cov(x.astype(np.float64), rowvar=False)
    self.assertLess(_rel(stats.covariance(got), ref), 1e-6)
    self.assertLess(_rel(stats.covariance(got), stats.covariance(one)), 1e-6)
    np.testing.assert_allclose(stats.mean(got), stats.mean(one), rtol=1e-6)

  def test_donated_streaming_step(self):
    # compress / methods.pfa jit the update with donate_argnums=0: init()
    # must not alias one buffer between fields.
    x = _data(14, 64, 3, offset=5.0)
    step = jax.jit(stats.update.__wrapped__, donate_argnums=0)
    state = step(step(stats.init(3), x[:32]), x[32:])
    ref = np.cov(x.astype(np.float64), rowvar=False)
    self.assertLess(_rel(stats.covariance(state), ref), 1e-6)

  def test_vmap_over_states_equals_separate_updates(self):
    xs = np.stack([_data(20 + i, 40, 4, offset=3.0 * i) for i in range(3)])
    init = jax.tree.map(lambda *v: jnp.stack(v), *[stats.init(4)] * 3)
    got = jax.vmap(stats.update)(jax.vmap(stats.update)(init, xs), xs[:, ::-1])
    for i in range(3):
      one = jax.tree.map(lambda v, i=i: v[i], got)
      ref = np.cov(
        np.concatenate([xs[i], xs[i]]).astype(np.float64), rowvar=False
      )
      self.assertLess(_rel(stats.covariance(one), ref), 1e-6)

  def test_empty_state_is_identity(self):
    x = _data(3, 20, 4, offset=7.0)
    s = stats.update(stats.init(4), x)
    for got in (
      stats.merge(stats.init(4), s),
      stats.merge(s, stats.init(4)),
    ):
      for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(s), strict=True):
        np.testing.assert_array_equal(a, b)

  def test_mask_equals_dropping_rows(self):
    x = _data(4, 50, 6, offset=-20.0)
    mask = np.random.default_rng(4).random(50) < 0.6
    for m in (mask, mask.astype(np.float32)):
      masked = stats.update(stats.init(6), x, m)
      dropped = stats.update(stats.init(6), x[mask])
      self.assertEqual(stats.count(masked), mask.sum())
      np.testing.assert_allclose(
        stats.covariance(masked),
        stats.covariance(dropped),
        rtol=1e-5,
        atol=1e-6,
      )
    # Masked rows may hold garbage (but finite) values.
    x_bad = x.copy()
    x_bad[~mask] = 1e6
    np.testing.assert_allclose(
      stats.covariance(stats.update(stats.init(6), x_bad, mask)),
      stats.covariance(dropped),
      rtol=1e-5,
      atol=1e-6,
    )

  def test_fewer_than_two_samples_raises(self):
    s = stats.update(stats.init(3), np.ones((1, 3), np.float32))
    with self.assertRaisesRegex(ValueError, r"'conv1'.*at least 2 samples"):
      stats.covariance(s, name='conv1')
    with self.assertRaisesRegex(ValueError, r'at least 2 samples, got 0'):
      stats.covariance(stats.init(3))

  def test_non_finite_raises_naming_layer(self):
    x = _data(5, 10, 3)
    x[4, 1] = np.nan
    states = stats.update_tree({'fc': stats.init(3)}, {'fc': x})
    with self.assertRaisesRegex(ValueError, r"'fc'.*NaN or Inf"):
      stats.check_finite_tree(states)
    with self.assertRaisesRegex(ValueError, r"'fc'.*NaN or Inf"):
      stats.covariance_tree(states)

  @parameterized.parameters((np.zeros((4,)),), (np.zeros((2, 3, 4)),))
  def test_bad_shape_raises(self, x):
    with self.assertRaisesRegex(ValueError, r"'conv2'.*\[N, 4\]"):
      stats.update_tree({'conv2': stats.init(4)}, {'conv2': x})

  def test_tree_key_mismatch_raises(self):
    states = stats.init_tree({'a': 2, 'b': 3})
    with self.assertRaisesRegex(ValueError, r"missing \['b'\].*extra \['c'\]"):
      stats.update_tree(states, {'a': np.ones((2, 2)), 'c': np.ones((2, 3))})

  def test_tree_api(self):
    xs = {'a': _data(6, 30, 2), 'b/conv': _data(7, 30, 5)}
    s1 = stats.update_tree(stats.init_tree({'a': 2, 'b/conv': 5}), xs)
    half = {k: v[:10] for k, v in xs.items()}
    rest = {k: v[10:] for k, v in xs.items()}
    s2 = stats.merge_tree(
      stats.update_tree(stats.init_tree({'a': 2, 'b/conv': 5}), half),
      stats.update_tree(stats.init_tree({'a': 2, 'b/conv': 5}), rest),
    )
    c1, c2 = stats.covariance_tree(s1), stats.covariance_tree(s2)
    for k, x in xs.items():
      ref = np.cov(x.astype(np.float64), rowvar=False)
      self.assertLess(_rel(c1[k], ref), 1e-6)
      self.assertLess(_rel(c2[k], ref), 1e-6)


class ShardingTest(parameterized.TestCase):
  def setUp(self):
    super().setUp()
    if jax.device_count() < 8:
      self.skipTest('needs 8 (fake) devices')
    self.mesh = Mesh(np.array(jax.devices()[:8]), ('data',))
    self.x = _data(8, 8 * 37, 10, offset=30.0)
    self.mask = np.random.default_rng(8).random(8 * 37) < 0.8
    self.ref = stats.update(stats.init(10), self.x[self.mask])

  def test_jit_with_named_sharding_matches_one_device(self):
    sh = NamedSharding(self.mesh, PartitionSpec('data'))
    x = jax.device_put(self.x, sh)
    mask = jax.device_put(self.mask, sh)
    state = jax.device_put(
      stats.init(10), NamedSharding(self.mesh, PartitionSpec())
    )
    self.assertLen(x.sharding.device_set, 8)
    got = jax.jit(stats.update)(state, x, mask)
    np.testing.assert_allclose(
      stats.covariance(got), stats.covariance(self.ref), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(stats.mean(got), stats.mean(self.ref), 1e-6)

  def test_shard_map_psum_matches_one_device(self):
    p = PartitionSpec

    @jax.jit
    @functools.partial(
      jax.shard_map,
      mesh=self.mesh,
      in_specs=(p(), p('data'), p('data')),
      out_specs=p(),
    )
    def step(state, x, mask):
      return stats.update(state, x, mask, axis_name='data')

    got = step(stats.init(10), jnp.asarray(self.x), jnp.asarray(self.mask))
    self.assertEqual(stats.count(got), self.mask.sum())
    np.testing.assert_allclose(
      stats.covariance(got), stats.covariance(self.ref), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(stats.mean(got), stats.mean(self.ref), 1e-6)


class Float32AccuracyTest(absltest.TestCase):
  def test_float32_streaming_with_large_mean_matches_float64(self):
    c, batch, num_batches = 16, 2048, 600  # 1.2M samples, mean/std ~ 100
    key = jax.random.PRNGKey(0)
    mix = jax.random.normal(jax.random.PRNGKey(1), (c, c)) / np.sqrt(c)

    @jax.jit
    def step(state, i):
      z = jax.random.normal(jax.random.fold_in(key, i), (batch, c))
      x = 100.0 + z @ mix
      return stats.update(state, x), x

    state = stats.init(c)
    # Independent reference: exact float64 sums of (x - 100), on the host.
    s1 = np.zeros(c)
    s2 = np.zeros((c, c))
    for i in range(num_batches):
      state, x = step(state, i)
      xd = np.asarray(x, np.float64) - 100.0
      s1 += xd.sum(0)
      s2 += xd.T @ xd
    m = batch * num_batches
    d = s1 / m
    ref = (s2 - m * np.outer(d, d)) / (m - 1)
    self.assertEqual(stats.count(state), m)
    self.assertLess(_rel(stats.covariance(state), ref), 1e-6)
    np.testing.assert_allclose(stats.mean(state), 100.0 + d, rtol=1e-6)


if __name__ == '__main__':
  absltest.main()
