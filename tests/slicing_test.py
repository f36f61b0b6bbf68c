"""Slicer tests: pruned net == masked dense net; keep-all == identity."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

from pfa_jax import costs
from pfa_jax import models
from pfa_jax import plan as plan_lib
from pfa_jax import slicing

# name, input shape, model kwargs: small but structurally complete.
CASES = (
  ('simple_cnn', (32, 32, 3), {'width_mult': 0.25}),
  ('vgg16_cifar', (32, 32, 3), {'width_mult': 0.125}),
  ('vgg16_imagenet', (224, 224, 3), {'width_mult': 1 / 32}),
  ('resnet8', (16, 16, 3), {}),
  ('resnet20', (16, 16, 3), {'width_mult': 0.5}),
  ('resnet_tiny_imagenet', (32, 32, 3), {}),
)


def _setup(name, shape, kw, seed=0):
  model = models.get_model(name, num_classes=5, **kw)
  variables = models.init(model, jax.random.key(seed), shape)
  # Non-trivial BN statistics, so that slicing them matters.
  k1, k2 = jax.random.split(jax.random.key(seed + 1))
  variables = {
    **variables,
    'batch_stats': jax.tree.map(
      lambda a: a + 0.5 * jnp.abs(jax.random.normal(k1, a.shape)),
      variables.get('batch_stats', {}),
    ),
  }
  x = jax.random.normal(k2, (2, *shape))
  return model, variables, x


def _random_keep(model, rng, streams):
  keep = {}
  for g in model.structure().groups:
    if g.stream and not streams:
      continue
    w = model.widths[g.index]
    k = int(rng.integers(1, w + 1))
    keep[g.name] = np.sort(rng.choice(w, k, replace=False))
  return keep


def _apply(model, variables, x):
  """One compile per model, instead of op-by-op dispatch."""
  return jax.jit(model.apply)(variables, x)


def _rel_err(a, b):
  return float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))


class SlicingTest(parameterized.TestCase):
  @parameterized.named_parameters(*[(c[0], *c) for c in CASES])
  def test_keep_all_is_identity(self, name, shape, kw):
    model, variables, x = _setup(name, shape, kw)
    keep = {
      g.name: np.arange(model.widths[g.index]) for g in model.structure().groups
    }
    pm, pv = slicing.prune(model, variables, keep)
    self.assertEqual(pm.widths, model.widths)
    np.testing.assert_array_equal(
      _apply(pm, pv, x), _apply(model, variables, x)
    )

  @parameterized.named_parameters(*[(c[0], *c) for c in CASES])
  def test_restrict_classes_equals_sliced_logits(self, name, shape, kw):
    model, variables, x = _setup(name, shape, kw)
    classes = [4, 1, 3]
    rm, rv = slicing.restrict_classes(model, variables, classes)
    self.assertEqual(rm.num_classes, 3)
    np.testing.assert_array_equal(
      _apply(rm, rv, x), _apply(model, variables, x)[:, classes]
    )

  def test_restrict_classes_errors(self):
    model, variables, _ = _setup('simple_cnn', (32, 32, 3), {'width_mult': 0.1})
    for bad in ([5], [1, 1], []):
      with self.assertRaisesRegex(ValueError, r'distinct indices in \[0, 5\)'):
        slicing.restrict_classes(model, variables, bad)

  @parameterized.named_parameters(*[(c[0], *c) for c in CASES])
  def test_pruned_equals_masked_dense(self, name, shape, kw):
    model, variables, x = _setup(name, shape, kw)
    rng = np.random.default_rng(0)
    is_resnet = any(g.stream for g in model.structure().groups)
    modes = (False, True) if is_resnet else (True,)
    for streams in modes:
      for trial in range(1):
        with self.subTest(streams=streams, trial=trial):
          keep = _random_keep(model, rng, streams)
          pm, pv = slicing.prune(model, variables, keep)
          mm, mv = slicing.mask(model, variables, keep)
          self.assertLess(_rel_err(_apply(pm, pv, x), _apply(mm, mv, x)), 1e-5)
          # The pruned variables are exactly what the pruned model inits.
          abstract = jax.eval_shape(
            lambda x, pm=pm: pm.init({'params': jax.random.key(0)}, x),
            jax.ShapeDtypeStruct((1, *shape), jnp.float32),
          )
          for c in ('params', 'batch_stats'):
            self.assertEqual(
              jax.tree.map(jnp.shape, pv.get(c, {})),
              jax.tree.map(jnp.shape, abstract.get(c, {})),
            )
          # costs.count of the pruned model == a leaf count of its params.
          leaves = sum(p.size for p in jax.tree.leaves(pv['params']))
          self.assertEqual(costs.count(pm, shape)['params'], leaves)
          # Masking zeroes exactly the pruned network's missing parameters.
          nonzero = sum(
            int(np.count_nonzero(m))
            for m in jax.tree.leaves(slicing.masks(model, variables, keep))
          )
          self.assertEqual(nonzero, leaves)

  @parameterized.named_parameters(*[(c[0], *c) for c in CASES])
  def test_plans_with_folds_pruned_equals_masked(self, name, shape, kw):
    model, variables, x = _setup(name, shape, kw)
    rng = np.random.default_rng(1)
    keep = _random_keep(model, rng, streams=False)
    keep = {
      n: k
      for n, k in keep.items()
      if len(k) < model.widths[model.structure().group(n).index]
    }
    folds = {}
    for n, k in keep.items():
      c = model.widths[model.structure().group(n).index]
      r = c - len(k)
      folds[n] = plan_lib.Fold(
        matrix=rng.normal(size=(r, len(k))) * 0.3,
        offset=rng.normal(size=(r,)) * 0.3,
      )
    plan = plan_lib.Plan(keep=keep, folds=folds)
    pm, pv = slicing.prune(model, variables, plan)
    mm, mv = slicing.mask(model, variables, plan)
    self.assertLess(_rel_err(_apply(pm, pv, x), _apply(mm, mv, x)), 1e-5)
    # The folds changed the function (they are not silently dropped).
    pm0, pv0 = slicing.prune(model, variables, keep)
    self.assertGreater(_rel_err(_apply(pm, pv, x), _apply(pm0, pv0, x)), 1e-3)

  def test_duplicate_filter_fold_is_exact(self):
    # conv2's filter 5 duplicates filter 2 (kernel and BN): folding 5 into 2
    # (B = 1, no offset) gives the full network's logits exactly; dropping
    # it without the fold does not.
    model, variables, x = _setup(
      'simple_cnn', (32, 32, 3), {'width_mult': 0.25}
    )
    params = jax.tree.map(np.array, variables['params'])
    stats = jax.tree.map(np.array, variables['batch_stats'])
    params['conv2']['bn']['bias'][2] = 2.0  # active after the ReLU
    for leaf in (params['conv2']['conv'], params['conv2']['bn']):
      for value in leaf.values():
        value[..., 5] = value[..., 2]
    for value in stats['conv2']['bn'].values():
      value[..., 5] = value[..., 2]
    variables = {**variables, 'params': params, 'batch_stats': stats}
    c = model.widths[1]
    kept = np.setdiff1d(np.arange(c), [5])
    matrix = np.zeros((1, c - 1))
    matrix[0, 2] = 1.0
    plan = plan_lib.Plan({'conv2': kept}, {'conv2': plan_lib.Fold(matrix)})
    full = _apply(model, variables, x)
    pm, pv = slicing.prune(model, variables, plan)
    self.assertLess(_rel_err(_apply(pm, pv, x), full), 1e-5)
    pm0, pv0 = slicing.prune(model, variables, {'conv2': kept})
    self.assertGreater(_rel_err(_apply(pm0, pv0, x), full), 1e-3)

  def test_fold_on_a_stream_is_refused(self):
    model, variables, _ = _setup('resnet8', (16, 16, 3), {})
    plan = plan_lib.Plan(
      {'stream1': np.arange(15)}, {'stream1': plan_lib.Fold(np.ones((1, 15)))}
    )
    with self.assertRaisesRegex(ValueError, "'stream1'.*residual stream"):
      slicing.prune(model, variables, plan)

  def test_fold_shape_is_checked(self):
    model, variables, _ = _setup(
      'simple_cnn', (32, 32, 3), {'width_mult': 0.25}
    )
    plan = plan_lib.Plan(
      {'conv1': np.arange(20)}, {'conv1': plan_lib.Fold(np.ones((3, 20)))}
    )
    with self.assertRaisesRegex(ValueError, r"'conv1'.*\(4, 20\)"):
      slicing.prune(model, variables, plan)

  def test_scatter_inverts_prune(self):
    model, variables, x = _setup('resnet8', (16, 16, 3), {})
    keep = _random_keep(model, np.random.default_rng(5), streams=True)
    pm, pv = slicing.prune(model, variables, keep)
    dense = slicing.scatter(model, pv, keep, like=variables)
    self.assertLess(_rel_err(_apply(model, dense, x), _apply(pm, pv, x)), 1e-5)
    self.assertEqual(
      jax.tree.map(jnp.shape, dense), jax.tree.map(jnp.shape, variables)
    )

  def test_prune_twice_composes(self):
    model, variables, x = _setup('resnet20', (16, 16, 3), {'width_mult': 0.5})
    rng = np.random.default_rng(3)
    pm, pv = slicing.prune(model, variables, _random_keep(model, rng, True))
    keep2 = _random_keep(pm, rng, True)
    pm2, pv2 = slicing.prune(pm, pv, keep2)
    mm, mv = slicing.mask(pm, pv, keep2)
    self.assertLess(_rel_err(_apply(pm2, pv2, x), _apply(mm, mv, x)), 1e-5)

  def test_flatten_consumer_slices_rows_per_position(self):
    # VGG's fc1 reads conv13 through a flatten; at 64x64 input the map is
    # 2x2, so each conv13 channel owns 4 rows of fc1's kernel.
    model, variables, x = _setup(
      'vgg16_cifar', (64, 64, 3), {'width_mult': 0.125}
    )
    keep = {'conv13': np.array([0, 3, 5])}
    pm, pv = slicing.prune(model, variables, keep)
    self.assertEqual(pv['params']['fc1']['dense']['kernel'].shape[0], 4 * 3)
    mm, mv = slicing.mask(model, variables, keep)
    self.assertLess(_rel_err(_apply(pm, pv, x), _apply(mm, mv, x)), 1e-5)

  def test_keep_rows_are_the_kept_filters(self):
    model, variables, _ = _setup(
      'simple_cnn', (32, 32, 3), {'width_mult': 0.25}
    )
    keep = {'conv2': np.array([1, 4, 7])}
    _, pv = slicing.prune(model, variables, keep)
    k_full = np.asarray(variables['params']['conv2']['conv']['kernel'])
    np.testing.assert_array_equal(
      pv['params']['conv2']['conv']['kernel'], k_full[..., [1, 4, 7]]
    )
    k3 = np.asarray(variables['params']['conv3']['conv']['kernel'])
    np.testing.assert_array_equal(
      pv['params']['conv3']['conv']['kernel'], k3[:, :, [1, 4, 7], :]
    )
    np.testing.assert_array_equal(
      pv['batch_stats']['conv2']['bn']['var'],
      np.asarray(variables['batch_stats']['conv2']['bn']['var'])[[1, 4, 7]],
    )


class SlicingErrorTest(parameterized.TestCase):
  def setUp(self):
    super().setUp()
    self.model, self.variables, _ = _setup(
      'simple_cnn', (32, 32, 3), {'width_mult': 0.25}
    )  # conv1 has 24 filters

  @parameterized.parameters(
    ({'conv1': [0, 24]}, r"'conv1'.*\[0, 24\)"),
    ({'conv1': [-1, 2]}, r"'conv1'.*\[0, 24\)"),
    ({'conv1': [3, 3]}, r"'conv1'.*duplicated"),
    ({'conv1': [4, 2]}, r"'conv1'.*unsorted"),
    ({'conv1': []}, r"'conv1'.*non-empty"),
    ({'conv1': [0.5]}, r"'conv1'.*integers"),
    (
      {'stage1_block0/conv1': [0]},
      r"Unknown layer 'stage1_block0/conv1'.*another model",
    ),
  )
  def test_bad_keep_sets(self, keep, pattern):
    with self.assertRaisesRegex(ValueError, pattern):
      slicing.prune(self.model, self.variables, keep)
    with self.assertRaisesRegex(ValueError, pattern):
      slicing.mask(self.model, self.variables, keep)

  def test_residual_producer_refused_with_reason(self):
    model, variables, _ = _setup('resnet8', (16, 16, 3), {})
    with self.assertRaisesRegex(
      ValueError, r"'stage2_block0/conv2'.*'stream2'.*residual add"
    ):
      slicing.prune(model, variables, {'stage2_block0/conv2': [0, 1]})


if __name__ == '__main__':
  absltest.main()
