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
import io
import json
import os
import shlex
import statistics
import tempfile
from contextlib import redirect_stdout

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
    point = points[base[-1]['hash']]
    if not _have_data(point['config'].input.dataset):
      self.skipTest('TFDS data not prepared (make data)')
    with tempfile.TemporaryDirectory() as root:
      with redirect_stdout(io.StringIO()):
        rec = sweep.run_point(point, root)
    self.assertEqual(rec['status'], 'complete', rec.get('error'))
    (row,) = rec['rows']
    accs = [r['accuracy'] for r in base]
    mean, std = statistics.mean(accs), statistics.stdev(accs)
    self.assertLessEqual(
      abs(row['accuracy'] - mean), max(3 * std, 0.01), (row, accs)
    )


if __name__ == '__main__':
  absltest.main()
