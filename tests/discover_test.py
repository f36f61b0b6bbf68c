"""Channel structure from the jaxpr (pfa_jax.discover).

References: every registered model's hand-written ``structure()``; for two
users' models written here (concatenation, depthwise conv, flatten, separate
BN modules, a residual add) a structure written by hand from their code; and
the slicer's invariant, the pruned network equal to the masked dense one,
under the discovered structure. Each pinned case is checked for its reason,
and the LayerNorm one also by showing that slicing it would change the
function.
"""

import contextlib
import dataclasses
import functools
import io
import os
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import random_nets
import references
from absl.testing import absltest
from absl.testing import parameterized

from pfa_jax import costs
from pfa_jax import discover
from pfa_jax import methods
from pfa_jax import models
from pfa_jax import slicing
from pfa_jax.methods import cf
from pfa_jax.methods import fcp
from pfa_jax.models import structure as structure_lib

C = structure_lib.Consumer

# Every registered model, with an input its forward pass accepts.
MODEL_INPUTS = {
  'simple_cnn': (1, 32, 32, 3),
  'vgg16_cifar': (1, 32, 32, 3),
  'vgg16_imagenet': (1, 224, 224, 3),
  'resnet8': (1, 32, 32, 3),
  'resnet20': (1, 32, 32, 3),
  'resnet56': (1, 32, 32, 3),
  'resnet34': (1, 64, 64, 3),
  'resnet_tiny_imagenet': (1, 32, 32, 3),
}

SHAPE = (1, 8, 8, 3)


def _discovered(model):
  return discover.cached(model, SHAPE).structure


def _bn(name, train):
  return nn.BatchNorm(use_running_average=not train, name=name)


class Branchy(nn.Module):
  """A user's CNN: two branches concatenated, a depthwise conv, a flatten."""

  widths: tuple[int, ...] = (6, 5, 7, 8, 9)
  num_classes: int = 4

  @nn.compact
  def __call__(self, x, train: bool = False):
    bn = functools.partial(_bn, train=train)
    w = self.widths
    a = nn.relu(bn('a_bn')(nn.Conv(w[0], (3, 3), name='a')(x)))
    b = nn.relu(nn.Conv(w[1], (1, 1), name='b')(x))
    h = jnp.concatenate([a, b], axis=-1)
    h = nn.Conv(w[2], (3, 3), strides=2, name='c')(h)
    h = nn.Conv(w[2], (3, 3), feature_group_count=w[2], name='dw')(h)
    h = nn.relu(bn('dw_bn')(h))
    h = nn.max_pool(h, (2, 2), strides=(2, 2))
    h = nn.relu(nn.Conv(w[3], (1, 1), name='e')(h))
    h = h.reshape((h.shape[0], -1))  # channel-last flatten: 2 x 2 x w[3]
    h = nn.relu(nn.Dense(w[4], name='fc1')(h))
    return nn.Dense(self.num_classes, name='out')(h)

  def structure(self):
    return _discovered(self)


class Residual(nn.Module):
  """A user's residual block: stem and back write one stream."""

  widths: tuple[int, ...] = (6, 5)  # stream, inner
  num_classes: int = 3

  @nn.compact
  def __call__(self, x, train: bool = False):
    s = nn.Conv(self.widths[0], (3, 3), name='stem')(x)
    h = nn.relu(nn.Conv(self.widths[1], (3, 3), name='inner')(nn.relu(s)))
    s = nn.relu(s + nn.Conv(self.widths[0], (3, 3), name='back')(h))
    return nn.Dense(self.num_classes, name='out')(jnp.mean(s, axis=(1, 2)))

  def structure(self):
    return _discovered(self)


class SEMobile(nn.Module):
  """A user's inverted residual with squeeze-excitation (MobileNetV3-like)."""

  widths: tuple[int, ...] = (6, 12, 3)  # stream, expansion, SE bottleneck
  num_classes: int = 3

  @nn.compact
  def __call__(self, x, train: bool = False):
    bn = functools.partial(_bn, train=train)
    w = self.widths
    s = nn.relu6(bn('stem_bn')(nn.Conv(w[0], (3, 3), name='stem')(x)))
    h = nn.relu6(bn('expand_bn')(nn.Conv(w[1], (1, 1), name='expand')(s)))
    h = nn.Conv(w[1], (3, 3), feature_group_count=w[1], name='dw')(h)
    h = nn.relu6(bn('dw_bn')(h))
    g = nn.relu(nn.Dense(w[2], name='se_down')(jnp.mean(h, (1, 2))))
    g = nn.sigmoid(nn.Dense(w[1], name='se_up')(g))
    h = h * g[:, None, None, :]  # the gate ties se_up to the expansion
    s = s + bn('proj_bn')(nn.Conv(w[0], (1, 1), name='proj')(h))
    return nn.Dense(self.num_classes, name='out')(jnp.mean(s, (1, 2)))

  def structure(self):
    return _discovered(self)


def _by_hand_se():
  return structure_lib.Structure(
    (
      structure_lib.Group(
        'stream1',
        0,
        ('proj', 'proj_bn', 'stem', 'stem_bn'),
        ('expand', 'out'),
        stream=True,
      ),
      structure_lib.Group(
        'stream2',
        1,
        ('dw', 'dw_bn', 'expand', 'expand_bn', 'se_up'),
        ('proj', 'se_down'),
        stream=True,
      ),
      structure_lib.Group('se_down', 2, ('se_down',), ('se_up',)),
    ),
    head='out',
  )


class DenseBlock(nn.Module):
  """A user's DenseNet block: BNs normalise concatenations of groups."""

  widths: tuple[int, ...] = (8, 4, 4, 6)  # stem, layer1, layer2, transition
  num_classes: int = 3

  @nn.compact
  def __call__(self, x, train: bool = False):
    bn = functools.partial(_bn, train=train)
    w = self.widths
    h = nn.Conv(w[0], (3, 3), name='stem')(x)
    for i in (1, 2):
      y = nn.Conv(w[i], (3, 3), name=f'layer{i}')(nn.relu(bn(f'bn{i}')(h)))
      h = jnp.concatenate([h, y], axis=-1)
    h = nn.Conv(w[3], (1, 1), name='trans')(nn.relu(bn('bn_t')(h)))
    return nn.Dense(self.num_classes, name='out')(jnp.mean(h, (1, 2)))

  def structure(self):
    return _discovered(self)


