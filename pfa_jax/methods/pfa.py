"""PFA (Suau et al. 2020): spectra -> widths, Pearson selection -> keep-sets.

``collect`` streams every pruned group's response covariance under ``jit``
(one pass, reused by every recipe); ``plan`` turns the spectra into widths
(PFA-KL, PFA-En(τ), a kept fraction, explicit widths, or the largest τ that
meets a params/FLOPs budget) and picks the filters by Pearson selection.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pfa_jax import gram
from pfa_jax import models
from pfa_jax import plan as plan_lib
from pfa_jax import recipes
from pfa_jax import select
from pfa_jax import spectra as spectra_lib
from pfa_jax import stats
from pfa_jax.methods import base

STATS_DTYPES = ('float32', 'float64')


def response_step(variables, images, *, model, names):
  """The forward pass's PFA responses ``{name: [N, C]}`` of ``names`` (pure)."""
  _, resp = models.responses(model, variables, images)
  return {n: resp[n] for n in names}


def update_step(states, resp, mask):
  """Folds one batch of responses into the states (pure)."""
  resp = {n: r.astype(states[n].mean.dtype) for n, r in resp.items()}
  return stats.update_tree(states, resp, mask=mask)


def stats_step(states, variables, batch, *, model, names):
  """One forward pass + covariance update for the ``names`` groups (pure)."""
  resp = response_step(variables, batch['image'], model=model, names=names)
  return update_step(states, resp, batch['mask'])


def check_stats_dtype(name: str):
  if name not in STATS_DTYPES:
    raise ValueError(
      f'stats_dtype must be one of {STATS_DTYPES}, got {name!r}.'
    )
  if name == 'float64' and not jax.config.jax_enable_x64:
    raise ValueError(
      "stats_dtype='float64' needs 64-bit JAX (JAX_ENABLE_X64=1); without it "
      'JAX silently computes in float32.'
    )
  return jnp.float64 if name == 'float64' else jnp.float32


def collect_step(model, names):
  """The statistics loop's step: ``states = step(states, variables, batch)``.

  One jitted program, the states donated. Decision: the responses and the
  update as two programs were tried (XLA:CPU may run the small update thunks
  beside the oneDNN convolutions in one); ``benchmarks/stats_overhead.py``
  times both, and over five session-10 runs neither was faster beyond the
  VM's noise (ResNet-56 +/- 4%), so the step stays one program.
  """
  return jax.jit(
    functools.partial(stats_step, model=model, names=tuple(names)),
    donate_argnums=0,
  )


def two_program_step(model, names):
  """``collect_step`` as two programs, responses then update (for timing)."""
  respond = jax.jit(
    functools.partial(response_step, model=model, names=tuple(names))
  )
  update = jax.jit(update_step, donate_argnums=0)

  def step(states, variables, batch):
    return update(states, respond(variables, batch['image']), batch['mask'])

  return step


def collect_states(model, variables, batches, groups, dtype, progress=None):
  """Streams the responses of ``groups``; returns host ``CovState``s."""
  widths = models.widths_of(model)
  states = stats.init_tree({n: widths[n] for n in groups}, dtype=dtype)
  # Donated below, so no two leaves may share a buffer.
  states = jax.tree.map(jnp.array, states)
  step = collect_step(model, groups)
  with gram.blas_threads_for(widths[n] for n in groups):
    for i, batch in enumerate(batches, 1):
      states = step(states, variables, batch)
      if progress is not None:
        progress(i, states)
    states = jax.device_get(states)
  stats.check_finite_tree(states)
  return states


def analyse(states) -> dict:
  """Host float64: spectra and Pearson removal orders of every layer."""
  covs = stats.covariance_tree(states)
  return {
    'spectra': spectra_lib.spectra(covs),
    'orders': select.removal_orders(covs),
    'num_examples': int(next(iter(states.values())).count),
  }


def collect(model, variables, batches, groups, hparams):
  dtype = check_stats_dtype(hparams['stats_dtype'])
  return analyse(collect_states(model, variables, batches, groups, dtype))


def widths_for(ctx: base.Context, spectra) -> tuple[dict[str, int], dict]:
  """Widths of ``ctx.groups`` for the recipe, and what was solved."""
  r = ctx.recipe
  spectra = {n: spectra[n] for n in ctx.groups}
  if r.kind == 'kl':
    return ctx.finalize(recipes.kl(spectra)), {}
  if r.kind == 'energy':
    return ctx.finalize(recipes.energy(spectra, r.value)), {'tau': r.value}
  if r.kind in ('params', 'flops'):
    family = lambda tau: ctx.finalize(recipes.energy(spectra, float(tau)))
    tau, widths = base.solve_target(ctx, family, recipes.breakpoints(spectra))
    return widths, {'tau': float(tau), 'target': ctx.target()}
  return base.uniform_widths(ctx, r), {}


def plan(ctx: base.Context) -> plan_lib.Plan:
  widths, solved = widths_for(ctx, ctx.stats['spectra'])
  orders = {n: ctx.stats['orders'][n] for n in ctx.groups}
  keep = select.keep_sets(orders, widths, ctx.blocks())
  return plan_lib.Plan(
    keep=keep,
    report={
      **solved,
      'widths': widths,
      'num_examples': ctx.stats['num_examples'],
      'kl_gamma': {
        n: recipes.kl_gamma(np.asarray(ctx.stats['spectra'][n]))
        for n in ctx.groups
      },
    },
  )


METHOD = base.Method(
  name='pfa',
  recipes=('kl', 'energy', 'keep', 'params', 'flops', 'widths'),
  plan=plan,
  collect=collect,
  hparams={'stats_dtype': 'float32'},
  doc='Principal Filter Analysis: spectra -> widths, Pearson selection.',
)
