"""BN recalibration vs a float64 numpy forward pass (cumulative averages)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

from pfa_jax import train

EPS = 1e-5  # flax BatchNorm's default epsilon


class _Net(nn.Module):
  """1x1 conv -> BN -> ReLU -> mean -> dense -> BN -> dense."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(4, (1, 1), name='conv')(x)
    x = nn.BatchNorm(use_running_average=not train, name='bn1')(x)
    x = nn.relu(x).mean((1, 2))
    x = nn.Dense(3, name='fc')(x)
    x = nn.BatchNorm(use_running_average=not train, name='bn2')(x)
    return nn.Dense(10, name='head')(x)


def _moments(y, mask, axes):
  """Masked biased moments of y (float64); axis 0 is the batch."""
  y = y[mask]
  return y.mean(axes), y.var(axes)


def _reference(variables, batch):
  """Per-batch moments of each BN's input, in train mode, float64 numpy."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables['params'])
  x, mask = np.asarray(batch['image'], np.float64), batch['mask'].astype(bool)
  y1 = np.einsum('nhwc,cd->nhwd', x, p['conv']['kernel'][0, 0])
  y1 = y1 + p['conv']['bias']
  m1, v1 = _moments(y1, mask, (0, 1, 2))
  z = (y1 - m1) / np.sqrt(v1 + EPS) * p['bn1']['scale'] + p['bn1']['bias']
  h = np.maximum(z, 0).mean((1, 2))
  y2 = h @ p['fc']['kernel'] + p['fc']['bias']
  m2, v2 = _moments(y2, mask, (0,))
  return {'bn1': (m1, v1, mask.sum()), 'bn2': (m2, v2, mask.sum())}


def _batches():
  rng = np.random.default_rng(0)
  out = []
  for i, (shift, scale) in enumerate([(0.0, 1.0), (2.0, 3.0), (-1.0, 0.5)]):
    image = shift + scale * rng.normal(size=(8, 4, 4, 3))
    mask = np.ones(8, bool)
    if i == 2:  # A padded last batch: padding is garbage and must not count.
      mask[5:] = False
      image[5:] = 1e3
    out.append(
      {
        'image': image.astype(np.float32),
        'label': np.zeros(8, np.int32),
        'mask': mask,
      }
    )
  return out


class RecalibrateTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    model = _Net()
    v = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4, 4, 3)))
    rng = np.random.default_rng(1)
    v = jax.tree.map(
      lambda a: a + rng.uniform(0.2, 1.0, a.shape).astype(np.float32), v
    )  # Non-trivial gammas/betas and stale running statistics.
    self.model, self.variables = model, v

  def test_equals_numpy_cumulative_average(self):
    batches = _batches()
    out = train.recalibrate_bn(self.model, self.variables, batches)
    refs = [_reference(self.variables, b) for b in batches]
    for name in ('bn1', 'bn2'):
      n = np.array([r[name][2] for r in refs], np.float64)
      self.assertEqual(list(n), [8, 8, 5])
      want_mean = sum(k * r[name][0] for k, r in zip(n, refs)) / n.sum()
      want_var = sum(k * r[name][1] for k, r in zip(n, refs)) / n.sum()
      got = out['batch_stats'][name]
      np.testing.assert_allclose(got['mean'], want_mean, rtol=2e-4, atol=1e-5)
      np.testing.assert_allclose(got['var'], want_var, rtol=2e-4, atol=1e-5)
      # Not the last batch alone, and not a momentum update of the old stats.
      self.assertGreater(
        np.abs(np.asarray(got['mean']) - refs[-1][name][0]).max(), 1e-2
      )
    np.testing.assert_array_equal(
      out['params']['conv']['kernel'],
      self.variables['params']['conv']['kernel'],
    )

  def test_callable_batches_and_all_padding(self):
    batches = _batches()
    a = train.recalibrate_bn(self.model, self.variables, batches)
    empty = {**batches[0], 'mask': np.zeros(8, bool)}
    b = train.recalibrate_bn(
      self.model, self.variables, lambda: iter([empty, *batches])
    )
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
      np.testing.assert_allclose(x, y, rtol=1e-6)
    with self.assertRaisesRegex(ValueError, 'no real example'):
      train.recalibrate_bn(self.model, self.variables, [empty])


if __name__ == '__main__':
  absltest.main()