def _by_hand_dense(w):
  P = structure_lib.Producer  # noqa: N806
  c1, ct = w[0] + w[1], w[0] + w[1] + w[2]
  return structure_lib.Structure(
    (
      structure_lib.Group(
        'stem',
        0,
        ('bn1', 'stem'),
        ('layer1', C('layer2', 0, c1), C('trans', 0, ct)),
        concat_producers=(P('bn2', 0, c1), P('bn_t', 0, ct)),
      ),
      structure_lib.Group(
        'layer1',
        1,
        ('layer1',),
        (C('layer2', w[0], c1), C('trans', w[0], ct)),
        concat_producers=(P('bn2', w[0], c1), P('bn_t', w[0], ct)),
      ),
      structure_lib.Group(
        'layer2',
        2,
        ('layer2',),
        (C('trans', c1, ct),),
        concat_producers=(P('bn_t', c1, ct),),
      ),
      structure_lib.Group('trans', 3, ('trans',), ('out',)),
    ),
    head='out',
  )


class BiasFree(nn.Module):
  """Bias-free convs, each followed by its BN module (the usual wiring)."""

  widths: tuple[int, ...] = (6, 5)
  num_classes: int = 3
  wiring: str = 'direct'  # b_bn reads b's output: directly / after a ReLU
  # / as well as the add that follows it

  @nn.compact
  def __call__(self, x, train: bool = False):
    bn = functools.partial(_bn, train=train)
    h = nn.Conv(self.widths[0], (3, 3), use_bias=False, name='a')(x)
    h = nn.relu(bn('a_bn')(h))
    y = nn.Conv(self.widths[1], (1, 1), use_bias=False, name='b')(h)
    if self.wiring == 'direct':
      h = bn('b_bn')(y)
    elif self.wiring == 'relu_first':
      h = bn('b_bn')(nn.relu(y))
    else:
      h = bn('b_bn')(y) + y
    h = nn.relu(h)
    return nn.Dense(self.num_classes, name='out')(jnp.mean(h, (1, 2)))

  def structure(self):
    return _discovered(self)


class _Block(nn.Module):
  """flax/examples/imagenet's ResNetBlock, with its inner width apart."""

  filters: int
  inner: int
  conv: Any
  norm: Any
  strides: tuple[int, int] = (1, 1)

  @nn.compact
  def __call__(self, x):
    y = nn.relu(self.norm()(self.conv(self.inner, (3, 3), self.strides)(x)))
    y = self.conv(self.filters, (3, 3))(y)
    y = self.norm(scale_init=nn.initializers.zeros_init())(y)
    if x.shape != y.shape:
      x = self.conv(self.filters, (1, 1), self.strides, name='conv_proj')(x)
      x = self.norm(name='norm_proj')(x)
    return nn.relu(x + y)


class FlaxExampleResNet(nn.Module):
  """A ResNet as flax's own example writes it: nested blocks, automatic
  module names, bias-free convs, projection shortcuts, zero-init BN."""

  widths: tuple[int, ...] = (8, 6, 16, 12, 16, 12, 32, 24)  # stream, inner
  num_classes: int = 5

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv = functools.partial(nn.Conv, use_bias=False)
    norm = functools.partial(
      nn.BatchNorm, use_running_average=not train, momentum=0.9
    )
    x = nn.relu(norm(name='bn_init')(conv(self.widths[0], (3, 3))(x)))
    for i in range(4):
      w, inner = self.widths[2 * i], self.widths[2 * i + 1]
      strides = (2, 2) if i else (1, 1)
      x = _Block(w, inner, conv, norm, strides)(x)
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))

  def structure(self):
    return _discovered(self)


def _by_hand_branchy(w):
  cat = w[0] + w[1]
  return structure_lib.Structure(
    (
      structure_lib.Group('a', 0, ('a', 'a_bn'), (C('c', 0, cat),)),
      structure_lib.Group('b', 1, ('b',), (C('c', w[0], cat),)),
      structure_lib.Group('c', 2, ('c', 'dw', 'dw_bn'), ('e',)),
      structure_lib.Group('e', 3, ('e',), ('fc1',)),
      structure_lib.Group('fc1', 4, ('fc1',), ('out',)),
    ),
    head='out',
  )


def _by_hand_residual():
  return structure_lib.Structure(
    (
      structure_lib.Group(
        'stream1', 0, ('back', 'stem'), ('inner', 'out'), stream=True
      ),
      structure_lib.Group('inner', 1, ('inner',), ('back',)),
    ),
    head='out',
  )


def _init(model, seed=0):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(k1, (2, *SHAPE[1:]))
  variables = model.init(k2, x)
  if 'batch_stats' in variables:
    variables = {
      **variables,
      'batch_stats': jax.tree.map(
        lambda a: a + 0.5 * jnp.abs(jax.random.normal(k3, a.shape)),
        variables['batch_stats'],
      ),
    }
  return variables, x


def _batches(n=2, size=32, seed=0):
  rng = np.random.default_rng(seed)
  return [
    {
      'image': rng.normal(size=(size, *SHAPE[1:])).astype(np.float32),
      'label': np.zeros(size, np.int32),
      'mask': np.ones(size, bool),
    }
    for _ in range(n)
  ]


def _rel_err(a, b):
  return float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))


def _pruned_vs_masked(model, variables, out, x):
  """Relative gap between a prune result and the masked dense network."""
  mm, mv = slicing.mask(model, variables, out.plan)
  return _rel_err(out.model.apply(out.variables, x), mm.apply(mv, x))


def _exact_only_with_fold(model, variables, out) -> tuple[float, float]:
  """(pruned with folds, pruned without) relative errors to the full net."""
  x = _batches(n=1, size=4, seed=9)[0]['image']
  full = model.apply(variables, x)
  pm, pv = slicing.prune(model, variables, out.plan.keep)
  return (
    _rel_err(out.model.apply(out.variables, x), full),
    _rel_err(pm.apply(pv, x), full),
  )


