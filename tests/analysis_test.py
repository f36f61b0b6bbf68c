"""Tests for pfa_jax.analysis (the one-call API) and its CLI."""

import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
from unittest import mock

import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

from pfa_jax import analysis

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _responses(seed=0, m=64):
  rng = np.random.default_rng(seed)
  low = rng.standard_normal((m, 2)) @ rng.standard_normal((2, 6))
  conv = rng.standard_normal((m, 3, 4, 5)).astype(np.float32)
  return {
    'conv1': conv,
    'fc': (low + 0.1 * rng.standard_normal((m, 6))).astype(np.float32),
  }


class AnalyzeTest(parameterized.TestCase):
  def test_structure_and_json_round_trip(self):
    out = analysis.analyze(_responses(), energies=(0.5, 0.9, 1.0))
    self.assertEqual(json.loads(json.dumps(out)), out)
    self.assertEqual(
      set(out['recipes']), {'energy_0.5', 'energy_0.9', 'energy_1', 'kl'}
    )
    self.assertLen(out['spectra']['conv1'], 5)
    self.assertAlmostEqual(sum(out['spectra']['fc']), 1.0)
    for recipe in out['recipes'].values():
      for layer, entry in recipe.items():
        c = len(out['spectra'][layer])
        self.assertBetween(entry['width'], 1, c)
        self.assertLen(entry['kept'], entry['width'])
        self.assertEqual(entry['kept'], sorted(set(entry['kept'])))
    # fc is rank 2 + small noise: 90% energy in at most 2 units.
    self.assertLessEqual(out['recipes']['energy_0.9']['fc']['width'], 2)
    # Selection is one nested order: smaller keep-sets are subsets.
    small = set(out['recipes']['energy_0.5']['fc']['kept'])
    self.assertLessEqual(small, set(out['recipes']['energy_1']['fc']['kept']))
    self.assertNotIn('kl', analysis.analyze(_responses(), kl=False)['recipes'])

  def test_4d_max_pooled_equals_pre_pooled(self):
    resp = _responses()
    pooled = dict(resp, conv1=resp['conv1'].max(axis=(1, 2)))
    self.assertEqual(analysis.analyze(resp), analysis.analyze(pooled))

  def test_dead_units_and_single_unit_layer_are_finite(self):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((20, 4)).astype(np.float32)
    x[:, 2] = 1.0
    out = analysis.analyze(
      {'a': x, 'one': x[:, :1], 'dead': np.zeros((20, 3), np.float32)}
    )
    self.assertEqual(out['recipes']['kl']['one'], {'width': 1, 'kept': [0]})
    self.assertEqual(out['recipes']['kl']['dead']['width'], 1)
    self.assertEqual(out['spectra']['dead'], [1.0, 0.0, 0.0])
    self.assertNotIn(2, out['recipes']['energy_0.99']['a']['kept'])
    self.assertTrue(np.all(np.isfinite(out['spectra']['a'])))

  @parameterized.named_parameters(
    ('nan', {'l1': np.array([[0.0, 1.0], [np.nan, 2.0]])}, r"'l1'.*NaN"),
    ('inf', {'l1': np.array([[0.0, 1.0], [np.inf, 2.0]])}, r"'l1'.*NaN or Inf"),
    ('1d', {'l2': np.zeros(5)}, r"'l2'.*1-D"),
    ('5d', {'l3': np.zeros((2, 1, 1, 1, 2))}, r"'l3'.*5-D"),
    ('one_sample', {'l4': np.zeros((1, 3))}, r"'l4'.*at least 2 samples"),
    ('empty', {}, r'non-empty'),
  )
  def test_bad_input_raises(self, responses, regex):
    with self.assertRaisesRegex(ValueError, regex):
      analysis.analyze(responses)

  def test_bad_tau_raises(self):
    with self.assertRaisesRegex(ValueError, r'tau.*1.5'):
      analysis.analyze(_responses(), energies=(0.9, 1.5))

  @parameterized.parameters(1e-30, 1e-21, 1e20, 1e30)
  def test_recipes_and_keep_sets_are_scale_invariant(self, scale):
    resp = _responses(seed=5, m=200)
    ref = analysis.analyze(resp)
    scaled = {
      k: (v.astype(np.float64) * scale).astype(np.float32)
      for k, v in resp.items()
    }
    got = analysis.analyze(scaled)
    self.assertEqual(got['recipes'], ref['recipes'])
    for k in ref['spectra']:
      np.testing.assert_allclose(
        got['spectra'][k], ref['spectra'][k], rtol=1e-4, atol=1e-7
      )

  def test_streamed_stats_recipes_are_scale_invariant(self):
    # The same invariance through the jitted streaming path (pfa_jax.stats),
    # which compress and methods.pfa use.
    from pfa_jax import recipes
    from pfa_jax import select
    from pfa_jax import spectra
    from pfa_jax import stats

    x = analysis.pool_responses(_responses(seed=6, m=300)['fc'])

    def run(scale):
      xs = (x.astype(np.float64) * scale).astype(np.float32)
      st = stats.init(x.shape[1])
      for chunk in np.array_split(xs, 3):
        st = stats.update(st, chunk)
      cov = stats.covariance(st)
      lam = spectra.spectrum(cov)
      order = select.removal_order(cov)
      widths = [recipes.energy(lam, t) for t in (0.5, 0.8, 0.9, 0.99)]
      widths.append(recipes.kl(lam))
      return widths, [select.keep_indices(order, w).tolist() for w in widths]

    ref = run(1.0)
    for scale in (1e-30, 1e-21, 1e20, 1e30):
      self.assertEqual(run(scale), ref, msg=f'scale {scale}')

  def test_both_solvers_match_a_float64_reference(self):
    """analyze keeps the units an independent float64 pipeline keeps, with
    the one-stage and the two-stage eigensolver."""
    from pfa_jax import recipes
    from pfa_jax import select
    from pfa_jax import spectra

    resp = _responses(seed=7, m=400)
    for n_min in (4, 10**9):  # two-stage solver, one-stage solver
      with mock.patch.object(spectra, 'TWO_STAGE_MIN_C', n_min):
        out = analysis.analyze(resp, energies=(0.7, 0.95))
      for layer, x in resp.items():
        pooled = np.asarray(x, np.float64).reshape(len(x), -1, x.shape[-1])
        cov = np.cov(pooled.max(axis=1), rowvar=False)
        lam = np.linalg.eigvalsh(cov)[::-1] / np.trace(cov)
        np.testing.assert_allclose(out['spectra'][layer], lam, atol=1e-6)
        order = select.removal_order(cov)
        for key, tau in (('energy_0.7', 0.7), ('energy_0.95', 0.95)):
          entry = out['recipes'][key][layer]
          self.assertEqual(entry['width'], recipes.energy(lam, tau))
          self.assertEqual(
            entry['kept'], select.keep_indices(order, entry['width']).tolist()
          )

  def test_host_covariance_matches_float64(self):
    rng = np.random.default_rng(7)
    x = 100.0 + rng.standard_normal((900, 300)) @ rng.random((300, 300))
    x = x.astype(np.float32)  # mean/std ~ 100 / 10; wider than one block
    ref = np.cov(x.astype(np.float64), rowvar=False)
    got = analysis.covariance(x)
    self.assertLess(np.linalg.norm(got - ref) / np.linalg.norm(ref), 1e-6)
    np.testing.assert_array_equal(got, got.T)
    np.testing.assert_array_equal(
      analysis.covariance(np.zeros((3, 2), np.float32)), np.zeros((2, 2))
    )

  def test_covariance_result_layout_and_out(self):
    """The result has LAPACK's padded rows, lands in the centred buffer's
    memory when that fits, and in ``out`` when given, with equal values."""
    from pfa_jax import spectra

    rng = np.random.default_rng(8)
    x = (3.0 + rng.standard_normal((60, 10))).astype(np.float32)
    ref = np.cov(x.astype(np.float64), rowvar=False)
    with mock.patch.multiple(spectra, TWO_STAGE_MIN_C=8, PAD_MULTIPLE=1):
      # lda(10) = 18
      roomy = x.copy()  # M = 60 >= 2 * 18: padded rows in its memory
      got = analysis.covariance(roomy, overwrite=True)
      self.assertEqual(got.strides, (144, 8))
      self.assertTrue(np.shares_memory(got, roomy))
      tight = x[:20].copy()  # M = 2C: room for unpadded rows only
      got_tight = analysis.covariance(tight, overwrite=True)
      self.assertEqual(got_tight.strides, (80, 8))
      self.assertTrue(np.shares_memory(got_tight, tight))
      small = x[:19].copy()  # M < 2C: a new, padded buffer
      got_small = analysis.covariance(small, overwrite=True)
      self.assertEqual(got_small.strides, (144, 8))
      self.assertFalse(np.shares_memory(got_small, small))
      out = spectra.square(10)
      got_out = analysis.covariance(x.copy(), out=out)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got_out, got)
    self.assertIs(got_out, out)
    np.testing.assert_allclose(
      got_tight, np.cov(x[:20].astype(np.float64), rowvar=False), atol=1e-5
    )
    zero = np.full((10, 10), np.nan)
    analysis.covariance(np.zeros((4, 10), np.float32), out=zero)
    np.testing.assert_array_equal(zero, 0.0)
    with self.assertRaisesRegex(ValueError, r'out must be .*\(10, 10\)'):
      analysis.covariance(x, out=np.zeros((10, 9)))

  def test_load_npz_matches_numpy_load(self):
    """Same arrays as numpy.load (plain, compressed, other dtypes and byte
    orders, arrays it leaves to NumPy), each response array followed in its
    buffer by room for the layer's padded float64 covariance."""
    from pfa_jax import spectra

    rng = np.random.default_rng(9)
    arrays = {
      'fc': rng.standard_normal((12, 6)).astype(np.float32),
      'conv': rng.standard_normal((5, 2, 3, 7)),  # float64, M < 2C
      'big_endian': rng.standard_normal((9, 4)).astype('>f4'),
      'vector': np.arange(5.0),  # another rank: NumPy reads it
      'fortran': np.asfortranarray(rng.standard_normal((8, 3))),
    }
    for save in (np.savez, np.savez_compressed):
      with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, 'r.npz')
        save(path, **arrays)
        with np.load(path) as ref:
          expected = {k: ref[k] for k in ref.files}
        with mock.patch.multiple(spectra, TWO_STAGE_MIN_C=4, PAD_MULTIPLE=1):
          got, outs = analysis.load_npz(path)
      self.assertEqual(list(got), list(expected))
      for k, v in expected.items():
        np.testing.assert_array_equal(got[k], v)
        self.assertEqual(got[k].dtype, v.dtype)
      self.assertEqual(set(outs), {'fc', 'conv', 'big_endian'})
      for k, out in outs.items():
        c = arrays[k].shape[-1]
        self.assertEqual((out.shape, out.dtype), ((c, c), np.float64))
        self.assertEqual(out.strides, (8 * (c + spectra.LDA_PAD), 8))
        self.assertTrue(np.shares_memory(out, got[k]))

  def test_load_npz_names_a_truncated_array(self):
    import zipfile

    data = np.ones((4, 3), np.float32)
    with tempfile.TemporaryDirectory() as d:
      whole = os.path.join(d, 'whole.npy')
      np.save(whole, data)
      with open(whole, 'rb') as f:
        raw = f.read()
      path = os.path.join(d, 'cut.npz')
      with zipfile.ZipFile(path, 'w') as z:
        z.writestr('fc.npy', raw[:-5])
      with self.assertRaisesRegex(ValueError, r"'fc' ends after 43 of 48"):
        analysis.load_npz(path)
      proc = subprocess.run(
        [sys.executable, '-m', 'pfa_jax.analyze', path],
        cwd=_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
      )
    self.assertEqual(proc.returncode, 2)
    self.assertIn('error: ', proc.stderr)
    self.assertIn("'fc' ends after", proc.stderr)
    self.assertNotIn('Traceback', proc.stderr)

  def test_load_npz_names_a_member_that_is_not_an_array(self):
    import zipfile

    with tempfile.TemporaryDirectory() as d:
      path = os.path.join(d, 'odd.npz')
      with zipfile.ZipFile(path, 'w') as z:
        z.writestr('notes.txt', b'not an array')
      with self.assertRaisesRegex(ValueError, r"odd.npz: array 'notes.txt'"):
        analysis.load_npz(path)

  def test_load_npz_names_a_missing_or_foreign_file(self):
    with tempfile.TemporaryDirectory() as d:
      npy = os.path.join(d, 'r.npy')
      np.save(npy, np.ones((3, 2), np.float32))
      for path in (os.path.join(d, 'missing.npz'), npy):
        with self.assertRaisesRegex(ValueError, f'cannot read .*{path}'):
          analysis.load_npz(path)

  def test_cli_path_matches_analyze_with_padded_rows(self):
    """The CLI's route (load_npz, results in the responses' buffers, padded
    rows, two-stage solver) gives what analyze gives on numpy.load."""
    from pfa_jax import spectra

    resp = _responses(seed=11, m=40)
    with tempfile.TemporaryDirectory() as d:
      path = os.path.join(d, 'r.npz')
      np.savez(path, **resp)
      with mock.patch.multiple(spectra, TWO_STAGE_MIN_C=4, PAD_MULTIPLE=1):
        expected = analysis.analyze(resp)
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
          self.assertEqual(analysis.main([path]), 0)
    got = json.loads(buf.getvalue())
    self.assertEqual(
      got['recipes'], json.loads(json.dumps(expected))['recipes']
    )
    for k, lam in expected['spectra'].items():
      np.testing.assert_allclose(got['spectra'][k], lam, rtol=1e-12, atol=1e-15)

  def test_cli_imports_neither_jax_nor_scipy(self):
    resp = _responses(m=16)
    with tempfile.TemporaryDirectory() as d:
      path = os.path.join(d, 'r.npz')
      np.savez(path, **resp)
      code = (
        'import sys, io, contextlib; from pfa_jax import analysis; '
        'f = io.StringIO(); '
        'contextlib.redirect_stdout(f).__enter__(); '
        f'analysis.main([{path!r}]); '
        'sys.stderr.write(str(sorted(m for m in sys.modules '
        "if m.split('.')[0] in ('jax', 'flax', 'jaxlib', 'scipy'))))"
      )
      proc = subprocess.run(
        [sys.executable, '-c', code],
        cwd=_ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
      )
    self.assertEqual(proc.stderr.strip().splitlines()[-1], '[]')

  def test_cli(self):
    resp = _responses(m=16)
    with tempfile.TemporaryDirectory() as d:
      path = os.path.join(d, 'r.npz')
      np.savez(path, **resp)
      proc = subprocess.run(
        [
          sys.executable,
          '-m',
          'pfa_jax.analyze',
          path,
          '--energies',
          '0.9,0.95',
          '--no-kl',
        ],
        cwd=_ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        env=dict(os.environ, JAX_PLATFORMS='cpu'),
      )
    out = json.loads(proc.stdout)
    self.assertEqual(set(out['recipes']), {'energy_0.9', 'energy_0.95'})
    expected = analysis.analyze(resp, energies=(0.9, 0.95), kl=False)
    self.assertEqual(out, json.loads(json.dumps(expected)))


if __name__ == '__main__':
  absltest.main()
