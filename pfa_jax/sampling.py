"""Random architectures at a target footprint (the paper's Fig. 1 baseline).

``sample_widths(model, input_shape, target, rng)`` draws per-group widths
whose parameter (or FLOPs) count lies within ``tol`` (default ±1%) of the
target, reproducibly from the seed. The ``random`` pruning method and the
random-architecture study both call this one function.

How we sample (and why it covers the space):

1. Draw one logit per group, ``z_g = logit(u_g)`` with ``u_g ~ U(0, 1)``.
2. The kept fraction of group ``g`` is ``sigmoid(z_g + t)``, one global shift
   ``t`` for all groups; the width is that fraction of the group's full width,
   rounded and clamped to ``[min_width, full]``. The cost is monotone in
   ``t``, so bisection finds the ``t`` that meets the target.
3. Rounding makes the cost a step function; a short repair walk then moves
   randomly chosen single widths by ±1 until the exact count is within
   ``tol``.

Any width vector strictly inside the box is reached with positive
probability: its fractions ``f`` are the image of ``z = logit(f)`` (``t = 0``),
and ``z`` has full support on R^n. A shift in logit space (unlike a
multiplicative rescale ``s * u_g``) never saturates layers at full width when
the target is large, and never forces them all to the minimum when it is
small, so every layer's width varies at every footprint.

Cost model: the search evaluates thousands of candidates, so it uses the
exact closed form :class:`pfa_jax.costs.CostModel` (read from the model
once; every leaf's size is a product over its axes of
``n_axis - Σ_g rows_g (1 - w_g / C_g)``, with the rows from the slicer's own
leaf edits). The returned widths are then checked against
:func:`pfa_jax.costs.count` (one abstract trace); a disagreement raises.
"""

import math
from collections.abc import Iterable, Mapping

import flax.linen as nn
import numpy as np

from pfa_jax import costs
from pfa_jax import select
from pfa_jax.models import structure as structure_lib

METRICS = ('params', 'flops')
_BISECT_STEPS = 60
_SHIFT_RANGE = 40.0


cost_model = costs.cost_model
CostModel = costs.CostModel


def _as_rng(rng) -> np.random.Generator:
  if isinstance(rng, np.random.Generator):
    return rng
  if isinstance(rng, (int, np.integer)):
    return np.random.default_rng(int(rng))
  raise TypeError(
    f'rng must be an int seed or a numpy Generator, got {type(rng).__name__}.'
  )


def sample_widths(
  model: nn.Module,
  input_shape,
  target: float,
  rng=None,
  *,
  seed: int | None = None,
  groups: Iterable[str] | None = None,
  tol: float = 0.01,
  metric: str = 'params',
  min_width: int | Mapping[str, int] = 1,
  round_to: int = 1,
  check: bool = True,
) -> dict[str, int]:
  """Random per-group widths whose cost is within ``tol`` of ``target``.

  Args:
    model: a pfa_jax model (``widths`` field and ``structure()``).
    input_shape: one input's shape, e.g. (32, 32, 3).
    target: the footprint: a fraction of the full model's cost if <= 1,
      else an absolute parameter (or MAC) count.
    rng: an int seed or a ``numpy.random.Generator``; same seed, same widths.
    seed: the same as an int ``rng`` (give one of the two).
    groups: the groups to sample (default: all of the model's groups, e.g.
      ResNet's inner convs *and* streams); the others keep their width.
    tol: allowed relative deviation of the exact cost from the target.
    metric: 'params' or 'flops' (MACs, as :mod:`pfa_jax.costs` counts them).
    min_width: smallest width per group (an int, or ``{group: int}``).
    round_to: widths are multiples of this and of the group's blocks (a
      grouped convolution's), or the group's full width.
    check: re-count the result with :func:`pfa_jax.costs.count` (one
      abstract trace, ~0.3 s for SimpleCNN, ~1 s for ResNet-56); bulk
      samplers may skip it, the tests compare both counts on every model.

  Returns:
    ``{group: width}`` for the sampled groups.

  Raises:
    ValueError: unknown metric or group, a bad tolerance, or a target that
      no widths in ``[min_width, full]`` can reach within ``tol``.
  """
  if metric not in METRICS:
    raise ValueError(f'metric must be one of {METRICS}, got {metric!r}.')
  if not 0 < tol < 1:
    raise ValueError(f'tol must lie in (0, 1), got {tol!r}.')
  if (rng is None) == (seed is None):
    raise TypeError('sample_widths needs exactly one of rng= and seed= .')
  if int(round_to) < 1:
    raise ValueError(f'round_to must be >= 1, got {round_to!r}.')
  cm = cost_model(model, input_shape)
  names = tuple(groups) if groups is not None else cm.names
  unknown = sorted(set(names) - set(cm.names))
  if unknown or not names:
    raise ValueError(
      f'Cannot sample groups {unknown or "(none)"}; {type(model).__name__} '
      f'has: {", ".join(cm.names)}.'
    )
  pos = np.asarray([cm.names.index(n) for n in names])
  full = cm.full[pos]
  s = model.structure()
  levels = [
    _levels(
      n,
      int(c),
      _min_width(min_width, n, c),
      math.lcm(int(round_to), s.group(n).blocks),
    )
    for n, c in zip(names, full)
  ]
  top = np.asarray([len(lv) - 1 for lv in levels])
  base = cm.full.copy()

  def cost(idx):
    v = base.copy()
    v[pos] = [lv[i] for lv, i in zip(levels, idx)]
    return cm(v, metric)

  full_cost = cost(top)
  tgt = float(target) * full_cost if target <= 1 else float(target)
  floor_cost = cost(np.zeros_like(top))
  if not floor_cost * (1 - tol) <= tgt <= full_cost * (1 + tol):
    raise ValueError(
      f'{metric} target {target!r} (= {tgt:.0f}) is outside what widths in '
      f'[min_width, full] of groups {list(names)} reach: [{floor_cost}, '
      f'{full_cost}].'
    )
  gen = _as_rng(seed if rng is None else rng)
  z = np.log(gen.uniform(size=len(names)).clip(1e-9, 1 - 1e-9))
  z = z - np.log1p(-np.exp(z))  # logit(u)

  def widths_at(t):
    want = full / (1.0 + np.exp(-(z + t)))
    return np.asarray([np.abs(lv - x).argmin() for lv, x in zip(levels, want)])

  t_lo, t_hi = -_SHIFT_RANGE, _SHIFT_RANGE
  for _ in range(_BISECT_STEPS):
    mid = 0.5 * (t_lo + t_hi)
    if cost(widths_at(mid)) <= tgt:
      t_lo = mid
    else:
      t_hi = mid
  idx = min(
    (widths_at(t_lo), widths_at(t_hi)), key=lambda v: abs(cost(v) - tgt)
  )
  idx = _repair(idx, cost, tgt, tol, top, gen)
  out = {n: int(lv[i]) for n, lv, i in zip(names, levels, idx)}
  if not check:
    return out
  exact = costs.count(structure_lib.with_widths(model, out), input_shape)
  if abs(exact[metric] - tgt) > tol * tgt:
    raise RuntimeError(  # The closed form disagrees with the real network.
      f'Cost model mismatch for {type(model).__name__}: {exact[metric]} '
      f'{metric} vs target {tgt:.0f}; please report.'
    )
  return out


