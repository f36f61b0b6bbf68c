"""The GPU device run (benchmarks/gpu/run.sh) at toy sizes on the CPU.

As on the GPU image, TensorFlow and TFDS cannot be imported by any Python
process the script starts (a ``sitecustomize`` on ``PYTHONPATH`` blocks
them, and torch, which CI's venv lacks): every step must still run and
leave its file in ``$OUT``.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
from absl.testing import absltest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# TensorFlow and TFDS as on the image; torch as in CI's venv (the smoke run
# times JAX alone, and must not need it).
_ABSENT = ('tensorflow', 'tensorflow_datasets', 'torch')


def _run_script(d, absent=_ABSENT):
  """Runs run.sh at toy sizes in ``d``; ``absent`` modules cannot import."""
  out, arrays, site = (os.path.join(d, k) for k in ('out', 'arr', 'site'))
  for path in (out, arrays, site):
    os.makedirs(path)
  with open(os.path.join(site, 'sitecustomize.py'), 'w') as f:
    f.write(
      f'import sys\nfor name in {absent!r}:\n  sys.modules[name] = None\n'
    )
  rng = np.random.default_rng(0)
  img = lambda n: rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)  # noqa: E731
  np.savez(
    os.path.join(arrays, 'cifar10_arrays.npz'),
    x_train=img(128),
    y_train=rng.integers(0, 10, 128),
    x_test=img(32),
    y_test=rng.integers(0, 10, 32),
  )
  env = dict(
    os.environ,
    OUT=out,
    PFA_JAX_DEVICE='cpu',
    PFA_JAX_GPU_SMOKE='1',
    PFA_JAX_GPU_ARRAYS=arrays,
    PFA_JAX_GPU_RUN_DIR=os.path.join(d, 'run'),
    PYTHONPATH=site,
    PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ['PATH'],
  )
  p = subprocess.run(
    ['bash', 'benchmarks/gpu/run.sh'],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  return p.returncode, p.stdout + p.stderr, out


class GpuScriptTest(absltest.TestCase):
  def test_smoke_run_writes_every_result_without_tensorflow(self):
    if shutil.which('timeout') is None:
      self.skipTest('needs coreutils timeout')
    with tempfile.TemporaryDirectory() as d:
      rc, log, out = _run_script(d)
      self.assertEqual(rc, 0, log[-3000:])
      for step in ('throughput', 'stats', 'speedup', 'train'):
        self.assertIn(f'== {step}: exit 0', log, log[-3000:])
      files = set(os.listdir(out))
      with open(os.path.join(out, 'train_result.json')) as f:
        result = json.load(f)
      with open(os.path.join(out, 'train_throughput.json')) as f:
        throughput = json.load(f)
    self.assertContainsSubset(
      {
        'gpu_run.log',
        'train_throughput.json',
        'pfa_core.json',
        'pruned_speedup.json',
        'train_config.json',
        'train_metrics.jsonl',
        'train_result.json',
      },
      files,
    )
    self.assertEqual(result['num_eval_examples'], 32)
    self.assertEqual(throughput['settings']['device'], 'cpu')

  def test_preflight_names_a_missing_package_before_any_part_runs(self):
    with tempfile.TemporaryDirectory() as d:
      rc, log, out = _run_script(d, absent=(*_ABSENT, 'ml_collections'))
      files = os.listdir(out)
    self.assertNotEqual(rc, 0)
    self.assertIn("missing Python packages: ['ml_collections']", log)
    self.assertNotIn('== throughput', log)
    self.assertEqual(files, ['gpu_run.log'])


if __name__ == '__main__':
  absltest.main()
