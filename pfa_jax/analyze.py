"""CLI: ``python -m pfa_jax.analyze responses.npz`` prints PFA recipes as JSON.

The logic lives in :mod:`pfa_jax.analysis`; the package re-exports its
function as ``pfa_jax.analyze(responses, ...)``.
"""

import sys

from pfa_jax import analysis

if __name__ == '__main__':
  sys.exit(analysis.main())
