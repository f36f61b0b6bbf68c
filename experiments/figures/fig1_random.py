"""Fig. 1 (random architectures): accuracy change vs footprint, from a summary.

Reads only the sweep summary (``python -m experiments.sweep --summarize``)
of ``configs/paper/fig1_random.py`` and writes

* ``<name>.json``: per (init, recipe): N, footprint, mean / std / best
  accuracy change vs the base model, and the expected best of n <= N
  random architectures; the base model's accuracy with its seed spread;
* ``<name>.md``: the same as a table;
* ``<name>.png``: change in accuracy (pp) vs footprint, best and mean lines
  per init (±1 std band), and the expected max-of-n curves.

Expected max of n: with the N observed accuracies sorted, ``x_(1) <= ... <=
x_(N)``, drawing n with replacement gives ``E[max] = Σ_j x_(j) ((j/N)^n -
((j-1)/N)^n)``: the bootstrap's expectation in closed form (no resampling
noise). With N far below the paper's 300, best-of-N is a weaker upper bound;
the curve shows how fast it grows with n.

  python -m experiments.figures.fig1_random runs/fig1_random_cpu/summary.json \
    --out_dir experiments/results --name fig1_random_cpu
"""

import statistics

import matplotlib
import matplotlib.ticker
import numpy as np

from experiments.figures import summary_cli

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402


def expected_max(values, n: int) -> float:
  """E[max of n draws with replacement from ``values``] (exact bootstrap)."""
  x = np.sort(np.asarray(values, np.float64))
  m = len(x)
  if m == 0 or n < 1:
    raise ValueError(f'expected_max needs values and n >= 1, got {m}, {n}.')
  j = np.arange(1, m + 1)
  w = (j / m) ** n - ((j - 1) / m) ** n
  return float(np.sum(w * x))


def _ns(n_max):
  ns = sorted({1, 2, 3, 5, 10, 20, 50, 100, 200, 300, n_max})
  return [n for n in ns if n <= n_max]


def _mean_std(values) -> tuple[float, float]:
  values = list(values)
  return (
    statistics.mean(values),
    statistics.stdev(values) if len(values) > 1 else 0.0,
  )


def verdict(diff: float, sigma: float, n: int = 2) -> str:
  """'win' / 'loss' beyond 2 sigma, else 'indistinguishable'; with fewer
  than 2 seeds on a side there is no sigma: 'too few seeds'."""
  if n < 2:
    return 'too few seeds'
  if abs(diff) <= 2 * sigma:
    return 'indistinguishable'
  return 'win' if diff > 0 else 'loss'


def _pfa_points(rows) -> list[dict]:
  groups = {}
  for r in rows:
    groups.setdefault((r['init'], r['recipe']), []).append(r)
  out = []
  for (init, recipe), rs in sorted(groups.items()):
    mean, std = _mean_std(100 * r['delta_accuracy'] for r in rs)
    out.append(
      {
        'init': init,
        'recipe': recipe,
        'n': len(rs),
        'seeds': sorted(r.get('data_seed', r['seed']) for r in rs),
        'footprint': statistics.mean(r['footprint'] for r in rs),
        'params': statistics.mean(r['params'] for r in rs),
        'mean_pp': mean,
        'std_pp': std,
      }
    )
  return out


