"""Central Filter (CF; Duan et al. 2021, arXiv 2112.05493): pure parts.

CF keeps, in each layer, a few *central* filters and removes filters whose
post-ReLU maps look like a central filter's; each removed filter is folded
into its centre's next-layer weights (``W[:, c] += W[:, k]``). Everything here
is pure: the streaming similarity (jit-able), the graph selection (NumPy), the
``compress_rate`` parser and the fold. The method entry and the layer-by-layer
schedule live at the end of this file.

Decisions (METHODS §3, issue 9):

* **Similarity.** Per image, the Pearson correlation of the flattened H×W maps
  of two channels, averaged over images. Degenerate maps follow the first
  matching row of: both constant (both all-zero included) → +1; exactly one
  all-zero (the other then varies) → −1; one constant non-zero, the other
  varying → 0 (the authors' code yields NaN); both varying → Pearson. So an
  all-zero map against a constant non-zero one counts as "both constant"
  (+1): either is an exact affine function of the other. "Constant" means
  max == min over the map, tested exactly, so no variance tolerance is
  needed. The diagonal is 1.
* **Threshold.** Instead of bisecting a float t, the threshold is found by an
  integer bisection over the sorted distinct similarities: the edge set is
  ``D >= v`` for a distinct value v, i.e. ``D > t`` for any t in
  [next lower value, v). The reported t is the midpoint. This is exact and
  picks the sparsest graph with (nodes with an edge) − (components) >= n;
  with distinct similarities that count equals n (removing one edge changes
  it by at most one).
* **Greedy.** Visit nodes by descending score (mean similarity to direct
  neighbours; isolated nodes 0; ties by lower index). An unhandled node whose
  component has no centre becomes a centre; its unhandled neighbours are
  removed and delegated to it, in descending similarity to it, until n are
  removed. A removed node is handled, so nothing is ever delegated to a
  removed node (the authors' quirk). Isolated nodes are never centres.
  With this score a star's hub scores the mean of its edges, so its best
  leaf is visited first and takes only the hub: stars fall short too.
* **Fallback.** When the greedy pass removes fewer than n (components that
  are not stars), the shortfall is reported and the remaining removals are
  the kept non-centres *most similar to a centre*, each delegated to that
  centre (ties: lower index). We prefer this to "lowest score first": the
  lowest scores are isolated nodes, the least redundant filters, which is the
  opposite of CF's premise that a removed filter is approximated by its
  centre.
"""

import functools
from collections.abc import Mapping, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax import lax
from scipy.sparse import csgraph

from pfa_jax import models
from pfa_jax import plan as plan_lib
from pfa_jax.methods import base
from pfa_jax.methods import compensation
from pfa_jax.models import layers
from pfa_jax.models import structure as structure_lib

# ---------------------------------------------------------------------------
# Streaming similarity.


@flax.struct.dataclass
class SimilarityState:
  """Running sum of per-image similarity matrices.

  Attributes:
    total: sum over images of the per-image similarity; [C, C] float32.
    count: number of images; shape=(), int32.
  """

  total: jax.Array
  count: jax.Array


def similarity_init(num_channels: int) -> SimilarityState:
  """Empty similarity statistics for a layer of ``num_channels`` channels."""
  c = int(num_channels)
  if c < 1:
    raise ValueError(f'num_channels must be >= 1, got {c}.')
  return SimilarityState(
    total=jnp.zeros((c, c), jnp.float32), count=jnp.zeros((), jnp.int32)
  )


