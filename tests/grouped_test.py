"""Grouped convolutions: discovery, balanced keep-sets, slicing, costs, folds.

A conv of ``G`` feature groups reads block ``b`` of its input channels into
block ``b`` of its outputs. Its input and output spaces are prunable when
every block keeps as many channels. References: hand-written structures, a
naive per-block gather of the kernel, the masked dense network, the traced
parameter and FLOP count, per-block float64 least squares, and naive
re-implementations of the balanced selections.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import random_nets as rn
from absl.testing import absltest
from absl.testing import parameterized

from pfa_jax import costs
from pfa_jax import discover
from pfa_jax import methods
from pfa_jax import models
from pfa_jax import plan as plan_lib
from pfa_jax import sampling
from pfa_jax import schedules
from pfa_jax import select
from pfa_jax import slicing
from pfa_jax.methods import cf
from pfa_jax.methods import compensation
from pfa_jax.methods import fcp
from pfa_jax.models import structure as structure_lib

SHAPE = (8, 8, 3)


class NeXt(nn.Module):
  """A ResNeXt-like bottleneck: 1x1, a 3x3 of fixed groups, 1x1, and a
  second grouped conv of 2 groups before the head."""

  widths: tuple[int, ...] = (6, 8, 12, 8, 6)
  groups: int = 4
  num_classes: int = 3

  @nn.compact
  def __call__(self, x, train: bool = False):
    w = self.widths
    bn = lambda name: nn.BatchNorm(use_running_average=not train, name=name)  # noqa: E731
    x = nn.relu(nn.Conv(w[0], (3, 3), name='stem')(x))
    y = nn.Conv(w[1], (1, 1), use_bias=False, name='a')(x)
    y = nn.relu(bn('bn_a')(y))
    y = nn.Conv(w[2], (3, 3), feature_group_count=self.groups, name='g')(y)
    y = nn.Conv(w[3], (1, 1), name='b')(nn.relu(y))
    y = nn.Conv(w[4], (3, 3), feature_group_count=2, name='g2')(nn.relu(y))
    return nn.Dense(self.num_classes, name='head')(jnp.mean(nn.relu(y), (1, 2)))

  def structure(self):
    return discover.cached(self, (1, *SHAPE)).structure


class Linear(nn.Module):
  """A linear 1x1 layer read by a grouped conv of 2 groups (LS tests)."""

  widths: tuple[int, ...] = (6, 4, 4)

  @nn.compact
  def __call__(self, x, train: bool = False):
    w = self.widths
    x = nn.relu(nn.Conv(w[0], (3, 3), name='stem')(x))
    y = nn.Conv(w[1], (1, 1), name='a')(x)
    # 1x1: a fold's offset is exact only without zero padding around it.
    y = nn.Conv(w[2], (1, 1), feature_group_count=2, name='g')(y)
    return nn.Dense(3, name='head')(jnp.mean(nn.relu(y), (1, 2)))

  def structure(self):
    return discover.cached(self, (1, *SHAPE)).structure


class ByWidth(nn.Module):
  """A RegNet-like conv whose group count follows its width (C // 2)."""

  widths: tuple[int, ...] = (8, 8)

  @nn.compact
  def __call__(self, x, train: bool = False):
    w = self.widths
    x = nn.relu(nn.Conv(w[0], (3, 3), name='stem')(x))
    x = nn.Conv(w[1], (3, 3), feature_group_count=w[0] // 2, name='g')(x)
    return nn.Dense(3, name='head')(jnp.mean(nn.relu(x), (1, 2)))


def _init(model, seed=0):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(k1, (4, *SHAPE))
  variables = model.init(k2, x)
  # Biases and BN statistics away from their init.
  variables = jax.tree.map(
    lambda a: a + 0.3 * jax.random.normal(k3, a.shape) if a.ndim == 1 else a,
    variables,
  )
  return variables, x


def _counts(keep, width, blocks):
  return np.bincount(np.asarray(keep) // (width // blocks), minlength=blocks)


class DiscoveryTest(parameterized.TestCase):
  def test_blocks_and_grouped_consumers(self):
    s = NeXt().structure()
    c = lambda path, blocks=1: structure_lib.Consumer(path, blocks=blocks)  # noqa: E731
    want = {
      'stem': (('stem',), (c('a'),), 1),
      'a': (('a', 'bn_a'), (c('g', 4),), 4),
      'g': (('g',), (c('b'),), 4),
      'b': (('b',), (c('g2', 2),), 2),
      'g2': (('g2',), (c('head'),), 2),
    }
    got = {g.name: (g.producers, g.consumers, g.blocks) for g in s.groups}
    self.assertEqual(got, want)

  def test_fixed_groups_that_equal_the_width_are_not_depthwise(self):
    # At widths of 4, conv g (4 fixed groups) has as many groups as input
    # and output channels, which is how a depthwise conv traces. Traced at
    # twice the widths it keeps 4 groups, so it stays a grouped conv: the
    # pruned network's structure is the full one's at its new widths.
    full = NeXt().structure()
    small = NeXt(widths=(6, 4, 4, 8, 6)).structure()
    self.assertEqual(
      [(g.name, g.consumers, g.blocks) for g in small.groups],
      [(g.name, g.consumers, g.blocks) for g in full.groups],
    )

  def test_a_group_count_that_follows_a_width_is_pinned(self):
    d = discover.discover(ByWidth(), (1, *SHAPE))
    self.assertEqual(d.structure.names, ())
    for name in ('stem', 'g'):
      self.assertIn("'g' has 4 groups, and 8 at twice", d.pinned[name])

  def test_check_reads_blocks(self):
    s = NeXt().structure()
    groups = [
      dataclasses.replace(g, blocks=1) if g.name == 'g' else g for g in s.groups
    ]
    wrong = dataclasses.replace(s, groups=tuple(groups))
    self.assertEqual(
      discover.compare(wrong, s), ["group 'g': blocks 1, discovered 4"]
    )


class SlicingTest(parameterized.TestCase):
  @parameterized.parameters(0, 1, 2)
  def test_pruned_equals_masked_and_costs_match(self, seed):
    model = NeXt()
    variables, x = _init(model, seed)
    rng = np.random.default_rng(seed)
    s = model.structure()
    keep = {
      g.name: rn.balanced_keep(
        rng,
        model.widths[g.index],
        g.blocks,
        int(rng.integers(1, model.widths[g.index] // g.blocks + 1)),
      )
      for g in s.groups
    }
    pm, pv = slicing.prune(model, variables, keep)
    mm, mv = slicing.mask(model, variables, keep)
    np.testing.assert_allclose(
      pm.apply(pv, x), mm.apply(mv, x), rtol=1e-5, atol=1e-6
    )
    abstract = jax.eval_shape(pm.init, jax.random.key(0), x)
    self.assertEqual(
      jax.tree.map(jnp.shape, pv), jax.tree.map(jnp.shape, abstract)
    )
    small = {n: len(i) for n, i in keep.items()}
    traced = costs.count(pm, SHAPE)
    for metric in costs.METRICS:
      fn = costs.cost_fn(model, SHAPE, metric)
      self.assertEqual(fn(small), traced[metric], metric)
    # Hand count of the grouped kernel: 3 * 3 * (C_in / G) * C_out.
    self.assertEqual(
      pv['params']['g']['kernel'].size,
      9 * (small['a'] // 4) * small['g'],
    )
    # Scatter inverts prune on kept entries: the masked dense parameters.
    dense = slicing.scatter(model, pv, keep, variables)
    for path, leaf in jax.tree_util.tree_leaves_with_path(dense['params']):
      want = mv['params']
      for k in path:
        want = want[k.key]
      np.testing.assert_allclose(leaf, want, atol=1e-7, err_msg=str(path))

  def test_grouped_kernel_against_a_naive_gather(self):
    model = NeXt()
    variables, _ = _init(model)
    keep = {'a': np.array([0, 3, 5, 6])}  # one of each block of 2
    _, pv = slicing.prune(model, variables, keep)
    old = np.asarray(variables['params']['g']['kernel'])  # [3, 3, 2, 12]
    new = np.asarray(pv['params']['g']['kernel'])  # [3, 3, 1, 12]
    for o in range(12):
      block = o // 3  # 12 outputs in 4 groups
      (row,) = [c - 2 * block for c in keep['a'] if c // 2 == block]
      np.testing.assert_array_equal(new[:, :, 0, o], old[:, :, row, o])

  def test_unbalanced_keep_sets_raise_naming_the_layer(self):
    model = NeXt()
    variables, _ = _init(model)
    with self.assertRaisesRegex(
      ValueError, r"Layer 'g': .*4 blocks of 3.*keeps \[2, 1, 1, 1\]"
    ):
      slicing.prune(model, variables, {'g': np.array([0, 1, 3, 6, 9])})
    with self.assertRaisesRegex(
      ValueError, "Layer 'a': .*multiple of 4, got 6"
    ):
      structure_lib.with_widths(model, {'a': 6})


class SelectionTest(parameterized.TestCase):
  @parameterized.parameters((12, 4, 8), (12, 3, 3), (6, 1, 4), (8, 2, 0))
  def test_balanced_against_a_naive_loop(self, width, blocks, k):
    rng = np.random.default_rng(width + blocks + k)
    for _ in range(20):
      ranking = rng.permutation(width)
      size, quota, taken = width // blocks, k // blocks, []
      for c in ranking:  # best first, while its block has room
        if sum(t // size == c // size for t in taken) < quota:
          taken.append(int(c))
      np.testing.assert_array_equal(
        select.balanced(ranking, k, blocks), sorted(taken)
      )

  def test_balanced_rejects_a_count_the_blocks_do_not_divide(self):
    with self.assertRaisesRegex(ValueError, 'keep 5 of 12 units in 4'):
      select.balanced(np.arange(12), 5, 4)

  def test_methods_keep_blocks_balanced(self):
    model = NeXt()
    variables, _ = _init(model)
    s = model.structure()
    batches = rn.batches()
    cases = [
      ('l1', 'keep:0.5', {}),
      ('l1', 'params:0.5', {}),
      ('pfa', 'flops:0.5', {}),
      ('random', 'keep:0.4', {'rng': 3}),
      ('slim', 'prune:0.3', {'groups': ['a']}),
    ]
    for name, recipe, kw in cases:
      out = methods.prune(
        name, model, variables, recipe=recipe, batches=batches, **kw
      )
      for g, kept in out.plan.keep.items():
        blocks = s.group(g).blocks
        counts = _counts(kept, model.widths[s.group(g).index], blocks)
        self.assertLen(set(counts.tolist()), 1, f'{name} {recipe} {g}')
      self.assertEqual(
        out.model.widths[s.group('g').index] % 4, 0, f'{name} {recipe}'
      )

  def test_l1_keeps_each_blocks_largest_filters(self):
    model = NeXt()
    variables, _ = _init(model)
    out = methods.prune('l1', model, variables, recipe='keep:0.5')
    # keep:0.5 of 12 in 4 blocks: 6, rounded up to 8, two per block.
    kernel = np.asarray(variables['params']['g']['kernel'], np.float64)
    norms = np.abs(kernel).sum((0, 1, 2)).reshape(4, 3)
    want = [3 * b + i for b in range(4) for i in np.argsort(-norms[b])[:2]]
    np.testing.assert_array_equal(out.plan.keep['g'], sorted(want))

  def test_explicit_widths_must_fill_the_blocks(self):
    model = NeXt()
    variables, _ = _init(model)
    with self.assertRaisesRegex(ValueError, "'g': .*multiple of 4, got 6"):
      methods.prune('l1', model, variables, recipe={'g': 6})

  def test_random_widths_and_keep_sets_fill_the_blocks(self):
    model = NeXt()
    s = model.structure()
    for seed in range(5):
      w = sampling.sample_widths(model, SHAPE, 0.5, seed=seed, tol=0.1)
      full = structure_lib.widths_of(model)
      keep = sampling.random_keep(
        full, w, seed, {n: s.group(n).blocks for n in w}
      )
      for n, width in w.items():
        self.assertEqual(width % s.group(n).blocks, 0, n)
        counts = _counts(keep[n], full[n], s.group(n).blocks)
        self.assertTrue(np.all(counts == width // s.group(n).blocks), n)

  def test_cf_and_fcp_remove_and_fold_inside_blocks(self):
    # Channel 1 of 'a' duplicates channel 0 (block 0), channel 3 channel 2
    # (block 1). Both methods remove one filter per block, the duplicate,
    # and fold it into its twin: the pruned network is the full one.
    model = Linear()
    variables, x = _init(model)
    params = jax.tree.map(np.array, variables['params'])
    k, b = params['a']['kernel'], params['a']['bias']
    k[..., 1], b[1] = k[..., 0], b[0]
    k[..., 3], b[3] = k[..., 2], b[2]
    variables = {'params': params}
    full = model.apply(variables, x)
    for name in ('cf', 'fcp'):
      out = methods.prune(
        name,
        model,
        variables,
        recipe='prune:0.5',
        groups=['a'],
        batches=rn.batches(n=4),
      )
      keep = out.plan.keep['a']
      self.assertEqual(_counts(keep, 4, 2).tolist(), [1, 1], name)
      self.assertLen(set(keep.tolist()) & {0, 1}, 1, name)
      np.testing.assert_allclose(
        out.model.apply(out.variables, x), full, rtol=1e-4, atol=1e-4
      )

  def test_cf_and_fcp_keep_blocks_balanced_on_the_bottleneck(self):
    model = NeXt()
    variables, x = _init(model)
    s = model.structure()
    for name in ('cf', 'fcp'):
      out = methods.prune(
        name, model, variables, recipe='prune:0.5', batches=rn.batches()
      )
      for g, kept in out.plan.keep.items():
        counts = _counts(
          kept, model.widths[s.group(g).index], s.group(g).blocks
        )
        self.assertLen(set(counts.tolist()), 1, f'{name} {g}')
      mm, mv = slicing.mask(model, variables, out.plan)
      np.testing.assert_allclose(
        out.model.apply(out.variables, x), mm.apply(mv, x), rtol=1e-4, atol=1e-5
      )

  def test_block_pairs_and_centres_stay_in_their_block(self):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(9, 12))
    r = fcp.filter_correlation(w)
    pairs = fcp.block_pairs(r, 4, blocks=4)
    self.assertEqual(sorted(a // 3 for a, _ in pairs), [0, 1, 2, 3])
    for a, b in pairs:
      self.assertEqual(a // 3, b // 3)
      # Inside its block, the pair is the block's most correlated one.
      lo = a // 3 * 3
      block = [(i, j) for i in range(lo, lo + 3) for j in range(i + 1, lo + 3)]
      best = max(block, key=lambda p: (r[p], -p[0], -p[1]))
      self.assertEqual(sorted((a, b)), list(best))
    d = np.abs(rng.normal(size=(12, 12)))
    keep, delegates, report = cf.central_filter_blocks(d + d.T, 8, blocks=4)
    self.assertEqual(_counts(keep, 12, 4).tolist(), [1, 1, 1, 1])
    self.assertLen(report['blocks'], 4)
    for removed, centre in delegates.items():
      self.assertEqual(removed // 3, centre // 3)
      self.assertIn(centre, keep)

  def test_fcp_round_count(self):
    # ceil(n / blocks) per block, at most half of each block.
    self.assertEqual(fcp.round_count(12, 1, 4), 4)
    self.assertEqual(fcp.round_count(12, 5, 4), 4)  # blocks of 3: one each
    self.assertEqual(fcp.round_count(16, 5, 2), 6)
    self.assertEqual(fcp.round_count(7, 5), 3)
    self.assertEqual(fcp.round_count(16, 3), 3)

  def test_fcp_rounds_drop_whole_blocks(self):
    # One pair per round: a plain layer drops 1, a layer of 4 blocks 4 (one
    # in each), until a block is down to one channel.
    model = NeXt()
    steps = schedules.fcp_round_steps(
      model, 'params:0.3', groups='all', num_pairs=1, input_shape=SHAPE
    )
    s = model.structure()
    widths = structure_lib.widths_of(model)
    for step in steps:
      for g, w in step.widths.items():
        blocks = s.group(g).blocks
        self.assertEqual(w % blocks, 0, g)
        self.assertEqual(w, widths[g] - fcp.round_count(widths[g], 1, blocks))
      widths = {**widths, **step.widths}
    self.assertGreater(len(steps), 1)

  def test_given_pairs_must_stay_in_blocks(self):
    model = Linear()
    variables, _ = _init(model)
    with self.assertRaisesRegex(
      ValueError, "Layer 'a': .* 2 blocks of 2; pairs must lie inside one"
    ):
      methods.prune(
        'fcp',
        model,
        variables,
        recipe='prune:0.5',
        groups=['a'],
        batches=rn.batches(),
        pairs={'a': [[0, 2], [1, 3]]},
      )


class CompensationTest(parameterized.TestCase):
  def test_block_fold_is_each_blocks_least_squares(self):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6))
    x[:, 1] = 0.5 * x[:, 0] + 0.2 * x[:, 2] + 0.01 * rng.normal(size=200)
    cov, mean = np.cov(x.T), x.mean(0)
    keep = np.array([0, 2, 4])  # blocks of 2 hold {0,1}, {2,3}, {4,5}
    fold = compensation.ls_fold(cov, mean, keep, ridge=0.0, blocks=3)
    # Row b (removed 2b + 1) regresses on kept 2b alone, with intercept.
    for b in range(3):
      a = np.c_[x[:, 2 * b], np.ones(200)]
      coef = np.linalg.lstsq(a, x[:, 2 * b + 1], rcond=None)[0]
      np.testing.assert_allclose(fold.matrix[b, b], coef[0], rtol=1e-8)
      np.testing.assert_allclose(fold.offset[b], coef[1], atol=1e-8)
      self.assertEqual(np.count_nonzero(fold.matrix[b]), 1)

  def test_ls_through_a_grouped_conv_is_exact_within_blocks(self):
    # Channel 1 of 'a' is 0.5 x channel 0 + 0.3 (block 0), channel 3 is
    # 2 x channel 2 - 0.1 (block 1): keeping {0, 2}, the block-by-block fold
    # restores the network exactly. Channel 3 = channel 0 instead crosses
    # blocks, which grouped conv g cannot route: the fold stays in-block.
    model = Linear()
    variables, x = _init(model)
    params = jax.tree.map(np.array, variables['params'])
    k, b = params['a']['kernel'], params['a']['bias']
    k[..., 1], b[1] = 0.5 * k[..., 0], 0.5 * b[0] + 0.3
    k[..., 3], b[3] = 2.0 * k[..., 2], 2.0 * b[2] - 0.1
    variables = {'params': params}
    keep = {'a': np.array([0, 2])}
    batches = rn.batches(n=4)
    plan = compensation.compensate(model, variables, keep, batches, ridge=0.0)
    detail = plan.report['compensation_detail']['groups']['a']
    self.assertEqual(detail['blocks'], 2)
    np.testing.assert_allclose(
      plan.folds['a'].matrix, [[0.5, 0.0], [0.0, 2.0]], atol=1e-4
    )
    pm, pv = slicing.prune(model, variables, plan)
    full = model.apply(variables, x)
    np.testing.assert_allclose(pm.apply(pv, x), full, rtol=1e-4, atol=1e-4)
    bare, bv = slicing.prune(model, variables, keep)
    self.assertGreater(float(jnp.max(jnp.abs(bare.apply(bv, x) - full))), 1e-2)

    k[..., 3], b[3] = k[..., 0], b[0]
    plan = compensation.compensate(model, variables, keep, batches, ridge=0.0)
    self.assertEqual(plan.folds['a'].matrix[1, 0], 0.0)

  def test_a_fold_across_blocks_raises_naming_the_layer(self):
    model = Linear()
    variables, _ = _init(model)
    plan = plan_lib.Plan(
      keep={'a': np.array([0, 2])}, folds={'a': plan_lib.Fold(np.ones((2, 2)))}
    )
    with self.assertRaisesRegex(
      ValueError, "Layer 'a': the fold carries channels across the 2 blocks"
    ):
      slicing.prune(model, variables, plan)

  def test_l1_with_ls_on_the_bottleneck(self):
    model = NeXt()
    variables, x = _init(model)
    out = methods.prune(
      'l1',
      model,
      variables,
      recipe='keep:0.5',
      compensation='ls',
      batches=rn.batches(),
    )
    mm, mv = slicing.mask(model, variables, out.plan)
    np.testing.assert_allclose(
      out.model.apply(out.variables, x), mm.apply(mv, x), rtol=1e-4, atol=1e-5
    )
    detail = out.report['compensation_detail']['groups']
    self.assertEqual(detail['a']['blocks'], 4)  # read by g
    self.assertEqual(detail['g']['blocks'], 1)  # read by b, a plain conv
    m = out.plan.folds['a'].matrix  # 4 removed x 4 kept, one block each
    self.assertTrue(np.all(m[~np.eye(4, dtype=bool)] == 0))


class UserModelTest(parameterized.TestCase):
  @parameterized.parameters(
    (0.25, (8, 16, 16, 32, 16, 16)), (0.1, (3, 8, 8, 13, 8, 8))
  )
  def test_width_mult_keeps_whole_blocks(self, mult, want):
    # 64 x 0.1 = 6.4 rounds to one block of 8, not to 6.
    model = models.get_model(
      'experiments.user_model:NeXtCNN', num_classes=10, width_mult=mult
    )
    self.assertEqual(model.widths, want)
    blocks = {g.name: g.blocks for g in model.structure().groups}
    self.assertEqual(
      blocks, {'stem': 1, 'a1': 8, 'g1': 8, 'stream1': 1, 'a2': 8, 'g2': 8}
    )

  def test_pfa_with_ls_on_the_example(self):
    model = models.get_model(
      'experiments.user_model:NeXtCNN', num_classes=10, width_mult=0.25
    )
    x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
    variables = model.init(jax.random.key(1), x)
    rng = np.random.default_rng(0)
    batches = [
      {
        'image': rng.normal(size=(8, 32, 32, 3)).astype(np.float32),
        'label': np.zeros(8, np.int32),
        'mask': np.ones(8, bool),
      }
      for _ in range(2)
    ]
    out = methods.prune(
      'pfa',
      model,
      variables,
      recipe='flops:0.5',
      batches=batches,
      compensation='ls',
    )
    self.assertLessEqual(
      costs.count(out.model, (32, 32, 3))['flops'],
      0.5 * costs.count(model, (32, 32, 3))['flops'],
    )
    for g in ('a1', 'g1', 'a2', 'g2'):
      self.assertEqual(len(out.plan.keep[g]) % 8, 0, g)
    mm, mv = slicing.mask(model, variables, out.plan)
    np.testing.assert_allclose(
      out.model.apply(out.variables, x), mm.apply(mv, x), rtol=1e-4, atol=1e-5
    )


if __name__ == '__main__':
  absltest.main()
