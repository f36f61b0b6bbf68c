"""Sweep runner: every point of a config's ``get_sweep(arg)``, resumable.

  python -m experiments.sweep --config configs/paper/fig1_random.py:cpu \
    --workdir runs/fig1_random [--dry_run] [--retry_failed] \
    [--task_index i --num_tasks n]
  python -m experiments.sweep --summarize runs/fig1_random

A config file exposes ``get_config(arg)`` and, optionally, ``get_sweep(arg)
-> list[dict]`` of dotted overrides (``{'seed': 1, 'optim.lr': 0.05}``);
without it the sweep is one point. A point is one run:

* its sub-workdir is ``<slug of its overrides>-<hash>``, where the hash is
  the first 10 hex digits of the SHA-256 of the resolved config's JSON, so a
  point whose config changed (an edited file, another arg) runs again in a
  new directory, and an unchanged one is found again;
* it runs through ``pfa_jax.main.run(config, workdir)``, or through
  ``config.runner = 'module:function'`` (same signature) when set; a runner
  may return a list of rows (a vmap group of K variants is one point with K
  rows) or a dict (one row, flattened to dotted keys);
* ``result.json`` is written atomically (tmp + rename) with the hash inside,
  and a point whose ``result.json`` is complete with the same hash is
  skipped; an exception is recorded in ``failed.json`` (type, message,
  traceback) and the sweep goes on; ``--retry_failed`` runs those again.

Several workers may share one root on one machine: each point is claimed
(``<point>/claim``, host and pid, created atomically) before it runs and
released after, and a worker skips points another has finished or holds;
a dead worker's claim is taken over.

Slicing: point ``i`` belongs to task ``i % num_tasks`` (strided, so slices
stay balanced when point costs grow along the sweep). The defaults come from
a SLURM job array: ``task_index = (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN)
/ SLURM_ARRAY_TASK_STEP`` and ``num_tasks = SLURM_ARRAY_TASK_COUNT``, since
array IDs need not start at 0. Every task writes the same ``sweep.json``
manifest (the point list), and ``--summarize`` reads whatever points have
finished, ignoring directories of points no longer in the manifest.

Decision: the CLI uses argparse, not absl flags. ``pfa_jax.main`` is the
only module that defines absl flags, and importing it (to call ``run``)
defines ``--config`` / ``--workdir`` on the global absl registry, which
would collide with this entry point's own flags.
"""

import argparse
import csv
import hashlib
import importlib
import importlib.util
import json
import math
import os
import re
import socket
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

from pfa_jax import hostmem

RESULT = 'result.json'
FAILED = 'failed.json'
CLAIM = 'claim'
MANIFEST = 'sweep.json'
HASH_LEN = 10
_SLUG_MAX = 80


# ----------------------------------------------------------------------------
# Points (pure).


def load_config_module(spec: str):
  """``'path/to/file.py[:arg]'`` -> (module, arg or None)."""
  path, sep, arg = spec.partition('.py:')
  path = path + '.py' if sep else spec
  if not path.endswith('.py') or not os.path.isfile(path):
    raise ValueError(f'--config must name an existing .py file, got {spec!r}.')
  name = 'sweep_config_' + re.sub(r'\W', '_', os.path.abspath(path))
  mod_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise ValueError(f'{path} has no get_config(arg).')
  return module, (arg if sep else None)


def apply_overrides(config, overrides: Mapping[str, Any]):
  """A resolved copy of ``config`` with dotted ``overrides`` set.

  Raises:
    ValueError: an override names a key the config does not have (typos
      must not silently start a new field).
  """
  config = config.copy_and_resolve_references()
  for key, value in overrides.items():
    node = config
    *path, leaf = key.split('.')
    for i, p in enumerate(path):
      if p not in node:
        raise ValueError(
          f'Sweep override {key!r}: config has no {".".join(path[: i + 1])!r}.'
        )
      node = node[p]
    if leaf not in node:
      raise ValueError(
        f'Sweep override {key!r}: config has no field {leaf!r} '
        f'(fields there: {sorted(node.keys())}).'
      )
    node[leaf] = value
  return config


# Fields added after sweeps had run: at these values they are left out of
# the hash, so a point keeps its name and an existing workdir resumes.
HASH_NEUTRAL = {('input', 'source'): 'tfds'}


def config_hash(config) -> str:
  """Short SHA-256 of the resolved config's canonical JSON.

  Fields of ``HASH_NEUTRAL`` at their listed value are left out.
  """
  tree = config.to_dict()
  for (*parents, leaf), neutral in HASH_NEUTRAL.items():
    node = tree
    for key in parents:
      node = node.get(key, {})
    if leaf in node and node[leaf] == neutral:
      del node[leaf]
  text = json.dumps(tree, sort_keys=True, default=repr)
  return hashlib.sha256(text.encode()).hexdigest()[:HASH_LEN]