def claims(agg: dict) -> dict:
  """The paper's three Fig. 1 claims, checked on ``agg`` (2-sigma rule).

  sigma of a difference of two seed means is the pooled seed std,
  ``sqrt((s_a^2 + s_b^2) / 2)``: a difference within 2 sigma is
  'indistinguishable'. Claim 1 compares each PFA point with the random
  curve (best of N and mean) at the same recipe's footprint and init.
  """
  curves = {(c['init'], c['recipe']): c for c in agg['curves']}
  pfa = {(p['init'], p['recipe']): p for p in agg['pfa']}
  near, gap = [], []
  for (init, recipe), p in sorted(pfa.items()):
    c = curves.get((init, recipe))
    if c is None:
      continue
    near.append(
      {
        'init': init,
        'recipe': recipe,
        'pfa_minus_best_pp': p['mean_pp'] - c['best_pp'],
        'pfa_minus_random_mean_pp': p['mean_pp'] - c['mean_pp'],
        'vs_random_mean': verdict(
          p['mean_pp'] - c['mean_pp'],
          ((p['std_pp'] ** 2 + c['std_pp'] ** 2) / 2) ** 0.5,
          min(p['n'], c['n']),
        ),
      }
    )
    gap.append(c['best_pp'] - c['mean_pp'])
  sel_vs_scr = []
  for init_pair in (('selection', 'scratch'),):
    for key in sorted({r for _, r in pfa} | {r for _, r in curves}):
      for kind, table in (('pfa', pfa), ('random_mean', curves)):
        a, b = (table.get((i, key)) for i in init_pair)
        if a is None or b is None:
          continue
        diff = a['mean_pp'] - b['mean_pp']
        sigma = ((a['std_pp'] ** 2 + b['std_pp'] ** 2) / 2) ** 0.5
        sel_vs_scr.append(
          {
            'recipe': key,
            'widths': kind,
            'selection_minus_scratch_pp': diff,
            'sigma_pp': sigma,
            'verdict': verdict(diff, sigma, min(a['n'], b['n'])),
          }
        )
  beats = []
  control = agg.get('control')
  for p in agg['pfa']:
    if p['recipe'] == 'full':
      continue
    row = {
      'init': p['init'],
      'recipe': p['recipe'],
      'footprint': p['footprint'],
      'vs_base_pp': p['mean_pp'],
      'vs_base': verdict(p['mean_pp'], p['std_pp'], p['n']),
    }
    if control is not None:
      diff = p['mean_pp'] - control['mean_pp']
      sigma = ((p['std_pp'] ** 2 + control['std_pp'] ** 2) / 2) ** 0.5
      row.update(
        vs_control_pp=diff,
        vs_control=verdict(diff, sigma, min(p['n'], control['n'])),
      )
    beats.append(row)
  return {
    'rule': 'a difference within 2 pooled seed std is indistinguishable',
    'c1_pfa_near_upper_bound': near,
    'c1_mean_upper_bound_gap_pp': statistics.mean(gap) if gap else None,
    'c2_selection_vs_scratch': sel_vs_scr,
    'c3_compressed_vs_full': beats,
  }


def aggregate(summary: dict) -> dict:
  """The figure's numbers from a sweep summary (module docstring)."""
  rows = summary['rows']
  base = [r for r in rows if r.get('part') == 'base']
  groups = {}
  pfa_rows = []
  for r in rows:
    if r.get('part') == 'base' or 'delta_accuracy' not in r:
      continue
    if r.get('widths_from', 'random') == 'pfa':
      pfa_rows.append(r)
      continue
    groups.setdefault((r['init'], r['recipe']), []).append(r)
  out = {
    'base': {
      'seeds': [r['seed'] for r in base],
      'accuracy': [r['accuracy'] for r in base],
      'mean': statistics.mean(r['accuracy'] for r in base) if base else None,
      'std': statistics.stdev(r['accuracy'] for r in base)
      if len(base) > 1
      else None,
    },
    'curves': [],
  }
  for (init, recipe), rs in sorted(groups.items()):
    d = [100 * r['delta_accuracy'] for r in rs]  # percentage points
    n = len(d)
    out['curves'].append(
      {
        'init': init,
        'recipe': recipe,
        'n': n,
        'footprint': statistics.mean(r['footprint'] for r in rs),
        'params': statistics.mean(r['params'] for r in rs),
        'base_accuracy': rs[0]['base_accuracy'],
        'mean_pp': statistics.mean(d),
        'std_pp': statistics.stdev(d) if n > 1 else 0.0,
        'best_pp': max(d),
        'worst_pp': min(d),
        'expected_max_pp': {str(k): expected_max(d, k) for k in _ns(n)},
      }
    )
  out['command'] = next((r['command'] for r in rows if r.get('command')), '')
  out['commits'] = sorted({r['commit'] for r in rows if r.get('commit')})
  points = _pfa_points(pfa_rows)
  out['pfa'] = [p for p in points if p['recipe'] != 'full']
  out['control'] = next((p for p in points if p['recipe'] == 'full'), None)
  out['claims'] = claims(out)
  return out


