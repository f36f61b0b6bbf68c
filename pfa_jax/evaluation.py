"""Evaluation edge: masked eval sums over a split, totalled in float64.

Sums stay in float64 on the host rather than in clu's ``metrics.Average``
(float32 accumulators), so 10^5-example totals are exact.
"""

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from pfa_jax import input_pipeline
from pfa_jax import metrics
from pfa_jax import models
from pfa_jax.steps import TrainState
from pfa_jax.steps import eval_sums


def _to_host(tree):
  """Replicated (or fully addressable) arrays -> numpy, on any host."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


def _sum_on_host(sums) -> dict[str, float]:
  """Per-batch eval sums -> one float64 total per key."""
  if not sums:
    return {'loss_sum': 0.0, 'correct': 0.0, 'count': 0.0}
  host = _to_host(sums)
  return {k: float(np.sum([np.float64(s[k]) for s in host])) for k in host[0]}


def evaluate(
  eval_step_fn: Callable[..., Any],
  state: TrainState,
  batches: Iterable[Mapping[str, jax.Array]],
) -> dict[str, float]:
  """Sums masked per-batch sums on the host; returns ``eval_summary``."""
  sums = [eval_step_fn(state, batch) for batch in batches]
  return metrics.eval_summary(_sum_on_host(sums))


def check_num_classes(config, model: nn.Module) -> None:
  """Refuses a classifier whose outputs do not match the config's labels.

  With ``input.classes`` the pipeline relabels the subset ``0..k-1``; a
  model with the whole dataset's outputs would then be scored (and trained)
  against the wrong logits, silently. ``slicing.restrict_classes`` cuts it.
  """
  want = len(config.input.get('classes', ())) or (
    input_pipeline.get_spec(config.input.dataset).num_classes
  )
  have = getattr(model, 'num_classes', want)
  if int(have) != int(want):
    raise ValueError(
      f'{type(model).__name__} has {have} outputs but the data has {want} '
      f'classes (input.dataset={config.input.dataset!r}, input.classes='
      f'{tuple(config.input.get("classes", ()))}); cut the head with '
      'pfa_jax.slicing.restrict_classes(model, variables, classes).'
    )


def evaluate_model(config, model: nn.Module, variables) -> dict[str, float]:
  """Loss and accuracy of any ``(model, variables)`` on the eval split.

  The eval set is padded and masked, so every example counts exactly once;
  its decoded arrays are loaded once per process (``input_pipeline``).
  """
  check_num_classes(config, model)
  mesh = input_pipeline.make_mesh()
  repl = input_pipeline.replicated(mesh)
  step = jax.jit(
    functools.partial(eval_sums, models.for_inference(model).apply),
    in_shardings=(repl, input_pipeline.data_sharding(mesh)),
    out_shardings=repl,
  )
  variables = jax.device_put(variables, repl)
  batches = input_pipeline.shard_batches(
    input_pipeline.get_split_iter(
      config,
      'test',
      augment=False,
      batch_size=int(config.input.eval_batch_size),
    ),
    mesh,
  )
  return metrics.eval_summary(
    _sum_on_host([step(variables, b) for b in batches])
  )
