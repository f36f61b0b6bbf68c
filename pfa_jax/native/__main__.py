"""``python -m pfa_jax.native [onednn]``: builds a native kernel, prints status.

Without an argument: the statistics' SSYRK kernel (:mod:`pfa_jax.native`);
with ``onednn``: the oneDNN convolutions of :mod:`pfa_jax.onednn` and, in
the same library, the fused BN, dropout and max-pool kernels. Exits 1
when the kernel cannot be built (the reason is printed).
"""

import sys

import numpy as np

from pfa_jax import native

if __name__ == '__main__':
  if sys.argv[1:] == ['onednn']:
    from pfa_jax import onednn  # noqa: PLC0415

    ok = onednn.available()
    print(onednn.status())
  else:
    ok = native.syrk(np.float32) is not None
    print(native.status())
  sys.exit(0 if ok else 1)
