"""Central Filter tests: similarity vs a float64 per-image reference, the
graph selection vs a hand-derived example and a naive re-implementation,
the compress_rate parser and the fold."""

import jax
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized
from flax import traverse_util
from references import similarity as _ref_similarity

from pfa_jax import methods
from pfa_jax import models
from pfa_jax.methods import cf

# ---------------------------------------------------------------------------
# Independent references.


def _naive_central_filter(d, n):
  """Float bisection, union-find components, loops: written separately."""
  c = d.shape[0]
  d = np.triu(d, 1) + np.triu(d, 1).T

  def edges(t):
    return [(i, j) for i in range(c) for j in range(i + 1, c) if d[i, j] > t]

  def comps(es):
    parent = list(range(c))

    def find(a):
      while parent[a] != a:
        a = parent[a]
      return a

    for i, j in es:
      parent[find(i)] = find(j)
    return [find(i) for i in range(c)]

  def removable(t):
    es = edges(t)
    nodes = {i for e in es for i in e}
    roots = comps(es)
    return len(nodes) - len({roots[i] for i in nodes})

  if n == 0:
    return list(range(c)), {}
  lo, hi = np.min(d) - 1.0, np.max(d)  # removable(lo) >= n > removable(hi)
  for _ in range(200):
    mid = 0.5 * (lo + hi)
    if removable(mid) >= n:
      lo = mid
    else:
      hi = mid
  es = edges(lo)
  nbr = {i: set() for i in range(c)}
  for i, j in es:
    nbr[i].add(j)
    nbr[j].add(i)
  roots = comps(es)
  score = [
    np.mean([d[i, j] for j in nbr[i]]) if nbr[i] else 0.0 for i in range(c)
  ]
  order = sorted(range(c), key=lambda i: (-score[i], i))
  removed, centres, done_comp = {}, [], set()
  for u in order:
    if len(removed) == n:
      break
    if u in removed or u in centres or not nbr[u] or roots[u] in done_comp:
      continue
    centres.append(u)
    done_comp.add(roots[u])
    for v in sorted(nbr[u], key=lambda v: (-d[u, v], v)):
      if len(removed) < n and v not in removed and v not in centres:
        removed[v] = u
  while len(removed) < n:
    best = None
    for i in range(c):
      if i in removed or i in centres:
        continue
      for ctr in centres:
        key = (-d[i, ctr], i, ctr)
        if best is None or key < best:
          best = key
    removed[best[1]] = best[2]
  keep = [i for i in range(c) if i not in removed]
  return keep, removed


def _example_d():
  """The hand-worked 8-node example (see WorkedExampleTest)."""
  c = 8
  d = np.zeros((c, c))
  for i in range(c):
    for j in range(i + 1, c):
      d[i, j] = 0.001 * (8 * i + j)  # distinct background, all < 0.06
  strong = {
    (0, 1): 0.9,
    (0, 2): 0.85,
    (0, 3): 0.8,
    (4, 5): 0.7,
    (1, 2): 0.66,
    (5, 6): 0.65,
    (4, 6): 0.3,
    (0, 7): 0.2,
    (0, 6): 0.1,
    (4, 7): 0.05,
  }
  for (i, j), v in strong.items():
    d[i, j] = v
  d = d + d.T
  np.fill_diagonal(d, 1.0)
  return d


