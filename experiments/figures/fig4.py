"""Fig. 4 (compression with domain adaptation), from a sweep summary.

Reads only the summary of ``configs/paper/fig4_domain.py`` and writes
``<name>.{json,md,png}``: per subset its classes, PFA-KL's footprint next to
the paper's, the four strategies' accuracies, and the check of the paper's
claim that the 10-class subsets keep more filters than the 2-class ones. The
plot is Fig. 4(b), PFA-KL's kept width per layer for every subset against
the full network's, beside the footprints (ours and the paper's).

  python -m experiments.figures.fig4 runs/fig4_cpu/summary.json \
    --out_dir experiments/results --name fig4_domain_cpu
"""

import json
import math

import matplotlib

from experiments.figures import summary_cli

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

STRATEGIES = ('full_scratch', 'full_fine', 'pfa_scratch', 'pfa_fine')
# The paper's comparisons, (a, b): is a above, below or indistinguishable
# from b? One seed per strategy, so the noise judged is the test set's: the
# binomial standard error of each accuracy on CIFAR-100's 100 test images
# per class, and a difference within 2 sigma of the difference is a tie.
COMPARISONS = (
  ('pfa_fine', 'full_fine'),
  ('pfa_fine', 'full_scratch'),
  ('full_fine', 'full_scratch'),
  ('pfa_fine', 'pfa_scratch'),
)
TEST_IMAGES_PER_CLASS = 100
_PROVENANCE = ('commit', 'hash', 'config_seed', 'command')


def aggregate(summary: dict) -> dict:
  rows = summary['rows']
  base = next((r for r in rows if r.get('part') == 'base'), {})
  subsets = {}
  for r in rows:
    if r.get('part') != 'subset':
      continue
    s = subsets.setdefault(
      r['subset'],
      {
        'subset': r['subset'],
        'classes': json.loads(r['classes']),
        'class_names': json.loads(r['class_names'] or '[]'),
        'paper_footprint': r['paper_footprint'],
        'accuracy': {},
        'provenance': {},
      },
    )
    s['accuracy'][r['strategy']] = r.get('accuracy')
    s['provenance'][r['strategy']] = {k: r.get(k) for k in _PROVENANCE}
    if r['strategy'] == 'pfa_fine':
      s['footprint'] = r['footprint']
      s['widths'] = json.loads(r['widths'])
    if r['strategy'] == 'full_fine':
      s['full_widths'] = json.loads(r['widths'])
  ordered = [subsets[k] for k in sorted(subsets)]
  for s in ordered:
    s['comparisons'] = _compare(s['accuracy'], len(s['classes']))
  return {
    'base_accuracy': base.get('accuracy'),
    'base_params': base.get('params'),
    'subsets': ordered,
    'claim_10_class_keep_more': _claim(ordered),
  }


def _compare(acc: dict, num_classes: int) -> dict:
  n = TEST_IMAGES_PER_CLASS * num_classes
  out = {}
  for a, b in COMPARISONS:
    if acc.get(a) is None or acc.get(b) is None:
      continue
    pa, pb = acc[a], acc[b]
    sigma = math.sqrt(pa * (1 - pa) / n + pb * (1 - pb) / n)
    diff = pa - pb
    out[f'{a}-{b}'] = {
      'diff_pp': 100 * diff,
      'two_sigma_pp': 200 * sigma,
      'verdict': 'tie'
      if abs(diff) <= 2 * sigma
      else ('above' if diff > 0 else 'below'),
    }
  return out


def _claim(subsets: list[dict]) -> dict:
  """Do the 10-class subsets keep more than the 2-class ones (ours, paper)?"""
  out = {}
  for key in ('footprint', 'paper_footprint'):
    ten = [s[key] for s in subsets if len(s['classes']) == 10 and key in s]
    two = [s[key] for s in subsets if len(s['classes']) == 2 and key in s]
    if not ten or not two:
      out[key] = None
      continue
    out[key] = {
      'min_10_class': min(ten),
      'max_2_class': max(two),
      'mean_10_class': sum(ten) / len(ten),
      'mean_2_class': sum(two) / len(two),
      'every_10_above_every_2': min(ten) > max(two),
    }
  return out


def _acc(x):
  return '-' if x is None else f'{100 * x:.2f}'


