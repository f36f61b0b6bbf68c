"""Plots of a compress run, drawn from its result files only.

* ``accuracy_vs_footprint.png``: test accuracy against parameter count for
  the full model and every recipe, before and after fine-tuning.
* ``widths.png``: kept filters per layer, for every recipe.

  python -m experiments.figures.demo_plots --workdir workdirs/demo
"""

import argparse
import json
import os

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402


def draw(workdir: str) -> list[str]:
  """Draws both plots from ``<workdir>/compress/result.json``."""
  rdir = os.path.join(workdir, 'compress')
  with open(os.path.join(rdir, 'result.json')) as f:
    result = json.load(f)
  full, recipes = result['full'], result['recipes']
  paths = []

  fig, ax = plt.subplots(figsize=(6, 4))
  ax.scatter(
    [full['params']],
    [full['accuracy']],
    marker='*',
    s=200,
    color='k',
    label='full model',
    zorder=3,
  )
  stages = (
    ('accuracy_pruned', 'x', 'tab:red', 'sliced'),
    ('accuracy_recalibrated', '^', 'tab:orange', 'BN recalibrated'),
    ('accuracy_finetuned', 'o', 'tab:blue', 'fine-tuned'),
  )
  for name, r in recipes.items():
    accs = [r[k] for k, *_ in stages if k in r]
    ax.plot([r['params']] * len(accs), accs, ':', color='gray')
    for key, marker, color, _ in stages:
      if key in r:
        ax.scatter([r['params']], [r[key]], marker=marker, color=color)
    ax.annotate(
      name,
      (r['params'], accs[-1]),
      textcoords='offset points',
      xytext=(5, 5),
      fontsize=8,
    )
  for _, marker, color, label in stages:
    ax.scatter([], [], marker=marker, color=color, label=label)
  ax.set_xscale('log')
  ax.set_xlabel('parameters (footprint)')
  ax.set_ylabel('test accuracy')
  ax.set_title(f'{result["model"]} / {result["dataset"]}: compression recipes')
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  paths.append(os.path.join(rdir, 'accuracy_vs_footprint.png'))
  fig.savefig(paths[-1], dpi=120)
  plt.close(fig)

  layers = list(full['widths'])
  fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(layers)), 4))
  ax.plot(layers, [full['widths'][n] for n in layers], 'k-*', label='full')
  for name, r in recipes.items():
    ax.plot(layers, [r['widths'][n] for n in layers], '-o', ms=3, label=name)
  ax.set_ylabel('kept filters')
  ax.set_title('Widths per layer')
  ax.tick_params(axis='x', rotation=60, labelsize=7)
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  paths.append(os.path.join(rdir, 'widths.png'))
  fig.savefig(paths[-1], dpi=120)
  plt.close(fig)
  return paths


if __name__ == '__main__':
  parser = argparse.ArgumentParser()
  parser.add_argument('--workdir', default='workdirs/demo')
  for p in draw(parser.parse_args().workdir):
    print(p)
