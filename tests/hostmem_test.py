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
  f = jax.jit(lambda x: jnp.sin(x) @ x)  # 16 MiB temporary and output
  x = jnp.ones((2048, 2048), jnp.float32)
  for _ in range(3):
    f(x).block_until_ready()
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(5):
    f(x).block_until_ready()
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
  print(applied, faults / 5)
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
    # Without it each call maps most of its 2 x 16 MiB afresh (4 KiB pages:
    # 8192 if all; measured 3.8k-6.6k).
    self.assertGreater(faults_off, 1024)
    self.assertLess(faults, faults_off / 20)


if __name__ == '__main__':
  absltest.main()