def markdown(agg: dict, title: str) -> str:
  lines = [f'# {title}', '']
  if agg['base_accuracy'] is not None:
    lines += [
      f'Base model {100 * agg["base_accuracy"]:.2f}% test accuracy on all '
      "classes. Subset accuracies are on the subset's test images, every "
      "net predicting only the subset's classes; the last state, never a "
      'test-selected checkpoint.',
      '',
    ]
  lines += [
    '| subset | classes | PFA-KL footprint | paper | full scratch | '
    'full fine | PFA scratch | PFA fine |',
    '|---|---|---|---|---|---|---|---|',
  ]
  for s in agg['subsets']:
    a = s['accuracy']
    fp = s.get('footprint')
    lines.append(
      f'| {s["subset"]} | {len(s["classes"])} | '
      f'{"-" if fp is None else f"{100 * fp:.1f}%"} | '
      f'{100 * s["paper_footprint"]:.1f}% | '
      + ' | '.join(_acc(a.get(k)) for k in STRATEGIES)
      + ' |'
    )
  c = agg['claim_10_class_keep_more']
  lines += ['', '10-class subsets keep more filters than 2-class ones:']
  for key, label in (('footprint', 'ours'), ('paper_footprint', 'paper')):
    v = c.get(key)
    if v is None:
      lines.append(f'- {label}: not enough subsets')
      continue
    lines.append(
      f'- {label}: 10-class mean {100 * v["mean_10_class"]:.1f}% '
      f'(min {100 * v["min_10_class"]:.1f}%), 2-class mean '
      f'{100 * v["mean_2_class"]:.1f}% (max {100 * v["max_2_class"]:.1f}%): '
      + ('yes, every one' if v['every_10_above_every_2'] else 'not for all')
    )
  lines += [
    '',
    "Differences in pp, with the test set's 2-sigma (binomial, "
    f'{TEST_IMAGES_PER_CLASS} test images per class; one seed per strategy, '
    'so seed noise is not in it): within 2 sigma is a tie.',
    '',
    '| subset | ' + ' | '.join(f'{a} - {b}' for a, b in COMPARISONS) + ' |',
    '|---|' + '---|' * len(COMPARISONS),
  ]
  for s in agg['subsets']:
    cells = []
    for a, b in COMPARISONS:
      c = s['comparisons'].get(f'{a}-{b}')
      cells.append(
        '-'
        if c is None
        else f'{c["diff_pp"]:+.1f} ± {c["two_sigma_pp"]:.1f} ({c["verdict"]})'
      )
    lines.append(f'| {s["subset"]} | ' + ' | '.join(cells) + ' |')
  lines += ['', 'Classes:', '']
  for s in agg['subsets']:
    names = ', '.join(s['class_names']) or '(names unavailable)'
    lines.append(f'- {s["subset"]}: {s["classes"]} = {names}')
  return '\n'.join(lines) + '\n'


def draw(agg: dict, path: str, title: str) -> None:
  fig, (ax_w, ax_f) = plt.subplots(
    1, 2, figsize=(12, 4.2), gridspec_kw={'width_ratios': [2.2, 1]}
  )
  subsets = [s for s in agg['subsets'] if 'widths' in s]
  full = next(s['full_widths'] for s in agg['subsets'] if 'full_widths' in s)
  layers = list(full)
  x = range(len(layers))
  ax_w.plot(x, [full[n] for n in layers], 'k-', lw=2, label='full')
  for s in subsets:
    ax_w.plot(
      x,
      [s['widths'][n] for n in layers],
      '-o' if len(s['classes']) == 10 else '--.',
      label=f'{s["subset"]} ({len(s["classes"])} classes)',
    )
  ax_w.set_xticks(list(x), layers, rotation=60, fontsize=7)
  ax_w.set_ylabel('filters kept (PFA-KL)')
  ax_w.set_title(title)
  ax_w.legend(fontsize=7)
  names = [s['subset'] for s in agg['subsets']]
  ours = [100 * s.get('footprint', float('nan')) for s in agg['subsets']]
  paper = [100 * s['paper_footprint'] for s in agg['subsets']]
  pos = range(len(names))
  ax_f.bar([p - 0.2 for p in pos], ours, 0.4, label='ours (CPU scale)')
  ax_f.bar([p + 0.2 for p in pos], paper, 0.4, label='paper')
  ax_f.set_xticks(list(pos), names)
  ax_f.set_ylabel('parameter footprint (%)')
  ax_f.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None):
  return summary_cli.main(
    argv,
    doc=__doc__,
    name='fig4_domain_cpu',
    title='VGG-16 1/4, CIFAR-100 -> subsets (CPU scale)',
    aggregate=aggregate,
    markdown=markdown,
    draw=draw,
  )


if __name__ == '__main__':
  main()