def _fmt(value) -> str:
  if isinstance(value, float):
    return f'{value:g}'
  if isinstance(value, (list, tuple)):
    return '+'.join(_fmt(v) for v in value)
  return str(value)


def slug(overrides: Mapping[str, Any]) -> str:
  """Readable ``key=value_key=value`` name; keys shortened to their leaf."""
  leaves = [k.rpartition('.')[2] for k in overrides]
  parts = []
  for key, short in zip(overrides, leaves):
    name = short if leaves.count(short) == 1 else key
    parts.append(f'{name}={_fmt(overrides[key])}')
  text = re.sub(r'[^A-Za-z0-9._=+-]', '', '_'.join(parts)) or 'base'
  return text[:_SLUG_MAX]


def expand(module, arg) -> list[dict[str, Any]]:
  """The sweep's points: index, overrides, resolved config, hash, name."""
  base = module.get_config(arg)
  overrides_list = (
    module.get_sweep(arg) if hasattr(module, 'get_sweep') else [{}]
  )
  points = []
  for i, overrides in enumerate(overrides_list):
    if not isinstance(overrides, Mapping):
      raise ValueError(f'get_sweep point {i} is not a dict: {overrides!r}.')
    config = apply_overrides(base, overrides)
    h = config_hash(config)
    points.append(
      {
        'index': i,
        'overrides': dict(overrides),
        'config': config,
        'hash': h,
        'name': f'{slug(overrides)}-{h}',
      }
    )
  names = [p['name'] for p in points]
  dup = sorted({n for n in names if names.count(n) > 1})
  if dup:
    raise ValueError(f'get_sweep yields identical points: {dup}.')
  return points


def task_slice(points: Sequence, task_index: int, num_tasks: int) -> list:
  """Points ``i`` with ``i % num_tasks == task_index``."""
  if num_tasks < 1 or not 0 <= task_index < num_tasks:
    raise ValueError(
      f'Need 0 <= task_index < num_tasks, got task_index={task_index}, '
      f'num_tasks={num_tasks}.'
    )
  return [p for p in points if p['index'] % num_tasks == task_index]


def slurm_defaults(env: Mapping[str, str]) -> tuple[int, int]:
  """``(task_index, num_tasks)`` from a SLURM job array, else ``(0, 1)``."""
  if 'SLURM_ARRAY_TASK_ID' not in env:
    return 0, 1
  first = int(env.get('SLURM_ARRAY_TASK_MIN', 0))
  step = int(env.get('SLURM_ARRAY_TASK_STEP', 1) or 1)
  index = (int(env['SLURM_ARRAY_TASK_ID']) - first) // step
  return index, int(env['SLURM_ARRAY_TASK_COUNT'])


def rows_of(result) -> list[dict[str, Any]]:
  """A runner's return value as table rows of JSON scalars."""
  if isinstance(result, Mapping) and 'rows' in result:
    result = result['rows']
  if isinstance(result, Mapping):
    result = [result]
  if not isinstance(result, (list, tuple)):
    raise TypeError(
      f'A runner must return a dict or a list of dicts, got '
      f'{type(result).__name__}.'
    )
  return [_flatten(r) for r in result]


def _flatten(d, prefix='') -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    key = f'{prefix}{k}'
    if isinstance(v, Mapping):
      out.update(_flatten(v, key + '.'))
    elif isinstance(v, (bool, int, float, str)) or v is None:
      out[key] = v
    elif hasattr(v, 'item') and getattr(v, 'ndim', 1) == 0:
      out[key] = v.item()  # numpy / jax scalars
  return out


# ----------------------------------------------------------------------------
# Files and running (edge).


def write_json(path: str, obj) -> None:
  """Atomic: a reader sees the old file or the whole new one."""
  tmp = f'{path}.tmp.{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, default=_json_default)
  os.replace(tmp, path)


def _json_default(o):
  if hasattr(o, 'tolist'):
    return o.tolist()
  return repr(o)


def _read(path):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def status(workdir: str, point) -> str:
  """'complete' | 'failed' | 'todo' for a point under ``workdir``."""
  d = os.path.join(workdir, point['name'])
  res = _read(os.path.join(d, RESULT))
  if (
    res and res.get('status') == 'complete' and res.get('hash') == point['hash']
  ):
    return 'complete'
  failed = _read(os.path.join(d, FAILED))
  if failed and failed.get('hash') == point['hash']:
    return 'failed'
  return 'todo'


