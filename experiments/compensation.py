"""Least-squares compensation vs none, at CPU scale (issue 9).

For PFA-KL, PFA at a params target and L1 (FP) at the same target, on a
trained model (``--config``: the demo SimpleCNN by default, or
``configs/vgg16_cifar10.py:cpu``): accuracy right after slicing, after BN
recalibration, and after the same short fine-tune, each with
``compensation='none'`` and ``'ls'``. Both arms run the compress job
(``pfa_jax.compress``) on the same checkpoint, data, keep-sets and seeds;
only ``method_kw.compensation`` differs. Each arm's workdir keeps the job's
``config.json``, ``result.json`` and per-recipe ``plan.json`` /
``metrics.jsonl``; the summary goes to
``experiments/results/compensation_cpu.{json,md}``.

  TFDS_DATA_DIR=$HOME/tensorflow_datasets python -m experiments.compensation \
    --source $HOME/runs/demo/train --workdir $HOME/runs/compensation
  python -m pfa_jax.main --config configs/vgg16_cifar10.py:cpu \
    --workdir $HOME/runs/vgg16_cpu
  python -m experiments.compensation --config configs/vgg16_cifar10.py:cpu \
    --source $HOME/runs/vgg16_cpu/train --workdir $HOME/runs/compensation_vgg \
    --out experiments/results/compensation_vgg16_cpu

LS statistics are one-shot: taken from the unpruned network in one pass
(``pfa_jax.methods.compensation``). Checkpoints are never chosen by test
accuracy; every number is the last state's.
"""

import argparse
import json
import os
import sys
import time

from absl import logging

from pfa_jax import hostmem

ARMS = ('none', 'ls')
STAGES = ('pruned', 'recalibrated', 'finetuned')


def build_config(args, compensation: str):
  from experiments import sweep  # noqa: PLC0415

  module, arg = sweep.load_config_module(args.config)
  c = module.get_config(arg)
  c.job = 'compress'
  c.compress.source = args.source
  c.compress.num_batches = args.num_batches
  c.compress.recalibrate_batches = args.recalibrate_batches
  c.recipes = ('kl', args.target, f'l1@{args.target}')
  c.method_kw.compensation = compensation
  c.method_kw.ridge = args.ridge
  c.finetune.num_epochs = args.finetune_epochs
  return c


def summarize(results: dict, meta: dict) -> dict:
  """Rows ``{recipe, compensation, params_ratio, flops_ratio, acc_*}``."""
  rows = []
  for arm, res in results.items():
    for label, r in res['recipes'].items():
      rows.append(
        {
          'recipe': label,
          'compensation': arm,
          'params_ratio': r['params_ratio'],
          'flops_ratio': r['flops_ratio'],
          **{f'acc_{s}': r.get(f'accuracy_{s}') for s in STAGES},
        }
      )
  rows.sort(key=lambda r: (r['recipe'], ARMS.index(r['compensation'])))
  full = next(iter(results.values()))['full']
  return {
    **meta,
    'full_accuracy': full['accuracy'],
    'full_params': full['params'],
    'full_flops': full['flops'],
    'rows': rows,
  }


def _fmt(x):
  return '-' if x is None else f'{100 * x:.2f}'


def to_markdown(s: dict) -> str:
  lines = [
    '# LS compensation vs none (CPU scale)',
    '',
    f'CPU scale: {s["model"]} (`{s["config"]}`: width '
    f'{s["width_mult"]:.3g}, {s["train_epochs"]} epochs; '
    f'checkpoint step {s["source_step"]}'
    + ('' if s['source_finished'] else ', training unfinished')
    + '), '
    f'full model {100 * s["full_accuracy"]:.2f}% test accuracy, '
    f'{s["full_params"]} params, {s["full_flops"]} MACs. Fine-tune '
    f'{s["finetune_epochs"]} epoch(s); BN recalibration on '
    f'{s["recalibrate_batches"]} batches; LS ridge {s["ridge"]} (relative), '
    'one-shot statistics. Accuracies in % on the CIFAR-10 test split; '
    'the last state, never a test-selected checkpoint.',
    '',
    f'Command: `{s["command"]}`  ',
    f'Wall time {s["wall_s"]:.0f} s; load average at start/end '
    f'{s["load_start"]} / {s["load_end"]}'
    + (' (loaded machine)' if s['loaded'] else '')
    + '.',
    '',
    '| recipe | compensation | params | FLOPs | sliced | recalibrated '
    '| fine-tuned |',
    '|---|---|---|---|---|---|---|',
  ]
  for r in s['rows']:
    lines.append(
      f'| {r["recipe"]} | {r["compensation"]} | {r["params_ratio"]:.3f} '
      f'| {r["flops_ratio"]:.3f} | {_fmt(r["acc_pruned"])} '
      f'| {_fmt(r["acc_recalibrated"])} | {_fmt(r["acc_finetuned"])} |'
    )
  lines += ['', s.get('notes', ''), '']
  return '\n'.join(lines)


