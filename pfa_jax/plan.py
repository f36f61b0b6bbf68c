"""A pruning plan: what every method produces and the slicer applies.

A :class:`Plan` is plain data, saveable as JSON, so a pruning can be replayed
or inspected without the method that made it:

* ``keep``: ``{group name: sorted kept channel indices}``; groups not named
  stay whole;
* ``folds``: optional next-layer weight edits, one :class:`Fold` per group.
  A fold says that the removed channels ``r`` of the group are replaced, in
  every consumer, by a linear prediction from the kept channels ``k``:
  ``x_r ≈ B x_k + c``. Applying it adds ``Bᵀ W_r`` to the consumer's kept
  input rows at every kernel tap, and folds the constant ``Σ_taps W_r[tap]ᵀ c``
  into the consumer's bias, or, where the consumer has none (a conv before a
  BN), into that BN's running mean. Central Filter (B = indicator of the
  centre), FCP (a one-regressor fit) and least-squares compensation
  (B = Σ_rk Σ_kk⁻¹) are all folds;
* ``report``: a JSON-serialisable record of how the plan was made (scores,
  widths, τ, thresholds, ...).
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Fold:
  """``x_removed ≈ matrix @ x_kept + offset`` for one group.

  Rows follow the group's sorted removed indices, columns its sorted kept
  indices.
  """

  matrix: np.ndarray  # [n_removed, n_kept]
  offset: np.ndarray | None = None  # [n_removed]

  def to_json(self) -> dict[str, Any]:
    return {
      'matrix': np.asarray(self.matrix, np.float64).tolist(),
      'offset': None
      if self.offset is None
      else np.asarray(self.offset, np.float64).tolist(),
    }

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> 'Fold':
    offset = d.get('offset')
    return cls(
      matrix=np.asarray(d['matrix'], np.float64).reshape(len(d['matrix']), -1),
      offset=None if offset is None else np.asarray(offset, np.float64),
    )


@dataclasses.dataclass(frozen=True)
class Plan:
  """Keep-sets, optional next-layer folds and a report (module docstring)."""

  keep: Mapping[str, np.ndarray]
  folds: Mapping[str, Fold] = dataclasses.field(default_factory=dict)
  report: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    keep = {n: np.asarray(k) for n, k in self.keep.items()}
    object.__setattr__(self, 'keep', keep)
    object.__setattr__(self, 'folds', dict(self.folds))
    object.__setattr__(self, 'report', dict(self.report))
    for name in self.folds:
      if name not in keep:
        raise ValueError(
          f'Plan folds layer {name!r} but keeps all of it: a fold needs '
          'removed channels.'
        )

  def widths(self) -> dict[str, int]:
    return {n: len(k) for n, k in self.keep.items()}

  def to_json(self) -> dict[str, Any]:
    return {
      'keep': {n: [int(i) for i in k] for n, k in self.keep.items()},
      'folds': {n: f.to_json() for n, f in self.folds.items()},
      'report': _jsonable(self.report),
    }

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> 'Plan':
    unknown = set(d) - {'keep', 'folds', 'report'}
    if unknown:
      raise ValueError(f'Plan JSON has unknown keys {sorted(unknown)}.')
    return cls(
      keep={n: np.asarray(k, np.int64) for n, k in d['keep'].items()},
      folds={n: Fold.from_json(f) for n, f in d.get('folds', {}).items()},
      report=d.get('report', {}),
    )


def as_plan(plan_or_keep) -> Plan:
  """A :class:`Plan` from a plan or a bare ``{group: kept indices}`` tree."""
  if isinstance(plan_or_keep, Plan):
    return plan_or_keep
  if not isinstance(plan_or_keep, Mapping):
    raise TypeError(
      f'Expected a Plan or a {{layer: kept indices}} mapping, got '
      f'{type(plan_or_keep).__name__}.'
    )
  return Plan(keep=plan_or_keep)


def _jsonable(obj):
  if isinstance(obj, Mapping):
    return {str(k): _jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_jsonable(v) for v in obj]
  if isinstance(obj, np.ndarray):
    return obj.tolist()
  if isinstance(obj, np.generic):
    return obj.item()
  return obj
