"""``python -m pfa_jax.native``: builds the native kernels now, prints status."""

import sys

import numpy as np

from pfa_jax import native

if __name__ == '__main__':
  ok = native.syrk(np.float32) is not None
  print(native.status())
  sys.exit(0 if ok else 1)