@jax.jit
def similarity_update(
  state: SimilarityState, maps: jax.Array, mask: jax.Array | None = None
) -> SimilarityState:
  """Adds the per-image similarities of a batch of maps.

  One matmul over (image, position) gives every varying pair's Pearson sum:
  with each map centred and scaled to unit norm (zero when constant), the
  Gram matrix of the unit maps sums the per-image correlations, and the
  degenerate rows of the table add as products of 0/1 flag matrices.

  Args:
    state: statistics so far.
    maps: [N, H, W, C] (or [N, P, C]) post-ReLU maps.
    mask: optional [N] 0/1 or bool; masked images are ignored.

  Returns:
    The updated state.
  """
  maps = jnp.asarray(maps, jnp.float32)
  c = state.total.shape[0]
  if maps.ndim < 3 or maps.shape[-1] != c:
    raise ValueError(
      f'similarity_update expects [N, H, W, {c}] maps, got {maps.shape}.'
    )
  n = maps.shape[0]
  x = maps.reshape(n, -1, c)  # [N, P, C]
  w = jnp.ones((n,), jnp.float32) if mask is None else jnp.asarray(mask) != 0
  w = w.astype(jnp.float32)
  const = jnp.max(x, axis=1) == jnp.min(x, axis=1)  # [N, C]
  zero = jnp.max(jnp.abs(x), axis=1) == 0
  xc = x - jnp.mean(x, axis=1, keepdims=True)
  norm = jnp.sqrt(jnp.sum(xc * xc, axis=1, keepdims=True))
  unit = jnp.where(const[:, None, :], 0.0, xc / jnp.where(norm > 0, norm, 1))
  unit = (unit * w[:, None, None]).reshape(-1, c)
  hi = lax.Precision.HIGHEST
  pearson = jnp.matmul(unit.T, unit, precision=hi)
  cf = const.astype(jnp.float32) * w[:, None]
  zf = zero.astype(jnp.float32) * w[:, None]
  vf = (1.0 - const.astype(jnp.float32)) * w[:, None]
  both_const = jnp.matmul(cf.T, cf, precision=hi)
  zero_vs_varying = jnp.matmul(zf.T, vf, precision=hi)
  total = pearson + both_const - zero_vs_varying - zero_vs_varying.T
  return SimilarityState(
    total=state.total + total,
    count=state.count + jnp.sum(w).astype(jnp.int32),
  )


def similarity(state: SimilarityState, *, name: str | None = None):
  """Mean per-image similarity D, float64 NumPy [C, C], diagonal 1."""
  n = int(jax.device_get(state.count))
  where = f'layer {name!r}: ' if name else ''
  if n < 1:
    raise ValueError(f'{where}similarity of an empty state (no images).')
  d = np.asarray(jax.device_get(state.total), np.float64) / n
  if not np.all(np.isfinite(d)):
    raise ValueError(f'{where}similarity has NaN/Inf (non-finite maps).')
  d = np.clip(0.5 * (d + d.T), -1.0, 1.0)
  np.fill_diagonal(d, 1.0)
  return d


# ---------------------------------------------------------------------------
# Graph selection.


def _components(adj: np.ndarray) -> np.ndarray:
  """Connected-component label of every node."""
  return csgraph.connected_components(adj, directed=False)[1]


def _removable(adj: np.ndarray) -> int:
  """(nodes with an edge) − (components among them) = C − #components."""
  return adj.shape[0] - len(np.unique(_components(adj)))


def _check_square(d, what='D'):
  d = np.asarray(d, np.float64)
  if d.ndim != 2 or d.shape[0] != d.shape[1]:
    raise ValueError(f'{what} must be a square [C, C] matrix, got {d.shape}.')
  if not np.all(np.isfinite(d)):
    raise ValueError(f'{what} has NaN or Inf entries.')
  return d


def threshold_graph(d: np.ndarray, num_remove: int):
  """Sparsest threshold graph with C − #components >= ``num_remove``.

  Returns:
    ``(adj, t)``: boolean adjacency [C, C] (``D > t``, no self loops) and
    the threshold t (midpoint between the chosen distinct value and the next
    lower one).
  """
  c = d.shape[0]
  off = ~np.eye(c, dtype=bool)
  if num_remove <= 0:
    return np.zeros((c, c), bool), float(np.max(d[off], initial=1.0))
  values = np.unique(d[off])[::-1]  # distinct, descending
  lo, hi = 0, len(values) - 1  # E_k = {D >= values[k]} grows with k
  while lo < hi:
    mid = (lo + hi) // 2
    if _removable((d >= values[mid]) & off) >= num_remove:
      hi = mid
    else:
      lo = mid + 1
  v = values[lo]
  below = values[lo + 1] if lo + 1 < len(values) else v - 1.0
  return (d >= v) & off, float(0.5 * (v + below))