def _min_width(min_width, name, full) -> int:
  m = min_width.get(name, 1) if isinstance(min_width, Mapping) else min_width
  m = int(m)
  if not 1 <= m <= full:
    raise ValueError(
      f'Layer {name!r}: min_width must lie in [1, {int(full)}], got {m}.'
    )
  return m


def _levels(name, full, lo, round_to) -> np.ndarray:
  """Admissible widths: multiples of ``round_to`` in ``[lo, full]``, + full."""
  first = -(-lo // round_to) * round_to
  lv = np.unique(np.append(np.arange(first, full + 1, round_to), full))
  return lv.astype(np.float64)


def _repair(idx, cost, tgt, tol, top, gen):
  """Random one-level moves (then swaps) until ``|cost - tgt| <= tol tgt``.

  A move is taken if it lowers ``|cost - tgt|``; single steps come first,
  and swaps (one group up a level, another down) only when no single step
  helps, so coarse models (one channel worth more than ``2 tol``) still land
  inside.
  """
  idx = idx.copy()
  c = cost(idx)
  n = len(idx)
  for _ in range(int(4 * top.sum()) + 10):
    if abs(c - tgt) <= tol * tgt:
      return idx
    moves = [((g, 1 if c < tgt else -1),) for g in range(n)]
    swaps = [((g, 1), (h, -1)) for g in range(n) for h in range(n) if g != h]
    best = None
    for group in (moves, swaps):
      for i in gen.permutation(len(group)):
        v = idx.copy()
        for g, step in group[i]:
          v[g] += step
        if np.any(v < 0) or np.any(v > top):
          continue
        cv = cost(v)
        if abs(cv - tgt) < abs(c - tgt):
          best = (v, cv)
          break
      if best is not None:
        break
    if best is None:
      break
    idx, c = best
  raise ValueError(
    f'No widths reach the target {tgt:.0f} within {tol:.1%} (closest '
    f'{c}); the width steps (one channel, or a multiple of round_to or '
    "of a grouped convolution's blocks) are too coarse for this model. "
    'Raise tol.'
  )


def random_keep(
  full: Mapping[str, int],
  widths: Mapping[str, int],
  rng,
  blocks: Mapping[str, int] | None = None,
) -> dict[str, np.ndarray]:
  """Uniformly random sorted keep-sets of the given ``widths``.

  Used for scratch-initialised random architectures, where *which*
  channels are kept does not change the network (only its widths do).
  ``blocks``: layer -> equal blocks that keep as many each (default 1).
  """
  gen = _as_rng(rng)
  out = {}
  for name, w in widths.items():
    if name not in full:
      raise ValueError(f'Unknown layer {name!r}; known: {sorted(full)}.')
    c = int(full[name])
    if not 1 <= int(w) <= c:
      raise ValueError(f'Layer {name!r}: width {w} outside [1, {c}].')
    b = (blocks or {}).get(name, 1)
    if b > 1:
      out[name] = select.balanced(gen.permutation(c), int(w), b)
    else:
      out[name] = np.sort(gen.choice(c, int(w), replace=False))
      out[name] = out[name].astype(np.int64)
  return out