def _scaled_channel(model, beta):
  """``model``'s variables with channel 3 of group 'a', after a_bn and the
  ReLU, equal to 0.5 x channel 1 + ``beta``: its filter is 0.01 x filter 1
  (L1 drops it, FCP pairs it), a_bn undoes the scale, and a large BN bias
  keeps both channels above zero."""
  variables, _ = _init(model)
  alpha, gamma, eps = 0.5, 0.01, 1e-5  # flax BN's epsilon
  p = flax.traverse_util.flatten_dict(variables['params'], sep='/')
  bs = flax.traverse_util.flatten_dict(variables['batch_stats'], sep='/')
  p = {k: np.array(v) for k, v in p.items()}
  bs = {k: np.array(v) for k, v in bs.items()}
  p['a/kernel'][..., 3] = gamma * p['a/kernel'][..., 1]
  p['a_bn/bias'][1] = 20.0
  p['a_bn/scale'][3] = alpha * p['a_bn/scale'][1]
  p['a_bn/bias'][3] = alpha * p['a_bn/bias'][1] + beta
  bs['a_bn/mean'][3] = gamma * bs['a_bn/mean'][1]
  bs['a_bn/var'][3] = gamma**2 * (bs['a_bn/var'][1] + eps) - eps
  return {
    'params': flax.traverse_util.unflatten_dict(p, sep='/'),
    'batch_stats': flax.traverse_util.unflatten_dict(bs, sep='/'),
  }


def _fold_channel_3(model, variables, method):
  """FCP, or L1 + exact LS, dropping channel 3 of group 'a'."""
  kw = dict(recipe={'a': model.widths[0] - 1}, groups=['a'])
  if method == 'fcp':
    out = methods.prune('fcp', model, variables, batches=_batches(), **kw)
    assert out.report['pairs']['a'] == [[1, 3]], out.report['pairs']
    return out
  out = methods.prune(
    'l1',
    model,
    variables,
    batches=_batches(),
    compensation='ls',
    ridge=0.0,
    **kw,
  )
  np.testing.assert_array_equal(out.keep['a'], [0, 1, 2, 4, 5])
  return out


class RegisteredModelsTest(parameterized.TestCase):
  @parameterized.named_parameters(*[(n, n) for n in models.MODELS])
  def test_hand_written_structure_matches_jaxpr(self, name):
    model = models.get_model(name, num_classes=10)
    found = discover.discover(model, MODEL_INPUTS[name])
    self.assertEqual(discover.compare(model.structure(), found.structure), [])
    self.assertEqual(found.widths, models.widths_of(model))
    # The classifier's output space is the only one pinned.
    self.assertEqual(found.pinned, {model.structure().head: 'the model output'})

  def test_every_registered_model_is_covered(self):
    self.assertEqual(set(MODEL_INPUTS), set(models.MODELS))

  def test_real_variables_give_the_same_structure(self):
    model = models.get_model('resnet8', num_classes=10)
    variables = models.init(model, jax.random.key(0), (32, 32, 3))
    a = discover.discover(model, (2, 32, 32, 3), variables).structure
    self.assertEqual(discover.compare(model.structure(), a), [])

  def test_compare_reports_each_kind_of_difference(self):
    model = models.get_model('resnet8', num_classes=10)
    s = model.structure()
    g = s.groups
    stream = next(x for x in g if x.stream)
    cases = {
      'consumers': dataclasses.replace(g[0], consumers=g[0].consumers[1:]),
      'index': dataclasses.replace(g[0], index=g[0].index + 1),
      'producers': dataclasses.replace(stream, producers=stream.producers[:-1]),
      'stream': dataclasses.replace(g[0], stream=True),
    }
    for field, changed in cases.items():
      groups = tuple(changed if x.name == changed.name else x for x in g)
      diffs = discover.compare(dataclasses.replace(s, groups=groups), s)
      self.assertLen(diffs, 1)
      self.assertIn(f'group {changed.name!r}: {field}', diffs[0])
    diffs = discover.compare(dataclasses.replace(s, index_maps=()), s)
    self.assertLen(diffs, 1)
    self.assertIn('index maps', diffs[0])
    diffs = discover.compare(dataclasses.replace(s, head='x'), s)
    self.assertEqual(diffs, ["head 'x', discovered 'fc'"])
    diffs = discover.compare(dataclasses.replace(s, groups=g[1:]), s)
    self.assertEqual(
      diffs, [f'group {g[0].name!r} is missing from structure()']
    )

  def test_check_names_the_wrong_group(self):
    class Wrong(models.SimpleCNN):
      def structure(self):
        s = super().structure()
        g = s.groups
        bad = dataclasses.replace(g[3], consumers=('conv6/conv',))
        return dataclasses.replace(s, groups=g[:3] + (bad,) + g[4:])

    discover.check(models.SimpleCNN(), (1, 32, 32, 3))
    with self.assertRaisesRegex(ValueError, r"Wrong.*group 'conv4': consumers"):
      discover.check(Wrong(), (1, 32, 32, 3))


