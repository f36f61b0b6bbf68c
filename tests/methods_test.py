"""Method registry and baselines against independent numpy references."""

import json

import jax
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

from pfa_jax import costs
from pfa_jax import methods
from pfa_jax import models
from pfa_jax import plan as plan_lib
from pfa_jax import recipes
from pfa_jax import slicing
from pfa_jax.methods import base

SHAPE = (16, 16, 3)


def _net(name='simple_cnn', seed=0, shape=SHAPE, **kw):
  kw = {'width_mult': 0.125, **kw} if name == 'simple_cnn' else kw
  model = models.get_model(name, num_classes=4, **kw)
  variables = models.init(model, jax.random.key(seed), shape)
  rng = np.random.default_rng(seed)

  def perturb(path, a):  # distinct BN scales, like a trained net's
    if 'scale' in jax.tree_util.keystr(path):
      return a * rng.uniform(0.01, 1.0, a.shape).astype(a.dtype)
    return a

  params = jax.tree_util.tree_map_with_path(perturb, variables['params'])
  return model, {**variables, 'params': params}


def _batches(n=3, seed=0):
  rng = np.random.default_rng(seed)
  return [
    {
      'image': rng.normal(size=(24, *SHAPE)).astype(np.float32),
      'label': np.zeros(24, np.int32),
      'mask': np.ones(24, bool),
    }
    for _ in range(n)
  ]


def _l1_reference(variables, layer):
  w = np.asarray(variables['params'][layer]['conv']['kernel'], np.float64)
  return np.abs(w).sum(axis=(0, 1, 2))


class RecipeParsingTest(parameterized.TestCase):
  def test_forms(self):
    self.assertEqual(base.parse_recipe('kl').kind, 'kl')
    self.assertEqual(base.parse_recipe('energy:0.9').value, 0.9)
    self.assertEqual(base.parse_recipe('params:12000').value, 12000.0)
    self.assertEqual(base.parse_recipe({'conv1': 3}).value, {'conv1': 3})
    self.assertEqual(base.parse_recipe('li2017').kind, 'named')
    self.assertEqual(
      base.parse_recipe('rates:[0.1]+[0.4]*2+[0.0]*3').value,
      (0.1, 0.4, 0.4, 0.0, 0.0, 0.0),
    )

  @parameterized.parameters(
    ('energy:1.5', r'\(0, 1\]'),
    ('keep:0', 'positive'),
    ('prune:1', r'\(0, 1\)'),
    ('flops:inf', 'finite'),
    ('rates:__import__("os")', 'unsupported'),
    ('rates:[1.5]', r'\[0, 1\)'),
    ('size:3', 'Unknown recipe'),
  )
  def test_bad_forms(self, spec, pattern):
    with self.assertRaisesRegex(ValueError, pattern):
      base.parse_recipe(spec)


class InterfaceTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    self.model, self.variables = _net()

  def test_unknown_hparams_are_named(self):
    with self.assertRaisesRegex(ValueError, r"'l1'.*\['bogus'\]"):
      methods.prune(
        'l1', self.model, self.variables, recipe='keep:0.5', bogus=1
      )

  def test_recipe_form_not_accepted_lists_forms(self):
    with self.assertRaisesRegex(ValueError, "'slim' does not accept.*prune"):
      methods.prune('slim', self.model, self.variables, recipe='kl')

  def test_random_widths_need_no_data(self):
    # select='random' (the default) reads no batches: weights and a budget.
    out = methods.prune(
      'random',
      self.model,
      self.variables,
      recipe='params:0.5',
      rng=0,
      input_shape=SHAPE,
    )
    full = costs.count(self.model, SHAPE)['params']
    got = costs.count(out.model, SHAPE)['params']
    self.assertAlmostEqual(got / full, 0.5, delta=0.01)
    with self.assertRaisesRegex(ValueError, 'pass input_shape'):
      methods.prune(
        'random', self.model, self.variables, recipe='params:0.5', rng=0
      )

  def test_random_needs_rng(self):
    with self.assertRaisesRegex(ValueError, 'no hidden default'):
      methods.prune('random', self.model, self.variables, recipe='keep:0.5')

  def test_generator_batches_refused(self):
    gen = (b for b in _batches())
    with self.assertRaisesRegex(ValueError, 'one-shot iterator'):
      methods.prune('pfa', self.model, self.variables, batches=gen, recipe='kl')

  def test_unknown_group_is_named(self):
    with self.assertRaisesRegex(KeyError, "'conv99'"):
      methods.prune(
        'l1', self.model, self.variables, recipe='keep:0.5', groups=['conv99']
      )

  def test_plan_json_replays(self):
    out = methods.prune(
      'pfa', self.model, self.variables, batches=_batches(), recipe='kl'
    )
    again = plan_lib.Plan.from_json(json.loads(json.dumps(out.plan.to_json())))
    m2, v2 = slicing.prune(self.model, self.variables, again)
    self.assertEqual(m2.widths, out.model.widths)
    x = _batches(1)[0]['image']
    np.testing.assert_array_equal(
      m2.apply(v2, x), out.model.apply(out.variables, x)
    )

  def test_callable_batches_and_explicit_groups(self):
    out = methods.prune(
      'pfa',
      self.model,
      self.variables,
      batches=lambda: iter(_batches()),
      recipe='energy:0.9',
      groups=['conv2', 'conv5'],
    )
    self.assertEqual(set(out.keep), {'conv2', 'conv5'})

  def test_min_width_and_round_to(self):
    out = methods.prune(
      'l1',
      self.model,
      self.variables,
      recipe='keep:0.1',
      min_width={'conv1': 7},
      round_to=4,
    )
    full = models.widths_of(self.model)
    for n, k in out.keep.items():
      w = len(k)
      self.assertTrue(w % 4 == 0 or w == full[n], (n, w))
    self.assertGreaterEqual(len(out.keep['conv1']), 7)