class SimilarityTest(parameterized.TestCase):
  def _maps(self, seed):
    rng = np.random.default_rng(seed)
    maps = np.maximum(rng.normal(size=(5, 4, 3, 7)), 0).astype(np.float32)
    maps[:, :, :, 1] = 0.0  # always all-zero
    maps[:, :, :, 2] = 0.7  # always constant non-zero
    maps[0, :, :, 3] = 0.0  # all-zero in image 0 only
    maps[1, :, :, 4] = 2.5  # constant non-zero in image 1 only
    maps[2, :, :, 5] = 2.0 * maps[2, :, :, 6] + 1.0  # exact affine copy
    maps[3, :, :, :] = 0.0  # a dead image: every pair both constant
    return maps

  def test_matches_per_image_reference_with_degenerate_maps(self):
    maps = self._maps(0)
    state = cf.similarity_update(cf.similarity_init(7), maps)
    got = cf.similarity(state)
    want = _ref_similarity(maps)
    np.testing.assert_allclose(got, want, atol=1e-6)
    # The table, entry by entry, on hand-known pairs (all 5 images agree):
    self.assertAlmostEqual(got[1, 2], 1.0)  # zero vs constant: both constant
    self.assertFalse(np.isnan(got).any())

  def test_table_on_single_images(self):
    v = np.array([0.0, 1.0, 3.0, 2.0], np.float32)
    maps = np.stack([v, 0 * v, 0 * v + 4.0, 0 * v, 3 * v + 1], -1)
    got = cf.similarity(cf.similarity_update(cf.similarity_init(5), maps[None]))
    self.assertAlmostEqual(got[0, 1], -1.0)  # varying vs all-zero
    self.assertAlmostEqual(got[0, 2], 0.0)  # varying vs constant non-zero
    self.assertAlmostEqual(got[1, 3], 1.0)  # both all-zero
    self.assertAlmostEqual(got[2, 3], 1.0)  # constant vs all-zero
    self.assertAlmostEqual(got[0, 4], 1.0, places=6)  # affine copy
    self.assertAlmostEqual(got[1, 4], -1.0)

  def test_streaming_and_mask(self):
    maps = self._maps(1)
    mask = np.array([1, 0, 1, 1, 0])
    one = cf.similarity_update(cf.similarity_init(7), maps, mask)
    s = cf.similarity_init(7)
    s = cf.similarity_update(s, maps[:2], mask[:2])
    s = cf.similarity_update(s, maps[2:], mask[2:])
    want = _ref_similarity(maps, mask)
    np.testing.assert_allclose(cf.similarity(one), want, atol=1e-6)
    np.testing.assert_allclose(cf.similarity(s), want, atol=1e-6)
    self.assertEqual(int(s.count), 3)

  def test_errors(self):
    with self.assertRaisesRegex(ValueError, r'\[N, H, W, 7\]'):
      cf.similarity_update(cf.similarity_init(7), np.zeros((2, 3, 3, 6)))
    with self.assertRaisesRegex(ValueError, "layer 'conv3'.*empty"):
      cf.similarity(cf.similarity_init(3), name='conv3')


class WorkedExampleTest(absltest.TestCase):
  """8 nodes; strong pairs 01 .9, 02 .85, 03 .8, 45 .7, 12 .66, 56 .65.

  Background pairs are < 0.06 except 46 .3, 07 .2, 06 .1, 47 .05.

  num_remove = 5. Adding pairs in descending order, the removable count
  C − #components is 1 (01), 2 (02), 3 (03), 4 (45), 4 (12 closes a cycle),
  5 (56); so the edges are those six and t = (.65 + .3) / 2 = .475.
  Scores (mean over neighbours): 0: (.9+.85+.8)/3 = .85; 1: (.9+.66)/2 =
  .78; 2: (.85+.66)/2 = .755; 3: .8; 4: .7; 5: (.7+.65)/2 = .675; 6: .65;
  7: isolated, 0. Visit order 0, 3, 1, 2, 4, 5, 6, 7.
  0 becomes a centre and removes 1, 2, 3 (by similarity to 0). 3, 1, 2 are
  handled. 4 becomes the centre of {4, 5, 6} and removes 5. 6's component
  has a centre, 7 is isolated: 4 removed, shortfall 1. Fallback: of the kept
  non-centres 6 (best centre 4 at .3) and 7 (best centre 0 at .2), remove 6
  delegated to 4. keep = [0, 4, 7].

  num_remove = 4: the edges are 01 02 03 45 (t = (.7 + .66) / 2 = .68).
  Scores 1: .9, 0: .85, 2: .85, 3: .8, 4: .7, 5: .7. 1 becomes a centre
  and removes its only neighbour 0 (the star's hub); 2, 3 are skipped (their
  component has a centre); 4 becomes a centre and removes 5: shortfall 2.
  Fallback over kept non-centres 2, 3, 6, 7 by similarity to their best
  centre: 2→1 .66, 6→4 .3, 7→4 .05, 3→4 .028: remove 2 and 6.
  keep = [1, 3, 4, 7].
  """

  def test_remove_five(self):
    keep, delegates, report = cf.central_filter(_example_d(), 5)
    np.testing.assert_array_equal(keep, [0, 4, 7])
    self.assertEqual(delegates, {1: 0, 2: 0, 3: 0, 5: 4, 6: 4})
    self.assertEqual(report['centres'], [0, 4])
    self.assertEqual(report['num_edges'], 6)
    self.assertAlmostEqual(report['threshold'], 0.475)
    self.assertEqual(report['removed_greedy'], 4)
    self.assertEqual(report['shortfall'], 1)
    self.assertEqual(report['fallback'], [[6, 4]])
    np.testing.assert_allclose(
      report['scores'], [0.85, 0.78, 0.755, 0.8, 0.7, 0.675, 0.65, 0.0]
    )

  def test_remove_four(self):
    keep, delegates, report = cf.central_filter(_example_d(), 4)
    np.testing.assert_array_equal(keep, [1, 3, 4, 7])
    self.assertEqual(delegates, {0: 1, 5: 4, 2: 1, 6: 4})
    self.assertEqual(report['centres'], [1, 4])
    self.assertAlmostEqual(report['threshold'], 0.68)
    self.assertEqual(report['shortfall'], 2)

  def test_remove_none(self):
    keep, delegates, report = cf.central_filter(_example_d(), 0)
    np.testing.assert_array_equal(keep, np.arange(8))
    self.assertEqual(delegates, {})
    self.assertEqual(report['shortfall'], 0)


