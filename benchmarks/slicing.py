"""Time to prune VGG-16 (CIFAR) and ResNet-34 to half width.

  python -m benchmarks.slicing

Prints a table and writes ``benchmarks/results/slicing.json``. Slicing is
host-side numpy indexing of the param tree (no compile), so the target is
milliseconds to a second. Both ResNet-34 modes are timed: inner convs only,
and inner + residual streams.
"""

import jax
import numpy as np

from benchmarks import common
from pfa_jax import models
from pfa_jax import slicing

CASES = (
  ('vgg16_cifar', (32, 32, 3), 10, False),
  ('resnet34', (224, 224, 3), 1000, False),
  ('resnet34', (224, 224, 3), 1000, True),
)


def half_keep(model, streams: bool) -> dict:
  return {
    g.name: np.arange(0, model.widths[g.index], 2)
    for g in model.structure().groups
    if streams or not g.stream
  }


def main(repeats: int = 5) -> dict:
  rows, out = [], []
  for name, shape, classes, streams in CASES:
    model = models.get_model(name, num_classes=classes)
    variables = jax.device_get(models.init(model, jax.random.key(0), shape))
    keep = half_keep(model, streams)
    prune_s = common.median_time(
      lambda m=model, v=variables, k=keep: slicing.prune(m, v, k), repeats
    )
    mask_s = common.median_time(
      lambda m=model, v=variables, k=keep: slicing.mask(m, v, k), repeats
    )
    n_params = sum(p.size for p in jax.tree.leaves(variables['params']))
    mode = 'inner+stream' if streams else 'all layers'
    if name.startswith('resnet') and not streams:
      mode = 'inner'
    rows.append(
      (
        name,
        mode,
        f'{n_params / 1e6:.1f}M',
        f'{prune_s * 1e3:.1f}',
        f'{mask_s * 1e3:.1f}',
      )
    )
    out.append(
      {
        'model': name,
        'mode': mode,
        'params': int(n_params),
        'prune_ms': prune_s * 1e3,
        'mask_ms': mask_s * 1e3,
      }
    )
  common.print_table(rows, ('model', 'mode', 'params', 'prune ms', 'mask ms'))
  path = common.write(
    'slicing',
    {
      'target': 'prune to half width in milliseconds to a second',
      'repeats': repeats,
      'results': out,
      'pass': all(r['prune_ms'] < 1000 for r in out),
    },
  )
  print(f'wrote {path}')
  return out


if __name__ == '__main__':
  main()