def claim(workdir: str, point) -> bool:
  """Takes ``<point>/claim`` (host, pid) atomically; False if a live process
  on this host holds it, so several workers can share one sweep root.

  A claim whose process is gone (a killed worker) is taken over; a claim
  from another host is respected (use ``--task_index`` across machines).
  """
  d = os.path.join(workdir, point['name'])
  os.makedirs(d, exist_ok=True)
  path = os.path.join(d, CLAIM)
  me = {'host': socket.gethostname(), 'pid': os.getpid()}
  for _ in range(2):
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
      held = _read(path) or {}
      if held.get('host') != me['host'] or _alive(held.get('pid')):
        return held == me
      os.remove(path)  # stale: its worker died
      continue
    with os.fdopen(fd, 'w') as f:
      json.dump(me, f)
    return True
  return False


def release(workdir: str, point) -> None:
  path = os.path.join(workdir, point['name'], CLAIM)
  if os.path.exists(path):
    os.remove(path)


def _alive(pid) -> bool:
  if not isinstance(pid, int):
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def get_runner(config):
  spec = config.get('runner', '') or ''
  if not spec:
    from pfa_jax import main as pfa_main  # noqa: PLC0415

    return pfa_main.run
  module, _, fn = spec.partition(':')
  if not fn:
    raise ValueError(f"config.runner must be 'module:function', got {spec!r}.")
  return getattr(importlib.import_module(module), fn)


def _fmt_time(seconds: float) -> str:
  if not math.isfinite(seconds):
    return '?'
  seconds = int(round(seconds))
  if seconds >= 3600:
    return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m'
  if seconds >= 60:
    return f'{seconds // 60}m{seconds % 60:02d}s'
  return f'{seconds}s'


def run_point(point, workdir: str, command: str = '') -> dict:
  """Runs one point; writes ``result.json`` or ``failed.json``.

  The record carries its provenance: the checkout's git commit when the
  point started (``-dirty`` if tracked files differed) and the sweep
  command that reruns it.
  """
  from pfa_jax import metrics  # noqa: PLC0415

  d = os.path.join(workdir, point['name'])
  os.makedirs(d, exist_ok=True)
  t0 = time.time()
  base = {
    'hash': point['hash'],
    'index': point['index'],
    'name': point['name'],
    'overrides': point['overrides'],
    'commit': metrics.git_commit(os.path.dirname(os.path.abspath(__file__))),
    'command': command,
  }
  try:
    runner = get_runner(point['config'])
    rows = rows_of(runner(point['config'], d))
  except Exception as e:  # noqa: BLE001  (recorded; the sweep goes on)
    record = {
      **base,
      'status': 'failed',
      'error': f'{type(e).__name__}: {e}',
      'traceback': traceback.format_exc(),
      'wall_time_s': time.time() - t0,
    }
    write_json(os.path.join(d, FAILED), record)
    return record
  record = {
    **base,
    'status': 'complete',
    'rows': rows,
    'wall_time_s': time.time() - t0,
    'config': point['config'].to_dict(),
  }
  write_json(os.path.join(d, RESULT), record)
  if os.path.exists(os.path.join(d, FAILED)):
    os.remove(os.path.join(d, FAILED))
  return record


def run_sweep(
  points,
  workdir: str,
  *,
  retry_failed: bool = False,
  dry_run: bool = False,
  log=print,
  command: str = '',
) -> dict[str, int]:
  """Runs the given (already sliced) points; returns status counts."""
  todo = []
  counts = {'complete': 0, 'failed': 0, 'ran': 0, 'todo': 0, 'skipped': 0}
  for p in points:
    st = status(workdir, p)
    if dry_run:
      log(
        f'[{p["index"]}] {st:8s} {os.path.join(workdir, p["name"])}  '
        f'{json.dumps(p["overrides"])}'
      )
    if st == 'complete' or (st == 'failed' and not retry_failed):
      counts[st] += 1
    else:
      todo.append(p)
  counts['todo'] = len(todo)
  if dry_run:
    return counts
  log(
    f'{len(points)} points: {counts["complete"]} complete, '
    f'{counts["failed"]} failed (skipped), {len(todo)} to run.'
  )
  t_start = time.time()
  ran = 0
  for n, p in enumerate(todo, 1):
    # Another worker on this root may have finished or taken it meanwhile.
    if status(workdir, p) == 'complete' or not claim(workdir, p):
      counts['todo'] -= 1
      counts['skipped'] += 1
      log(f'[{n}/{len(todo)}] {p["name"]}: done or claimed by another worker')
      continue
    try:
      rec = run_point(p, workdir, command)
    finally:
      release(workdir, p)
    ran += 1
    counts['ran'] += 1
    counts['todo'] -= 1
    ok = rec['status'] == 'complete'
    counts['complete' if ok else 'failed'] += 1
    elapsed = time.time() - t_start
    eta = elapsed / ran * (len(todo) - n)
    what = f'{len(rec["rows"])} rows' if ok else f'FAILED {rec["error"]}'
    log(
      f'[{n}/{len(todo)}] {p["name"]}: {what} in '
      f'{_fmt_time(rec["wall_time_s"])} | ETA {_fmt_time(eta)}',
    )
  return counts


