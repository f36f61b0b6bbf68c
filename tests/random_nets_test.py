"""Random Flax CNNs through discovery, the slicer, the cost model and methods.

References, per random net (``tests/random_nets.py``): the structure derived
from the net's recipe by bookkeeping (not from its jaxpr); the masked dense
network for the pruned one; the traced parameter and FLOP count of the
sliced network for the closed-form cost model; the pruned network's own
discovered structure against the recipe at its new widths. The default suite
runs a few hundred nets; ``slow`` runs thousands, and larger ones.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import random_nets as rn
from absl.testing import absltest
from absl.testing import parameterized

from pfa_jax import costs
from pfa_jax import discover
from pfa_jax import methods
from pfa_jax import slicing
from pfa_jax.methods import compensation

SHAPE = (rn.SIZE, rn.SIZE, 3)


def _want(spec, widths):
  groups, bn_after, pinned = rn.expected(spec, widths)
  return {g: v.normal() for g, v in groups.items()}, bn_after, pinned


def _check_structure(test, spec, widths):
  found = discover.discover(rn.RandomNet(spec, widths), (1, *SHAPE))
  want, bn_after, pinned = _want(spec, widths)
  msg = f'{spec} {widths}'
  test.assertEqual(rn.found(found.structure), want, msg)
  test.assertEqual(set(found.structure.bn_after), bn_after, msg)
  test.assertEqual(found.structure.head, 'out', msg)
  test.assertEqual(found.pinned.pop('out'), 'the model output', msg)
  test.assertLen(found.pinned, len(pinned), msg)
  for reason in found.pinned.values():  # a GroupNorm over 2 groups
    test.assertIn('regrouped by a reshape', reason, msg)
  test.assertEqual(found.structure.index_maps, (), msg)


def _init(model, seed):
  k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(k1, (4, *SHAPE))
  variables = model.init(k2, x)
  # Biases and scales away from their init (zero biases after a GroupNorm
  # per channel and a global mean give logits of rounding noise only).
  variables = {
    **variables,
    'params': jax.tree.map(
      lambda a: a + 0.3 * jax.random.normal(k4, a.shape) if a.ndim == 1 else a,
      variables['params'],
    ),
  }
  if 'batch_stats' in variables:  # running statistics away from (0, 1)
    variables = {
      **variables,
      'batch_stats': jax.tree.map(
        lambda a: a + 0.5 * jnp.abs(jax.random.normal(k3, a.shape)),
        variables['batch_stats'],
      ),
    }
  return variables, x


def _rel_err(a, b):
  return float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))


def _check_slicing(test, seed, n_ops=7):
  spec, widths = rn.spec(seed, n_ops)
  model = rn.RandomNet(spec, widths)
  variables, x = _init(model, seed)
  groups = model.structure().groups
  blocks = {i: g['blocks'] for i, g in _want(spec, widths)[0].items()}
  rng = np.random.default_rng(seed)
  keep = {
    g.name: rn.balanced_keep(rng, widths[g.index], blocks[g.index])
    for g in groups
  }
  msg = f'seed {seed}: {spec} {widths}'
  pm, pv = slicing.prune(model, variables, keep)
  mm, mv = slicing.mask(model, variables, keep)
  test.assertLess(_rel_err(pm.apply(pv, x), mm.apply(mv, x)), 1e-5, msg)
  # The sliced variables are what the smaller model initialises.
  abstract = jax.eval_shape(pm.init, jax.random.key(0), x)
  test.assertEqual(
    jax.tree.map(jnp.shape, pv), jax.tree.map(jnp.shape, abstract), msg
  )
  small = {g.name: len(keep[g.name]) for g in groups}
  traced = costs.count(pm, SHAPE)
  for metric in costs.METRICS:
    fn = costs.cost_fn(model, SHAPE, metric)
    test.assertEqual(fn(small), traced[metric], f'{metric}, {msg}')
  # The pruned model's own structure is the recipe's at its new widths.
  test.assertEqual(rn.found(pm.structure()), _want(spec, pm.widths)[0], msg)


class StructureTest(parameterized.TestCase):
  def test_discovered_structure_is_the_recipes(self):
    for seed in range(100):
      _check_structure(self, *rn.spec(seed))

  @pytest.mark.slow
  def test_discovered_structure_is_the_recipes_many(self):
    for seed in range(100, 700):
      _check_structure(self, *rn.spec(seed, n_ops=int(4 + seed % 12)))

  def test_reference_by_hand(self):
    # One net worked by hand: a concat read at offsets 0 and 3 of 7, and a
    # BN on conv0's raw output, which the concat reads too (no bn_after).
    spec = (
      ('conv', 0, 0, 3, 1, False, 'none'),
      ('conv', 0, 1, 1, 1, True, 'relu'),
      ('cat', 1, 2),
      ('bn', 1, True),
      ('conv', 3, 2, 3, 1, True, 'relu'),
      ('head', 5, 'mean', -1),
    )
    want, bn_after, _ = _want(spec, (3, 4, 2))
    self.assertEqual(want[0]['producers'], ['bn3', 'conv0'])
    self.assertEqual(want[0]['consumers'], [('conv4', 0, 7, 1)])
    self.assertEqual(want[1]['consumers'], [('conv4', 3, 7, 1)])
    self.assertEqual(want[2]['consumers'], [('out', 0, None, 1)])
    self.assertEqual(bn_after, set())
    _check_structure(self, spec, (3, 4, 2))
    # Read once, conv0's output gives the pair.
    spec = spec[:2] + (('pool', 2, 'max'),) + spec[3:]
    self.assertEqual(_want(spec, (3, 4, 2))[1], {('conv0', 'bn3')})
    _check_structure(self, spec, (3, 4, 2))

  def test_a_pin_reports_the_first_cause_in_the_forward_pass(self):
    # A GroupNorm(2) pins group 5; a squeeze-excitation gate after it then
    # fails to join the regrouped label to its own. The reason reported was
    # the gate's ("mixed channels in 'mul'"), whichever node was older; it
    # is the norm's, the first cause in the forward pass.
    spec = (
      ('conv', 0, 0, 3, 1, True, 'relu_bn'),
      ('dense4d', 1, 1, False),
      ('pool', 2, 'max'),
      ('se', 1, 2),
      ('conv', 4, 3, 3, 2, True, 'relu'),
      ('dw', 4, 'relu'),
      ('conv', 5, 4, 1, 1, False, 'none'),
      ('up', 3, 5),
      ('gn', 8, 2),
      ('gain', 1),
      ('se', 9, 6),
      ('head', 11, 'mean', -1),
    )
    _check_structure(self, spec, (2, 3, 2, 2, 4, 4, 6))


class SlicingTest(parameterized.TestCase):
  def test_pruned_equals_masked_and_costs_match(self):
    for seed in range(8):
      _check_slicing(self, seed)

  @pytest.mark.slow
  def test_pruned_equals_masked_and_costs_match_many(self):
    for seed in range(8, 200):
      _check_slicing(self, seed, n_ops=int(4 + seed % 10))


def _methods_on(test, seed):
  spec, widths = rn.spec(seed)
  model = rn.RandomNet(spec, widths)
  variables, x = _init(model, seed)
  s = model.structure()
  unread = sorted(g.name for g in s.groups if not g.consumers)
  inner = [g.name for g in s.groups if not g.stream]
  msg = f'seed {seed}: {spec} {widths}'
  batches = rn.batches(seed=seed)
  cases = [
    ('l1', dict(recipe='keep:0.5', compensation='ls')),
    ('random', dict(recipe='keep:0.5', rng=seed)),
    ('pfa', dict(recipe='energy:0.9')),
    ('cf', dict(recipe='prune:0.5', groups=inner)),
    ('fcp', dict(recipe='prune:0.5', groups=inner)),
  ]
  for name, kw in cases:
    if kw.get('groups') == []:
      continue
    dead = [n for n in unread if n in kw.get('groups', s.names)]
    if name in ('pfa', 'cf', 'fcp') and dead:  # they read what consumers read
      with test.assertRaisesRegex(ValueError, '|'.join(map(repr, dead))):
        methods.prune(name, model, variables, batches=batches, **kw)
      continue
    out = methods.prune(name, model, variables, batches=batches, **kw)
    mm, mv = slicing.mask(model, variables, out.plan)
    err = _rel_err(out.model.apply(out.variables, x), mm.apply(mv, x))
    # float32 rounding, scaled by the largest fold coefficient (an LS fit
    # from 32 samples of a near-constant channel reaches 30).
    scale = max(
      [1.0] + [np.abs(f.matrix).max() for f in out.plan.folds.values()]
    )
    test.assertLess(err, 1e-5 * scale, f'{name}, {msg}')
    if name == 'l1':
      detail = out.report['compensation_detail']
      test.assertEqual(detail['skipped_unread'], unread, msg)
      for g, info in detail['groups'].items():
        test.assertEqual(
          info['intercept'], not slicing.offset_free(model, variables, g)
        )
        test.assertEqual(
          out.plan.folds[g].offset is None, not info['intercept']
        )


class MethodsTest(parameterized.TestCase):
  def test_a_layer_nothing_reads(self):
    # conv1 is a dead branch. LS skips it and names it; asked for it by
    # name, LS raises; PFA, CF and FCP, which read what consumers read,
    # raise naming it, reading at most one batch.
    spec = (
      ('conv', 0, 0, 3, 1, True, 'bn_relu'),
      ('conv', 1, 1, 3, 1, True, 'relu'),
      ('conv', 1, 2, 3, 1, True, 'relu'),
      ('head', 3, 'mean', -1),
    )
    model = rn.RandomNet(spec, (4, 3, 5))
    variables, _ = _init(model, 0)
    self.assertEqual(model.structure().group('conv1').consumers, ())
    kw = dict(recipe='keep:0.5', batches=rn.batches(seed=0))
    out = methods.prune('l1', model, variables, compensation='ls', **kw)
    detail = out.report['compensation_detail']
    self.assertEqual(detail['skipped_unread'], ['conv1'])
    self.assertEqual(sorted(out.plan.folds), ['conv0', 'conv2'])
    with self.assertRaisesRegex(ValueError, "'conv1' has no consumer"):
      compensation.compensate(
        model, variables, out.plan, kw['batches'], groups=['conv1']
      )

    drawn = []

    def batches():  # records how far each pass reads
      drawn.append(0)
      for b in rn.batches(seed=0):
        drawn[-1] += 1
        yield b

    for name in ('pfa', 'cf', 'fcp'):
      drawn.clear()
      with self.subTest(name), self.assertRaisesRegex(ValueError, "'conv1'"):
        methods.prune(
          name, model, variables, recipe='keep:0.5', batches=batches
        )
      self.assertLessEqual(max(drawn, default=0), 1, name)

  def test_every_method_on_random_nets(self):
    for seed in range(6):
      _methods_on(self, seed)

  @pytest.mark.slow
  def test_every_method_on_random_nets_many(self):
    for seed in range(6, 60):
      _methods_on(self, seed)


if __name__ == '__main__':
  absltest.main()
