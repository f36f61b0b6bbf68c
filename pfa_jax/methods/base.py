"""What every compression method shares: recipes, the method record, targets.

A method is a :class:`Method` record (as in jaxpruner's ``api.py``
registry): a name, the recipe forms it accepts, its hyperparameters with
their defaults, an optional ``collect`` that streams what it reads from data,
and a pure ``plan(ctx) -> Plan``. The one-call API and the registry live in
:mod:`pfa_jax.methods`.

Recipes (every form says what its number means):

================  ==========================================================
``params:x``      **kept** parameter budget: x <= 1 is a fraction of the
``flops:x``       full model, else an absolute count (FLOPs = MACs)
``kl``            PFA-KL
``energy:τ``      PFA-En at kept energy τ ∈ (0, 1]
``keep:γ``        **kept** fraction per layer, the same for every layer
``prune:p``       **removed** fraction (per layer for l1; one global fraction
                  of all BN channels for slim)
``rates:[...]``   per-layer **removed** fractions in group order, in the
                  HRank/CHIP/CF ``compress_rate`` syntax, e.g.
                  ``rates:[0.1]+[0.4]*2``
``{group: w}``    explicit kept widths
a name            a method's named recipe (e.g. l1's ``li2017``)
================  ==========================================================

The target rule: for ``params:x`` / ``flops:x`` a method returns the
largest point of its one-parameter family whose cost is <= the target
(:func:`solve_target`).
"""

import ast
import bisect
import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import numpy as np

from pfa_jax import costs
from pfa_jax import plan as plan_lib
from pfa_jax import select
from pfa_jax.models import structure

KINDS = (
  'params',
  'flops',
  'kl',
  'energy',
  'keep',
  'prune',
  'rates',
  'widths',
  'named',
)
GROUP_SELECTIONS = ('all', 'inner', 'inner+stream')


@dataclasses.dataclass(frozen=True)
class Recipe:
  """A parsed recipe: ``kind`` (one of ``KINDS``) and its ``value``."""

  kind: str
  value: Any = None
  spec: Any = None  # what the user wrote

  @property
  def name(self) -> str:
    """A short, filesystem-safe label (``energy_0.9``, ``params_0.5``)."""
    if self.kind in ('kl',) or self.kind == 'named':
      return str(self.value if self.kind == 'named' else self.kind)
    if self.kind in ('widths', 'rates'):
      return self.kind
    return f'{self.kind}_{self.value:g}'

  def to_json(self):
    return self.spec if isinstance(self.spec, str) else dict(self.value)


def parse_recipe(spec) -> Recipe:
  """Parses one recipe form (module docstring); raises naming the form."""
  if isinstance(spec, Recipe):
    return spec
  if isinstance(spec, Mapping):
    widths = {}
    for k, v in spec.items():
      if isinstance(v, bool) or not float(v).is_integer() or int(v) < 1:
        raise ValueError(
          f'Recipe widths: layer {k!r} needs a positive integer width, got '
          f'{v!r}.'
        )
      widths[str(k)] = int(v)
    if not widths:
      raise ValueError('Recipe widths: empty mapping.')
    return Recipe('widths', widths, spec)
  if not isinstance(spec, str):
    raise ValueError(
      f'A recipe is a string or a {{layer: width}} dict: {spec!r}.'
    )
  kind, sep, value = spec.strip().partition(':')
  if kind == 'kl' and not sep:
    return Recipe('kl', None, spec)
  if not sep:
    if kind.isidentifier():
      return Recipe('named', kind, spec)
    raise ValueError(f'Unknown recipe {spec!r}; forms: {", ".join(KINDS)}.')
  if kind == 'rates':
    return Recipe('rates', tuple(parse_rates(value)), spec)
  if kind not in ('params', 'flops', 'energy', 'keep', 'prune'):
    raise ValueError(
      f'Unknown recipe {spec!r}: use kl, energy:<tau>, keep:<gamma>, '
      'prune:<p>, params:<x>, flops:<x>, rates:[...], a {layer: width} dict '
      "or a method's named recipe."
    )
  try:
    v = float(value)
  except ValueError:
    raise ValueError(
      f'Recipe {spec!r} needs a number after the colon.'
    ) from None
  if not math.isfinite(v) or v <= 0:
    raise ValueError(f'Recipe {spec!r}: value must be positive and finite.')
  if kind in ('energy', 'keep') and v > 1:
    raise ValueError(f'Recipe {spec!r}: {kind} must lie in (0, 1].')
  if kind == 'prune' and v >= 1:
    raise ValueError(f'Recipe {spec!r}: a removed fraction must lie in (0, 1).')
  return Recipe(kind, v, spec)


