"""Filter-correlation pair pruning (FCP; Singh et al., WACV 2020): our reading.

Only the abstract is public (METHODS §3), so this is an interpretation:

1. correlation = Pearson coefficient of two filters' flattened weights
   (:func:`filter_correlation`);
2. per layer, N disjoint pairs are picked greedily by descending correlation
   (:func:`select_pairs`);
3. a few epochs of training add ``λ·Σ_pairs (1 − corr)``
   (:func:`pair_regularizer`, :func:`regularizer`): +1, not |corr|, because
   ReLU(−z) is not a scaled ReLU(z), and unlike ``exp(−Σ|corr|)`` the term
   does not vanish as N grows;
4. one filter of each pair is dropped and folded into its partner's
   next-layer weights by a one-regressor least squares with an intercept on
   the post-activation responses, ``x_drop ≈ a·x_keep + b``
   (:func:`fold_pair`), since BN and ReLU sit between the weights and what
   the next layer reads;
5. brief fine-tuning; the rounds repeat until a params/FLOPs target.

The rounds and training are the edge's schedule; everything here is pure.
Decisions: in a pair the filter whose responses have the smaller variance
is dropped (the fold's residual is var_drop·(1 − ρ²), so this loses less);
without responses the higher index goes. Where a consumer of the layer has
neither a bias nor a BN after it to take the constant ``b``, the fold goes
through the origin (``a`` from the second moments, no offset). Filters with
zero weight variance have correlation 0 with every other filter. A round drops at most
⌊C/2⌋ filters per layer (the pairs are disjoint); a larger request is capped
and the cap reported.
"""

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from pfa_jax import plan as plan_lib
from pfa_jax import slicing
from pfa_jax import stats
from pfa_jax.methods import base
from pfa_jax.methods import compensation
from pfa_jax.models import structure as structure_lib

_EPS = 1e-12


def _unit_filters(kernel):
  """[kh, kw, I, O] -> centred, unit-norm filters as columns [kh·kw·I, O]."""
  w = jnp.reshape(kernel, (-1, kernel.shape[-1]))
  w = w - jnp.mean(w, axis=0, keepdims=True)
  ss = jnp.sum(w * w, axis=0, keepdims=True)
  return w * jnp.where(ss > 0, jax.lax.rsqrt(ss + _EPS), 0.0)


def filter_correlation(kernel) -> np.ndarray:
  """Pearson correlation of the flattened filters, float64 [O, O]."""
  kernel = np.asarray(kernel, np.float64)
  if kernel.ndim < 2:
    raise ValueError(f'kernel must be [..., I, O], got shape {kernel.shape}.')
  w = kernel.reshape(-1, kernel.shape[-1])
  w = w - w.mean(0)
  norm = np.sqrt((w * w).sum(0))
  u = np.where(norm > 0, w / np.where(norm > 0, norm, 1.0), 0.0)
  r = np.clip(u.T @ u, -1.0, 1.0)
  np.fill_diagonal(r, 1.0)
  return r


def select_pairs(r, n: int, scores=None) -> list[tuple[int, int]]:
  """``n`` disjoint pairs, greedily by descending correlation.

  Args:
    r: [O, O] correlation matrix (upper triangle used).
    n: number of pairs; at most ``O // 2``.
    scores: optional [O]; in each pair the higher-score filter is kept
      (ties: the lower index). Without scores the lower index is kept.

  Returns:
    ``[(keep, drop), ...]`` in selection order (ties in correlation: the
    lexicographically smaller pair first).
  """
  r = np.asarray(r, np.float64)
  o = r.shape[0]
  if r.ndim != 2 or r.shape != (o, o):
    raise ValueError(f'r must be a square matrix, got shape {r.shape}.')
  if not 0 <= n <= o // 2:
    raise ValueError(f'n must lie in [0, {o // 2}] for {o} filters, got {n}.')
  i, j = np.triu_indices(o, 1)
  order = np.lexsort((j, i, -r[i, j]))  # by -corr, then i, then j
  used = np.zeros(o, bool)
  pairs = []
  for t in order:
    if len(pairs) == n:
      break
    a, b = int(i[t]), int(j[t])
    if used[a] or used[b]:
      continue
    used[a] = used[b] = True
    if scores is not None and scores[b] > scores[a]:
      a, b = b, a
    pairs.append((a, b))
  return pairs


