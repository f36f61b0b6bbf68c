"""Network Slimming (Liu et al. 2017): one global threshold on BN |γ|.

The sparse training is a train job with ``optim.bn_l1 = s`` (1e-4 for VGG,
1e-5 for ResNet; ``configs/slim_*``). A channel's score is the |γ| of the BN
that normalises it (the largest over a residual stream's producers). The
threshold is the ``100·p``-th percentile of all pruned groups' |γ|
(``prune:p``; numpy's linear interpolation), or the lowest threshold whose
network meets a params/FLOPs target. Channels with |γ| above the threshold
are kept, and every layer keeps at least ``min_width`` (default 1) channels,
its largest.
"""

import numpy as np
from flax import traverse_util

from pfa_jax import plan as plan_lib
from pfa_jax.methods import base


def bn_scores(model, variables, groups) -> dict[str, np.ndarray]:
  """|γ| per channel: the largest over the BN ``scale`` leaves of a group.

  A producer's BN may sit under it (``<producer>/bn/scale``, this package's
  models) or be a module of its own (``<bn>/scale``, a discovered user
  model); a BN after a concatenation contributes its slice of the group.
  """
  flat = traverse_util.flatten_dict(variables['params'], sep='/')
  s = model.structure()
  out = {}
  for name in groups:
    g = s.group(name)
    width = int(model.widths[g.index])
    slots = [(p, 0) for p in g.producers]
    slots += [(p.path, p.offset) for p in g.concat_producers]
    gammas = [
      np.abs(np.asarray(v, np.float64))[..., o : o + width]
      for path, o in slots
      for k, v in flat.items()
      if k.startswith(path + '/') and k.endswith('/scale')
    ]
    if not gammas:
      raise ValueError(
        f'Layer {name!r}: Network Slimming needs a BN scale among its '
        f'producers {list(g.producers)}; this model has none '
        '(use_bn=False?).'
      )
    out[name] = np.max(gammas, axis=0)
  return out


def plan(ctx: base.Context) -> plan_lib.Plan:
  scores = bn_scores(ctx.model, ctx.variables, ctx.groups)
  r = ctx.recipe
  solved = {}
  family = lambda t, strict=False: ctx.finalize(
    {
      n: int(np.sum(v > t)) if strict else int(np.sum(v >= t))
      for n, v in scores.items()
    }
  )
  if r.kind == 'prune':
    all_g = np.concatenate([scores[n] for n in ctx.groups])
    t = float(np.percentile(all_g, 100.0 * r.value))
    widths = family(t, strict=True)
    solved = {'threshold': t, 'percentile': 100.0 * r.value}
  elif r.kind in ('params', 'flops'):
    cands = np.unique(np.concatenate(list(scores.values())))[::-1]
    t, widths = base.solve_target(ctx, family, cands)
    solved = {'threshold': float(t), 'target': ctx.target()}
  else:
    widths = base.uniform_widths(ctx, r)
  return base.score_plan(ctx, scores, widths, solved)


METHOD = base.Method(
  name='slim',
  recipes=('prune', 'params', 'flops', 'widths'),
  plan=plan,
  doc='Network Slimming: global |gamma| threshold (Liu et al. 2017).',
)