class UserModelsTest(parameterized.TestCase):
  def test_branchy_structure_by_hand(self):
    model = Branchy()
    found = discover.discover(model, SHAPE)
    self.assertEqual(
      discover.compare(_by_hand_branchy(model.widths), found.structure), []
    )
    self.assertEqual(
      found.widths, dict(zip(('a', 'b', 'c', 'e', 'fc1'), model.widths))
    )

  def test_residual_structure_by_hand(self):
    found = discover.discover(Residual(), SHAPE)
    self.assertEqual(discover.compare(_by_hand_residual(), found.structure), [])

  def test_densenet_structure_by_hand(self):
    # bn2 and bn_t hold several groups' channels, each at its offset.
    model = DenseBlock()
    found = discover.discover(model, SHAPE)
    self.assertEqual(
      discover.compare(_by_hand_dense(model.widths), found.structure), []
    )
    self.assertEqual(found.pinned, {'out': 'the model output'})

  @parameterized.named_parameters(
    ('branchy_all_ones', Branchy, (1, 1, 1, 1, 1), _by_hand_branchy),
    ('branchy_some_ones', Branchy, (3, 1, 2, 1, 4), _by_hand_branchy),
    ('densenet_all_ones', DenseBlock, (1, 1, 1, 1), _by_hand_dense),
    ('densenet_some_ones', DenseBlock, (3, 1, 2, 1), _by_hand_dense),
    ('residual', Residual, (1, 1), lambda w: _by_hand_residual()),
    ('squeeze_excitation', SEMobile, (1, 1, 1), lambda w: _by_hand_se()),
  )
  def test_groups_of_one_channel_keep_their_place(self, cls, widths, by_hand):
    # A pruned network can have one-channel groups; a (1,) BN scale looks
    # like a broadcast axis in the jaxpr, yet the structure is the same one.
    found = discover.discover(cls(widths=widths), SHAPE)
    self.assertEqual(discover.compare(by_hand(widths), found.structure), [])
    names = [g.name for g in found.structure.groups]
    self.assertEqual(found.widths, dict(zip(names, widths)))

  def test_squeeze_excitation_structure_by_hand(self):
    # Two writers (expand, and se_up through the gate) share one keep-set.
    found = discover.discover(SEMobile(), SHAPE)
    self.assertEqual(discover.compare(_by_hand_se(), found.structure), [])

  def test_without_widths_groups_follow_the_forward_pass(self):
    class NoWidths(nn.Module):
      @nn.compact
      def __call__(self, x, train=False):
        x = nn.relu(nn.Conv(4, (3, 3), name='p')(x))
        x = nn.relu(nn.Conv(6, (3, 3), name='q')(x))
        return nn.Dense(2, name='out')(jnp.mean(x, (1, 2)))

    found = discover.discover(NoWidths(), SHAPE)
    self.assertEqual(
      [(g.name, g.index) for g in found.structure.groups],
      [('p', 0), ('q', 1)],
    )
    self.assertEqual(found.widths, {'p': 4, 'q': 6})

  def test_sees_through_remat_and_custom_vjp(self):
    @jax.custom_vjp
    def relu(x):
      return jnp.maximum(x, 0.0)

    relu.defvjp(lambda x: (relu(x), x), lambda x, g: (g * (x > 0),))

    class Wrapped(nn.Module):
      @nn.compact
      def __call__(self, x, train=False):
        x = relu(nn.remat(nn.Conv)(4, (3, 3), name='p')(x))
        x = nn.relu(jax.jit(lambda y: y * 2.0)(nn.Conv(6, (1, 1), name='q')(x)))
        return nn.Dense(2, name='out')(jnp.mean(x, (1, 2)))

    want = structure_lib.Structure(
      (
        structure_lib.Group('p', 0, ('p',), ('q',)),
        structure_lib.Group('q', 1, ('q',), ('out',)),
      ),
      head='out',
    )
    found = discover.discover(Wrapped(), SHAPE)
    self.assertEqual(discover.compare(want, found.structure), [])

  @parameterized.named_parameters(
    ('branchy', Branchy, 5),
    ('residual', Residual, 2),
    ('squeeze_excitation', SEMobile, 3),
    ('densenet', DenseBlock, 4),
  )
  def test_pruned_equals_masked_under_discovered_structure(self, cls, n):
    model = cls()
    variables, x = _init(model)
    rng = np.random.default_rng(0)
    for trial in range(3):
      keep = {
        g.name: np.sort(rng.choice(w, int(rng.integers(1, w + 1)), False))
        for g, w in zip(
          model.structure().groups,
          [model.widths[g.index] for g in model.structure().groups],
        )
      }
      self.assertLen(keep, n)
      pm, pv = slicing.prune(model, variables, keep)
      mm, mv = slicing.mask(model, variables, keep)
      with self.subTest(trial=trial):
        self.assertEqual(
          pm.widths,
          tuple(
            len(keep[g.name])
            for g in sorted(model.structure().groups, key=lambda g: g.index)
          ),
        )
        self.assertLess(_rel_err(pm.apply(pv, x), mm.apply(mv, x)), 1e-5)
        # The sliced variables are what the smaller model initialises.
        abstract = jax.eval_shape(pm.init, jax.random.key(0), x)
        self.assertEqual(
          jax.tree.map(jnp.shape, pv), jax.tree.map(jnp.shape, abstract)
        )

  @parameterized.named_parameters(
    ('branchy', Branchy), ('densenet', DenseBlock)
  )
  def test_cost_model_counts_concatenations(self, cls):
    # The closed-form cost model (one term per group on each leaf axis, two
    # or three groups on a concatenated axis) against the traced count of
    # the sliced network.
    model = cls()
    shape = SHAPE[1:]
    rng = np.random.default_rng(1)
    for metric in costs.METRICS:
      fn = costs.cost_fn(model, shape, metric)
      for _ in range(3):
        widths = {
          g.name: int(rng.integers(1, model.widths[g.index] + 1))
          for g in model.structure().groups
        }
        small = structure_lib.with_widths(model, widths)
        self.assertEqual(fn(widths), costs.count(small, shape)[metric])

  def test_responses_tap_what_the_next_layer_reads(self):
    model = Branchy()
    variables, x = _init(model)
    _, got = models.responses(model, variables, x)
    # Reference: the module outputs flax captures, with the model's own
    # ReLUs applied by hand and the max over space taken in numpy.
    _, state = model.apply(variables, x, capture_intermediates=True)
    out = {
      k: np.asarray(v['__call__'][0])
      for k, v in state['intermediates'].items()
      if k != '__call__'
    }
    relu = lambda a: np.maximum(a, 0.0)  # noqa: E731
    want = {
      'a': relu(out['a_bn']).max(axis=(1, 2)),
      'b': relu(out['b']).max(axis=(1, 2)),
      'c': relu(out['dw_bn']).max(axis=(1, 2)),  # max-pool keeps the max
      'e': relu(out['e']).max(axis=(1, 2)),
      'fc1': relu(out['fc1']),
    }
    self.assertEqual(set(got), set(want))
    for name in want:
      np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-6)

  @parameterized.named_parameters(
    ('branchy', Branchy), ('densenet', DenseBlock)
  )
  def test_pfa_on_a_users_model(self, cls):
    model = cls()
    variables, _ = _init(model)
    batches = _batches()
    out = methods.prune(
      'pfa', model, variables, batches=batches, recipe='energy:0.9'
    )
    self.assertLess(sum(out.model.widths), sum(model.widths))
    x = batches[0]['image'][:4]
    self.assertLess(_pruned_vs_masked(model, variables, out, x), 1e-5)

  def test_slimming_reads_the_bns_after_a_concatenation(self):
    model = DenseBlock()
    variables, x = _init(model)
    rng = np.random.default_rng(2)
    params = jax.tree.map(
      lambda a: rng.uniform(-1, 1, a.shape).astype(a.dtype),
      variables['params'],
    )
    variables = {**variables, 'params': params}
    groups = ['stem', 'layer1', 'layer2']  # 'trans' has no BN
    out = methods.prune(
      'slim', model, variables, recipe='prune:0.5', groups=groups
    )

    def gamma(bn):
      return np.abs(np.asarray(params[bn]['scale'], np.float64))

    # By hand: each channel's largest |scale| over the BNs that normalise it.
    w0, w1 = model.widths[:2]
    score = {
      'stem': np.max(
        [gamma('bn1'), gamma('bn2')[:w0], gamma('bn_t')[:w0]], axis=0
      ),
      'layer1': np.maximum(gamma('bn2')[w0:], gamma('bn_t')[w0 : w0 + w1]),
      'layer2': gamma('bn_t')[w0 + w1 :],
    }
    t = np.percentile(np.concatenate([score[n] for n in groups]), 50.0)
    self.assertEqual(out.report['threshold'], t)
    for n in groups:
      want = np.flatnonzero(score[n] > t)
      if want.size == 0:
        want = np.array([np.argmax(score[n])])
      np.testing.assert_array_equal(out.keep[n], want, err_msg=n)
    self.assertLess(_pruned_vs_masked(model, variables, out, x), 1e-5)

  @parameterized.named_parameters(
    ('branchy', Branchy), ('densenet', DenseBlock)
  )
  def test_ls_compensation_on_a_users_model(self, cls):
    model = cls()
    variables, _ = _init(model)
    batches = _batches()
    x = batches[0]['image']
    kw = dict(recipe='keep:0.5', batches=batches)
    ls = methods.prune('l1', model, variables, compensation='ls', **kw)
    plain = methods.prune('l1', model, variables, **kw)
    self.assertEqual(sorted(ls.plan.folds), sorted(model.structure().names))
    self.assertLess(_pruned_vs_masked(model, variables, ls, x), 1e-5)
    # The folds predict the removed channels: closer to the full network.
    full = model.apply(variables, x)
    self.assertLess(
      _rel_err(ls.model.apply(ls.variables, x), full),
      0.8 * _rel_err(plain.model.apply(plain.variables, x), full),
    )

  def test_slimming_without_a_bn_names_the_layer(self):
    variables, _ = _init(Residual())
    with self.assertRaisesRegex(
      ValueError, r"Layer 'stream1': Network Slimming needs a BN scale"
    ):
      methods.prune('slim', Residual(), variables, recipe='prune:0.5')

  def test_weight_only_methods_run_on_a_discovered_structure(self):
    model = Branchy()
    variables, x = _init(model)
    for name, recipe in (('l1', 'keep:0.5'), ('random', 'keep:0.5')):
      out = methods.prune(name, model, variables, recipe=recipe, rng=0)
      self.assertLess(_pruned_vs_masked(model, variables, out, x), 1e-5)
      self.assertLess(sum(out.model.widths), sum(model.widths))

  def test_cf_reads_the_maps_the_next_layer_reads(self):
    model = Branchy()
    variables, _ = _init(model)
    batches = _batches(n=2, size=6)
    batches[1]['mask'][-2:] = False
    names = model.structure().names
    got = cf.collect(model, variables, batches, names, {'num_batches': 5})
    # Reference: flax's captured module outputs, the model's ReLUs and its
    # 2x2 max-pool applied by hand, D by a float64 per-image loop.
    relu = lambda a: np.maximum(np.asarray(a, np.float64), 0.0)  # noqa: E731
    maps = {n: [] for n in names}
    for b in batches:
      _, st = model.apply(variables, b['image'], capture_intermediates=True)
      inter = st['intermediates']
      out = {k: inter[k]['__call__'][0] for k in inter if k != '__call__'}
      c = relu(out['dw_bn'])
      n, h, w, ch = c.shape
      maps['a'].append(relu(out['a_bn']))
      maps['b'].append(relu(out['b']))
      maps['c'].append(c.reshape(n, h // 2, 2, w // 2, 2, ch).max((2, 4)))
      maps['e'].append(relu(out['e']))
      maps['fc1'].append(relu(out['fc1']))
    mask = np.concatenate([b['mask'] for b in batches])
    for name in ('a', 'b', 'c', 'e'):
      want = references.similarity(np.concatenate(maps[name]), mask)
      np.testing.assert_allclose(got[name], want, atol=1e-5, err_msg=name)
    # A dense layer: each batch's kept samples are the positions of one map.
    want = np.mean(
      [
        references.similarity(m[b['mask']][None])
        for m, b in zip(maps['fc1'], batches)
      ],
      axis=0,
    )
    np.testing.assert_allclose(got['fc1'], want, atol=1e-5)

  @parameterized.parameters('cf', 'fcp')
  def test_fold_through_a_flatten_is_exact_for_a_scaled_filter(self, method):
    # 'e' feeds a flatten and a dense layer. Its filter 3 is α times filter
    # 1, bias too, so after the ReLU channel 3 is α times channel 1: the
    # fold into fc1's rows (CF adds the rows, α = 1; FCP regresses, α = 0.5)
    # reproduces the full network, and dropping without it does not.
    model = Branchy()
    variables, x = _init(model)
    alpha = 1.0 if method == 'cf' else 0.5
    rng = np.random.default_rng(3)
    e = dict(variables['params']['e'])
    kernel = np.array(e['kernel'])
    bias = rng.uniform(0.5, 1.5, e['bias'].shape)  # every channel alive
    kernel[..., 3] = alpha * kernel[..., 1]
    bias[3] = alpha * bias[1]
    e = {'kernel': jnp.asarray(kernel), 'bias': jnp.asarray(bias, jnp.float32)}
    variables = {**variables, 'params': {**variables['params'], 'e': e}}
    width = model.widths[3]
    out = methods.prune(
      method,
      model,
      variables,
      batches=_batches(),
      recipe={'e': width - 1},
      groups=['e'],
    )
    if method == 'cf':
      (delegate,) = out.report['cf']['e']['delegates'].items()
      self.assertEqual(sorted([int(delegate[0]), delegate[1]]), [1, 3])
    else:
      self.assertEqual(out.report['pairs']['e'], [[1, 3]])  # 3 is smaller
    with_fold, without = _exact_only_with_fold(model, variables, out)
    self.assertLess(with_fold, 1e-4)
    self.assertGreater(without, 1e-3)

  def test_fcp_pairs_the_layers_kernel_not_its_depthwise_one(self):
    # Group 'c' is written by conv 'c', depthwise 'dw' and BN 'dw_bn'.
    model = Branchy()
    variables, _ = _init(model)
    flat = flax.traverse_util.flatten_dict(variables['params'], sep='/')
    self.assertEqual(
      fcp.filter_key(flat, model.structure().group('c')), 'c/kernel'
    )
    # A layer of one input before a depthwise conv: both kernels are
    # [3, 3, 1, C]; the group's own layer is the one (it was neither).
    spec = (
      ('conv', 0, 0, 1, 1, True, 'relu'),
      ('conv', 1, 1, 3, 1, True, 'none'),
      ('dw', 2, 'bn_relu'),
      ('head', 3, 'mean', -1),
    )
    one = random_nets.RandomNet(spec, (1, 4))
    one_flat = flax.traverse_util.flatten_dict(
      jax.eval_shape(one.init, jax.random.key(0), jnp.ones(SHAPE))['params'],
      sep='/',
    )
    self.assertEqual(
      one.structure().group('conv1').producers[:2], ('bn2', 'conv1')
    )
    self.assertEqual(
      fcp.filter_key(one_flat, one.structure().group('conv1')), 'conv1/kernel'
    )
    pairs = [(0, 4), (2, 5)]
    got = fcp.regularizer(model, {'c': pairs}, 0.1)(variables['params'])
    k = np.asarray(flat['c/kernel'], np.float64).reshape(-1, model.widths[2])
    want = 0.1 * sum(1 - np.corrcoef(k[:, a], k[:, b])[0, 1] for a, b in pairs)
    self.assertAlmostEqual(float(got), want, places=5)

  @parameterized.named_parameters(
    ('cf_se', 'cf', SEMobile),
    ('cf_densenet', 'cf', DenseBlock),
    ('fcp_se', 'fcp', SEMobile),
    ('fcp_densenet', 'fcp', DenseBlock),
  )
  def test_fold_methods_on_a_users_model(self, method, cls):
    model = cls()
    variables, x = _init(model)
    out = methods.prune(
      method,
      model,
      variables,
      batches=_batches(),
      recipe='prune:0.5',
      groups='inner',
    )
    inner = [g.name for g in model.structure().groups if not g.stream]
    self.assertEqual(sorted(out.plan.folds), sorted(inner))
    self.assertLess(sum(out.model.widths), sum(model.widths))
    self.assertLess(_pruned_vs_masked(model, variables, out, x), 1e-5)

  @parameterized.parameters(
    ('direct', (('a', 'a_bn'), ('b', 'b_bn'))),
    ('relu_first', (('a', 'a_bn'),)),
    ('shared', (('a', 'a_bn'),)),
  )
  def test_bn_after_a_layer_reads_only_its_output(self, wiring, want):
    found = discover.discover(BiasFree(wiring=wiring), SHAPE)
    self.assertEqual(found.structure.bn_after, want)

  @parameterized.parameters('fcp', 'ls')
  def test_fold_offset_goes_to_the_bn_after_a_bias_free_layer(self, method):
    # Channel 3 of group 'a' is, after a_bn and the ReLU, 0.5 x channel 1 +
    # 1. The fold's constant must go into b_bn's mean, as 'b' has no bias;
    # b is 1x1, so zero padding adds no error and the fold is exact.
    model = BiasFree()
    variables = _scaled_channel(model, beta=1.0)
    out = _fold_channel_3(model, variables, method)
    self.assertIsNotNone(out.plan.folds['a'].offset)
    with_fold, without = _exact_only_with_fold(model, variables, out)
    self.assertLess(with_fold, 1e-4)
    self.assertGreater(without, 1e-3)

  @parameterized.parameters('fcp', 'ls')
  def test_fold_without_a_place_for_its_offset_has_none(self, method):
    # 'b' has no bias and its BN follows a ReLU: a constant has nowhere to
    # go, so the fold goes through the origin. Channel 3 = 0.5 x channel 1
    # exactly: that fold is exact (and was an error before).
    model = BiasFree(wiring='relu_first')
    variables = _scaled_channel(model, beta=0.0)
    self.assertEqual(slicing.offset_free(model, variables, 'a'), ['b'])
    out = _fold_channel_3(model, variables, method)
    self.assertIsNone(out.plan.folds['a'].offset)
    np.testing.assert_allclose(
      out.plan.folds['a'].matrix, [[0.0, 0.5, 0.0, 0.0, 0.0]], atol=1e-5
    )
    if method == 'ls':
      info = out.report['compensation_detail']['groups']['a']
      self.assertFalse(info['intercept'])
      self.assertAlmostEqual(info['explained_second_moment'], 1.0, 5)
    with_fold, without = _exact_only_with_fold(model, variables, out)
    self.assertLess(with_fold, 1e-4)
    self.assertGreater(without, 1e-3)

  def test_flax_example_resnet(self):
    model = FlaxExampleResNet()
    s = model.structure()
    blocks = [f'_Block_{i}' for i in range(4)]
    self.assertEqual(
      s.names,
      tuple(
        n
        for i, b in enumerate(blocks)
        for n in (f'stream{i + 1}', f'{b}/Conv_0')
      ),
    )
    self.assertEqual(
      sorted(s.group('stream2').producers),
      sorted(
        f'_Block_1/{m}'
        for m in ('Conv_1', 'BatchNorm_1', 'conv_proj', 'norm_proj')
      ),
    )
    self.assertEqual(
      sorted(c.path for c in s.group('stream2').consumers),
      ['_Block_2/Conv_0', '_Block_2/conv_proj'],
    )
    self.assertIn(('_Block_1/conv_proj', '_Block_1/norm_proj'), s.bn_after)
    variables, x = _init(model)
    batches = _batches(n=1)
    for name, kw in (
      ('pfa', dict(recipe='flops:0.5', groups='inner+stream')),
      ('l1', dict(recipe='keep:0.5', compensation='ls')),
      ('cf', dict(recipe='prune:0.5', groups='inner')),
      ('fcp', dict(recipe='prune:0.5', groups='inner')),
      ('slim', dict(recipe='prune:0.3')),
    ):
      with self.subTest(name):
        out = methods.prune(name, model, variables, batches=batches, **kw)
        self.assertLess(sum(out.model.widths), sum(model.widths))
        self.assertLess(_pruned_vs_masked(model, variables, out, x), 1e-5)
    fn = costs.cost_fn(model, SHAPE[1:], 'flops')
    rng = np.random.default_rng(4)
    for _ in range(3):
      widths = {
        n: int(rng.integers(1, model.widths[s.group(n).index] + 1))
        for n in s.names
      }
      small = structure_lib.with_widths(model, widths)
      self.assertEqual(fn(widths), costs.count(small, SHAPE[1:])['flops'])

  @parameterized.parameters('cf', 'fcp')
  def test_fold_methods_name_a_stream(self, method):
    variables, _ = _init(Residual())
    with self.assertRaisesRegex(
      ValueError, r"Layer 'stream1' is a residual stream.*groups='inner'"
    ):
      methods.prune(
        method, Residual(), variables, batches=_batches(), recipe='prune:0.5'
      )


def _conv(n, name):
  return nn.Conv(n, (3, 3), name=name)


class _Pinned(nn.Module):
  """conv 'a' -> ``middle`` -> conv 'b' -> mean -> dense 'out'."""

  middle: str = 'layernorm'

  @nn.compact
  def __call__(self, x, train=False):
    h = _conv(6, 'a')(x)
    if self.middle == 'layernorm':
      h = nn.LayerNorm(name='ln')(h)
    elif self.middle == 'groupnorm':
      h = nn.GroupNorm(num_groups=2, name='gn')(h)
    elif self.middle == 'channel_slice':
      h = jnp.concatenate([h[..., :3], h[..., :3]], axis=-1)
    elif self.middle == 'sort':
      h = jnp.sort(h, axis=-1)
    elif self.middle == 'generic_reduce':
      # lax.reduce with its own computation: the generic 'reduce' primitive.
      norm = jax.lax.reduce(h, 0.0, lambda a, b: a + b * b, (3,))
      h = h * norm[..., None]
    elif self.middle == 'cumsum':
      h = jnp.cumsum(h, axis=-1)
    elif self.middle == 'channel_pool':
      h = nn.max_pool(h[..., None], (1, 1, 2), strides=(1, 1, 2))[..., 0]
      h = jnp.concatenate([h, h], axis=-1)
    elif self.middle == 'channel_first_flatten':
      h = jnp.transpose(h, (0, 3, 1, 2)).reshape((h.shape[0], -1))
      return nn.Dense(2, name='out')(h)
    elif self.middle == 'input_residual':
      h = _conv(3, 'a2')(x) + x
    h = nn.relu(_conv(4, 'b')(nn.relu(h)))
    return nn.Dense(2, name='out')(jnp.mean(h, (1, 2)))


class _Sized(nn.Module):
  """conv 'a' -> GroupNorm(2) -> 'back' added -> conv 'b'."""

  widths: tuple[int, ...] = (6, 4)
  num_classes: int = 2

  @nn.compact
  def __call__(self, x, train=False):
    h = _conv(self.widths[0], 'a')(x)
    h = nn.GroupNorm(num_groups=2, name='gn')(h)
    h = h + _conv(self.widths[0], 'back')(nn.relu(h))
    h = nn.relu(_conv(self.widths[1], 'b')(nn.relu(h)))
    return nn.Dense(self.num_classes, name='out')(jnp.mean(h, (1, 2)))


class _TwoGroups(nn.Module):
  """conv 'a' -> conv 'g' of 2 fixed groups, 'back' added -> conv 'b'."""

  widths: tuple[int, ...] = (6, 6, 4)
  num_classes: int = 2

  @nn.compact
  def __call__(self, x, train=False):
    w = self.widths
    h = _conv(w[0], 'a')(x)
    h = nn.Conv(w[1], (3, 3), feature_group_count=2, name='g')(h)
    h = h + _conv(w[1], 'back')(nn.relu(h))
    h = nn.relu(_conv(w[2], 'b')(nn.relu(h)))
    return nn.Dense(self.num_classes, name='out')(jnp.mean(h, (1, 2)))

  def structure(self):
    return _discovered(self)


class _RootGain(nn.Module):
  """A per-channel parameter at the model's root, after conv 'a'."""

  widths: tuple[int, ...] = (5, 4)
  num_classes: int = 2

  @nn.compact
  def __call__(self, x, train=False):
    h = _conv(self.widths[0], 'a')(x)
    h = h * self.param('gain', nn.initializers.ones, (self.widths[0],))
    h = nn.relu(_conv(self.widths[1], 'b')(nn.relu(h)))
    return nn.Dense(self.num_classes, name='out')(jnp.mean(h, (1, 2)))

  def structure(self):
    return _discovered(self)


class ReadmeTest(absltest.TestCase):
  def test_readme_user_model_example_runs_as_written(self):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, 'README.md')) as f:
      text = f.read()
    start = text.index('**You have your own Flax CNN**')
    block = text[start:].split('```python\n', 1)[1].split('```', 1)[0]
    ns = {'__name__': 'readme_example'}
    with contextlib.redirect_stdout(io.StringIO()) as out:
      exec(compile(block, 'README.md', 'exec'), ns)  # noqa: S102
    self.assertEqual(ns['d'].structure.names, ('conv1', 'conv2'))
    self.assertEqual(ns['d'].pinned, {'fc': 'the model output'})
    # The comment on the first print is what it prints.
    self.assertIn(
      "('conv1', 'conv2') {'fc': 'the model output'}", out.getvalue()
    )
    self.assertLess(sum(ns['out'].model.widths), 16 + 32)