def parse_rates(text: str) -> list[float]:
  """``'[0.1]+[0.4]*2'`` -> ``[0.1, 0.4, 0.4]``, without ``eval``.

  Accepts the list expressions the HRank/CHIP/CF repositories use: list
  literals of numbers, ``+`` between lists and ``*`` by an integer.
  """

  def ev(node):
    if isinstance(node, ast.List):
      return [num(e) for e in node.elts]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
      return ev(node.left) + ev(node.right)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
      lst, n = (node.left, node.right)
      if not isinstance(lst, ast.List) and not isinstance(lst, ast.BinOp):
        lst, n = n, lst
      count = num(n)
      if not float(count).is_integer() or count < 0:
        raise ValueError(
          f'rates: repeat count must be a whole number: {text!r}'
        )
      return ev(lst) * int(count)
    raise ValueError(f'rates: unsupported expression in {text!r}.')

  def num(node):
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
      return float(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
      return -num(node.operand)
    raise ValueError(f'rates: expected a number in {text!r}.')

  try:
    tree = ast.parse(text.strip(), mode='eval').body
  except SyntaxError:
    raise ValueError(f'rates: cannot parse {text!r}.') from None
  rates = ev(tree)
  for r in rates:
    if not 0.0 <= r < 1.0:
      raise ValueError(
        f'rates: every removed fraction must lie in [0, 1): {r!r}.'
      )
  return rates


@dataclasses.dataclass(frozen=True)
class Context:
  """Everything ``Method.plan`` receives (all plain data)."""

  model: nn.Module
  variables: Mapping[str, Any]
  stats: Any  # what Method.collect returned (None if it reads none)
  recipe: Recipe
  hparams: Mapping[str, Any]
  rng: Any
  groups: tuple[str, ...]
  input_shape: tuple[int, ...] | None
  min_width: Mapping[str, int]
  round_to: int = 1

  def full_widths(self) -> dict[str, int]:
    return {n: structure.widths_of(self.model)[n] for n in self.groups}

  def blocks(self) -> dict[str, int]:
    """``{group: equal blocks}`` (``Group.blocks``; 1 but for grouped convs)."""
    s = self.model.structure()
    return {n: s.group(n).blocks for n in self.groups}

  def finalize(self, widths: Mapping[str, float]) -> dict[str, int]:
    """Clamps to [min_width, C] and rounds up to a multiple of ``round_to``
    and of the group's blocks (capped at C)."""
    full, blocks = self.full_widths(), self.blocks()
    out = {}
    for n, w in widths.items():
      c = full[n]
      w = max(int(math.ceil(w - 1e-9)), int(self.min_width.get(n, 1)), 1)
      step = math.lcm(self.round_to, blocks[n])
      out[n] = min(int(math.ceil(w / step) * step), c)
    return out

  def cost(self, kind: str) -> Callable[[Mapping[str, int]], int]:
    """``widths of self.groups -> params/FLOPs of the whole model``."""
    if self.input_shape is None:
      raise ValueError(
        f'Recipe {self.recipe.spec!r} needs the input shape: pass '
        'input_shape=(H, W, C) or batches.'
      )
    fn = costs.cost_fn(self.model, self.input_shape, kind)
    return lambda w: fn(dict(w))

  def target(self) -> float:
    kind, v = self.recipe.kind, float(self.recipe.value)
    full = costs.count(self.model, self.input_shape)[kind] if v <= 1 else None
    return v * full if v <= 1 else v


@dataclasses.dataclass(frozen=True)
class Method:
  """A registered compression method (see the module docstring)."""

  name: str
  recipes: tuple[str, ...]
  plan: Callable[[Context], plan_lib.Plan]
  hparams: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  collect: Callable | None = None  # (model, variables, batches, groups, hp)
  needs_rng: bool = False
  named_recipes: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  doc: str = ''

  def check_recipe(self, recipe: Recipe) -> Recipe:
    if recipe.kind == 'named':
      if recipe.value not in self.named_recipes:
        raise ValueError(
          f'Method {self.name!r} has no named recipe {recipe.value!r}; named '
          f'recipes: {sorted(self.named_recipes) or "none"}; forms it '
          f'accepts: {", ".join(self.recipes)}.'
        )
      return parse_recipe(self.named_recipes[recipe.value])
    if recipe.kind not in self.recipes:
      raise ValueError(
        f'Method {self.name!r} does not accept recipe {recipe.spec!r} '
        f'({recipe.kind}); it accepts: {", ".join(self.recipes)}.'
      )
    return recipe

  def check_hparams(self, hparams: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(hparams) - set(self.hparams))
    if unknown:
      raise ValueError(
        f'Method {self.name!r} has no hyperparameter(s) {unknown}; it takes: '
        f'{sorted(self.hparams) or "none"}.'
      )
    return {**self.hparams, **hparams}


def select_groups(model: nn.Module, groups) -> tuple[str, ...]:
  """Which groups are pruned: 'all', 'inner' (no residual streams),
  'inner+stream' (= all), or an explicit list of names."""
  s = model.structure()
  if isinstance(groups, str):
    if groups not in GROUP_SELECTIONS:
      raise ValueError(
        f'groups must be one of {GROUP_SELECTIONS} or a list of layer names, '
        f'got {groups!r}.'
      )
    if groups == 'inner':
      return tuple(g.name for g in s.groups if not g.stream)
    return s.names
  names = tuple(groups)
  for n in names:
    s.group(n)  # KeyError naming the layer and the known ones
  if not names:
    raise ValueError('groups: the list of layers to prune is empty.')
  return names


def per_layer(ctx: Context, values: Sequence[float], what: str) -> dict:
  """Maps a per-layer list (in group order) onto ``ctx.groups``."""
  if len(values) != len(ctx.groups):
    raise ValueError(
      f'{what}: {len(values)} values for {len(ctx.groups)} pruned layers '
      f'({", ".join(ctx.groups)}).'
    )
  return dict(zip(ctx.groups, values))


def uniform_widths(ctx: Context, recipe: Recipe) -> dict[str, int] | None:
  """Widths for the layer-wise forms (keep, prune, rates, widths), or None."""
  full = ctx.full_widths()
  if recipe.kind == 'keep':
    return ctx.finalize({n: recipe.value * c for n, c in full.items()})
  if recipe.kind == 'prune':
    return ctx.finalize({n: (1 - recipe.value) * c for n, c in full.items()})
  if recipe.kind == 'rates':
    rates = per_layer(ctx, recipe.value, 'rates')
    return ctx.finalize({n: (1 - rates[n]) * full[n] for n in full})
  if recipe.kind == 'widths':
    unknown = sorted(set(recipe.value) - set(full))
    if unknown:
      raise ValueError(
        f'Recipe widths name layer(s) {unknown} that are not pruned; pruned '
        f'layers: {", ".join(full)}.'
      )
    out, blocks = dict(full), ctx.blocks()
    for n, w in recipe.value.items():
      if w > full[n]:
        raise ValueError(f'Layer {n!r}: width {w} exceeds its {full[n]} units.')
      if w % blocks[n]:
        raise ValueError(
          f'Layer {n!r}: a grouped convolution splits it into {blocks[n]} '
          f'blocks, so its width must be a multiple of {blocks[n]}, got {w}.'
        )
      out[n] = w
    return out
  return None


def solve_target(
  ctx: Context,
  family: Callable[[Any], Mapping[str, int]],
  candidates: Sequence[Any],
) -> tuple[Any, dict[str, int]]:
  """The largest family point whose cost meets the params/FLOPs target.

  ``candidates`` must be ordered so that ``family`` keeps more with each
  step (cost non-decreasing); bisection is then exact over them.

  Returns:
    ``(point, widths)``.

  Raises:
    ValueError: when even the smallest member exceeds the target, naming
      both numbers.
  """
  kind = ctx.recipe.kind
  cost = ctx.cost(kind)
  target = ctx.target()
  fits = [None] * len(candidates)

  def ok(i):
    if fits[i] is None:
      fits[i] = cost(family(candidates[i])) <= target
    return fits[i]

  if len(candidates) == 0 or not ok(0):
    low = cost(family(candidates[0])) if len(candidates) else float('nan')
    raise ValueError(
      f'Recipe {ctx.recipe.spec!r}: the target {kind} {target:.6g} is below '
      f'the smallest network this method can make ({low:.6g}).'
    )
  first_bad = bisect.bisect_left(
    range(len(candidates)), True, lo=1, key=lambda i: not ok(i)
  )
  point = candidates[first_bad - 1]
  return point, dict(family(point))


def full_keep(widths: Mapping[str, int]) -> dict[str, np.ndarray]:
  return {n: np.arange(w) for n, w in widths.items()}


def top_k(scores: np.ndarray, k: int, blocks: int = 1) -> np.ndarray:
  """Sorted indices of the k largest scores (ties: the lower index);
  ``k / blocks`` from each of ``blocks`` equal blocks."""
  order = np.argsort(-np.asarray(scores), kind='stable')
  return select.balanced(order, k, blocks)


def score_plan(ctx: Context, scores, widths, solved) -> plan_lib.Plan:
  """The plan that keeps each layer's ``widths[n]`` highest-scoring units."""
  return plan_lib.Plan(
    keep={n: top_k(scores[n], widths[n], b) for n, b in ctx.blocks().items()},
    report={
      **solved,
      'widths': widths,
      'scores': {n: np.asarray(s).tolist() for n, s in scores.items()},
    },
  )