def main(argv=None):
  hostmem.retain_freed_memory()  # before the first JAX computation
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  home = os.path.expanduser('~')
  p.add_argument(
    '--config',
    default='configs/demo_cifar10.py',
    help="the trained model's config file[:arg] (its compress job is run)",
  )
  p.add_argument('--source', default=os.path.join(home, 'runs/demo/train'))
  p.add_argument('--workdir', default=os.path.join(home, 'runs/compensation'))
  p.add_argument('--target', default='params:0.5')
  p.add_argument('--finetune_epochs', type=float, default=0.2)
  p.add_argument('--recalibrate_batches', type=int, default=10)
  p.add_argument('--num_batches', type=int, default=20)
  p.add_argument('--ridge', type=float, default=1e-3)
  p.add_argument('--out', default='experiments/results/compensation_cpu')
  p.add_argument('--notes', default='', help='a line for the summary')
  p.add_argument(
    '--wait_s', type=float, default=0, help='poll for <source>/result.json'
  )
  args = p.parse_args(argv)
  t_end = time.time() + args.wait_s
  done = os.path.join(args.source, 'result.json')
  while not os.path.exists(done) and time.time() < t_end:
    time.sleep(30)
  ckpt = os.path.join(args.source, 'ckpt')
  steps = [int(d) for d in os.listdir(ckpt) if d.isdigit()]
  if not steps:
    raise SystemExit(f'No checkpoint in {ckpt}.')

  from pfa_jax import compress  # noqa: PLC0415
  from pfa_jax import input_pipeline  # noqa: PLC0415
  from pfa_jax import main as pfa_main  # noqa: PLC0415

  logging.set_verbosity(logging.INFO)
  pfa_main.quiet_third_party_logs()
  input_pipeline.configure_tf()
  load_start = os.getloadavg()
  t0 = time.time()
  results = {}
  for arm in ARMS:
    config = build_config(args, arm)
    results[arm] = compress.compress(config, os.path.join(args.workdir, arm))
  load_end = os.getloadavg()
  train_result = {}
  if os.path.exists(done):  # else: a copy of an unfinished run's checkpoint
    with open(done) as f:
      train_result = json.load(f)
  meta = {
    'scale': 'cpu',
    'command': 'python -m experiments.compensation '
    + ' '.join(sys.argv[1:] if argv is None else argv),
    'source': args.source,
    'workdir': args.workdir,
    'target': args.target,
    'finetune_epochs': args.finetune_epochs,
    'recalibrate_batches': args.recalibrate_batches,
    'ridge': args.ridge,
    'config': args.config,
    'model': config.model.name,
    'width_mult': float(config.model.kw.get('width_mult', 1.0)),
    'train_epochs': config.num_epochs,
    'train_accuracy_reported': train_result.get('eval_accuracy'),
    'source_step': max(steps),
    'source_finished': bool(train_result),
    'notes': args.notes,
    'wall_s': time.time() - t0,
    'load_start': [round(x, 2) for x in load_start],
    'load_end': [round(x, 2) for x in load_end],
    'loaded': max(load_start[0], load_end[0]) > 1.5,
  }
  s = summarize(results, meta)
  os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
  with open(args.out + '.json', 'w') as f:
    json.dump(s, f, indent=2)
  with open(args.out + '.md', 'w') as f:
    f.write(to_markdown(s))
  print(to_markdown(s))


if __name__ == '__main__':
  main()