class L1Test(absltest.TestCase):
  def test_keeps_numpy_top_k_per_layer(self):
    model, variables = _net()
    out = methods.prune('l1', model, variables, recipe='prune:0.5')
    for n, kept in out.keep.items():
      score = _l1_reference(variables, n)
      c = score.size
      k = c - int(np.floor(0.5 * c))  # removes floor(pC), keeps the rest
      expected = np.sort(np.argsort(-score, kind='stable')[:k])
      np.testing.assert_array_equal(kept, expected, err_msg=n)

  def test_li2017_rates_on_vgg16(self):
    model, variables = _net('vgg16_cifar', shape=(32, 32, 3), width_mult=1 / 16)
    out = methods.prune('l1', model, variables, recipe='li2017')
    full = models.widths_of(model)
    halved = {'conv1'} | {f'conv{i}' for i in range(8, 14)}
    for n, c in full.items():
      want = c - c // 2 if n in halved else c
      self.assertLen(out.keep[n], want, n)


class SlimTest(absltest.TestCase):
  def test_threshold_is_numpy_percentile(self):
    model, variables = _net()
    out = methods.prune('slim', model, variables, recipe='prune:0.4')
    gammas = np.concatenate(
      [
        np.abs(np.asarray(variables['params'][f'conv{i}']['bn']['scale']))
        for i in range(1, 9)
      ]
    ).astype(np.float64)
    t = np.percentile(gammas, 40.0)
    self.assertEqual(out.report['threshold'], t)
    for i in range(1, 9):
      g = np.abs(np.asarray(variables['params'][f'conv{i}']['bn']['scale']))
      expected = np.flatnonzero(g > t)
      if expected.size == 0:  # at least one channel per layer: its largest
        expected = np.array([np.argmax(g)])
      np.testing.assert_array_equal(out.keep[f'conv{i}'], expected)


