"""The benchmarks still run against the library (tiny sizes, no timing claims).

A benchmark that calls a renamed library function fails only when someone
runs it; these smoke runs catch that in CI. They assert what the benchmark
measured is well-formed, never how fast it was.
"""

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

from benchmarks import analyze_cold
from benchmarks import bn_widths
from benchmarks import common
from benchmarks import conv_levers
from benchmarks import eig_levers
from benchmarks import layer_profile
from benchmarks import narrow_ab
from benchmarks import native_levers
from benchmarks import pfa_core
from benchmarks import process_spread
from benchmarks import pruned_speedup
from benchmarks import stats_overhead
from pfa_jax import models
from pfa_jax import onednn
from pfa_jax import slicing
from pfa_jax import spectra


def _native_net(name):
  """A model on the oneDNN path (conv_impl 'auto' is XLA's under the tests'
  8 host devices) and its initial variables."""
  model = models.get_model(name, num_classes=10).clone(conv_impl='onednn')
  return model, models.init(model, jax.random.key(0), pruned_speedup.SHAPE)


def _infer(m, v, x):
  """The library's inference forward (BN folded), as pruned_speedup runs it."""
  return models.for_inference(m).apply(v, x, train=False)


class BenchmarksTest(absltest.TestCase):
  def _narrow_rows(self, table, layers, batch=2):
    """A narrow-kernel conv_levers table, one rep (batch 2 unless told;
    skips where the kernel is not built)."""
    if not onednn.narrow_available():
      self.skipTest(f'narrow kernel not built: {onednn.status()["reason"]}')
    return self._written_rows(table, reps=1, batch=batch, layers=layers)

  def _written_rows(self, table, **kw):
    """Runs a conv_levers table into a temporary JSON; its rows are returned."""
    with tempfile.TemporaryDirectory() as d:
      path = os.path.join(d, 'rows.json')
      rows = table(**kw, path=path)
      with open(path) as f:
        self.assertEqual(json.load(f)['rows'], rows)
    return rows

  def test_stats_overhead_runs(self):
    r = stats_overhead.bench('simple_cnn', batch=4, repeats=1)
    self.assertEqual(r['layers'], 8)  # SimpleCNN's eight prunable convs
    self.assertGreater(r['forward_img_s'], 0)
    self.assertTrue(math.isfinite(r['overhead']))
    self.assertTrue(math.isfinite(r['two_programs_overhead']))
    self.assertEqual(set(r['samples_per_call'].values()), {4})
    for k in stats_overhead.kernels(batch=2, repeats=1):
      self.assertGreater(k['plain_ms'], 0)
      self.assertTrue(math.isfinite(k['ratio']))

  def test_bn_widths_runs_both_walks(self):
    if not onednn.available():
      self.skipTest(f'native kernel not built: {onednn.status()["reason"]}')
    rows = bn_widths.run_kernels((8, 16), rounds=1, reps=1, n=2, hw=4)
    self.assertEqual(len(rows), 8)  # 2 widths x 4 passes
    for r in rows:
      self.assertGreater(r['on_s'], 0)
      self.assertGreater(r['off_s'], 0)
      self.assertTrue(math.isfinite(r['per_byte_vs_16']))

  def test_conv_pack_table_runs(self):
    if not onednn.available():
      self.skipTest(f'native kernel not built: {onednn.status()["reason"]}')
    rows = self._written_rows(
      conv_levers.pack_table, reps=1, batch=2, couts=(2, 16), stages=((16, 8),)
    )
    # 2 channels on 16 columns: P = 2 (8 packed columns); 16: not packed.
    self.assertEqual([r['pack_factor_at_max8'] for r in rows], [2, 1])
    for r in rows:
      self.assertGreater(r['packed_fwd_ms'], 0)
      self.assertTrue(math.isfinite(r['fwd_bwd_speedup']))

  def test_conv_narrow_kernel_table_runs(self):
    rows = self._narrow_rows(
      conv_levers.narrow_kernel_table, ((16, 16, 2, 1), (8, 64, 4, 1))
    )
    # 16 columns of 2 channels pack (P = 2); an 8x8 map does not.
    self.assertEqual(
      [set(r) & {'pack2_ms'} for r in rows], [{'pack2_ms'}, set()]
    )
    self.assertEqual([r['chosen'] for r in rows], ['narrow', 'narrow'])
    for r in rows:
      self.assertGreater(r['narrow_ms'], 0)
      self.assertGreater(r['plain_ms'], 0)

  def test_conv_narrow_wide_table_runs(self):
    rows = self._narrow_rows(
      conv_levers.narrow_wide_table, ((16, 16, 12), (16, 16, 16))
    )
    # 12 outputs on 16 columns: the row path; 16: oneDNN's own width.
    self.assertEqual([r['chosen'] for r in rows], ['narrow', 'onednn'])
    for r in rows:
      for k in ('onednn_fwd', 'narrow_fwd', 'onednn_fold', 'narrow_fold'):
        self.assertGreater(r[f'{k}_ms'], 0)

  def test_results_record_address_randomization(self):
    # setarch -R runs a process without ASLR; the record must say so.
    setarch = shutil.which('setarch')
    if setarch is None or common.address_randomization() is None:
      self.skipTest('no setarch or no /proc/sys/kernel/randomize_va_space')
    code = (
      'from benchmarks import common; print(common.address_randomization())'
    )
    runs = {}
    for name, prefix in (('plain', []), ('setarch', [setarch, 'x86_64', '-R'])):
      out = subprocess.run(
        [*prefix, sys.executable, '-c', code],
        capture_output=True,
        text=True,
        check=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
      )
      runs[name] = out.stdout.split()[-1]
    with open('/proc/sys/kernel/randomize_va_space') as f:
      system_on = int(f.read()) > 0
    self.assertEqual(runs, {'plain': str(system_on), 'setarch': 'False'})
    self.assertIn('address_randomization', common.machine())

  def test_conv_tail_split_table_runs(self):
    rows = self._narrow_rows(
      conv_levers.tail_split_table, ((16, 8, 20), (16, 8, 25))
    )
    # Tail 4: split by default; tail 9 is past TAIL_MAX (timed split anyway).
    self.assertEqual([r['chosen'] for r in rows], ['split', 'whole'])
    self.assertEqual([r['tail'] for r in rows], [4, 9])
    for r in rows:
      self.assertGreater(r['split_ms'], 0)
      self.assertGreater(r['whole_ms'], 0)

  def test_conv_inline_table_runs(self):
    # Batch 1: 8 -> 6 at 16 x 16 is the narrow kernel's, 0.22 MFLOP
    # (inline by default); 64 -> 64 at 16 x 16 is oneDNN's, 18.9 MFLOP
    # (the team thread's).
    rows = self._narrow_rows(
      conv_levers.inline_table, ((16, 8, 6), (16, 64, 64)), batch=1
    )
    self.assertEqual([r['kernel'] for r in rows], ['narrow', 'dnnl'])
    self.assertEqual([r['mflop'] for r in rows], [0.221, 18.874])
    self.assertEqual([r['default'] for r in rows], ['inline', 'team'])
    for r in rows:
      self.assertGreater(r['inline_us'], 0)
      self.assertAlmostEqual(
        r['inline_over_team'], r['inline_us'] / r['team_us'], places=2
      )

  def test_pruned_speedup_tail_ab_compiles_the_split_off(self):
    # A SimpleCNN whose second conv (32 x 32, stride 1) keeps 20 filters
    # (16 + a tail of 4): the default trace splits it, the --tail-ab one
    # does not, and both compute the same network; a network with no tail
    # is left out.
    if not onednn.narrow_available():
      self.skipTest(f'narrow kernel not built: {onednn.status()["reason"]}')
    model, variables = _native_net('simple_cnn')
    pm, pv = slicing.prune(model, variables, {'conv2': np.arange(20)})
    variants = {'odd': (pm, pv, 0), 'full': (model, variables, 0)}
    fwd = jax.jit(_infer, static_argnums=0)
    x = np.random.default_rng(0).standard_normal((2, *pruned_speedup.SHAPE))
    x = x.astype(np.float32)
    off = pruned_speedup._tail_off(_infer, fwd, variants, x)
    self.assertEqual(set(off), {'odd'})
    self.assertIn('split_conv', fwd.lower(pm, pv, x).as_text())
    self.assertNotIn('split_conv', off['odd'].as_text())
    np.testing.assert_allclose(
      off['odd'](pv, x), fwd(pm, pv, x), rtol=1e-4, atol=1e-4
    )

  def test_pruned_speedup_setting_abs_compile_each_setting_off(self):
    # At batch 1 a ResNet-8's stem and stride-2 convolutions are small (<=
    # 2.4 MFLOP): the default trace runs them on the calling thread
    # (threads = 1), the --inline-ab one hands every call to the team
    # thread, for the full network too, and both compute the same outputs.
    if not onednn.available():
      self.skipTest(f'oneDNN kernel not built: {onednn.status()["reason"]}')
    model, variables = _native_net('resnet8')
    pm, pv = slicing.prune(
      model, variables, {'stage1_block0/conv1': np.arange(8)}
    )
    fwd = jax.jit(_infer, static_argnums=0)
    x = np.random.default_rng(0).standard_normal((1, *pruned_speedup.SHAPE))
    x = x.astype(np.float32)
    nets = {'full': (model, variables), 'pruned': (pm, pv)}
    off = pruned_speedup._setting_off(_infer, nets, x, 'inline')
    self.assertEqual(set(off), {'full', 'pruned'})
    for k, (m, v) in nets.items():
      self.assertIn('threads = 1 : i64', fwd.lower(m, v, x).as_text())
      self.assertNotIn('threads = 1 : i64', off[k].as_text())
      np.testing.assert_allclose(
        off[k](v, x), fwd(m, v, x), rtol=1e-4, atol=1e-4
      )
    # --plain-ab: the last stage's 8 x 8 maps are 64 pixels at batch 1, so
    # its oneDNN calls read plain weights by default, reordered ones off.
    plain_off = pruned_speedup._setting_off(_infer, nets, x, 'plain')
    for k, (m, v) in nets.items():
      self.assertIn('plain_weights = true', fwd.lower(m, v, x).as_text())
      self.assertNotIn('plain_weights = true', plain_off[k].as_text())
      np.testing.assert_allclose(
        plain_off[k](v, x), fwd(m, v, x), rtol=1e-4, atol=1e-4
      )
    # Through bench_case: every row keeps its model's name, and each setting
    # adds one row per variant.
    rows = pruned_speedup.bench_case(
      'resnet8',
      'inner',
      (2,),
      (1,),
      1,
      multiples=(1,),
      rounds=1,
      settings_ab=('inline', 'plain'),
    )
    self.assertEqual({r['model'] for r in rows}, {'resnet8'})
    self.assertEqual(
      sorted(r['variant'] for r in rows),
      ['2x_round1', '2x_round1_inlineoff', '2x_round1_plainoff'],
    )
    self.assertEqual(pruned_speedup._base('4x_round8_inlineoff'), '4x_round8')
    self.assertEqual(pruned_speedup._base('4x_round8_plainoff'), '4x_round8')
    self.assertEqual(pruned_speedup._base('4x_round8_tailoff'), '4x_round8')
    self.assertEqual(pruned_speedup._base('2x_round1'), '2x_round1')

  def test_process_spread_times_fresh_processes_with_and_without_aslr(self):
    # Two child processes of a tiny case; with setarch the second runs
    # without address-space randomization, and says so from inside.
    aslr_ab = bool(shutil.which('setarch')) and (
      common.address_randomization() is not None
    )
    args = ['--processes', '2', '--model', 'resnet8', '--factor', '2']
    args += ['--round-to', '1', '--batch', '1', '--rounds', '1']
    args += ['--name', 'spread'] + ([] if aslr_ab else ['--no-aslr-ab'])
    with (
      tempfile.TemporaryDirectory() as d,
      mock.patch.object(common, 'RESULTS', d),
      mock.patch.dict(os.environ, {'PFA_JAX_BENCH_RESULTS': d}),
    ):
      res = process_spread.main(args)
      with open(os.path.join(d, 'spread.json')) as f:
        self.assertEqual(json.load(f)['records'], res['records'])
    self.assertLen(res['records'], 2)
    for r in res['records']:
      self.assertGreater(r['pruned_ms'], 0)
      self.assertGreater(r['flops_reduction'], 1.5)  # a 2x target
      self.assertAlmostEqual(
        r['efficiency'], r['full_ms'] / r['pruned_ms'] / r['flops_reduction']
      )
    effs = [r['efficiency'] for r in res['records']]
    self.assertEqual(
      res['summary']['all']['efficiency'],
      {'min': min(effs), 'median': float(np.median(effs)), 'max': max(effs)},
    )
    if aslr_ab:
      self.assertEqual(
        [r['address_randomization'] for r in res['records']],
        [common.address_randomization(), False],
      )
      self.assertIn('aslr_off', res['summary'])
    with self.assertRaises(SystemExit), mock.patch('sys.stderr'):
      process_spread.main(['--processes', '0'])

  def test_analyze_cold_runs_both_jobs_and_variants(self):
    with (
      tempfile.TemporaryDirectory() as d,
      mock.patch.object(common, 'RESULTS', d),
      mock.patch.object(analyze_cold, 'VGG_M', 64),
      mock.patch.object(analyze_cold, 'WIDE', (96, 48)),
    ):
      analyze_cold.main(['--repeats', '1', '--name', 'cold_run'])
      with open(os.path.join(d, 'cold_run.json')) as f:
        res = json.load(f)['results']
    for job in ('vgg16', 'wide4096'):
      r = res[job]
      self.assertLen(r['process_s'], 1)
      self.assertLen(r['process_no_huge_pages_s'], 1)
      self.assertFalse(r['inside'][0]['jax_imported'])
      self.assertGreater(r['no_huge_pages_to_default'], 0)

  def test_layer_profile_parses_hlo_custom_calls(self):
    line = (
      '  %ffi_call.7 = f32[2,8,8,5]{3,2,1,0} custom-call(%a, %b, %c), '
      'custom_call_target="pfa_jax_narrow_conv_fwd_bias", '
      'operand_layout_constraints={f32[2,16,16,3]{3,2,1,0}, '
      'f32[3,3,3,5]{3,2,1,0}, f32[5]{0}}, api_version=API_VERSION_TYPED_FFI'
    )
    calls = layer_profile.custom_calls(f'HloModule m\n{line}\n')
    self.assertEqual(
      calls,
      {
        'ffi_call.7': {
          'target': 'narrow_conv_fwd_bias',
          'out': (2, 8, 8, 5),
          'operands': [(2, 16, 16, 3), (3, 3, 3, 5), (5,)],
        }
      },
    )
    self.assertEqual(
      layer_profile.conv_flops(calls['ffi_call.7']), 2 * 2 * 64 * 5 * 9 * 3
    )
    # The narrow kernel has no output-channel lanes; oneDNN's are 16 wide.
    self.assertIsNone(layer_profile.lane_flops(calls['ffi_call.7']))
    dnnl = {**calls['ffi_call.7'], 'target': 'dnnl_conv_fwd_bias'}
    self.assertEqual(layer_profile.lane_flops(dnnl), 2 * 2 * 64 * 16 * 9 * 3)
    wide = {**dnnl, 'out': (2, 8, 8, 33)}
    self.assertEqual(layer_profile.lane_flops(wide), 2 * 2 * 64 * 48 * 9 * 3)

  def test_layer_profile_counts_resnet56_convs(self):
    if not onednn.available():
      self.skipTest('the oneDNN kernel is not built here')
    # 'auto' picks XLA's convolutions on the tests' 8 host devices.
    model = models.get_model('resnet56', num_classes=10, conv_impl='onednn')
    variables = models.init(model, jax.random.key(0), (32, 32, 3))
    r = layer_profile.profile(model, variables, batch=2, repeats=1)
    # Hand count of ResNet-56's 3x3 convolutions (MACs per image).
    macs = 9 * (
      32 * 32 * (3 * 16 + 18 * 16 * 16)
      + 16 * 16 * (16 * 32 + 17 * 32 * 32)
      + 8 * 8 * (32 * 64 + 17 * 64 * 64)
    )
    self.assertEqual(r['conv_flops'], 2 * 2 * macs)
    self.assertEqual(sum(c['calls'] for c in r['classes']), 55)
    self.assertEqual(sum(c['flops'] for c in r['classes']), r['conv_flops'])
    self.assertGreater(r['custom_call_ms'], 0)
    self.assertTrue(all(c['ms'] > 0 for c in r['classes']))
    # Every width here is a multiple of 16: the lane rate is the plain one.
    for c in r['classes']:
      self.assertAlmostEqual(c['lane_gflops_per_s'], c['gflops_per_s'])

  def test_median_of_rounds_by_hand(self):
    def row(side, flops, lane_flops, ms):
      return {
        'kernel': 'dnnl_conv_fwd_bias',
        'input_hwc': [8, 8, 4],
        'weight': [3, 3, 4, 5],
        'output_hwc': [side, side, 5],
        'calls': 1,
        'flops': flops,
        'lane_flops': lane_flops,
        'ms': ms,
      }

    def res(untraced, other, ms_a, ms_b):
      # Same input and weight, stride 1 and 2: two classes.
      rows = [row(8, 1000, 3200, ms_a), row(4, 500, None, ms_b)]
      return {'untraced_ms': untraced, 'other_ms': other, 'classes': rows}

    got = layer_profile.median_of(
      [
        res(10.0, 1.0, 2.0, 9.0),
        res(30.0, 3.0, 4.0, 1.0),
        res(20.0, 2.0, 8.0, 5.0),
      ]
    )
    self.assertEqual(got['untraced_ms'], 20.0)
    self.assertEqual(got['other_ms'], 2.0)
    self.assertEqual(got['conv_flops'], 1500)
    self.assertEqual(got['custom_call_ms'], 4.0 + 5.0)
    self.assertAlmostEqual(got['gflops_per_s'], 1500 / 20.0 / 1e6)
    a, b = got['classes']  # slowest first
    self.assertEqual((a['output_hwc'], a['ms']), ([4, 4, 5], 5.0))
    self.assertEqual((b['output_hwc'], b['ms']), ([8, 8, 5], 4.0))
    self.assertAlmostEqual(b['gflops_per_s'], 1000 / 4.0 / 1e6)
    self.assertAlmostEqual(b['lane_gflops_per_s'], 3200 / 4.0 / 1e6)
    self.assertIsNone(a['lane_gflops_per_s'])

  def test_stage_mix_efficiency_by_hand(self):
    def row(hw_in, hw_out, c, flops, ms):
      return {
        'input_hwc': [hw_in, hw_in, c],
        'output_hwc': [hw_out, hw_out, 8],
        'weight': [3, 3, c, 8],
        'flops': flops,
        'ms': ms,
      }

    # Full: the 32x32 stage at 100 FLOP/ms-units, 8x8 at 200, stem at 10.
    full = {  # traced: 60 ms of convolutions, 50 of the rest
      'untraced_ms': 99.0,
      'conv_flops': 2000 + 6000 + 100,
      'classes': [
        row(32, 32, 16, 2000, 20.0),
        row(8, 8, 64, 4000, 20.0),
        row(8, 8, 64, 2000, 10.0),
        row(32, 32, 3, 100, 10.0),
      ],
      'other_ms': 50.0,
    }
    # Pruned keeps half of 32x32, an eighth of 8x8, the whole stem.
    pruned = {
      'conv_flops': 1000 + 750 + 100,
      'classes': [
        row(32, 32, 6, 1000, 99.0),
        row(8, 8, 12, 750, 99.0),
        row(32, 32, 3, 100, 99.0),
      ],
      'other_ms': 5.0,
    }
    ms = 5.0 + 1000 / 100 + 750 / 200 + 100 / 10
    want = 110.0 / ms / (8100 / 1850)
    got = layer_profile.stage_mix_efficiency(full, pruned)
    self.assertAlmostEqual(got, want)
    pruned['classes'].append(row(16, 16, 6, 10, 1.0))
    with self.assertRaisesRegex(ValueError, 'no full-network convolution'):
      layer_profile.stage_mix_efficiency(full, pruned)

  def test_layer_profile_refuses_a_program_without_native_convs(self):
    variants = {'4x_round1': ('pruned', 'pruned_vars', 1)}
    with (
      mock.patch.object(
        pruned_speedup,
        'pruned_variants',
        return_value=('full', 'vars', [], 4, variants, []),
      ),
      mock.patch.object(
        layer_profile,
        'profiler',
        return_value=lambda: {
          'untraced_ms': 1.0,
          'other_ms': 1.0,
          'classes': [],
        },
      ),
      self.assertRaisesRegex(SystemExit, 'No native convolution'),
    ):
      layer_profile.main([])
    with self.assertRaises(SystemExit), mock.patch('sys.stderr'):
      layer_profile.main(['--mode', 'stream'])  # not a residual mode
    with self.assertRaises(SystemExit), mock.patch('sys.stderr'):
      layer_profile.main(['--name', '../elsewhere'])

  def test_narrow_ab_times_two_builds_in_one_process(self):
    if not onednn.narrow_available():
      self.skipTest(f'narrow kernel not built: {onednn.status()["reason"]}')
    # The kernel against itself: same outputs to the bit, every shape at
    # both input states; a row path with and without a residual.
    with open(os.path.join(narrow_ab.ROOT, narrow_ab.KERNEL)) as f:
      text = f.read()
    shapes = ((16, 4, 3, 0), (32, 16, 13, 1))
    rows = narrow_ab.run(
      text, text, batch=2, rounds=1, buffers=(1, 2), shapes=shapes
    )
    got = [
      (r['hw'], r['cin'], r['cout'], r['residual'], r['buffers']) for r in rows
    ]
    want = [(*s[:3], bool(s[3]), nb) for nb in (1, 2) for s in shapes]
    self.assertEqual(got, want)
    for r in rows:
      self.assertEqual(r['max_abs_diff'], 0.0)
      self.assertGreater(r['a_s'], 0)
      self.assertAlmostEqual(r['b_over_a'], r['b_s'] / r['a_s'])
    # A revision that does not exist is a clear error, before any build.
    with self.assertRaisesRegex(ValueError, 'no pfa_jax/native/narrow_conv.cc'):
      narrow_ab.source_at('no-such-revision')
    for bad in (
      ['--buffers', '1,x'],
      ['--buffers', '0'],
      ['--rounds', '0'],
      ['--shapes', '32:16:8'],  # three fields
      ['--shapes', '32:16:17:0'],  # more outputs than the kernel takes
      ['--shapes', '32:16:8:2'],  # residual is 0 or 1
    ):
      with self.assertRaises(SystemExit), mock.patch('sys.stderr'):
        narrow_ab.main(['--base', 'HEAD', *bad])

  def test_narrow_ab_parses_shapes(self):
    self.assertEqual(
      narrow_ab.parse_shapes('32:16:8:1,16:8:8:0'),
      ((32, 16, 8, 1), (16, 8, 8, 0)),
    )
    with self.assertRaisesRegex(ValueError, "'32:x:8:1'"):
      narrow_ab.parse_shapes('32:x:8:1')
    with self.assertRaisesRegex(ValueError, "'0:16:8:0'"):
      narrow_ab.parse_shapes('0:16:8:0')

  def test_eig_levers_two_stages_match_eigvalsh(self):
    # run() itself raises if the directly called LAPACK stages disagree with
    # spectra.eigvalsh; float32's error is measured, not assumed.
    r = eig_levers.run(m=200, c=48, repeats=1, kds=(8, 16))
    self.assertEqual(set(r['ratio_to_eigvalsh']), {'kd8', 'kd16', 'float32'})
    self.assertGreater(r['float32_max_rel_error'], 0)
    self.assertLess(r['float32_max_rel_error'], 1e-4)

  def test_eig_levers_lda_lever_times_padded_rows(self):
    # run() raises if either layout's eigenvalues leave eigvalsh's.
    with mock.patch.multiple(spectra, TWO_STAGE_MIN_C=16, PAD_MULTIPLE=16):
      r = eig_levers.run(m=200, c=48, repeats=2, only=('lda',))
    self.assertEqual(r['lda'], 48 + spectra.LDA_PAD)
    self.assertEqual(
      set(r['median_s']),
      {'covariance', 'order', 'eigvalsh', 'unpadded', 'padded'},
    )
    self.assertLen(r['padded_to_unpadded']['pairs'], 2)
    self.assertIsNone(r['float32_max_rel_error'])
    for bad in (['--only', 'lda,fast'], ['--name', '/tmp/eig']):
      with self.assertRaises(SystemExit), mock.patch('sys.stderr'):
        eig_levers.main(bad)
    with self.assertRaises(SystemExit), mock.patch('sys.stderr'):
      analyze_cold.main(['--name', 'sub/dir'])

  def test_native_levers_ops_run(self):
    rows = native_levers.ops(repeats=1)
    self.assertEqual(len(rows), 4)  # BN (+residual), BN, pool, dropout
    for r in rows:
      self.assertGreater(r['native_ms'], 0)
      self.assertTrue(math.isfinite(r['speedup']))

  def test_pruned_speedup_rounding_keeps_the_budget(self):
    full = {'a': 64, 'b': 20}
    self.assertEqual(
      pruned_speedup.round_up({'a': 17, 'b': 19}, full, 16), {'a': 32, 'b': 20}
    )
    lam = {k: np.geomspace(1.0, 1e-3, c) for k, c in full.items()}
    lam = {k: v / v.sum() for k, v in lam.items()}

    def cost(w):  # hand-countable: a chain of two layers
      return 3 * w['a'] + w['a'] * w['b']

    budget = cost(full) / 4
    for mult in (1, 8, 16):
      w = pruned_speedup.widths_for_target(lam, cost, budget, full, mult)
      self.assertLessEqual(cost(w), budget)
      for k, v in w.items():
        self.assertTrue(v == full[k] or v % mult == 0, (mult, w))

  def test_pruned_speedup_bytes_count_shrinks_with_width(self):
    import jax  # noqa: PLC0415

    wide = models.get_model('simple_cnn', num_classes=10)
    narrow = models.get_model(
      'simple_cnn', num_classes=10, widths=(8,) * len(wide.widths)
    )
    b = [
      pruned_speedup.bytes_accessed(
        m, models.init(m, jax.random.key(0), pruned_speedup.SHAPE), 2
      )
      for m in (wide, narrow)
    ]
    self.assertGreater(b[0], b[1])
    self.assertGreater(b[1], 2 * 32 * 32 * 3 * 4)  # at least reads its input

  def test_pruned_variants_are_on_the_device_like_the_full_network(self):
    # The slicer returns NumPy leaves; timed as they came, every call of a
    # pruned network re-sent them while the full network's stayed put.
    import jax  # noqa: PLC0415

    _, variables, _, _, variants, _ = pruned_speedup.pruned_variants(
      'resnet8', 'inner', (2,), (1,)
    )
    self.assertEqual(set(variants), {'2x_round1'})
    for tree in (variables, variants['2x_round1'][1]):
      leaves = jax.tree.leaves(tree)
      self.assertTrue(leaves)
      for leaf in leaves:
        self.assertIsInstance(leaf, jax.Array)

  def test_pruned_speedup_gpu_path_skips_the_cpu_levers(self):
    # jax.default_backend() 'gpu' is what every GPU branch reads; on these
    # host devices it runs XLA's convolutions, as a GPU does.
    tiny = ['--cases', 'resnet8:inner', '--batches', '2', '--factors', '2']
    tiny += ['--round-to', '1', '--rounds', '1', '--repeats', '1']
    with (
      tempfile.TemporaryDirectory() as d,
      mock.patch.object(common, 'RESULTS', d),
      mock.patch.object(jax, 'default_backend', return_value='gpu'),
      mock.patch.object(onednn, 'available', side_effect=AssertionError),
      mock.patch.object(jax, 'device_put', wraps=jax.device_put) as put,
      mock.patch.dict(os.environ, {'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}),
    ):
      pruned_speedup.main(tiny)
      self.assertEqual(os.listdir(d), ['pruned_speedup_gpu.json'])
      with open(os.path.join(d, 'pruned_speedup_gpu.json')) as f:
        res = json.load(f)
    self.assertEqual(res['conv_path'], 'xla')
    self.assertFalse(res['narrow_kernel'])
    # The run's settings that move CPU timings are recorded (no tail split
    # without the narrow kernel).
    self.assertEqual(res['tail_max'], 0)
    self.assertEqual(res['inline_mflops'], 0.0)  # no native calls off the CPU
    self.assertEqual(res['plain_pixels'], 0)
    self.assertEqual(res['glibc_tunables'], 'glibc.malloc.hugetlb=1')
    self.assertIn('address_randomization', res['machine'])
    self.assertTrue(res['inputs_on_device'])
    self.assertTrue(res['target'].startswith('batch 128, GPU:'))
    # The timed batch went to the device before the clock started.
    self.assertTrue(
      any(
        isinstance(c.args[0], np.ndarray) and c.args[0].shape == (2, 32, 32, 3)
        for c in put.call_args_list
      )
    )
    (r,) = res['results']
    self.assertEqual((r['variant'], r['batch']), ('2x_round1', 2))
    self.assertGreater(r['flops_reduction'], 1.5)
    self.assertAlmostEqual(r['efficiency'], r['speedup'] / r['flops_reduction'])
    self.assertTrue(math.isfinite(r['bytes_reduction_xla_count']))
    with self.assertRaises(SystemExit), mock.patch('sys.stderr'):
      pruned_speedup.main(['--name', '../elsewhere'])

  def test_pfa_core_device_reference_sums_the_gram(self):
    rng = np.random.default_rng(0)
    xs = [
      50 + rng.standard_normal((64, 24), dtype=np.float32) for _ in range(3)
    ]
    want = sum(x.astype(np.float64).T @ x for x in xs)
    for kind in ('matmul', 'dot_general'):
      add = pfa_core.device_add(kind)
      acc = jnp.zeros((24, 24), jnp.float32)
      # HIGHEST: float32 on a GPU too (its default would be TF32).
      jaxpr = str(jax.make_jaxpr(add)(acc, xs[0]))
      self.assertIn('precision=(Precision.HIGHEST, Precision.HIGHEST)', jaxpr)
      for x in xs:
        old, acc = acc, add(acc, jnp.asarray(x))
        self.assertTrue(old.is_deleted(), kind)  # donated
      np.testing.assert_allclose(np.asarray(acc), want, rtol=1e-5, err_msg=kind)

  def test_pfa_core_device_reference_times_the_same_batches(self):
    with mock.patch.object(pfa_core, '_ssyrk_acc', side_effect=AssertionError):
      r = pfa_core.bench_throughput(
        16, num_batches=3, reps=2, batch=32, reference='device'
      )
      s = pfa_core.bench_at_scale(16, 100, batch=32, reference='device')
    med = r['median_s']
    self.assertEqual(
      set(med),
      {'update', 'update_donated', 'device_matmul', 'device_dot_general'},
    )
    self.assertEqual(r['samples_both_sides'], 96)
    for times in r['times_s'].values():
      self.assertLen(times, 2)
      self.assertTrue(all(t > 0 for t in times))
    self.assertAlmostEqual(
      r['update_donated_over_reference'],
      med['update_donated'] / med['device_matmul'],
    )
    self.assertEqual(r['target_update_donated_over_reference'], 1.25)
    self.assertEqual((s['samples'], s['reference']), (128, 'device'))
    self.assertAlmostEqual(
      s['ours_over_reference'], s['ours_s'] / s['reference_s']
    )
    self.assertNotIn('ssyrk_s', s)
    with self.assertRaisesRegex(ValueError, 'reference must be one of'):
      pfa_core.bench_throughput(16, 1, 1, batch=8, reference='blas')

  def test_pfa_core_names_its_file_and_reference_by_backend(self):
    with (
      tempfile.TemporaryDirectory() as d,
      mock.patch.object(common, 'RESULTS', d),
      mock.patch.object(pfa_core, 'THROUGHPUT', ((16, 2),)),
    ):
      with mock.patch.object(jax, 'default_backend', return_value='gpu'):
        pfa_core.main(['--only', 'throughput'])
      pfa_core.main(['--only', 'throughput'])
      pfa_core.main(['--only', 'throughput', '--name', 'mine'])
      stems = ('mine', 'pfa_core', 'pfa_core_gpu')
      self.assertEqual(sorted(os.listdir(d)), [f'{s}.json' for s in stems])
      res = {}
      for stem in stems:
        with open(os.path.join(d, f'{stem}.json')) as f:
          res[stem] = json.load(f)['3_throughput']['16']
    self.assertEqual(res['pfa_core_gpu']['reference'], 'device')
    for stem in ('mine', 'pfa_core'):  # the CPU's SSYRK, as always
      self.assertNotIn('reference', res[stem])
      self.assertIn('ratio_update_donated', res[stem])
    with self.assertRaises(SystemExit), mock.patch('sys.stderr'):
      pfa_core.main(['--name', 'a/b'])

  def test_cpu_model_names_the_family_and_model(self):
    cpuinfo = (
      'processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\n'
      'model\t\t: 17\nmodel name\t: AMD EPYC\n\nprocessor\t: 1\n'
      'model name\t: other\n'
    )
    with mock.patch('builtins.open', mock.mock_open(read_data=cpuinfo)):
      self.assertEqual(common.cpu_model(), 'AMD EPYC (family 25, model 17)')
    with (
      mock.patch('builtins.open', side_effect=OSError('no /proc')),
      mock.patch.object(common.platform, 'processor', return_value='x86_64'),
    ):
      self.assertEqual(common.cpu_model(), 'x86_64')

  def test_loaded_is_decided_by_the_load_before_the_run(self):
    saved = common.START_LOAD
    try:
      for start, want in (((0.3, 2.0, 2.0), False), ((1.6, 0.5, 0.2), True)):
        common.START_LOAD = start
        self.assertEqual(common.loaded(), want, start)
    finally:
      common.START_LOAD = saved


class ConvNarrowTest(absltest.TestCase):
  def test_narrow_table_rows_and_ratios(self):
    d = tempfile.mkdtemp()
    with (
      mock.patch.object(conv_levers, '_RESULTS', d),
      mock.patch.object(conv_levers, 'NARROW', ((4, 8, (2, 8)),)),
    ):
      conv_levers.narrow_table(reps=1, batch=2)
    with open(os.path.join(d, 'conv_narrow.json')) as f:
      rows = json.load(f)['rows']
    # 8 -> 2, 2 -> 8 and the full 8 -> 8 layer, each timed once.
    self.assertEqual(
      [(r['cin'], r['cout']) for r in rows], [(8, 2), (2, 8), (8, 8)]
    )
    self.assertEqual([r['flops_of_full'] for r in rows], [0.25, 0.25, 1.0])
    self.assertEqual(rows[-1]['onednn_time_of_full'], 1.0)
    for r in rows:  # GFLOP/s is the hand count over the measured time
      flop = 2 * 2 * 4 * 4 * 9 * r['cin'] * r['cout']
      ms = r['onednn_ms']  # rounded to 1 us, GFLOP/s to 0.1
      want = flop / ms / 1e6
      self.assertLessEqual(
        abs(r['onednn_gflops'] - want), 0.05 + want * 5e-4 / ms
      )
