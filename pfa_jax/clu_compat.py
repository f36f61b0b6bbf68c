"""clu's writers and periodic actions, also where TensorFlow is absent.

``clu.metric_writers``' package ``__init__`` imports its TensorBoard
``SummaryWriter``, which imports TensorFlow, and ``clu.periodic_actions``
imports ``clu.metric_writers``: without TensorFlow (the GPU image) neither
imports. Where TensorFlow cannot be imported, this module registers a
stand-in for that one submodule, ``clu.metric_writers.summary_writer``,
whose ``SummaryWriter`` raises a clear error when built. The rest of clu
(logging, multi and async writers, periodic actions, parameter overviews)
works as it does with TensorFlow. ``TENSORBOARD`` says whether TensorBoard
summaries can be written; :func:`pfa_jax.metrics.create_writer` otherwise
logs and writes ``metrics.jsonl`` only.

The library imports clu's ``metric_writers``, ``parameter_overview`` and
``periodic_actions`` from here.
"""

import importlib.util
import sys
import types


def _importable(name: str) -> bool:
  if name in sys.modules:  # None there marks a module known to be absent
    return sys.modules[name] is not None
  return importlib.util.find_spec(name) is not None


TENSORBOARD = _importable('tensorflow')
_SUMMARY = 'clu.metric_writers.summary_writer'


class _NoSummaryWriter:
  """Stands in for clu's TensorBoard writer where TensorFlow is absent."""

  def __init__(self, *args, **kwargs):
    del args, kwargs
    raise ImportError(
      'TensorBoard summaries need TensorFlow, which is not installed here; '
      'pfa_jax writes metrics.jsonl and the log without it.'
    )


if not TENSORBOARD and _SUMMARY not in sys.modules:
  _stand_in = types.ModuleType(_SUMMARY)
  _stand_in.SummaryWriter = _NoSummaryWriter
  sys.modules[_SUMMARY] = _stand_in

from clu import metric_writers  # noqa: E402
from clu import parameter_overview  # noqa: E402
from clu import periodic_actions  # noqa: E402

__all__ = [
  'TENSORBOARD',
  'metric_writers',
  'parameter_overview',
  'periodic_actions',
]
