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


class HostmemTest(absltest.TestCase):
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
