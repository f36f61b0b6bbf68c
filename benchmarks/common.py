"""Shared benchmark plumbing: timing, machine info, JSON output."""

import datetime
import json
import os
import platform
import statistics
import time

import jax

RESULTS = os.path.join(os.path.dirname(__file__), 'results')


def machine() -> dict:
  return {
    'platform': platform.platform(),
    'processor': platform.processor(),
    'cpu_count': os.cpu_count(),
    'python': platform.python_version(),
    'jax': jax.__version__,
    'backend': jax.default_backend(),
    'devices': [str(d) for d in jax.devices()],
    'date': datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds'),
  }


def median_time(fn, repeats: int) -> float:
  """Median wall time of ``fn()`` over ``repeats`` calls (fn must block)."""
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def write(name: str, payload: dict) -> str:
  os.makedirs(RESULTS, exist_ok=True)
  path = os.path.join(RESULTS, f'{name}.json')
  with open(path, 'w') as f:
    json.dump({'machine': machine(), **payload}, f, indent=2)
  return path


def print_table(rows: list[tuple], header: tuple) -> None:
  rows = [tuple(str(c) for c in r) for r in [header, *rows]]
  widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
  for i, r in enumerate(rows):
    print('  '.join(c.rjust(w) for c, w in zip(r, widths)))
    if i == 0:
      print('  '.join('-' * w for w in widths))