class PinnedTest(parameterized.TestCase):
  @parameterized.named_parameters(
    ('layernorm', 'layernorm', 'a', 'reduced over by'),
    ('groupnorm', 'groupnorm', 'a', 'split or regrouped by a reshape'),
    ('channel_slice', 'channel_slice', 'a', 'channels sliced'),
    ('sort', 'sort', 'a', "unsupported primitive 'sort'"),
    ('cumsum', 'cumsum', 'a', "combined by 'cumsum'"),
    ('generic_reduce', 'generic_reduce', 'a', "unsupported primitive 'reduce'"),
    ('channel_pool', 'channel_pool', 'a', "combined by 'reduce_window_max'"),
    (
      'channel_first_flatten',
      'channel_first_flatten',
      'a',
      'flattened before others',
    ),
    # x + conv(x) ties a2's channels to the image's: a 'stream' of the input.
    ('input_residual', 'input_residual', 'stream1', 'the model input'),
  )
  def test_pinned_with_reason(self, middle, group, reason):
    found = discover.discover(_Pinned(middle=middle), SHAPE)
    self.assertIn(group, found.pinned)
    self.assertIn(reason, found.pinned[group])
    self.assertNotIn(group, found.structure.names)
    self.assertIn('out', found.pinned)  # the model output

  @parameterized.parameters(2, 6)
  def test_two_groups_stay_pinned_at_any_width(self, width):
    # At 2 channels, a GroupNorm's 2 groups look per-channel in the jaxpr;
    # pruning one would break the layer, so the trace at twice the widths
    # pins it. The residual 'back' writes after the norm: that stream must
    # not become a group of its own beginning at the norm's bias (it did).
    found = discover.discover(_Sized(widths=(width, 4)), SHAPE)
    self.assertEqual(found.structure.names, ('b',))
    self.assertEqual(found.pinned.pop('out'), 'the model output')
    self.assertIn('stream1', found.pinned)  # the layer's output, with 'back'
    suffix = ' (at twice the widths)' if width == 2 else ''
    for reason in found.pinned.values():
      self.assertTrue(reason.endswith(suffix), found.pinned)
      self.assertIn('group', reason)

  @parameterized.parameters(2, 6)
  def test_two_fixed_conv_groups_are_blocks_at_any_width(self, width):
    # A conv of 2 fixed groups on 2 channels traces like a depthwise conv
    # (it was pinned as one at twice the widths); at both widths 'a' and the
    # conv's stream are prunable in 2 blocks, and slice like the masked net.
    model = _TwoGroups(widths=(width, width, 4))
    found = discover.discover(model, SHAPE)
    s = found.structure
    self.assertEqual(s.names, ('a', 'stream1', 'b'))
    self.assertEqual([g.blocks for g in s.groups], [2, 2, 1])
    self.assertEqual(
      s.group('a').consumers, (structure_lib.Consumer('g', blocks=2),)
    )
    self.assertEqual(found.pinned, {'out': 'the model output'})
    if width == 6:
      variables, x = _init(model)
      keep = {'a': np.array([1, 3]), 'stream1': np.array([0, 2, 4, 5])}
      pm, pv = slicing.prune(model, variables, keep)
      mm, mv = slicing.mask(model, variables, keep)
      np.testing.assert_allclose(
        pm.apply(pv, x), mm.apply(mv, x), rtol=1e-5, atol=1e-6
      )

  def test_a_root_parameter_is_its_own_producer(self):
    model = _RootGain()
    self.assertEqual(model.structure().group('a').producers, ('a', 'gain'))
    variables, x = _init(model)
    variables = {
      'params': {
        **variables['params'],
        'gain': jnp.arange(1.0, 6.0),  # not all ones: the slice matters
      }
    }
    keep = {'a': np.array([1, 3]), 'b': np.array([0, 2, 3])}
    pm, pv = slicing.prune(model, variables, keep)
    np.testing.assert_array_equal(pv['params']['gain'], [2.0, 4.0])
    mm, mv = slicing.mask(model, variables, keep)
    self.assertLess(_rel_err(pm.apply(pv, x), mm.apply(mv, x)), 1e-6)

  def test_layernorm_pin_is_needed(self):
    # Forcing 'a' into a structure anyway breaks pruned == masked: the
    # LayerNorm's statistics over channels see the removed ones as zeros.
    class Forced(_Pinned):
      widths: tuple[int, ...] = (6,)

      @nn.compact
      def __call__(self, x, train=False):
        h = nn.LayerNorm(name='ln')(_conv(self.widths[0], 'a')(x))
        h = nn.relu(_conv(4, 'b')(nn.relu(h)))
        return nn.Dense(2, name='out')(jnp.mean(h, (1, 2)))

      def structure(self):
        return structure_lib.Structure(
          (structure_lib.Group('a', 0, ('a', 'ln'), ('b',)),), head='out'
        )

    model = Forced()
    variables, x = _init(model)
    keep = {'a': np.array([0, 2, 5])}
    pm, pv = slicing.prune(model, variables, keep)
    mm, mv = slicing.mask(model, variables, keep)
    self.assertGreater(_rel_err(pm.apply(pv, x), mm.apply(mv, x)), 1e-3)


class ErrorsTest(absltest.TestCase):
  def test_trace_failure_names_model_and_shape(self):
    with self.assertRaisesRegex(
      ValueError, r'tracing SimpleCNN.apply on an input of shape \(1, 32, 32\)'
    ):
      discover.discover(models.SimpleCNN(), (1, 32, 32))

  def test_width_that_sets_no_group(self):
    class Fixed(nn.Module):
      widths: tuple[int, ...] = (4,)

      @nn.compact
      def __call__(self, x, train=False):
        x = nn.relu(nn.Conv(5, (3, 3), name='p')(x))  # ignores widths
        return nn.Dense(2, name='out')(jnp.mean(x, (1, 2)))

    with self.assertRaisesRegex(ValueError, r"group 'p' is not set by exactly"):
      discover.discover(Fixed(), SHAPE)


if __name__ == '__main__':
  absltest.main()