def block_pairs(r, n: int, blocks: int = 1, scores=None):
  """:func:`select_pairs` in each of ``blocks`` equal blocks on its own:
  ``n / blocks`` pairs inside each, so both filters of a pair, and the fold
  between them, stay in the block a grouped convolution reads."""
  r = np.asarray(r, np.float64)
  o = r.shape[0]
  if blocks == 1:
    return select_pairs(r, n, scores)
  if o % blocks or n % blocks:
    raise ValueError(
      f'{o} filters and {n} pairs must both be multiples of the {blocks} '
      'blocks.'
    )
  size, pairs = o // blocks, []
  for lo in range(0, o, size):
    part = slice(lo, lo + size)
    sub = None if scores is None else np.asarray(scores)[part]
    for a, b in select_pairs(r[part, part], n // blocks, sub):
      pairs.append((a + lo, b + lo))
  return pairs


def round_count(width: int, n: int, blocks: int = 1) -> int:
  """Pairs one FCP round drops from a layer: ``min(n, C // 2)``, or with
  blocks, ``ceil(n / blocks)`` in each (at most half of it)."""
  size = width // blocks
  return blocks * min(-(-int(n) // blocks), size // 2)


def pair_regularizer(kernel, pairs: Sequence[tuple[int, int]], lam: float):
  """``lam · Σ_pairs (1 − corr)`` of one layer's kernel (differentiable)."""
  if not pairs:
    return jnp.zeros((), jnp.asarray(kernel).dtype)
  u = _unit_filters(jnp.asarray(kernel))
  a = jnp.asarray([p[0] for p in pairs])
  b = jnp.asarray([p[1] for p in pairs])
  corr = jnp.sum(u[:, a] * u[:, b], axis=0)
  return lam * jnp.sum(1.0 - corr)


def _check_pairable(group) -> None:
  if group.stream:
    raise ValueError(
      f'Layer {group.name!r} is a residual stream; FCP pairs the filters of '
      "one layer and folds into next-layer weights: use groups='inner'."
    )


def filter_key(flat: Mapping[str, jax.Array], group) -> str:
  """The ``'/'``-joined params key of the kernel whose filters FCP pairs.

  A group's producers may include per-channel modules beside its layer: a BN
  of its own, a depthwise conv after it (discovered structures of users'
  models have both). The filters are those of the one producer kernel that
  mixes input channels; a lone kernel counts even with one input (a first
  layer on grey images). Where a layer of one input has a depthwise conv
  after it, both kernels are ``[kh, kw, 1, C]``; the group's own layer (the
  module it is named after) is then the one.

  Raises:
    ValueError: for a residual stream, a grouped-conv group, or a group with
      no such kernel.
  """
  _check_pairable(group)
  kernels = {
    k: v
    for prod in group.producers
    for k, v in flat.items()
    if structure_lib.holds(k, prod) and k.endswith('kernel')
  }
  if len(kernels) > 1:  # drop depthwise kernels: [kh, kw, 1, C]
    mixing = {k: v for k, v in kernels.items() if v.shape[-2] > 1}
    own = {
      k: v for k, v in kernels.items() if structure_lib.holds(k, group.name)
    }
    kernels = mixing or own
  if len(kernels) != 1:
    raise ValueError(
      f'Layer {group.name!r}: FCP needs one producer kernel that mixes '
      f'channels, found {sorted(kernels) or "none"} among its producers '
      f'{list(group.producers)}.'
    )
  return next(iter(kernels))


def regularizer(model, pairs: Mapping[str, Sequence], lam: float):
  """``params -> Σ_groups pair_regularizer`` for the train loop's loss.

  ``pairs`` maps a group to its pairs; the group's filter kernel
  (:func:`filter_key`) is regularised.
  """
  s = model.structure()
  groups = {name: s.group(name) for name in pairs}
  for g in groups.values():
    _check_pairable(g)

  def fn(params):
    flat = traverse_util.flatten_dict(params, sep='/')
    total = 0.0
    for name, g in groups.items():
      kern = flat[filter_key(flat, g)]
      total = total + pair_regularizer(kern, pairs[name], lam)
    return total

  return fn


def fold_pair(
  cov, mean, keep: int, drop: int, *, intercept: bool = True, count=None
) -> tuple[float, float | None]:
  """``x_drop ≈ a·x_keep + b``: least squares with an intercept.

  ``cov`` [C, C] and ``mean`` [C] are the consumer input's statistics over
  every spatial position. A constant ``x_keep`` gives ``a = 0``. Without
  ``intercept`` the line goes through the origin (``a`` from the second
  moments, :func:`compensation.second_moment` of ``count`` samples) and
  ``b`` is ``None``.
  """
  cov = np.asarray(cov, np.float64)
  mean = np.asarray(mean, np.float64)
  if not intercept:
    cov = compensation.second_moment(cov, mean, count)
  var = cov[keep, keep]
  a = float(cov[drop, keep] / var) if var > 0 else 0.0
  if not intercept:
    return a, None
  return a, float(mean[drop] - a * mean[keep])


def pair_fold(
  cov, mean, keep, pairs, *, intercept=True, count=None
) -> plan_lib.Fold:
  """The group's :class:`~pfa_jax.plan.Fold` for its dropped pair members."""
  keep = np.asarray(keep, np.int64)
  col = {int(k): j for j, k in enumerate(keep)}
  drops = sorted(p[1] for p in pairs)
  partner = {int(d): int(k) for k, d in pairs}
  b = np.zeros((len(drops), len(keep)))
  c = np.zeros(len(drops)) if intercept else None
  for i, d in enumerate(drops):
    a, off = fold_pair(
      cov, mean, partner[d], d, intercept=intercept, count=count
    )
    b[i, col[partner[d]]] = a
    if intercept:
      c[i] = off
  return plan_lib.Fold(matrix=b, offset=c)


# ---------------------------------------------------------------------------
# The method entry (one round).


def _kernel(model, variables, name):
  flat = traverse_util.flatten_dict(variables['params'], sep='/')
  return np.asarray(flat[filter_key(flat, model.structure().group(name))])


def round_pairs(model, variables, groups, num_pairs: int) -> dict:
  """A round's pairs: ``min(num_pairs, C // 2)`` per group, from weights.

  The edge trains with :func:`regularizer` on these pairs and then passes
  them as the ``pairs`` hyperparameter, so the round drops what it trained.
  """
  s = model.structure()
  out = {}
  for name in groups:
    g = s.group(name)
    r = filter_correlation(_kernel(model, variables, name))
    n = round_count(int(model.widths[g.index]), num_pairs, g.blocks)
    out[name] = [list(p) for p in block_pairs(r, n, g.blocks)]
  return out


def collect(model, variables, batches, groups, hparams):
  """Consumer-input statistics of every group (for the folds)."""
  del hparams
  struct = model.structure()
  for name in groups:
    _check_pairable(struct.group(name))
    if not struct.group(name).consumers:
      raise ValueError(
        f'Layer {name!r} has no consumer layer (nothing reads its channels):'
        ' FCP folds into next-layer weights and has none to fold into.'
      )
  states = compensation.input_stats(model, variables, batches, groups)
  return {
    n: (stats.covariance(s, name=n), stats.mean(s, name=n), stats.count(s))
    for n, s in states.items()
  }


def plan(ctx: base.Context) -> plan_lib.Plan:
  full = ctx.full_widths()
  r = ctx.recipe
  solved = {}
  if r.kind in ('params', 'flops'):
    cands = np.unique([w / c for c in full.values() for w in range(1, c + 1)])
    cands = cands[cands >= 0.5]  # one round drops at most half
    family = lambda g: ctx.finalize(
      {n: max(g * c, c - c // 2) for n, c in full.items()}
    )
    g, widths = base.solve_target(ctx, family, cands)
    solved = {'keep_fraction': float(g), 'target': ctx.target()}
  else:
    widths = base.uniform_widths(ctx, r)
  keep, folds, pairs, capped = {}, {}, {}, {}
  for name, blocks in ctx.blocks().items():
    c = full[name]
    n = c - widths[name]
    half = c // blocks // 2 * blocks  # at most half of every block
    if n > half:
      capped[name] = n
      n = half
    cov, mean, count = ctx.stats[name]
    given = (ctx.hparams['pairs'] or {}).get(name)
    if given is not None:
      pairs[name] = _orient(name, given, c, np.diag(cov), blocks)
    else:
      rr = filter_correlation(_kernel(ctx.model, ctx.variables, name))
      pairs[name] = block_pairs(rr, n, blocks, scores=np.diag(cov))
    drops = {d for _, d in pairs[name]}
    keep[name] = np.array([i for i in range(c) if i not in drops], np.int64)
    if drops:
      folds[name] = pair_fold(
        cov,
        mean,
        keep[name],
        pairs[name],
        intercept=not slicing.offset_free(ctx.model, ctx.variables, name),
        count=count,
      )
  return plan_lib.Plan(
    keep=keep,
    folds=folds,
    report={
      **solved,
      'widths': {n: len(k) for n, k in keep.items()},
      'pairs': {n: [list(p) for p in ps] for n, ps in pairs.items()},
      'capped': capped,
    },
  )


def _orient(name, given, c, scores, blocks=1):
  """Validates explicit pairs (disjoint, in range, inside blocks, as many
  in each) and orients them."""
  flat = [int(i) for p in given for i in p]
  if any(len(p) != 2 for p in given) or len(set(flat)) != len(flat):
    raise ValueError(f'Layer {name!r}: pairs must be disjoint [a, b] pairs.')
  if flat and not (0 <= min(flat) and max(flat) < c):
    raise ValueError(f'Layer {name!r}: pair indices must lie in [0, {c}).')
  size = c // blocks
  per = np.bincount([int(a) // size for a, _ in given], minlength=blocks)
  if any(int(a) // size != int(b) // size for a, b in given) or np.any(
    per != per[0]
  ):
    raise ValueError(
      f'Layer {name!r}: a grouped convolution splits it into {blocks} '
      f'blocks of {size}; pairs must lie inside one block, as many in each.'
    )
  out = []
  for a, b in given:
    a, b = int(a), int(b)
    if scores[b] > scores[a] or (scores[b] == scores[a] and b < a):
      a, b = b, a
    out.append((a, b))
  return out


METHOD = base.Method(
  name='fcp',
  recipes=('keep', 'prune', 'rates', 'widths', 'params', 'flops'),
  plan=plan,
  collect=collect,
  # lam, num_pairs (N per layer and round) and epochs configure the edge's
  # rounds; pairs ({group: [[a, b], ...]}) fixes the pairs the regularised
  # training used, instead of re-selecting them from the weights.
  hparams={'lam': 0.1, 'num_pairs': 0, 'epochs': 2, 'pairs': None},
  doc='Filter-correlation pairs (Singh et al. 2020), one round per call.',
)
