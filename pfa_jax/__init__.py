"""pfa_jax: Principal Filter Analysis and structured pruning in JAX/Flax.

The pure core (no I/O, no flags): :mod:`stats` (streaming covariance),
:mod:`spectra`, :mod:`recipes`, :mod:`select`, :mod:`slicing`, :mod:`costs`
and :mod:`models`. The edges: :mod:`input_pipeline`, :mod:`train`,
:mod:`checkpoint`, :mod:`metrics`, :mod:`compress` and :mod:`main` (CLI).
"""

import importlib

# Lazy re-exports (PEP 562): `python -m pfa_jax.analyze` then never imports
# JAX or Flax (~1-2 s of a cold process); `pfa_jax.stats` etc. work as before.
_SUBMODULES = (
  'costs',
  'discover',
  'recipes',
  'select',
  'slicing',
  'spectra',
  'stats',
)


def __getattr__(name):
  if name in _SUBMODULES:
    return importlib.import_module(f'pfa_jax.{name}')
  if name == 'analyze':
    return importlib.import_module('pfa_jax.analysis').analyze
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


__version__ = '0.1.0'

__all__ = ['analyze', *_SUBMODULES]
