"""FP (Li et al. 2017): keep each layer's filters of largest kernel L1 norm.

A filter's score is the L1 norm of every kernel that writes its channel
(one producer for a plain layer; all of a residual stream's producers,
summed). Widths come from a kept/removed fraction per layer, per-layer rates
(``li2017``: the paper's VGG-16 CIFAR-10 rates, 50% of conv1 and
conv8-13), explicit widths, or a params/FLOPs target: a uniform kept
fraction searched exactly, or, with ``global_ranking=True``, one threshold
on the layer-normalised scores (score / layer max).
"""

import numpy as np
from flax import traverse_util

from pfa_jax import plan as plan_lib
from pfa_jax.methods import base
from pfa_jax.models import structure

# VGG-16 CIFAR: conv1..conv13 + fc1; prune 50% of conv1 and conv8-13.
LI2017_VGG16 = 'rates:[0.5]+[0.0]*6+[0.5]*6+[0.0]'


def kernel_scores(model, variables, groups) -> dict[str, np.ndarray]:
  """L1 norm per output channel of every producer kernel of each group."""
  flat = traverse_util.flatten_dict(variables['params'], sep='/')
  s = model.structure()
  out = {}
  for name in groups:
    total = None
    # A producer may hold no kernel (a BN module of its own, as discovered
    # structures of users' models have); the group must have one.
    producers = s.group(name).producers
    for prod in producers:
      for k, v in flat.items():
        if structure.holds(k, prod) and k.endswith('kernel'):
          w = np.asarray(v, np.float64)
          score = np.abs(w).reshape(-1, w.shape[-1]).sum(axis=0)
          total = score if total is None else total + score
    if total is None:
      raise ValueError(
        f'Layer {name!r}: none of its producers {list(producers)} has a kernel.'
      )
    out[name] = total
  return out


top_k = base.top_k


def plan(ctx: base.Context) -> plan_lib.Plan:
  scores = kernel_scores(ctx.model, ctx.variables, ctx.groups)
  full = ctx.full_widths()
  r = ctx.recipe
  solved = {}
  if r.kind in ('params', 'flops'):
    if ctx.hparams['global_ranking']:
      norm = {n: s / max(float(s.max()), 1e-30) for n, s in scores.items()}
      cands = np.unique(np.concatenate(list(norm.values())))[::-1]
      family = lambda t: ctx.finalize(
        {n: int(np.sum(v >= t)) for n, v in norm.items()}
      )
      t, widths = base.solve_target(ctx, family, cands)
      solved = {'threshold': float(t), 'target': ctx.target()}
    else:
      cands = np.unique([w / c for c in full.values() for w in range(1, c + 1)])
      family = lambda g: ctx.finalize({n: g * c for n, c in full.items()})
      g, widths = base.solve_target(ctx, family, cands)
      solved = {'keep_fraction': float(g), 'target': ctx.target()}
  else:
    widths = base.uniform_widths(ctx, r)
  return base.score_plan(ctx, scores, widths, solved)


METHOD = base.Method(
  name='l1',
  recipes=('keep', 'prune', 'rates', 'widths', 'params', 'flops'),
  plan=plan,
  hparams={'global_ranking': False},
  named_recipes={'li2017': LI2017_VGG16},
  doc='L1-norm filter pruning (Li et al. 2017).',
)
