"""pfa_jax: Principal Filter Analysis and structured pruning in JAX/Flax.

The pure core (no I/O, no flags): :mod:`stats` (streaming covariance),
:mod:`spectra`, :mod:`recipes`, :mod:`select`, :mod:`slicing`, :mod:`costs`
and :mod:`models`. The edges: :mod:`input_pipeline`, :mod:`train`,
:mod:`checkpoint`, :mod:`metrics`, :mod:`compress` and :mod:`main` (CLI).
"""

from pfa_jax import costs
from pfa_jax import recipes
from pfa_jax import select
from pfa_jax import slicing
from pfa_jax import spectra
from pfa_jax import stats
from pfa_jax.analysis import analyze

__version__ = '0.1.0'

__all__ = [
  'analyze',
  'costs',
  'recipes',
  'select',
  'slicing',
  'spectra',
  'stats',
]
