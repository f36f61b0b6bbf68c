"""The shared command line of the figures drawn from a sweep summary.

``main(argv, aggregate=..., markdown=..., draw=...)`` reads one
``summary.json`` (``python -m experiments.sweep --summarize``), aggregates
it, and writes ``<out_dir>/<name>.{json,md,png}``, the JSON carrying where
its numbers came from (summary path, sweep, points complete and failed).
"""

import argparse
import json
import os
from collections.abc import Callable


def main(
  argv,
  *,
  doc: str,
  name: str,
  title: str,
  aggregate: Callable[[dict], dict],
  markdown: Callable[[dict, str], str],
  draw: Callable[[dict, str, str], None],
) -> str:
  p = argparse.ArgumentParser(description=doc.split('\n')[0])
  p.add_argument('summary', help='summary.json of the sweep')
  p.add_argument('--out_dir', default='experiments/results')
  p.add_argument('--name', default=name)
  p.add_argument('--title', default=title)
  args = p.parse_args(argv)
  with open(args.summary) as f:
    summary = json.load(f)
  agg = aggregate(summary)
  agg['source'] = {
    'summary': args.summary,
    'sweep': summary.get('sweep'),
    'num_points': summary.get('num_points'),
    'num_points_complete': summary.get('num_points_complete'),
    'failed': summary.get('failed'),
  }
  os.makedirs(args.out_dir, exist_ok=True)
  stem = os.path.join(args.out_dir, args.name)
  with open(stem + '.json', 'w') as f:
    json.dump(agg, f, indent=2)
  with open(stem + '.md', 'w') as f:
    f.write(markdown(agg, args.title))
  draw(agg, stem + '.png', args.title)
  print(f'wrote {stem}.{{json,md,png}}')
  return stem