class TargetRuleTest(parameterized.TestCase):
  """Every target meets the budget and is the largest point of its family."""

  @parameterized.parameters(
    ('pfa', 'params:0.5', {}),
    ('pfa', 'flops:0.4', {}),
    ('l1', 'params:0.5', {}),
    ('l1', 'flops:0.5', {'global_ranking': True}),
    ('slim', 'params:0.5', {}),
    ('slim', 'flops:0.3', {}),
  )
  def test_meets_target_and_is_largest(self, name, spec, hp):
    model, variables = _net()
    out = methods.prune(
      name, model, variables, batches=_batches(), recipe=spec, **hp
    )
    kind, frac = spec.split(':')
    full = costs.count(model, SHAPE)[kind]
    target = float(frac) * full
    cost = costs.count(out.model, SHAPE)[kind]
    self.assertLessEqual(cost, target)
    # The next point of the family (keeping a little more) misses it.
    cost_of = costs.cost_fn(model, SHAPE, kind)
    nxt = self._next_widths(name, out, model, variables, hp)
    self.assertGreater(cost_of(nxt), target, (name, spec))

  def _next_widths(self, name, out, model, variables, hp):
    full = models.widths_of(model)
    r = out.report
    if name == 'pfa':
      # Independent: spectra recomputed by numpy from the same responses.
      spectra = _numpy_spectra(model, variables, _batches())
      # The first numpy breakpoint whose recipe keeps more than ours (float32
      # and float64 breakpoints differ by rounding, so compare recipes).
      for tau in recipes.breakpoints(spectra):
        w = recipes.energy(spectra, float(tau))
        if sum(w.values()) > sum(r['widths'].values()):
          return w
      self.fail('no larger PFA recipe')
    if name == 'l1' and not hp:
      cands = np.unique([w / c for c in full.values() for w in range(1, c + 1)])
      g = cands[np.searchsorted(cands, r['keep_fraction'], side='right')]
      return {
        n: min(max(int(np.ceil(g * c - 1e-9)), 1), c) for n, c in full.items()
      }
    scores = {n: np.asarray(s) for n, s in r['scores'].items()}
    if name == 'l1':
      scores = {n: s / s.max() for n, s in scores.items()}
    vals = np.unique(np.concatenate(list(scores.values())))
    t = vals[np.searchsorted(vals, r['threshold']) - 1]  # next lower
    return {n: max(int(np.sum(s >= t)), 1) for n, s in scores.items()}


def _numpy_spectra(model, variables, batches):
  resp = {}
  for b in batches:
    _, r = models.responses(model, variables, b['image'])
    for n, x in r.items():
      resp.setdefault(n, []).append(np.asarray(x, np.float64))
  out = {}
  for n, v in resp.items():
    lam = np.clip(
      np.linalg.eigvalsh(np.cov(np.concatenate(v), rowvar=False)), 0, None
    )[::-1]
    out[n] = lam / lam.sum() if lam.sum() > 0 else np.eye(len(lam))[0]
  return out


class CollectStepTest(absltest.TestCase):
  def test_collect_states_and_two_programs_match_numpy(self):
    # pfa.collect_states (one program) must give numpy's float64 covariance
    # over the unmasked rows, and the two-program step the same states.
    from pfa_jax import stats  # pylint: disable=g-import-not-at-top
    from pfa_jax.methods import pfa  # pylint: disable=g-import-not-at-top

    model, variables = _net('resnet8')
    batches = _batches(3)
    batches[1]['mask'][5:] = False
    batches[1]['image'][5:] = np.nan  # padded rows: ignored, even NaN
    names = tuple(base.select_groups(model, 'inner+stream'))
    got = pfa.collect_states(model, variables, batches, names, np.float32)
    step = pfa.two_program_step(model, names)
    widths = models.widths_of(model)
    one = jax.tree.map(
      jax.numpy.array, stats.init_tree({n: widths[n] for n in names})
    )
    for b in batches:
      one = step(one, variables, b)
    resp = {n: [] for n in names}
    for b in batches:
      _, r = models.responses(model, variables, b['image'])
      for n in names:
        resp[n].append(np.asarray(r[n], np.float64)[b['mask']])
    for n in names:
      want = np.cov(np.concatenate(resp[n]), rowvar=False)
      cov = stats.covariance(got[n], name=n)
      np.testing.assert_allclose(cov, want, rtol=1e-5, atol=1e-6 * want.max())
      np.testing.assert_allclose(
        cov, stats.covariance(one[n], name=n), rtol=1e-6, atol=1e-12
      )
      self.assertEqual(stats.count(got[n]), 24 + 5 + 24)


class ConstsAreDataTest(absltest.TestCase):
  def test_masked_resnet_variants_share_one_program(self):
    model, variables = _net('resnet8')
    traces = []

    @jax.jit
    def f(v, x):
      traces.append(1)
      return model.apply(v, x)

    x = _batches(1)[0]['image']
    rng = np.random.default_rng(0)
    outs = []
    for _ in range(3):
      keep = {
        g.name: np.sort(rng.choice(model.widths[g.index], 5, replace=False))
        for g in model.structure().groups
      }
      mm, mv = slicing.mask(model, variables, keep)
      self.assertIs(mm, model)
      outs.append(f(mv, x))
      pm, pv = slicing.prune(model, variables, keep)
      np.testing.assert_allclose(
        outs[-1], pm.apply(pv, x), rtol=1e-4, atol=1e-5
      )
    self.assertLen(traces, 1)


if __name__ == '__main__':
  absltest.main()