def markdown(agg: dict, title: str) -> str:
  b = agg['base']
  lines = [f'# {title}', '']
  if agg.get('command'):
    lines += [
      f'Sweep: `{agg["command"]}`; summary of its rows, drawn by '
      '`python -m experiments.figures.fig1_random`. Commits: '
      + ', '.join(
        f'`{c[:12]}{"-dirty" if c.endswith("-dirty") else ""}`'
        for c in agg.get('commits', [])
      )
      + '.',
      '',
    ]
  if b['mean'] is not None:
    spread = f' ± {100 * b["std"]:.2f}' if b['std'] is not None else ''
    lines.append(
      f'Base model: {100 * b["mean"]:.2f}%{spread} test accuracy over seeds '
      f'{b["seeds"]} (every variant starts from / is compared with seed '
      f'{b["seeds"][0] if b["seeds"] else "?"}).'
    )
    lines.append('')
  lines += [
    '| init | recipe | footprint | N | mean Δ (pp) | std | best Δ | '
    'E[best of 2] | E[best of N/2] |',
    '|---|---|---|---|---|---|---|---|---|',
  ]
  for c in agg['curves']:
    em = c['expected_max_pp']
    half = str(max(1, c['n'] // 2))
    half_v = em.get(half)
    if half_v is None:
      from_n = max(int(k) for k in em if int(k) <= int(half))
      half_v = em[str(from_n)]
    lines.append(
      f'| {c["init"]} | {c["recipe"]} | {c["footprint"]:.3f} | {c["n"]} | '
      f'{c["mean_pp"]:+.2f} | {c["std_pp"]:.2f} | {c["best_pp"]:+.2f} | '
      f'{em.get("2", em["1"]):+.2f} | {half_v:+.2f} |'
    )
  if agg.get('pfa'):
    lines += [
      '',
      "PFA's own widths (mean ± std over seeds; Δ vs the base model):",
      '',
      '| init | recipe | footprint | seeds | mean Δ (pp) | std |',
      '|---|---|---|---|---|---|',
    ]
    for p in agg['pfa'] + ([agg['control']] if agg.get('control') else []):
      lines.append(
        f'| {p["init"]} | {p["recipe"]} | {p["footprint"]:.3f} | {p["n"]} | '
        f'{p["mean_pp"]:+.2f} | {p["std_pp"]:.2f} |'
      )
    lines += ['', *claims_markdown(agg['claims'])]
  return '\n'.join(lines) + '\n'


def claims_markdown(c: dict) -> list[str]:
  out = [f'Claims ({c["rule"]}):', '']
  near = c['c1_pfa_near_upper_bound']
  if near:
    worst = min(near, key=lambda r: r['pfa_minus_best_pp'])
    wins = sum(r['vs_random_mean'] == 'win' for r in near)
    out.append(
      f'1. PFA vs the random study: PFA minus best-of-N ranges '
      f'{min(r["pfa_minus_best_pp"] for r in near):+.2f} to '
      f'{max(r["pfa_minus_best_pp"] for r in near):+.2f} pp (worst: '
      f'{worst["init"]} {worst["recipe"]}); PFA beats the random mean '
      f'beyond 2σ at {wins} of {len(near)} points; the best-of-N lies '
      f'{c["c1_mean_upper_bound_gap_pp"]:.2f} pp above the random mean on '
      'average.'
    )
  sel = c['c2_selection_vs_scratch']
  for kind in ('pfa', 'random_mean'):
    rs = [r for r in sel if r['widths'] == kind]
    if rs:
      tally = {
        v: sum(r['verdict'] == v for r in rs)
        for v in ('win', 'loss', 'indistinguishable')
      }
      out.append(
        f'2. Selection vs scratch ({kind}): selection wins at {tally["win"]}, '
        f'loses at {tally["loss"]}, indistinguishable at '
        f'{tally["indistinguishable"]} of {len(rs)} recipes'
        + (
          f' ({len(rs) - sum(tally.values())} with too few seeds)'
          if len(rs) > sum(tally.values())
          else ''
        )
        + '.'
      )
  beats = c['c3_compressed_vs_full']
  if beats:

    def names(key):
      rs = [r for r in beats if r.get(key) == 'win']
      return len(rs), ', '.join(f'{r["init"]} {r["recipe"]}' for r in rs)

    (nb, b), (nc, cn) = names('vs_base'), names('vs_control')
    out.append(
      f'3. Compressed nets beyond 2σ above the base model: {nb} of '
      f'{len(beats)} ({b or "none"}); above the control (the full net '
      f'trained as long): {nc} ({cn or "none"}).'
    )
  return out


def draw(agg: dict, path: str, title: str) -> None:
  fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
  colors = {'scratch': 'tab:blue', 'selection': 'tab:orange'}
  for init in sorted({c['init'] for c in agg['curves']}):
    cs = sorted(
      (c for c in agg['curves'] if c['init'] == init),
      key=lambda c: c['footprint'],
    )
    x = [c['footprint'] for c in cs]
    mean = np.asarray([c['mean_pp'] for c in cs])
    std = np.asarray([c['std_pp'] for c in cs])
    col = colors.get(init, None)
    ax.plot(
      x, [c['best_pp'] for c in cs], '-o', color=col, label=f'{init}: best of N'
    )
    ax.plot(x, mean, '--', color=col, label=f'{init}: mean')
    ax.fill_between(x, mean - std, mean + std, color=col, alpha=0.15)
    pts = [p for p in agg.get('pfa', []) if p['init'] == init]
    for marker, sel in (('s', 'energy'), ('o', 'kl')):
      ps = [p for p in pts if p['recipe'].startswith(sel)]
      if ps:
        ax.errorbar(
          [p['footprint'] for p in ps],
          [p['mean_pp'] for p in ps],
          yerr=[p['std_pp'] for p in ps],
          fmt=marker,
          mfc='white',
          ms=7,
          color=col,
          capsize=3,
          label=f'{init}: PFA-{"En" if sel == "energy" else "KL"}',
        )
    for c in cs:
      em = c['expected_max_pp']
      ns = sorted(int(k) for k in em)
      ax2.plot(ns, [em[str(k)] for k in ns], '-', color=col, alpha=0.6)
  ax.axhline(0, color='k', lw=0.8)
  ctl = agg.get('control')
  if ctl is not None:
    ax.axhspan(
      ctl['mean_pp'] - ctl['std_pp'],
      ctl['mean_pp'] + ctl['std_pp'],
      color='gray',
      alpha=0.25,
      label='full net, trained as long (±1 std)',
    )
  ax.set_xlabel("footprint (fraction of the base model's parameters)")
  ax.set_ylabel('accuracy change vs base (pp)')
  ax.set_title(title)
  ax.legend(fontsize=8)
  ax2.axhline(0, color='k', lw=0.8)
  n_max = max((c['n'] for c in agg['curves']), default=1)
  if n_max > 10:
    ax2.set_xscale('log')
    ax2.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
  ax2.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
  ax2.set_xlabel('n random architectures')
  ax2.set_ylabel('expected best-of-n change (pp)')
  ax2.set_title('expected max of n (one line per footprint)')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None):
  return summary_cli.main(
    argv,
    doc=__doc__,
    name='fig1_random_cpu',
    title='Random architectures (SimpleCNN)',
    aggregate=aggregate,
    markdown=markdown,
    draw=draw,
  )


if __name__ == '__main__':
  main()