def summarize(workdir: str) -> list[dict[str, Any]]:
  """Collects every finished point into ``summary.{csv,json}`` in workdir.

  Columns: the overrides (one per dotted key), ``point`` (the sub-workdir),
  ``hash``, ``row`` (the row's index within its point), the provenance
  (``commit``, ``command``, ``config_seed``), then the rows' own keys. Directories of points not in ``sweep.json`` are ignored.
  """
  manifest = _read(os.path.join(workdir, MANIFEST)) or {}
  known = {p['name'] for p in manifest.get('points', [])} or None
  rows, failed = [], []
  for name in sorted(os.listdir(workdir)):
    if known is not None and name not in known:
      continue
    res = _read(os.path.join(workdir, name, RESULT))
    if res and res.get('status') == 'complete':
      for j, r in enumerate(res['rows']):
        rows.append(
          {
            **res['overrides'],
            'point': name,
            'hash': res['hash'],
            'row': j,
            'commit': res.get('commit', 'unknown'),
            'command': res.get('command', ''),
            'config_seed': res.get('config', {}).get('seed'),
            **r,
          }
        )
    fail = _read(os.path.join(workdir, name, FAILED))
    if fail:
      failed.append({'point': name, 'error': fail.get('error')})
  columns = []
  for r in rows:
    columns += [k for k in r if k not in columns]
  with open(os.path.join(workdir, 'summary.csv.tmp'), 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    for r in rows:
      writer.writerow(
        {
          k: json.dumps(v) if isinstance(v, (list, dict)) else v
          for k, v in r.items()
        }
      )
  os.replace(
    os.path.join(workdir, 'summary.csv.tmp'),
    os.path.join(workdir, 'summary.csv'),
  )
  total = len(manifest.get('points', [])) or None
  write_json(
    os.path.join(workdir, 'summary.json'),
    {
      'sweep': manifest.get('config'),
      'num_points': total,
      'num_points_complete': len({r['point'] for r in rows}),
      'failed': failed,
      'columns': columns,
      'rows': rows,
    },
  )
  return rows


def main(argv=None) -> int:
  hostmem.retain_freed_memory()  # before the first JAX computation
  parser = argparse.ArgumentParser(
    prog='python -m experiments.sweep', description=__doc__.split('\n')[0]
  )
  parser.add_argument('--config', help='configs/...py[:arg]')
  parser.add_argument('--workdir', help='root directory of the sweep')
  parser.add_argument('--summarize', metavar='DIR', help='aggregate DIR')
  parser.add_argument('--dry_run', action='store_true')
  parser.add_argument('--retry_failed', action='store_true')
  env_index, env_count = slurm_defaults(os.environ)
  parser.add_argument('--task_index', type=int, default=env_index)
  parser.add_argument('--num_tasks', type=int, default=env_count)
  args = parser.parse_args(argv)
  if args.summarize:
    rows = summarize(args.summarize)
    print(f'{len(rows)} rows -> {args.summarize}/summary.{{csv,json}}')
    return 0
  if not args.config or not args.workdir:
    parser.error('--config and --workdir are required (or --summarize DIR).')
  module, arg = load_config_module(args.config)
  points = expand(module, arg)
  mine = task_slice(points, args.task_index, args.num_tasks)
  if not args.dry_run:
    os.makedirs(args.workdir, exist_ok=True)
    write_json(
      os.path.join(args.workdir, MANIFEST),
      {
        'config': args.config,
        'points': [
          {k: p[k] for k in ('index', 'name', 'hash', 'overrides')}
          for p in points
        ],
      },
    )
  print(
    f'Sweep {args.config}: {len(points)} points, task {args.task_index}/'
    f'{args.num_tasks} runs {len(mine)}.',
    flush=True,
  )
  counts = run_sweep(
    mine,
    args.workdir,
    retry_failed=args.retry_failed,
    dry_run=args.dry_run,
    log=lambda s: print(s, flush=True),
    command=f'python -m experiments.sweep --config {args.config} '
    f'--workdir {args.workdir}',
  )
  print(f'Done: {counts}', flush=True)
  return 1 if counts['failed'] and not args.dry_run else 0


if __name__ == '__main__':
  sys.exit(main())
