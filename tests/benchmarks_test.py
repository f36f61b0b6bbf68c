"""The benchmarks still run against the library (tiny sizes, no timing claims).

A benchmark that calls a renamed library function fails only when someone
runs it; these smoke runs catch that in CI. They assert what the benchmark
measured is well-formed, never how fast it was.
"""

import math

from absl.testing import absltest

from benchmarks import common
from benchmarks import native_levers
from benchmarks import stats_overhead


class BenchmarksTest(absltest.TestCase):
  def test_stats_overhead_runs(self):
    r = stats_overhead.bench('simple_cnn', batch=4, repeats=1)
    self.assertEqual(r['layers'], 8)  # SimpleCNN's eight prunable convs
    self.assertGreater(r['forward_img_s'], 0)
    self.assertTrue(math.isfinite(r['overhead']))

  def test_native_levers_ops_run(self):
    rows = native_levers.ops(repeats=1)
    self.assertEqual(len(rows), 4)  # BN (+residual), BN, pool, dropout
    for r in rows:
      self.assertGreater(r['native_ms'], 0)
      self.assertTrue(math.isfinite(r['speedup']))

  def test_loaded_is_decided_by_the_load_before_the_run(self):
    saved = common.START_LOAD
    try:
      for start, want in (((0.3, 2.0, 2.0), False), ((1.6, 0.5, 0.2), True)):
        common.START_LOAD = start
        self.assertEqual(common.loaded(), want, start)
    finally:
      common.START_LOAD = saved


if __name__ == '__main__':
  absltest.main()
