"""Fig. 2 (PFA vs FP, NS, CF): accuracy change vs footprint, from a summary.

Reads only the sweep summary of ``configs/paper/fig2_cifar10.py`` and
writes ``<name>.{json,md,png}``: per method and recipe, params and FLOPs
ratios and the accuracy change against the plain base model after slicing,
BN recalibration and fine-tuning; the plot has change after fine-tuning vs
parameter footprint (left) and vs FLOPs (right), one line per method.

  python -m experiments.figures.fig2 runs/fig2_vgg16_cpu/summary.json \
    --out_dir experiments/results --name fig2_vgg16_cpu
"""

import matplotlib

from experiments.figures import summary_cli

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

STAGES = ('pruned', 'recalibrated', 'finetuned')
_LABELS = {'pfa': 'PFA', 'l1': 'FP (L1)', 'slim': 'NS', 'cf': 'CF'}


def aggregate(summary: dict) -> dict:
  rows = summary['rows']
  bases = {r['part']: r for r in rows if r.get('part') in ('base', 'slim_base')}
  points = sorted(
    (r for r in rows if r.get('part') == 'compress'),
    key=lambda r: (r['method'], r['params_ratio']),
  )
  out = {
    'base_accuracy': bases.get('base', {}).get('accuracy'),
    'slim_base_accuracy': bases.get('slim_base', {}).get('accuracy'),
    'points': [],
  }
  for r in points:
    out['points'].append(
      {
        'method': r['method'],
        'recipe': r['recipe'],
        'params_ratio': r['params_ratio'],
        'flops_ratio': r['flops_ratio'],
        **{
          f'delta_{s}_pp': None
          if r.get(f'delta_{s}') is None
          else 100 * r[f'delta_{s}']
          for s in STAGES
        },
        'acc_finetuned': r.get('acc_finetuned'),
        'commit': r.get('commit'),
        'hash': r.get('hash'),
      }
    )
  return out


def _pp(x):
  return '-' if x is None else f'{x:+.2f}'


def markdown(agg: dict, title: str) -> str:
  b, s = agg['base_accuracy'], agg['slim_base_accuracy']
  lines = [f'# {title}', '']
  if b is not None:
    lines.append(
      f'Base model {100 * b:.2f}% test accuracy'
      + (f'; NS sparse-trained base {100 * s:.2f}%' if s is not None else '')
      + '. Changes in pp against the base model; the last state, never a '
      'test-selected checkpoint.'
    )
    lines.append('')
  lines += [
    '| method | recipe | params | FLOPs | Δ sliced | Δ recalibrated | '
    'Δ fine-tuned | fine-tuned acc |',
    '|---|---|---|---|---|---|---|---|',
  ]
  for p in agg['points']:
    acc = p['acc_finetuned']
    lines.append(
      f'| {_LABELS.get(p["method"], p["method"])} | {p["recipe"]} | '
      f'{p["params_ratio"]:.3f} | {p["flops_ratio"]:.3f} | '
      f'{_pp(p["delta_pruned_pp"])} | {_pp(p["delta_recalibrated_pp"])} | '
      f'{_pp(p["delta_finetuned_pp"])} | '
      f'{"-" if acc is None else f"{100 * acc:.2f}"} |'
    )
  return '\n'.join(lines) + '\n'


def draw(agg: dict, path: str, title: str) -> None:
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
  for method in sorted({p['method'] for p in agg['points']}):
    ps = [
      p
      for p in agg['points']
      if p['method'] == method and p['delta_finetuned_pp'] is not None
    ]
    for ax, key in zip(axes, ('params_ratio', 'flops_ratio')):
      ps_sorted = sorted(ps, key=lambda p: p[key])
      ax.plot(
        [p[key] for p in ps_sorted],
        [p['delta_finetuned_pp'] for p in ps_sorted],
        '-o' if method == 'pfa' else '--s',
        label=_LABELS.get(method, method),
      )
  for ax, xlabel in zip(axes, ('parameter footprint', 'FLOPs footprint')):
    ax.axhline(0, color='k', lw=0.8)
    ax.set_xlabel(f'{xlabel} (fraction of the base model)')
  axes[0].set_ylabel('accuracy change after fine-tuning (pp)')
  fig.suptitle(title, fontsize=11)
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None):
  return summary_cli.main(
    argv,
    doc=__doc__,
    name='fig2_vgg16_cpu',
    title='VGG-16 on CIFAR-10 (CPU scale)',
    aggregate=aggregate,
    markdown=markdown,
    draw=draw,
  )


if __name__ == '__main__':
  main()
