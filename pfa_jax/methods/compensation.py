"""Least-squares compensation: fold removed channels into the next layer.

A consumer layer reads channels x. Removing channels r loses ``W_rᵀ x_r``;
the best linear stand-in from the kept channels k is ``x_r ≈ B x_k + c`` with

  ``B = Σ_rk (Σ_kk + λ I)⁻¹``,  ``c = μ_r − B μ_k``,  ``λ = ridge·tr(Σ_kk)/n_k``,

where Σ and μ are the covariance and mean of the consumer's *input* over all
N·H·W spatial positions (not PFA's max-pooled responses). The plan carries
it as a :class:`pfa_jax.plan.Fold`; :func:`pfa_jax.slicing.prune` adds
``Bᵀ W_r`` to ``W_k`` at every kernel tap and ``Σ_taps W_r[tap]ᵀ c`` to the
consumer's bias, or to its BN's running mean.

Decisions:

* **One-shot statistics by default.** All statistics come from the unpruned
  network in one pass (``sequential=False``). ``sequential=True`` instead
  re-collects each group's statistics on the masked network with every
  upstream group already pruned and folded, in structure order: one pass per
  group, but every fold then predicts the inputs the pruned network really
  produces. Masking keeps one compiled program for all passes.
* **Ridge relative to the trace** (default 1e-3): scale-free, and it keeps
  Σ_kk invertible when kept channels are dead or duplicated. ``ridge=0``
  gives the exact least-squares fit (pseudo-inverse if singular).
* **Only inner groups.** A residual stream is also read by identity
  shortcuts, which have no weights to fold into: compensating a stream raises
  ``ValueError``; when ``groups`` is not given, streams are skipped and
  reported.
* **Zero padding.** A SAME-padded consumer reads zeros beyond the border for
  every channel, where the fold assumes ``x_r = B x_k + c``: at the border
  taps the constant ``c`` is added though the original input was 0. With
  ``c = 0`` (e.g. ``x_r = α x_k``) the fold is exact everywhere; otherwise
  the error is confined to the outer ring of positions of the consumer's
  output (``compensation_test`` checks that). Size, measured on a
  random-init ResNet-20 (32×32 normal inputs, L1 keep-sets at half width,
  ridge 1e-3; a trained net will differ): the padding error is 7–10% of the
  consumer output's RMS over the whole map (16–21% on its outer rows),
  against a prediction error of 22–49% for ls and 59–67% with no
  compensation, for maps of 32² down to 8² (smaller maps: larger share).
* **Dense after a flatten.** The flatten's channel repeat: the positions of a
  channel-last flatten are extra samples of the same channels, so the input
  ``[N, P·span]`` is read as ``[N·P, span]``.
* An existing fold of a compensated group (CF's, FCP's) is replaced.
* **No intercept where no consumer can take it.** The constant ``c`` goes
  to each consumer's bias, or to the BN right after it
  (:func:`pfa_jax.slicing.offset_free`). A group read by a bias-free layer
  with no such BN is fitted through the origin from the second moments
  instead (``intercept: false`` in the report); a constant in the removed
  channels is then lost, as without compensation, while their variation
  is still predicted.
* **Unread groups** (a layer whose output nothing reads) have nothing to
  fold into: skipped, and named in the report.
"""

import functools
import math
from collections.abc import Callable, Iterable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pfa_jax import gram
from pfa_jax import models
from pfa_jax import plan as plan_lib
from pfa_jax import slicing
from pfa_jax import stats
from pfa_jax.models import structure as structure_lib

# ---------------------------------------------------------------------------
# Capturing module inputs and outputs.


def capture(
  model: nn.Module,
  variables,
  images: jax.Array,
  *,
  inputs_of: Sequence[str] = (),
  outputs_of: Sequence[str] = (),
) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
  """The first positional input / the output of modules, by path (pure).

  One eval-mode forward pass under :func:`flax.linen.intercept_methods`; it
  can be jitted. Paths are ``'/'``-joined module paths, e.g.
  ``'stage1_block0/conv2/conv'``. A module called twice keeps its last call.

  Raises:
    ValueError: naming the paths that were never called.
  """
  want_in, want_out = set(inputs_of), set(outputs_of)
  ins, outs = {}, {}

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == '__call__':
      path = '/'.join(context.module.path)
      if path in want_in:
        ins[path] = args[0]
      if path in want_out:
        outs[path] = out
    return out

  model = models.unfolded(model)  # a folded conv never calls nn.Conv
  with nn.intercept_methods(interceptor):
    model.apply(variables, images, train=False)
  missing = sorted((want_in - set(ins)) | (want_out - set(outs)))
  if missing:
    raise ValueError(
      f'{type(model).__name__} never called module(s) {missing}; check the '
      'layer names against model.structure().'
    )
  return ins, outs


