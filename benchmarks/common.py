"""Shared benchmark plumbing: timing, machine info, JSON output."""

import argparse
import contextlib
import ctypes
import datetime
import json
import os
import platform
import statistics
import time

import jax

# The load averages when this process started, before it did any work: what
# other processes put on the machine. A benchmark's own threads raise the load
# while it runs, so the end of a run cannot tell a quiet machine from a busy
# one; the start can (on 2 cores, a 1-minute average above 1 means another
# job held at least one core).
START_LOAD = os.getloadavg()
QUIET_LOAD = 1.0
_ADDR_NO_RANDOMIZE = 0x0040000  # personality(2) flag (setarch -R)

# Where ``write`` puts results: benchmarks/results/, or the folder that
# PFA_JAX_BENCH_RESULTS names (a device run writes under its $OUT).
RESULTS = os.environ.get('PFA_JAX_BENCH_RESULTS') or os.path.join(
  os.path.dirname(__file__), 'results'
)


@contextlib.contextmanager
def env(name: str, value: str):
  """Sets environment variable ``name`` to ``value`` inside the block."""
  old = os.environ.get(name)
  os.environ[name] = value
  try:
    yield
  finally:
    if old is None:
      os.environ.pop(name)
    else:
      os.environ[name] = old


def file_stem(name: str) -> str:
  """argparse ``type`` of a ``--name`` option: a file stem under RESULTS."""
  if not name or os.sep in name or name.startswith('.'):
    raise argparse.ArgumentTypeError(f'a file stem, got {name!r}')
  return name


def cpu_model() -> str:
  """The CPU as /proc/cpuinfo names it, with its family and model numbers.

  Benchmark ratios move with the CPU (a VM may land on another host kind
  between sessions), so every result records it.
  """
  fields = {}
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        key, _, value = line.partition(':')
        fields.setdefault(key.strip(), value.strip())
        if not line.strip():
          break
  except OSError:
    return platform.processor()
  return (
    f'{fields.get("model name", "?")} (family {fields.get("cpu family", "?")}'
    f', model {fields.get("model", "?")})'
  )


def address_randomization() -> bool | None:
  """Whether this process's addresses are randomized (ASLR); None if unknown.

  Recorded with every result: the pruned ResNet-56's speed depends on the
  process's address layout (README, "Performance"; ``setarch -R`` runs a
  command without randomization).
  """
  try:
    with open('/proc/sys/kernel/randomize_va_space') as f:
      system = int(f.read())
    persona = ctypes.CDLL(None).personality(0xFFFFFFFF)
  except (OSError, ValueError, AttributeError):
    return None
  return system > 0 and not persona & _ADDR_NO_RANDOMIZE


def machine() -> dict:
  return {
    'platform': platform.platform(),
    'processor': platform.processor(),
    'cpu': cpu_model(),
    'cpu_count': os.cpu_count(),
    'python': platform.python_version(),
    'jax': jax.__version__,
    'backend': jax.default_backend(),
    'devices': [str(d) for d in jax.devices()],
    'device_kind': jax.devices()[0].device_kind,
    'date': datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds'),
    'address_randomization': address_randomization(),
  }


def loaded() -> bool:
  """Whether the machine was busy when this benchmark process started."""
  return bool(START_LOAD[0] > QUIET_LOAD)


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
