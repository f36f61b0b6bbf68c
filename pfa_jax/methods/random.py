"""Random pruning: random widths at a footprint, random (or PFA) keep-sets.

For a params/FLOPs recipe the widths come from
:func:`pfa_jax.sampling.sample_widths` (within ±1% of the target, exact cost
model); for the layer-wise forms they are deterministic. Keep-sets are
uniform random subsets (``select='random'``), or PFA's Pearson selection on
the random widths (``select='pfa'``: the paper's "filter selection" init of
random architectures, which streams response statistics). Reproducible from
``rng`` (a jax key or an int seed), which is required.
"""

import jax
import numpy as np

from pfa_jax import plan as plan_lib
from pfa_jax import select
from pfa_jax.methods import base
from pfa_jax.methods import pfa

SELECTS = ('random', 'pfa')


def seed_of(rng) -> int:
  if isinstance(rng, (int, np.integer)):
    return int(rng)
  return int(jax.random.randint(rng, (), 0, 2**31 - 1))


def collect(model, variables, batches, groups, hparams):
  if hparams['select'] not in SELECTS:
    raise ValueError(
      f'random: select must be one of {SELECTS}, got {hparams["select"]!r}.'
    )
  if hparams['select'] == 'pfa':
    return pfa.collect(model, variables, batches, groups, hparams)
  return None


def plan(ctx: base.Context) -> plan_lib.Plan:
  from pfa_jax import sampling  # noqa: PLC0415  (imports the cost model)

  seed = seed_of(ctx.rng)
  r = ctx.recipe
  solved = {}
  if r.kind in ('params', 'flops'):
    widths = sampling.sample_widths(
      ctx.model,
      ctx.input_shape,
      ctx.target(),
      seed=seed,
      groups=ctx.groups,
      metric=r.kind,
      tol=float(ctx.hparams['tol']),
      min_width=ctx.min_width,
      round_to=ctx.round_to,
    )
    solved = {'target': ctx.target()}
  else:
    widths = base.uniform_widths(ctx, r)
  if ctx.hparams['select'] == 'pfa':
    orders = {n: ctx.stats['orders'][n] for n in ctx.groups}
    keep = select.keep_sets(orders, widths, ctx.blocks())
  else:
    keep = select.random_keep_sets(
      ctx.full_widths(), widths, seed, ctx.blocks()
    )
  return plan_lib.Plan(
    keep=keep,
    report={**solved, 'widths': widths, 'seed': seed},
  )


METHOD = base.Method(
  name='random',
  recipes=('params', 'flops', 'keep', 'rates', 'widths'),
  plan=plan,
  collect=collect,
  hparams={'select': 'random', 'tol': 0.01, 'stats_dtype': 'float32'},
  needs_rng=True,
  doc='Random widths at a footprint (+-1%) and random or PFA keep-sets.',
)