def central_filter(d, num_remove: int):
  """CF's centres and delegates for one layer (see the module docstring).

  Args:
    d: [C, C] similarity matrix (symmetric; the upper triangle is used).
    num_remove: number of filters to remove, ``ceil(C * r)``; in [0, C).

  Returns:
    ``(keep, delegates, report)``: sorted kept indices (int64), a dict
    ``{removed index: centre index}`` over every removed filter, and a
    JSON-serialisable report (threshold, centres, scores, shortfall).
  """
  d = _check_square(d)
  c = d.shape[0]
  num_remove = int(num_remove)
  if not 0 <= num_remove < c:
    raise ValueError(
      f'num_remove must lie in [0, {c}) for {c} filters, got {num_remove}.'
    )
  d = np.triu(d, 1) + np.triu(d, 1).T
  adj, t = threshold_graph(d, num_remove)
  deg = adj.sum(1)
  score = np.where(deg > 0, (d * adj).sum(1) / np.maximum(deg, 1), 0.0)
  comp = _components(adj)
  order = sorted(range(c), key=lambda i: (-score[i], i))
  handled = np.zeros(c, bool)
  has_centre = set()
  centres, delegates = [], {}
  for u in order:
    if len(delegates) == num_remove:
      break
    if handled[u] or comp[u] in has_centre or deg[u] == 0:
      continue
    handled[u] = True
    has_centre.add(comp[u])
    centres.append(u)
    nbrs = sorted(np.flatnonzero(adj[u]), key=lambda v: (-d[u, v], v))
    for v in nbrs:
      if len(delegates) == num_remove:
        break
      if not handled[v]:
        handled[v] = True
        delegates[int(v)] = int(u)
  greedy = len(delegates)
  fallback = _fallback(d, centres, delegates, num_remove)
  keep = np.array(sorted(set(range(c)) - set(delegates)), np.int64)
  report = {
    'num_filters': c,
    'num_remove': num_remove,
    'threshold': t,
    'num_edges': int(adj.sum() // 2),
    'removed_greedy': greedy,
    'shortfall': num_remove - greedy,
    'fallback': fallback,
    'centres': [int(u) for u in centres],
    'scores': [float(s) for s in score],
  }
  return keep, delegates, report


def central_filter_blocks(d, num_remove: int, blocks: int = 1):
  """:func:`central_filter` in each of ``blocks`` equal blocks on its own.

  A grouped convolution splits the layer's channels into blocks, which must
  keep as many each, and a fold must stay inside one (its consumer reads
  each block apart). Each block removes ``num_remove / blocks`` filters,
  delegated to centres of its own block's graph. The report lists each
  block's, under ``'blocks'``.
  """
  if blocks == 1:
    return central_filter(d, num_remove)
  d = _check_square(d)
  c = d.shape[0]
  if c % blocks or num_remove % blocks:
    raise ValueError(
      f'{c} filters and {num_remove} removed must both be multiples of the '
      f'{blocks} blocks.'
    )
  size = c // blocks
  keep, delegates, reports = [], {}, []
  for lo in range(0, c, size):
    part = d[lo : lo + size, lo : lo + size]
    k, dl, rep = central_filter(part, num_remove // blocks)
    keep.append(k + lo)
    delegates.update({a + lo: b + lo for a, b in dl.items()})
    reports.append(rep)
  report = {
    'num_filters': c,
    'num_remove': int(num_remove),
    'shortfall': sum(r['shortfall'] for r in reports),
    'blocks': reports,
  }
  return np.concatenate(keep), delegates, report


def _fallback(d, centres, delegates, num_remove):
  """Removes the kept non-centres most similar to a centre (in place)."""
  added = []
  if len(delegates) == num_remove:
    return added
  c = d.shape[0]
  cs = np.asarray(centres)  # non-empty: num_remove >= 1 implies an edge
  rest = [i for i in range(c) if i not in delegates and i not in set(centres)]
  best = {i: int(cs[np.argmax(d[i, cs])]) for i in rest}
  rest.sort(key=lambda i: (-d[i, best[i]], i))
  for i in rest[: num_remove - len(delegates)]:
    delegates[i] = best[i]
    added.append([i, best[i]])
  return added


def num_to_remove(width: int, rate: float) -> int:
  """``ceil(width * rate)``, clamped so that at least one filter stays."""
  if not 0.0 <= rate < 1.0:
    raise ValueError(f'pruning rate must lie in [0, 1), got {rate}.')
  return min(int(np.ceil(width * rate - 1e-9)), width - 1)


# ---------------------------------------------------------------------------
# compress_rate strings (HRank / CHIP / CF): one parser, the recipes'.

parse_compress_rate = base.parse_rates


# ---------------------------------------------------------------------------
# The fold.


def fold_matrix(keep, delegates: Mapping[int, int]) -> np.ndarray:
  """CF's fold B [n_removed, n_kept]: B[removed k, its centre] = 1.

  Rows follow the sorted removed indices and columns the sorted kept ones,
  as :class:`pfa_jax.plan.Fold` expects; ``W_k += Bᵀ W_r`` is then
  ``W[:, c] += Σ_{k delegated to c} W[:, k]``. There is no offset.
  """
  keep = np.asarray(keep, np.int64)
  col = {int(k): j for j, k in enumerate(keep)}
  removed = sorted(delegates)
  b = np.zeros((len(removed), len(keep)), np.float64)
  for i, r in enumerate(removed):
    centre = int(delegates[r])
    if centre not in col:
      raise ValueError(
        f'filter {r} is delegated to {centre}, which is not kept.'
      )
    b[i, col[centre]] = 1.0
  return b


# ---------------------------------------------------------------------------
# The method entry and the layer-by-layer schedule.


def _check_groups(model, groups):
  s = model.structure()
  for name in groups:
    if s.group(name).stream:
      raise ValueError(
        f'Layer {name!r} is a residual stream: CF prunes single layers whose '
        "next layer has weights to fold into; use groups='inner'."
      )
  return s


def _sown(model, variables, images) -> set[str]:
  """The module paths that sow a PFA response (shapes only, no compute)."""
  apply = functools.partial(
    model.apply, train=False, mutable=[layers.RESPONSES]
  )
  _, state = jax.eval_shape(apply, models.model_variables(variables), images)
  flat = traverse_util.flatten_dict(state.get(layers.RESPONSES, {}), sep='/')
  return {k.removesuffix('/out') for k in flat}


def taps(model, variables, images, groups) -> dict[str, tuple[str, str]]:
  """Where CF reads each group's maps: ``(kind, module path)``.

  A group its model sows a response for (this package's layers, whose ReLU
  is inside the module) is read at its producer's output, ``('out', path)``,
  as the authors' code reads the layer's post-ReLU maps. Any other group (a
  user's model, its structure discovered from the jaxpr) is read where its
  first consumer reads it, ``('in', path)``: that layer's input restricted
  to the group's channels, after whatever activation, BN or pooling the
  model applies in between. It is the tap :func:`pfa_jax.models.responses`
  uses for PFA.
  """
  s = model.structure()
  sown = _sown(models.unfolded(model), variables, images)
  out = {}
  for name in groups:
    g = s.group(name)
    if name in sown and len(g.producers) == 1:
      out[name] = ('out', g.producers[0])
    elif g.consumers:
      out[name] = ('in', structure_lib.as_consumer(g.consumers[0]).path)
    else:
      raise ValueError(
        f'Layer {name!r}: {type(model).__name__} sows no response for it and '
        'it has no consumer layer, so CF has no maps to read.'
      )
  return out


def _maps(model, where, readers, widths, variables, images):
  """Every group's maps at its tap (pure; jit it with the first four bound)."""
  ins, outs = compensation.capture(
    model,
    variables,
    images,
    inputs_of=sorted({p for k, p in where.values() if k == 'in'}),
    outputs_of=sorted({p for k, p in where.values() if k == 'out'}),
  )
  out = {}
  for n, (kind, path) in where.items():
    if kind == 'out':
      out[n] = outs[path]
    else:  # [N, P, C]: the consumer's input as maps of the group's channels
      out[n] = compensation.channel_rows(ins[path], readers[n], widths[n])
  return out


def collect(model, variables, batches, groups, hparams):
  """Streams D for every group from its post-ReLU maps (see :func:`taps`).

  A map of one position (a dense layer, or a group its consumer reads after
  a global pooling) has no spatial extent; its batch is then taken as one
  "image" whose positions are the batch's (unmasked) samples, so D is the
  Pearson correlation of the responses across samples, averaged over
  batches.
  """
  s = _check_groups(model, groups)
  widths = {g.name: int(model.widths[g.index]) for g in s.groups}
  readers = {
    n: structure_lib.as_consumer(s.group(n).consumers[0])
    for n in groups
    if s.group(n).consumers
  }
  states = {n: similarity_init(widths[n]) for n in groups}
  maps, seen = None, 0
  for i, batch in enumerate(batches):
    if i >= int(hparams['num_batches']):
      break
    images = jnp.asarray(batch['image'])
    mask = batch.get('mask')
    mask = np.ones(images.shape[0], bool) if mask is None else np.asarray(mask)
    if maps is None:
      where = taps(model, variables, images, groups)
      maps = jax.jit(functools.partial(_maps, model, where, readers, widths))
    got = maps(variables, images)
    for n in groups:
      x = got[n]
      x = x.reshape(x.shape[0], -1, x.shape[-1])  # [N, P, C]
      if x.shape[1] == 1:  # one position: the samples are the positions
        x = jnp.asarray(np.asarray(x)[mask != 0, 0])[None]
        states[n] = similarity_update(states[n], x)
      else:
        states[n] = similarity_update(states[n], x, jnp.asarray(mask))
    seen += 1
  if not seen:
    raise ValueError('cf: batches is empty.')
  return {n: similarity(states[n], name=n) for n in groups}


def widths_for(ctx: base.Context) -> tuple[dict[str, int], dict]:
  """Kept widths: C − ⌈C·r⌉ for rates (CF's count), or a uniform target."""
  full = ctx.full_widths()
  r = ctx.recipe
  if r.kind in ('rates', 'prune'):
    rates = (
      base.per_layer(ctx, r.value, 'rates')
      if r.kind == 'rates'
      else {n: r.value for n in full}
    )
    widths = {n: c - num_to_remove(c, rates[n]) for n, c in full.items()}
    return ctx.finalize(widths), {}
  if r.kind in ('params', 'flops'):
    cands = np.unique([w / c for c in full.values() for w in range(1, c + 1)])
    family = lambda g: ctx.finalize({n: g * c for n, c in full.items()})
    g, widths = base.solve_target(ctx, family, cands)
    return widths, {'keep_fraction': float(g), 'target': ctx.target()}
  return base.uniform_widths(ctx, r), {}


def plan(ctx: base.Context) -> plan_lib.Plan:
  _check_groups(ctx.model, ctx.groups)
  widths, solved = widths_for(ctx)
  full = ctx.full_widths()
  keep, folds, reports = {}, {}, {}
  for name in ctx.groups:
    k, delegates, rep = central_filter_blocks(
      ctx.stats[name], full[name] - widths[name], ctx.blocks()[name]
    )
    keep[name] = k
    if delegates:
      folds[name] = plan_lib.Fold(fold_matrix(k, delegates))
    reports[name] = {
      **rep,
      'delegates': {str(a): b for a, b in delegates.items()},
    }
  return plan_lib.Plan(
    keep=keep,
    folds=folds,
    report={**solved, 'widths': widths, 'cf': reports},
  )


def layer_schedule(model, groups: Sequence[str] | None = None) -> list:
  """CF's layer-by-layer order: one step per layer, from the deep end.

  VGG: fc1, conv13, ..., conv1 (every group, deepest first). ResNet: each
  block's first conv, from the last block back (streams are never steps).
  Each step is a tuple of group names, pruned and then fine-tuned before
  the next; ``groups`` restricts the steps (e.g. to the convs).
  """
  s = model.structure()
  names = [g.name for g in s.groups if not g.stream]
  if groups is not None:
    unknown = sorted(set(groups) - set(names))
    if unknown:
      raise ValueError(
        f'layer_schedule: {unknown} are not single prunable layers of '
        f'{type(model).__name__}.'
      )
    names = [n for n in names if n in set(groups)]
  return [(n,) for n in reversed(names)]


METHOD = base.Method(
  name='cf',
  recipes=('rates', 'prune', 'keep', 'widths', 'params', 'flops'),
  plan=plan,
  collect=collect,
  hparams={'num_batches': 5},
  doc='Central Filter (Duan et al. 2021): similarity graph centres + fold.',
)
