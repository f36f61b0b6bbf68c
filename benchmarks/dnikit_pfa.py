"""Reference job for ``benchmarks.analyze_cold``: the same PFA with DNIKit.

  <python with dnikit> benchmarks/dnikit_pfa.py job.npz --energies=0.8,0.9

Runs with a separate interpreter that has ``dnikit`` (2.0.0) installed, not
the project's venv (no pfa_jax import). Same work as ``pfa_jax.analyze``:
covariances of every array of the ``.npz`` (one layer each, (M, C)), the
KL recipe, one energy recipe per threshold, each with the default L1Max
unit selection.
"""

import argparse

import numpy as np
from dnikit.base import Batch
from dnikit.introspectors import PFA


def main():
  p = argparse.ArgumentParser()
  p.add_argument('npz')
  p.add_argument('--energies', default='')
  p.add_argument('--batch-size', type=int, default=1024)
  a = p.parse_args()
  with np.load(a.npz) as d:
    fields = {k: d[k] for k in d.files}
  m = next(iter(fields.values())).shape[0]

  def producer(batch_size):
    for i in range(0, m, batch_size):
      yield Batch({k: v[i : i + batch_size] for k, v in fields.items()})

  pfa = PFA.introspect(producer, batch_size=a.batch_size)
  out = {'kl': pfa.get_recipe(strategy=PFA.Strategy.KL())}
  for t in [float(t) for t in a.energies.split(',') if t]:
    out[t] = pfa.get_recipe(strategy=PFA.Strategy.Energy(energy_threshold=t))
  print(
    {
      k: {n: r.recommended_output_count for n, r in v.items()}
      for k, v in out.items()
    }
  )


if __name__ == '__main__':
  main()
