"""benchmarks/train_throughput.py: options, the GPU guard, tiny CPU runs.

The GPU path itself needs a GPU; here: its options, that it stops early
without one, and the device-parametrised PyTorch code on the CPU. No timing
claims.
"""

import io
import json
import os
import tempfile
from unittest import mock

import jax
from absl.testing import absltest

from benchmarks import common
from benchmarks import train_throughput as tt
from pfa_jax import models

# The tiny runs: one step, one repetition, no warm-up rounds, no gap.
_TINY = (
  '--models=simple_cnn',
  '--impls=xla',
  '--batch=4',
  '--steps=1',
  '--repeats=1',
  '--warmup-rounds=0',
  '--gap=0',
)


def _jax_num_params(name):
  model = models.get_model(name, num_classes=10)
  shapes = jax.eval_shape(
    lambda: models.init(model, jax.random.PRNGKey(0), (32, 32, 3))
  )
  return sum(x.size for x in jax.tree.leaves(shapes['params']))


class TrainThroughputTest(absltest.TestCase):
  def _torch(self):
    try:
      import torch  # noqa: PLC0415
    except ImportError:
      self.skipTest('torch not importable (make bench-deps)')
    return torch

  def _run(self, *argv):
    """`main` with ``argv`` into a temporary JSON; the JSON is returned."""
    with tempfile.TemporaryDirectory() as d:
      path = os.path.join(d, 'out', 'tt.json')
      report = tt.main([*argv, f'--out={path}'])
      with open(path) as f:
        written = json.load(f)
    self.assertEqual(written, json.loads(json.dumps(report)))
    return written

  def test_parse_args_cpu_defaults_unchanged(self):
    args = tt.parse_args([])
    self.assertEqual(args.device, 'cpu')
    self.assertEqual(args.precision, 'highest')
    self.assertEqual(args.impls, 'xla,fast,onednn')
    self.assertEqual((args.batch, args.steps, args.repeats), (128, 2, 3))
    self.assertEqual(args.gap, 3.0)
    self.assertEqual(
      args.out, os.path.join(common.RESULTS, 'train_throughput.json')
    )

  def test_parse_args_gpu(self):
    args = tt.parse_args(['--device', 'gpu', '--precision', 'tf32'])
    self.assertEqual((args.device, args.precision), ('gpu', 'tf32'))
    self.assertEqual(args.impls, 'xla')
    self.assertEqual((args.batch, args.steps, args.repeats), (128, 50, 5))
    self.assertEqual(args.gap, 0.0)
    self.assertEqual(
      args.out, os.path.join(common.RESULTS, 'train_throughput_gpu.json')
    )
    # Options given win over the device's defaults.
    args = tt.parse_args(['--device=gpu', '--steps=7', '--gap=1', '--out='])
    self.assertEqual((args.steps, args.gap, args.out), (7, 1.0, ''))

  def test_parse_args_rejects(self):
    for argv in (
      ['--device', 'tpu'],
      ['--precision', 'bf16'],
      ['--device', 'gpu', '--impls', 'xla,onednn'],
      ['--device', 'gpu', '--impls', 'fast'],
    ):
      with (
        self.subTest(argv=argv),
        mock.patch('sys.stderr', io.StringIO()) as err,
        self.assertRaises(SystemExit),
      ):
        tt.parse_args(argv)
      self.assertIn('error', err.getvalue())

  def test_gpu_without_a_gpu_stops_before_any_work(self):
    backend = jax.default_backend()
    if backend == 'gpu':
      self.skipTest('a GPU is present')
    reached = AssertionError('went past the backend check')
    with (
      mock.patch.object(tt, '_TorchProcess', side_effect=reached),
      mock.patch.object(tt.models, 'init', side_effect=reached),
      mock.patch.object(tt, 'make_jax_runner', side_effect=reached),
      self.assertRaises(SystemExit) as cm,
    ):
      tt.main(['--device', 'gpu', '--models', 'simple_cnn', '--out', ''])
    message = str(cm.exception)
    self.assertIn('--device gpu', message)
    self.assertIn(repr(backend), message)

  def test_torch_runner_matches_jax_models(self):
    self._torch()
    for name in tt.MODEL_NAMES:
      with self.subTest(name):
        runner = tt.make_torch_runner(name, batch=2, device='cpu')
        self.assertEqual(runner['num_params'], _jax_num_params(name))
        self.assertGreater(runner['train'](1), 0)
        self.assertGreater(runner['eval'](1), 0)
    self.assertGreater(tt.torch_matmul_gflops(64, reps=1, device='cpu'), 0)

  def test_set_torch_precision_reads_the_switches_back(self):
    torch = self._torch()
    old = (
      torch.backends.cuda.matmul.allow_tf32,
      torch.backends.cudnn.allow_tf32,
    )

    def restore():
      torch.backends.cuda.matmul.allow_tf32 = old[0]
      torch.backends.cudnn.allow_tf32 = old[1]

    self.addCleanup(restore)
    self.assertEqual(tt.set_torch_precision(torch, 'tf32'), 'tf32')
    self.assertTrue(torch.backends.cudnn.allow_tf32)
    self.assertEqual(tt.set_torch_precision(torch, 'highest'), 'highest')
    self.assertFalse(torch.backends.cuda.matmul.allow_tf32)
    self.assertFalse(torch.backends.cudnn.allow_tf32)

  def test_check_torch_setup(self):
    ok = {'device': 'cuda', 'dtype': 'float32', 'precision': 'tf32'}
    tt._check_torch_setup(ok, 'gpu', 'tf32')
    for bad in (
      {**ok, 'precision': 'mixed'},
      {**ok, 'device': 'cpu'},
      {**ok, 'dtype': 'float64'},
    ):
      with self.subTest(bad=bad), self.assertRaises(RuntimeError):
        tt._check_torch_setup(bad, 'gpu', 'tf32')

  def test_cpu_run_writes_json(self):
    r = self._run(*_TINY, '--no-torch', '--precision=tf32')
    s = r['settings']
    self.assertEqual((s['device'], s['precision']), ('cpu', 'highest'))
    self.assertIn('--precision tf32 ignored on the CPU.', r['notes'])
    self.assertIsNone(s['jax_default_matmul_precision'])
    self.assertEqual(s['dtype']['jax'], 'float32')
    self.assertIn('XLA:CPU', s['conv_path']['jax_xla'])
    self.assertIsNone(s['torch'])
    self.assertEqual(r['machine']['device'], 'cpu')
    self.assertEqual(r['peak_reference_matmul_n'], 2048)
    self.assertGreater(r['peak_reference_gflops']['jax_matmul_gflops'], 0)
    self.assertEqual(
      r['num_params']['simple_cnn']['jax'], _jax_num_params('simple_cnn')
    )
    for mode in ('train', 'eval'):
      cell = r['results_img_s']['simple_cnn'][mode]
      self.assertEqual(list(cell), ['jax_xla'])
      self.assertEqual(cell['jax_xla']['images_timed'], 4)
      self.assertGreater(cell['jax_xla']['median_img_s'], 0)

  def test_cpu_run_with_torch_process(self):
    self._torch()
    r = self._run(*_TINY, '--modes=train')
    s = r['settings']
    self.assertEqual(s['torch']['device'], 'cpu')
    self.assertEqual(s['torch']['precision'], 'highest')
    self.assertEqual(s['dtype'], {'jax': 'float32', 'torch': 'float32'})
    self.assertEqual(s['torch']['threads'], 2)
    count = r['num_params']['simple_cnn']
    self.assertEqual(count['jax'], count['torch'])
    cell = r['results_img_s']['simple_cnn']['train']
    self.assertEqual(set(cell), {'jax_xla', 'torch'})
    self.assertEqual(cell['jax_xla']['images_timed'], 4)
    self.assertEqual(cell['torch']['images_timed'], 4)
    ratios = r['ratios_jax_over_torch']['simple_cnn']['train']
    self.assertGreater(ratios['jax_xla/torch'], 0)
    self.assertGreater(r['peak_reference_gflops']['torch_matmul_gflops'], 0)


if __name__ == '__main__':
  absltest.main()
