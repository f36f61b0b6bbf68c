"""Which filters to keep: Pearson-correlation selection and random baseline.

PFA removes, one at a time, the filter whose responses are most correlated
with the remaining ones (METHODS.md section 1, "Filter selection"):

1. For every remaining filter f, s_f = sum_{g != f, g remaining} |R_fg|.
2. Remove argmax_f s_f.
3. Ties: the largest single |R_fg| (g remaining, g != f) among the tied
   filters is removed; if still tied, the larger index is removed, so an exact
   duplicate goes before its original.

The removal order does not depend on how many filters are kept, so
:func:`removal_order` computes the full order once (O(C^2) per layer: the
column sums are updated incrementally) and :func:`keep_indices` takes
prefixes.

Decisions:
  * Inactive units (variance <= 1e-8 x the layer's largest variance, or
    exactly 0; all units if the layer is entirely constant) have an undefined
    correlation; they are removed first, in ascending index order, and never
    enter R (so no NaN).
  * Ties are detected with a tolerance of 1e-9 x max(1, s_max) on s_f (the
    incrementally updated sums carry ~C x 1e-16 round-off) and of 1e-12 on
    |R|; the correlation is computed in float64 from the covariance and
    clipped to [-1, 1].
  * Passing a correlation matrix instead of a covariance gives the same
    order (it is a covariance with unit variances).
  * A layer whose channels a grouped convolution splits into ``blocks``
    (``Group.blocks``) keeps ``k / blocks`` in each block: the removal order
    is walked from its end, taking a filter while its block has room
    (:func:`balanced`). The order itself is the layer's, unchanged.
"""

import zlib
from collections.abc import Mapping

import numpy as np

INACTIVE_RTOL = 1e-8
_S_TOL = 1e-9
_R_TOL = 1e-12


def _name(name):
  return f'layer {name!r}' if name is not None else 'layer'


def _check_same_keys(a: Mapping, b: Mapping, what_a: str, what_b: str):
  ka, kb = set(a), set(b)
  if ka != kb:
    raise ValueError(
      f'Layer trees do not match: {what_b} is missing {sorted(ka - kb)} '
      f'and has extra {sorted(kb - ka)} relative to {what_a}.'
    )