class GraphTest(parameterized.TestCase):
  @parameterized.parameters(0, 1, 2, 3, 4, 5)
  def test_matches_naive_on_random_similarities(self, seed):
    rng = np.random.default_rng(seed)
    c = int(rng.integers(5, 16))
    a = rng.normal(size=(c, 6))
    d = np.corrcoef(a) + 1e-3 * rng.normal(size=(c, c))  # distinct values
    d = np.triu(d, 1) + np.triu(d, 1).T
    np.fill_diagonal(d, 1.0)
    for n in range(c):
      keep, delegates, report = cf.central_filter(d, n)
      want_keep, want_del = _naive_central_filter(d, n)
      np.testing.assert_array_equal(keep, want_keep, err_msg=f'n={n}')
      self.assertEqual(delegates, want_del, msg=f'n={n}')
      # Exactly n removed; every delegate is a kept centre.
      self.assertLen(keep, c - n)
      self.assertTrue(set(delegates.values()) <= set(keep.tolist()))
      self.assertEqual(report['shortfall'] + report['removed_greedy'], n)

  def test_threshold_count_is_exact_for_distinct_values(self):
    rng = np.random.default_rng(7)
    c = 12
    d = rng.uniform(-1, 1, size=(c, c))
    d = np.triu(d, 1) + np.triu(d, 1).T
    for n in range(c):
      adj, t = cf.threshold_graph(d, n)
      off = ~np.eye(c, dtype=bool)
      np.testing.assert_array_equal(adj, (d > t) & off)
      self.assertEqual(cf._removable(adj), n)

  def test_errors(self):
    with self.assertRaisesRegex(ValueError, r'\[0, 4\)'):
      cf.central_filter(np.eye(4), 4)
    with self.assertRaisesRegex(ValueError, 'square'):
      cf.central_filter(np.zeros((3, 4)), 1)
    with self.assertRaisesRegex(ValueError, 'NaN'):
      cf.central_filter(np.full((3, 3), np.nan), 1)

  def test_num_to_remove(self):
    self.assertEqual(cf.num_to_remove(64, 0.3), 20)  # ceil(19.2)
    self.assertEqual(cf.num_to_remove(10, 0.3), 3)  # exact, no float creep
    self.assertEqual(cf.num_to_remove(2, 0.9), 1)  # at least one kept
    with self.assertRaisesRegex(ValueError, r'\[0, 1\)'):
      cf.num_to_remove(8, 1.0)


class CompressRateTest(parameterized.TestCase):
  def test_parses_published_strings(self):
    self.assertEqual(
      cf.parse_compress_rate('[0.1]+[0.4]*2+[0.0]*3'),
      [0.1, 0.4, 0.4, 0.0, 0.0, 0.0],
    )
    self.assertEqual(cf.parse_compress_rate('2*[0.5]'), [0.5, 0.5])
    self.assertEqual(cf.parse_compress_rate(' [0., 0.3] '), [0.0, 0.3])
    self.assertLen(cf.parse_compress_rate('[0.]+[0.18]*29'), 30)

  @parameterized.parameters(
    '__import__("os").system("true")',
    '[0.1]*-1',
    '[0.1]+0.2',
    '[[0.1]]',
    '[1.0]',
    '[-0.1]',
    '(0.1,)',
    '[0.1',
    '[True]',
  )
  def test_rejects(self, text):
    with self.assertRaises(ValueError):
      cf.parse_compress_rate(text)


