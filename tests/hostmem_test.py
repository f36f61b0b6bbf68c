"""hostmem: freed XLA buffers stay mapped, measured as page faults."""

import os
import subprocess
import sys
import textwrap

from absl.testing import absltest

_PROBE = textwrap.dedent("""
  import resource
  from pfa_jax import hostmem
  applied = hostmem.retain_freed_memory()
  import jax
  import jax.numpy as jnp
  # A 64 MiB output: above glibc's largest dynamic mmap threshold (32 MiB),
  # so by default every call maps it afresh, as XLA's step buffers are.
  f = jax.jit(jnp.sin)
  x = jnp.ones((4096, 4096), jnp.float32)
  windows = []
  for _ in range(8):  # the heap still grows now and then early on
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
      f(x).block_until_ready()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    windows.append((after - before) / 5)
  print(applied, sorted(windows)[4])  # faults per call, median window
""")


def _probe(retain: bool) -> tuple[bool, float]:
  env = dict(os.environ, PFA_JAX_RETAIN_MEMORY='1' if retain else '0')
  out = subprocess.run(
    [sys.executable, '-c', _PROBE],
    env=env,
    capture_output=True,
    text=True,
    check=True,
  ).stdout.split()
  return out[-2] == 'True', float(out[-1])


_HUGE_PROBE = textwrap.dedent("""
  import sys
  import numpy as np
  from pfa_jax import hostmem

  def anon_huge_kib():
    with open('/proc/self/smaps_rollup') as f:
      return next(int(l.split()[1]) for l in f if l.startswith('AnonHugePages'))

  before_flag = hostmem.numpy_huge_pages(sys.argv[1] == 'on')
  before = anon_huge_kib()
  a = np.ones((16, 1024, 1024), np.float32)  # 64 MiB, touched
  print(before_flag, anon_huge_kib() - before, hostmem.numpy_huge_pages(True))
""")


def _huge_probe(on: bool, **env) -> tuple[str, int, str]:
  out = subprocess.run(
    [sys.executable, '-c', _HUGE_PROBE, 'on' if on else 'off'],
    env=dict(os.environ, **env),
    capture_output=True,
    text=True,
    check=True,
  ).stdout.split()
  return out[0], int(out[1]), out[2]


class HostmemTest(absltest.TestCase):
  def test_numpy_huge_pages_switch(self):
    try:
      with open('/sys/kernel/mm/transparent_hugepage/enabled') as f:
        mode = f.read()
    except OSError:
      self.skipTest('no transparent huge pages here')
    if '[madvise]' not in mode:
      self.skipTest(f'huge pages are not per-madvise here: {mode.strip()}')
    prev, huge_on, now = _huge_probe(True)
    if huge_on == 0:
      self.skipTest('the kernel granted no huge pages (memory fragmented)')
    self.assertEqual((prev, now), ('True', 'True'))  # NumPy's default: on
    prev, huge_off, now = _huge_probe(False)
    self.assertEqual((prev, now), ('True', 'False'))  # it was switched off
    self.assertGreater(huge_on, 32 * 1024)  # most of the 64 MiB
    self.assertLess(huge_off, 4 * 1024)
    _, huge_kept, _ = _huge_probe(False, PFA_JAX_HUGE_PAGES='1')
    self.assertGreater(huge_kept, 32 * 1024)  # the override keeps them

  def test_retained_memory_does_not_fault_again(self):
    applied, faults = _probe(retain=True)
    off, faults_off = _probe(retain=False)
    self.assertTrue(applied)
    self.assertFalse(off)  # PFA_JAX_RETAIN_MEMORY=0 turns it off
    # Without it each call maps its 64 MiB afresh: 16384 4-KiB pages.
    self.assertGreater(faults_off, 8192)
    self.assertLess(faults, faults_off / 20)


if __name__ == '__main__':
  absltest.main()