def correlation(
  cov: np.typing.ArrayLike, *, name: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """Returns (|R| among active units with zero diagonal, active indices).

  Args:
    cov: [C, C] covariance matrix.
    name: layer name for error messages.

  Returns:
    ``(abs_r, active)``: float64 [A, A] absolute Pearson correlations of the
    active units (diagonal set to 0) and the sorted int indices of the A
    active units.

  Raises:
    ValueError: if ``cov`` is not square 2-D or not finite.
  """
  c = np.asarray(cov, np.float64)
  if c.ndim != 2 or c.shape[0] != c.shape[1] or c.shape[0] < 1:
    raise ValueError(
      f'{_name(name)}: covariance must be a square [C, C] matrix, '
      f'got shape {c.shape}.'
    )
  if not np.all(np.isfinite(c)):
    raise ValueError(f'{_name(name)}: covariance contains NaN or Inf.')
  var = np.diag(c).copy()
  vmax = var.max()
  active = np.flatnonzero((var > 0) & (var > INACTIVE_RTOL * vmax))
  sd = np.sqrt(var[active])
  if active.size == c.shape[0]:  # the first division makes the copy
    r = np.divide(c, sd[:, None])
  else:
    r = c[np.ix_(active, active)]
    r /= sd[:, None]
  r /= sd[None, :]
  np.abs(r, out=r)
  np.minimum(r, 1.0, out=r)
  np.fill_diagonal(r, 0.0)
  return r, active


def removal_order(
  cov: np.typing.ArrayLike, *, name: str | None = None
) -> np.ndarray:
  """Returns the full PFA removal order of a layer's filters.

  Args:
    cov: [C, C] covariance (or correlation) matrix of the layer's responses.
    name: layer name for error messages.

  Returns:
    int64 array, a permutation of range(C): ``order[0]`` is removed first.
    Keeping k filters keeps ``order[C - k:]`` (see :func:`keep_indices`).

  References:
    Suau et al., PFA, WACV 2020, Sec. 3.2 (filter selection).
  """
  a, active = correlation(cov, name=name)
  num_units = np.shape(cov)[0]
  inactive = np.setdiff1d(np.arange(num_units), active)
  n = active.size
  order = np.empty(n, np.int64)
  s = a.sum(axis=1)
  removed = np.zeros(n, bool)
  neg_inf = -np.inf
  for step in range(n - 1):
    f = int(np.argmax(s))
    smax = s[f]
    tied = np.flatnonzero(s >= smax - _S_TOL * max(1.0, smax))
    if tied.size > 1:
      keep_mask = ~removed
      mx = np.array([a[t, keep_mask].max() for t in tied])
      best = mx.max()
      tied = tied[mx >= best - _R_TOL]
      f = int(tied[-1])  # larger (active) index <=> larger original index
    order[step] = f
    removed[f] = True
    s -= a[f]
    s[f] = neg_inf
  if n:
    order[n - 1] = int(np.flatnonzero(~removed)[0])
  return np.concatenate([inactive, active[order]]).astype(np.int64)


def balanced(ranking, k: int, blocks: int = 1) -> np.ndarray:
  """Sorted first ``k`` of ``ranking`` (best first), ``k / blocks`` per block.

  Block ``b`` holds indices ``b C / blocks .. (b + 1) C / blocks``, where
  ``C = len(ranking)``; every block's best ``k / blocks`` are kept.

  Raises:
    ValueError: if ``k`` is not in [0, C] or not a multiple of ``blocks``.
  """
  ranking = np.asarray(ranking)
  c, k, blocks = ranking.size, int(k), int(blocks)
  if not 0 <= k <= c:
    raise ValueError(f'Cannot keep {k} of {c} units.')
  if k % blocks or c % blocks:
    raise ValueError(
      f'Cannot keep {k} of {c} units in {blocks} equal blocks: both must be '
      f'multiples of {blocks}.'
    )
  block = ranking // (c // blocks)
  # Position of each entry among its block's entries, in ranking order.
  nth = np.empty(c, np.int64)
  for b in range(blocks):
    where = block == b
    nth[where] = np.arange(int(where.sum()))
  return np.sort(ranking[nth < k // blocks]).astype(np.int64)


def keep_indices(order: np.ndarray, k: int, blocks: int = 1) -> np.ndarray:
  """Returns the sorted indices kept when the first C - k of ``order`` go.

  With ``blocks > 1``, ``k / blocks`` are kept in each block
  (:func:`balanced` over the reversed order).

  Raises:
    ValueError: if k is not in [0, C].
  """
  order = np.asarray(order)
  c = order.size
  k = int(k)
  if not 0 <= k <= c:
    raise ValueError(f'Cannot keep {k} of {c} units.')
  if blocks > 1:
    return balanced(order[::-1], k, blocks)
  return np.sort(order[c - k :]).astype(np.int64)


def removal_orders(
  covs: Mapping[str, np.typing.ArrayLike],
) -> dict[str, np.ndarray]:
  """Applies :func:`removal_order` to each layer of a covariance tree."""
  return {k: removal_order(v, name=k) for k, v in covs.items()}


def keep_sets(
  orders: Mapping[str, np.ndarray],
  widths: Mapping[str, int],
  blocks: Mapping[str, int] | None = None,
) -> dict[str, np.ndarray]:
  """Returns layer -> sorted kept indices for the given widths.

  ``blocks``: layer -> equal blocks that keep as many each (default 1).

  Raises:
    ValueError: if the layer names differ (naming missing/extra layers) or a
      width is outside [0, C].
  """
  _check_same_keys(orders, widths, 'orders', 'widths')
  out = {}
  for k, order in orders.items():
    try:
      out[k] = keep_indices(order, widths[k], (blocks or {}).get(k, 1))
    except ValueError as e:
      raise ValueError(f'layer {k!r}: {e}') from e
  return out


def random_keep_sets(
  widths_full: Mapping[str, int],
  widths: Mapping[str, int],
  rng: np.random.Generator | int,
  blocks: Mapping[str, int] | None = None,
) -> dict[str, np.ndarray]:
  """Random-selection baseline: a sorted uniform random subset per layer.

  Args:
    widths_full: layer -> number of units C.
    widths: layer -> number to keep k (0 <= k <= C).
    rng: a NumPy Generator (layers drawn in sorted-name order) or an int seed.
      With an int seed each layer uses its own stream seeded by
      ``(seed, crc32(name))``, so a layer's subset does not depend on which
      other layers are present.
    blocks: layer -> equal blocks that keep as many each (default 1): a
      uniform random subset of each block.

  Returns:
    layer -> sorted int64 indices.
  """
  _check_same_keys(widths_full, widths, 'widths_full', 'widths')
  out = {}
  for name in sorted(widths_full):
    c, k = int(widths_full[name]), int(widths[name])
    if not 0 <= k <= c:
      raise ValueError(f'layer {name!r}: cannot keep {k} of {c} units.')
    if isinstance(rng, np.random.Generator):
      g = rng
    else:
      g = np.random.default_rng([int(rng), zlib.crc32(name.encode())])
    b = (blocks or {}).get(name, 1)
    if b > 1:
      out[name] = balanced(g.permutation(c), k, b)
    else:
      out[name] = np.sort(g.choice(c, size=k, replace=False)).astype(np.int64)
  return {name: out[name] for name in widths_full}
