"""Committed sweep summaries are fresh and reproducible (slow; needs CIFAR).

Every ``experiments/results/*_sweep.json`` is a sweep's ``summary.json``
copied as it was committed. For each, this test

* checks that every row names its commit, config hash and command, and that
  the command's config still expands to a point with each row's hash (an
  edited config or default makes the summary stale, and this fails);
* re-runs one cheap point (a base-model seed) at its recorded config and
  checks that its accuracy lands within the summary's seed spread
  (mean ± max(3 std, 1 pp)).

It needs the prepared TFDS data (``make data``); without it, it skips.
"""

import glob
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile

import pytest
from absl.testing import absltest

from experiments import sweep

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SUMMARIES = sorted(
  glob.glob(os.path.join(_ROOT, 'experiments', 'results', '*_sweep.json'))
)


def _config_spec(command: str) -> str:
  args = shlex.split(command)
  return args[args.index('--config') + 1]


def _have_data(dataset: str) -> bool:
  d = os.environ.get('TFDS_DATA_DIR') or os.path.expanduser(
    '~/tensorflow_datasets'
  )
  return os.path.isdir(os.path.join(d, dataset))


_RERUN = """
import json, sys
from experiments import sweep
spec, want, root = sys.argv[1:]
module, arg = sweep.load_config_module(spec)
(point,) = [p for p in sweep.expand(module, arg) if p['hash'] == want]
print(json.dumps(sweep.run_point(point, root)))
"""


def _rerun(spec: str, want: str, root: str) -> dict:
  """Runs the point with hash ``want`` in a fresh process, on the real
  devices (the tests' 8 fake CPU devices would change the batch split)."""
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  out = subprocess.run(
    [sys.executable, '-c', _RERUN, os.path.join(_ROOT, spec), want, root],
    cwd=_ROOT,
    env=env,
    capture_output=True,
    text=True,
    check=True,
  ).stdout
  return json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow
class ProvenanceTest(absltest.TestCase):
  def test_summaries_exist(self):
    self.assertNotEmpty(_SUMMARIES)

  def test_rows_match_current_configs_and_rerun_within_spread(self):
    for path in _SUMMARIES:
      with self.subTest(summary=os.path.basename(path)):
        self._check(path)

  def _check(self, path):
    with open(path) as f:
      summary = json.load(f)
    rows = summary['rows']
    for r in rows:
      for key in ('commit', 'hash', 'command', 'config_seed'):
        self.assertIn(key, r)
    spec = _config_spec(rows[0]['command'])
    module, arg = sweep.load_config_module(os.path.join(_ROOT, spec))
    points = {p['hash']: p for p in sweep.expand(module, arg)}
    stale = sorted({r['hash'] for r in rows} - set(points))
    self.assertEmpty(stale, f'{path}: configs changed since the summary')
    base = [r for r in rows if r.get('part') == 'base']
    if len(base) < 2:
      self.skipTest(f'{path}: no seed spread to compare with')
    want = base[-1]['hash']
    if not _have_data(points[want]['config'].input.dataset):
      self.skipTest('TFDS data not prepared (make data)')
    with tempfile.TemporaryDirectory() as root:
      rec = _rerun(spec, want, root)
    self.assertEqual(rec['status'], 'complete', rec.get('error'))
    (row,) = rec['rows']
    accs = [r['accuracy'] for r in base]
    mean, std = statistics.mean(accs), statistics.stdev(accs)
    self.assertLessEqual(
      abs(row['accuracy'] - mean), max(3 * std, 0.01), (row, accs)
    )


if __name__ == '__main__':
  absltest.main()
