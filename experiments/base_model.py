"""The shared base model of a sweep: trained once, read by every point."""

import json
import os


def trained(config, d: str, **overrides) -> dict:
  """``<d>/train/result.json``, training it first (job 'train') if absent.

  ``overrides`` are dotted config keys set before training (e.g.
  ``{'optim.bn_l1': 1e-4}`` for a sparse-trained base, ``seed``); a base
  that exists is returned as is.
  """
  path = os.path.join(d, 'train', 'result.json')
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  from experiments import sweep  # noqa: PLC0415
  from pfa_jax import main as pfa_main  # noqa: PLC0415

  c = sweep.apply_overrides(config, {'job': 'train', **overrides})
  return pfa_main.run(c, d)['train']
