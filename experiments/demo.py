"""`make demo`: train SimpleCNN on CIFAR-10, compress with PFA, fine-tune.

Runs ``configs/demo_cifar10.py`` through the library (``pfa_jax.main.run``),
then prints the summary table and draws the plots from the result files.

  python -m experiments.demo --workdir workdirs/demo [--config-arg epochs=2]
"""

import argparse
import json
import os
import sys
import time

from absl import logging

from configs import demo_cifar10
from experiments.figures import demo_plots
from pfa_jax import hostmem


def _acc(r, key):
  return f'{r[key]:.4f}' if key in r else '-'


def table(result: dict) -> str:
  """The summary table of a compress ``result.json``."""
  full = result['full']
  rows = [
    (
      'recipe',
      'params',
      'FLOPs',
      'size',
      'acc sliced',
      'acc BN-recal.',
      'acc fine-tuned',
    ),
    (
      'full',
      f'{full["params"]:,}',
      f'{full["flops"] / 1e6:.1f}M',
      '1.00x',
      f'{full["accuracy"]:.4f}',
      '-',
      '-',
    ),
  ]
  for name, r in result['recipes'].items():
    rows.append(
      (
        name,
        f'{r["params"]:,}',
        f'{r["flops"] / 1e6:.1f}M',
        f'{1 / r["params_ratio"]:.2f}x smaller',
        _acc(r, 'accuracy_pruned'),
        _acc(r, 'accuracy_recalibrated'),
        _acc(r, 'accuracy_finetuned'),
      )
    )
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  lines = ['  '.join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
  lines.insert(1, '  '.join('-' * w for w in widths))
  return '\n'.join(lines)


def _save_summary(args, result, minutes, load=None):
  """The committed summary: command, table and the full result.json.

  ``load``: the 1-minute load averages at start and end. The job's own two
  threads raise the load to ~2 while it runs, so only the start decides:
  above 1 on this 2-core machine (another job held a core), the wall time is
  marked as measured on a loaded machine.
  """
  os.makedirs(args.summary_dir, exist_ok=True)
  base = os.path.join(args.summary_dir, 'demo_cifar10')
  command = 'make demo  # = python -m experiments.demo --workdir workdirs/demo'
  if args.config_arg:
    command = f'python -m experiments.demo --config-arg {args.config_arg}'
  load = list(load or ())
  loaded = bool(load) and load[0] > 1.0
  with open(base + '.json', 'w') as f:
    json.dump(
      {
        'command': command,
        'minutes': minutes,
        'load_average': load,
        'loaded': loaded,
        **result,
      },
      f,
      indent=2,
    )
  where = f'{os.cpu_count()} CPU cores'
  if load:
    where += f', load average {load[0]:.1f} at start / {load[-1]:.1f} at end'
    where += ' (a loaded machine)' if loaded else ''
  with open(base + '.md', 'w') as f:
    f.write(
      f'# `make demo`: SimpleCNN on CIFAR-10 (JPEG q75 copy)\n\n'
      f'Command: `{command}`  \n'
      f'Wall time of the train + compress job: {minutes:.1f} min on {where}, '
      f'commit {result.get("git_commit", "?")}.\n\n```\n{table(result)}\n'
      f'```\n\nFull result: `demo_cifar10.json`.\n'
    )
  print(f'Summary: {base}.md')


def main(argv=None) -> int:
  hostmem.retain_freed_memory()  # before the first JAX computation
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', default='workdirs/demo')
  parser.add_argument(
    '--config-arg', default=None, help="e.g. 'epochs=2,finetune_epochs=0.5'"
  )
  parser.add_argument(
    '--summary-dir',
    default=None,
    help='Also write demo_cifar10.{md,json} here (experiments/results).',
  )
  args = parser.parse_args(argv)
  logging.set_verbosity(logging.INFO)
  from pfa_jax import main as pfa_main  # noqa: PLC0415

  pfa_main.quiet_third_party_logs()
  config = demo_cifar10.get_config(args.config_arg)
  t0, load0 = time.time(), os.getloadavg()[0]
  pfa_main.run(config, args.workdir)
  minutes = (time.time() - t0) / 60
  load = (load0, os.getloadavg()[0])
  path = os.path.join(args.workdir, 'compress', 'result.json')
  with open(path) as f:
    result = json.load(f)
  plots = demo_plots.draw(args.workdir)
  print()
  print(f'PFA on SimpleCNN / CIFAR-10 (JPEG q75 copy), {minutes:.1f} min')
  print(table(result))
  print(f'\nResults: {path}')
  if args.summary_dir:
    _save_summary(args, result, minutes, load)
  for p in plots:
    print(f'Plot:    {p}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