class FoldTest(absltest.TestCase):
  def test_fold_matrix_adds_removed_columns_to_centres(self):
    keep = np.array([0, 4, 7])
    delegates = {1: 0, 2: 0, 3: 0, 5: 4, 6: 4}
    b = cf.fold_matrix(keep, delegates)
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 3, 8, 5))  # consumer kernel, inputs on axis -2
    folded = w[..., keep, :] + np.einsum(
      'rk,hwro->hwko', b, w[..., [1, 2, 3, 5, 6], :]
    )
    want = w.copy()  # independent: the CF rule W[:, c] += W[:, k]
    for k, c in delegates.items():
      want[..., c, :] += w[..., k, :]
    np.testing.assert_allclose(folded, want[..., keep, :])

  def test_rejects_delegate_to_removed(self):
    with self.assertRaisesRegex(ValueError, 'delegated to 1'):
      cf.fold_matrix(np.array([0, 2]), {1: 0, 3: 1})


class MethodTest(parameterized.TestCase):
  """cf through the registry on resnet8's inner groups."""

  shape = (8, 8, 3)

  def _setup(self):
    model = models.get_model('resnet8', num_classes=3, width_mult=0.5)
    variables = models.init(model, jax.random.key(0), self.shape)
    rng = np.random.default_rng(0)
    batches = [
      {
        'image': rng.normal(size=(6, *self.shape)).astype(np.float32),
        'label': np.zeros(6, np.int32),
        'mask': np.array([1, 1, 1, 1, 1, i == 0], bool),
      }
      for i in range(2)
    ]
    return model, variables, batches

  def test_collect_matches_reference_on_captured_maps(self):
    model, variables, batches = self._setup()
    groups = ('stage1_block0/conv1', 'stage3_block0/conv1')
    got = cf.collect(model, variables, batches, groups, {'num_batches': 5})
    for name in groups:
      maps, mask = [], []
      for b in batches:  # flax's own capture, not cf's interceptor
        _, st = model.apply(
          variables, b['image'], capture_intermediates=True, mutable=True
        )
        inter = traverse_util.flatten_dict(st['intermediates'], sep='/')
        maps.append(np.asarray(inter[f'{name}/__call__'][0]))
        mask.append(b['mask'])
      want = _ref_similarity(np.concatenate(maps), np.concatenate(mask))
      np.testing.assert_allclose(got[name], want, atol=1e-5)

  def test_rates_recipe_counts_and_plan(self):
    model, variables, batches = self._setup()
    out = methods.prune(
      'cf',
      model,
      variables,
      batches=batches,
      recipe='rates:[0.3]*3',
      groups='inner',
    )
    for g in model.structure().groups:
      if g.stream:
        continue
      c = model.widths[g.index]
      self.assertLen(out.keep[g.name], c - int(np.ceil(c * 0.3)))
      rep = out.report['cf'][g.name]
      self.assertEqual(rep['num_remove'], int(np.ceil(c * 0.3)))
      fold = out.plan.folds[g.name]
      np.testing.assert_array_equal(fold.matrix.sum(1), 1.0)  # one centre
    x = batches[0]['image']
    self.assertEqual(out.model.apply(out.variables, x).shape, (6, 3))
    with self.assertRaisesRegex(ValueError, "'stream1' is a residual stream"):
      methods.prune('cf', model, variables, batches=batches, recipe='prune:0.3')

  def test_layer_by_layer_schedule(self):
    model, variables, batches = self._setup()
    steps = cf.layer_schedule(model)
    self.assertEqual(
      steps,
      [
        ('stage3_block0/conv1',),
        ('stage2_block0/conv1',),
        ('stage1_block0/conv1',),
      ],
    )
    vgg = models.get_model('vgg16_cifar', num_classes=3)
    self.assertEqual(
      cf.layer_schedule(vgg),
      [('fc1',)] + [(f'conv{i}',) for i in range(13, 0, -1)],
    )
    self.assertEqual(
      cf.layer_schedule(vgg, ['conv1', 'conv13']), [('conv13',), ('conv1',)]
    )
    with self.assertRaisesRegex(ValueError, 'stream2'):
      cf.layer_schedule(model, ['stream2'])
    # Run the schedule: each step prunes one layer of the current network.
    full = dict(models.widths_of(model))
    for (name,) in steps:
      out = methods.prune(
        'cf',
        model,
        variables,
        batches=batches,
        recipe='rates:[0.5]',
        groups=[name],
      )
      model, variables = out.model, out.variables
      self.assertEqual(models.widths_of(model)[name], full[name] // 2)
    # The result rebuilds from its architecture record alone.
    again = models.from_arch(models.arch_of(model))
    x = batches[0]['image']
    np.testing.assert_allclose(
      again.apply(variables, x), model.apply(variables, x), rtol=1e-6
    )


if __name__ == '__main__':
  absltest.main()