def channel_rows(x: jax.Array, cons, width: int) -> jax.Array:
  """A consumer's input ``x`` as samples of the group's channels, [M, width].

  Conv inputs ``[N, H, W, span]`` give N·H·W samples; a dense input
  ``[N, P·span]`` after a channel-last flatten gives N·P samples.
  """
  cons = structure_lib.as_consumer(cons)
  span = width if cons.span is None else int(cons.span)
  n = x.shape[0]
  flat = x.reshape(n, -1)
  if flat.shape[1] % span:
    raise ValueError(
      f'consumer {cons.path!r}: input of {flat.shape[1]} features per sample '
      f'is not a multiple of the span {span}.'
    )
  rows = flat.reshape(n, -1, span)[..., cons.offset : cons.offset + width]
  return rows


def _batches(batches) -> Iterable:
  if callable(batches):
    return batches()
  if batches is None:
    raise ValueError('compensation needs batches (training images).')
  return batches


@functools.lru_cache(maxsize=16)
def _stats_step(model: nn.Module, groups: tuple[str, ...]):
  """The jitted statistics step, cached per (model, groups): sequential
  compensation reuses one compiled program for every pass."""
  s = model.structure()
  info = {}
  for name in groups:
    g = s.group(name)
    width = int(model.widths[g.index])
    info[name] = (width, tuple(map(structure_lib.as_consumer, g.consumers)))
  paths = sorted({c.path for _, cs in info.values() for c in cs})

  @jax.jit
  def step(states, variables, images, mask):
    ins, _ = capture(model, variables, images, inputs_of=paths)
    out = {}
    for name, (width, conss) in info.items():
      st = states[name]
      for cons in conss:
        rows = channel_rows(ins[cons.path], cons, width)
        m = jnp.repeat(mask, rows.shape[1])
        st = stats.update(st, rows.reshape(-1, width), m)
      out[name] = st
    return out

  return step


def input_stats(
  model: nn.Module,
  variables,
  batches,
  groups: Sequence[str],
  *,
  dtype=jnp.float32,
) -> dict[str, stats.CovState]:
  """Streams the covariance of each group's consumer input.

  Args:
    model: the network the statistics describe.
    variables: its variables (all collections).
    batches: a re-iterable (list, or zero-arg callable returning a fresh
      iterator) of ``{'image', 'mask'}`` dicts (``mask`` optional).
    groups: group names; every consumer of a group adds its samples to the
      group's one statistics state.
    dtype: accumulator dtype (:mod:`pfa_jax.stats` centres each batch).

  Returns:
    ``{group: CovState}`` over the group's channels.
  """
  step = _stats_step(model, tuple(groups))
  s = model.structure()
  widths = {n: int(model.widths[s.group(n).index]) for n in groups}
  states = {n: stats.init(w, dtype) for n, w in widths.items()}
  seen = 0
  with gram.blas_threads_for(widths.values()):
    for batch in _batches(batches):
      images = jnp.asarray(batch['image'])
      mask = batch.get('mask')
      mask = jnp.ones(images.shape[:1]) if mask is None else jnp.asarray(mask)
      states = step(states, variables, images, mask)
      seen += 1
    states = jax.block_until_ready(states)
  if not seen:
    raise ValueError('compensation got an empty batch iterator.')
  return states


# ---------------------------------------------------------------------------
# The fold.


def _removed(width: int, keep) -> tuple[np.ndarray, np.ndarray]:
  keep = np.asarray(keep, np.int64)
  if keep.ndim != 1 or keep.size == 0 or np.any(np.diff(keep) <= 0):
    raise ValueError(f'keep must be sorted, unique, non-empty; got {keep}.')
  if keep[0] < 0 or keep[-1] >= width:
    raise ValueError(f'keep indices must lie in [0, {width}); got {keep}.')
  return keep, np.setdiff1d(np.arange(width), keep)


def second_moment(cov, mean, count=None) -> np.ndarray:
  """``E[x xᵀ]`` from the unbiased covariance of ``count`` samples and their
  mean (``count=None``: ``cov`` is the population covariance)."""
  cov = np.asarray(cov, np.float64)
  mean = np.asarray(mean, np.float64)
  scale = 1.0 if count is None else (count - 1) / count
  return scale * cov + np.outer(mean, mean)


