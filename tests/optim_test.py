"""The optax-built schedules equal the former hand-written formula."""

import math

import ml_collections
from absl.testing import absltest
from absl.testing import parameterized

from pfa_jax import optim


def _old_formula(step, *, base_lr, schedule, num_steps, warmup, bounds, decay):
  """The hand-written schedule this module replaced (float64 python)."""
  lr = base_lr
  if schedule == 'step':
    lr *= decay ** sum(step >= b for b in bounds)
  elif schedule == 'cosine':
    t = (step - warmup) / max(1, num_steps - warmup)
    lr *= 0.5 * (1 + math.cos(math.pi * min(max(t, 0.0), 1.0)))
  if warmup > 0:
    lr *= min(1.0, (step + 1) / warmup)
  return lr


CASES = [
  dict(schedule='constant', warmup=0, bounds=()),
  dict(schedule='constant', warmup=7, bounds=()),
  dict(schedule='step', warmup=0, bounds=(30, 60)),
  dict(schedule='step', warmup=0, bounds=(0, 30, 30, 99)),
  dict(schedule='step', warmup=10, bounds=(10, 45)),
  dict(schedule='cosine', warmup=0, bounds=()),
  dict(schedule='cosine', warmup=1, bounds=()),
  dict(schedule='cosine', warmup=13, bounds=()),
]


class ScheduleTest(parameterized.TestCase):
  @parameterized.parameters(*CASES)
  def test_equals_old_formula_at_every_boundary(self, schedule, warmup, bounds):
    kw = dict(base_lr=0.4, schedule=schedule, num_steps=100)
    fn = optim.learning_rate_schedule(
      **kw, warmup_steps=warmup, boundaries=bounds, decay_factor=0.2
    )
    edges = {0, 1, 50, 99, 100, 150, warmup - 1, warmup, warmup + 1}
    edges |= {b + d for b in bounds for d in (-1, 0, 1)}
    for step in sorted(s for s in edges if s >= 0) + list(range(0, 101, 7)):
      want = _old_formula(step, warmup=warmup, bounds=bounds, decay=0.2, **kw)
      self.assertAlmostEqual(float(fn(step)), want, places=6, msg=step)

  def test_boundary_inside_warmup_is_rejected(self):
    with self.assertRaisesRegex(ValueError, r'\[5\].*10-step warm-up'):
      optim.learning_rate_schedule(
        base_lr=1.0,
        schedule='step',
        num_steps=50,
        warmup_steps=10,
        boundaries=(5, 20),
      )

  def test_unknown_schedule_names_it(self):
    with self.assertRaisesRegex(ValueError, "'poly'.*cosine"):
      optim.learning_rate_schedule(base_lr=1, schedule='poly', num_steps=1)

  def test_missing_config_field_is_an_error(self):
    config = ml_collections.ConfigDict(
      {'num_epochs': 1.0, 'optim': {'lr': 0.1, 'warmup_epochs': 0.0}}
    )
    with self.assertRaisesRegex(AttributeError, 'schedule'):
      optim.create_learning_rate_fn(config, steps_per_epoch=10)


if __name__ == '__main__':
  absltest.main()