def ls_fold(
  cov,
  mean,
  keep,
  ridge: float = 1e-3,
  *,
  intercept: bool = True,
  count=None,
  blocks: int = 1,
):
  """Least-squares fold ``x_r ≈ B x_k + c`` from covariance and mean.

  Args:
    cov: [C, C] covariance of the consumer's input channels.
    mean: [C] their mean.
    keep: sorted kept channel indices.
    ridge: λ = ridge · tr(A_kk) / n_k is added to A_kk's diagonal (>= 0).
    intercept: fit ``c`` (A = Σ, the covariance). Without it the fit goes
      through the origin, ``x_r ≈ B x_k`` from the second moments
      A = Σ + μμᵀ, and the fold has no offset: for consumers with neither a
      bias nor a BN to take one.
    count: samples behind the unbiased ``cov``, for the second moments
      (:func:`second_moment`); unused with ``intercept``.
    blocks: fit each of this many equal, contiguous blocks of channels on
      its own, so ``B`` is block-diagonal: a grouped convolution reads the
      group, and a fold must not carry a channel into another block.

  Returns:
    ``Fold(matrix=B [n_r, n_k], offset=c [n_r] or None)`` (float64).
  """
  cov = np.asarray(cov, np.float64)
  mean = np.asarray(mean, np.float64)
  c = cov.shape[0]
  if cov.shape != (c, c) or mean.shape != (c,):
    raise ValueError(
      f'cov must be [C, C] and mean [C]; got {cov.shape}, {mean.shape}.'
    )
  if not (np.all(np.isfinite(cov)) and np.all(np.isfinite(mean))):
    raise ValueError('cov and mean must be finite.')
  if not ridge >= 0:
    raise ValueError(f'ridge must be >= 0, got {ridge}.')
  keep, removed = _removed(c, keep)
  if blocks > 1:
    return _block_fold(
      cov, mean, keep, removed, ridge, intercept, count, blocks
    )
  m = cov if intercept else second_moment(cov, mean, count)
  a_kk = m[np.ix_(keep, keep)]
  a_rk = m[np.ix_(removed, keep)]
  lam = ridge * np.trace(a_kk) / len(keep)
  a = a_kk + lam * np.eye(len(keep))
  try:
    if lam <= 0:
      raise np.linalg.LinAlgError
    b = np.linalg.solve(a, a_rk.T).T
  except np.linalg.LinAlgError:
    b = a_rk @ np.linalg.pinv(a, hermitian=True)
  if not intercept:
    return plan_lib.Fold(matrix=b)
  return plan_lib.Fold(matrix=b, offset=mean[removed] - b @ mean[keep])


def _block_fold(cov, mean, keep, removed, ridge, intercept, count, blocks):
  """:func:`ls_fold` of each block on its own, as one block-diagonal fold."""
  size = cov.shape[0] // blocks
  matrix = np.zeros((len(removed), len(keep)))
  offset = np.zeros(len(removed))
  for lo in range(0, cov.shape[0], size):
    r = np.flatnonzero((removed >= lo) & (removed < lo + size))
    k = np.flatnonzero((keep >= lo) & (keep < lo + size))
    if not len(r):
      continue
    if not len(k):
      raise ValueError(
        f'Block {lo // size} of {blocks} keeps no channel to fold into.'
      )
    part = slice(lo, lo + size)
    fold = ls_fold(
      cov[part, part],
      mean[part],
      keep[k] - lo,
      ridge,
      intercept=intercept,
      count=count,
    )
    matrix[np.ix_(r, k)] = fold.matrix
    if intercept:
      offset[r] = fold.offset
  return plan_lib.Fold(matrix=matrix, offset=offset if intercept else None)


def explained(cov, keep, fold: plan_lib.Fold, mean=None, count=None) -> float:
  """Fraction of the removed channels' variance the fold predicts.

  For a fold without offset, pass ``mean`` (and ``count``): the fraction is
  then of their second moment (what removing them loses), the fold's
  residual measured the same way.
  """
  cov = np.asarray(cov, np.float64)
  if fold.offset is None and mean is not None:
    cov = second_moment(cov, mean, count)
  keep, removed = _removed(cov.shape[0], keep)
  b = np.asarray(fold.matrix, np.float64)
  s_rr = cov[np.ix_(removed, removed)]
  s_rk = cov[np.ix_(removed, keep)]
  s_kk = cov[np.ix_(keep, keep)]
  resid = s_rr - b @ s_rk.T - s_rk @ b.T + b @ s_kk @ b.T
  total = np.trace(s_rr)
  return float(1.0 - np.trace(resid) / total) if total > 0 else 1.0


def _groups_to_fold(model, plan, groups):
  """(groups to fold, skipped streams, skipped unread groups)."""
  s = model.structure()
  if groups is not None:
    for name in groups:
      if s.group(name).stream:
        raise ValueError(
          f'Layer {name!r} is a residual stream: its identity shortcuts read '
          'it without weights, so least-squares compensation cannot apply.'
        )
      if name not in plan.keep:
        raise ValueError(f'Layer {name!r} is not pruned by this plan.')
      if not s.group(name).consumers:
        raise ValueError(
          f'Layer {name!r} has no consumer layer (nothing reads its '
          'channels), so there is nothing to compensate.'
        )
    names = list(groups)
  else:
    names = [
      n for n in plan.keep if not s.group(n).stream and s.group(n).consumers
    ]
  width = {g.name: int(model.widths[g.index]) for g in s.groups}
  order = {n: i for i, n in enumerate(s.names)}
  names = [n for n in names if len(plan.keep[n]) < width[n]]
  skipped = sorted(n for n in plan.keep if s.group(n).stream)
  unread = sorted(n for n in plan.keep if not s.group(n).consumers)
  return sorted(names, key=order.get), skipped, unread


def compensate(
  model: nn.Module,
  variables,
  plan,
  batches,
  groups: Sequence[str] | None = None,
  ridge: float = 1e-3,
  *,
  sequential: bool = False,
  stats_fn: Callable | None = None,
) -> plan_lib.Plan:
  """Returns ``plan`` with least-squares folds for its inner groups.

  Args:
    model, variables: the unpruned network the plan applies to.
    plan: a :class:`~pfa_jax.plan.Plan` (or a bare keep tree).
    batches: re-iterable ``{'image', 'mask'}`` batches (training data).
    groups: groups to compensate; None means every non-stream group the
      plan prunes that some layer reads (streams and unread groups are
      skipped and listed in the report). A group with a consumer that has
      neither a bias nor a BN after it is fitted without intercept
      (:func:`ls_fold`); one that a grouped convolution reads, block by
      block (``blocks``).
    ridge: relative ridge of :func:`ls_fold`.
    sequential: re-collect each group's statistics after the upstream
      folds (see the module docstring); default one-shot.
    stats_fn: override of :func:`input_stats` (tests, caching).

  Returns:
    A new plan: same keep-sets, LS folds for the compensated groups (other
    groups' folds kept), and ``report['compensation_detail']``.
  """
  plan = plan_lib.as_plan(plan)
  slicing.check_keep(model, plan.keep)
  names, skipped, unread = _groups_to_fold(model, plan, groups)
  intercept = {n: not slicing.offset_free(model, variables, n) for n in names}
  s = model.structure()
  blocks = {
    n: math.lcm(
      *(c.blocks for c in map(structure_lib.as_consumer, s.group(n).consumers))
    )
    for n in names
  }
  stats_fn = stats_fn or input_stats
  folds = dict(plan.folds)
  per_group = {}
  if sequential:
    for name in names:
      upstream = plan_lib.Plan(
        keep={n: plan.keep[n] for n in plan.keep if n != name},
        folds={n: f for n, f in folds.items() if n != name},
      )
      _, masked = slicing.mask(model, variables, upstream)
      # All groups each pass: one compiled step serves every pass.
      st = stats_fn(model, masked, batches, names)[name]
      folds[name], per_group[name] = _fold_one(
        name, st, plan, ridge, intercept[name], blocks[name]
      )
  else:
    states = stats_fn(model, variables, batches, names) if names else {}
    for name in names:
      folds[name], per_group[name] = _fold_one(
        name, states[name], plan, ridge, intercept[name], blocks[name]
      )
  report = dict(plan.report)
  report['compensation_detail'] = {
    'kind': 'ls',
    'ridge': float(ridge),
    'statistics': 'sequential' if sequential else 'one-shot',
    'groups': per_group,
    'skipped_streams': skipped,
    'skipped_unread': unread,
  }
  return plan_lib.Plan(keep=plan.keep, folds=folds, report=report)


def _fold_one(name, state, plan, ridge, intercept, blocks):
  cov = stats.covariance(state, name=name)
  mean = stats.mean(state, name=name)
  n = stats.count(state)
  fold = ls_fold(
    cov,
    mean,
    plan.keep[name],
    ridge,
    intercept=intercept,
    count=n,
    blocks=blocks,
  )
  info = {'samples': n, 'intercept': intercept, 'blocks': blocks}
  key = 'explained_variance' if intercept else 'explained_second_moment'
  info[key] = explained(cov, plan.keep[name], fold, mean, n)
  return fold, info
