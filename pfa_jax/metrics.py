"""Metric writers and results files.

* ``JsonlWriter``: a clu ``MetricWriter`` that appends one JSON object per
  ``write_scalars`` call to ``metrics.jsonl`` (``{'step': N, name: value}``),
  so every logged number survives outside TensorBoard. Each row is flushed
  and fsynced, so a SIGKILL loses none already written.
* ``truncate_jsonl(path, last_step)``: drops rows past a restored
  checkpoint's step (they are re-run on resume); with the writer skipping a
  ``(step, name)`` the file already holds, no step appears twice.
* ``create_writer(workdir)``: clu's default writer (TensorBoard + logging)
  combined with a ``JsonlWriter`` through clu's ``MultiWriter``; hosts other
  than process 0 only log, and so does process 0 without TensorFlow
  (:mod:`pfa_jax.clu_compat`).
* ``write_config(config, workdir)``: dumps the config to ``config.json``.
* ``eval_summary(sums)``: masked eval sums -> mean loss and accuracy.
"""

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from pfa_jax import clu_compat
from pfa_jax.clu_compat import metric_writers

METRICS_FILE = 'metrics.jsonl'
CONFIG_FILE = 'config.json'


def _to_json_number(value: Any) -> float | int | str | None:
  value = np.asarray(value)
  if value.size != 1:
    raise ValueError(f'Expected a scalar, got shape {value.shape}.')
  value = value.reshape(()).item()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # 'nan' / 'inf': keep the file valid JSON.
  return value


class JsonlWriter(metric_writers.MetricWriter):
  """Appends ``{'step': step, **scalars}`` lines to a JSONL file.

  Only scalars (and hparams, as one ``{'hparams': ...}`` line) are written;
  images, histograms and the like are ignored. Names already in the file at
  its last step (a job resumed after its final checkpoint re-evaluates it)
  are not written again.
  """

  def __init__(self, path: str | os.PathLike):
    self._path = os.fspath(path)
    os.makedirs(os.path.dirname(self._path) or '.', exist_ok=True)
    self._seen = _last_step_names(self._path)
    self._file = open(self._path, 'a')  # noqa: SIM115 (closed in close()).

  @property
  def path(self) -> str:
    return self._path

  def _write(self, obj: Mapping[str, Any]) -> None:
    self._file.write(json.dumps(obj, sort_keys=False) + '\n')
    self._file.flush()
    os.fsync(self._file.fileno())

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    step = int(step)
    values = {
      k: _to_json_number(v)
      for k, v in scalars.items()
      if (step, k) not in self._seen
    }
    if values:
      self._write({'step': step, **values})

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    self._write({'hparams': json.loads(json.dumps(hparams, default=str))})

  def write_summaries(self, step, values, metadata=None):
    del step, values, metadata

  def write_images(self, step, images):
    del step, images

  def write_videos(self, step, videos):
    del step, videos

  def write_audios(self, step, audios, *, sample_rate):
    del step, audios, sample_rate

  def write_texts(self, step, texts):
    del step, texts

  def write_histograms(self, step, arrays, num_buckets=None):
    del step, arrays, num_buckets

  def flush(self) -> None:
    self._file.flush()

  def close(self) -> None:
    if not self._file.closed:
      self._file.close()


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
  """All objects of a JSONL file, in order."""
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _complete_rows(path: str) -> list[str]:
  """The file's lines that parse as JSON (a torn last line is dropped)."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = f.read().split('\n')
  out = []
  for line in lines:
    try:
      json.loads(line)
    except json.JSONDecodeError:
      continue
    out.append(line)
  return out


def _last_step_names(path: str) -> set[tuple[int, str]]:
  rows = [json.loads(line) for line in _complete_rows(path)]
  steps = [r['step'] for r in rows if 'step' in r]
  if not steps:
    return set()
  last = max(steps)
  return {(last, k) for r in rows if r.get('step') == last for k in r}


def truncate_jsonl(path: str | os.PathLike, last_step: int) -> int:
  """Drops rows with ``step > last_step`` (and a torn last line).

  Rewrites the file atomically (tmp + fsync + rename) only if something is
  dropped. Rows without a step (hparams) are kept.

  Returns:
    The number of rows dropped.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    total = sum(1 for line in f if line.strip())
  keep = [
    line
    for line in _complete_rows(path)
    if json.loads(line).get('step', -1) <= last_step
  ]
  if len(keep) == total:
    return 0
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    f.write(''.join(line + '\n' for line in keep))
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  return total - len(keep)


def create_writer(workdir: str | os.PathLike) -> metric_writers.MetricWriter:
  """TensorBoard + logging + ``workdir/metrics.jsonl`` (process 0 only).

  Without TensorFlow (``clu_compat.TENSORBOARD`` False): logging and
  ``metrics.jsonl`` only.
  """
  lead = jax.process_index() == 0
  default = metric_writers.create_default_writer(
    os.fspath(workdir), just_logging=not (lead and clu_compat.TENSORBOARD)
  )
  if not lead:
    return default
  return metric_writers.MultiWriter(
    [default, JsonlWriter(os.path.join(workdir, METRICS_FILE))]
  )


def write_config(config, workdir: str | os.PathLike) -> str | None:
  """Dumps ``config`` (a ConfigDict or dict) to ``workdir/config.json``."""
  if jax.process_index() != 0:
    return None
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, CONFIG_FILE)
  if hasattr(config, 'to_json_best_effort'):
    text = config.to_json_best_effort(indent=2, sort_keys=True)
  else:
    text = json.dumps(config, indent=2, sort_keys=True, default=str)
  with open(path, 'w') as f:
    f.write(text + '\n')
  return path


def eval_summary(sums: Mapping[str, Any]) -> dict[str, float]:
  """``{'loss_sum', 'correct', 'count'}`` -> ``{'loss', 'accuracy', 'count'}``."""
  count = float(sums['count'])
  denom = max(count, 1.0)
  return {
    'loss': float(sums['loss_sum']) / denom,
    'accuracy': float(sums['correct']) / denom,
    'count': count,
  }


def git_commit(path: str | None = None) -> str:
  """HEAD of the checkout holding ``path`` (+ '-dirty'), or 'unknown'."""
  import subprocess  # noqa: PLC0415

  here = path or os.path.dirname(os.path.abspath(__file__))

  def git(*args):
    return subprocess.run(
      ['git', *args],
      cwd=here,
      capture_output=True,
      text=True,
      timeout=10,
      check=True,
    ).stdout.strip()

  try:
    commit = git('rev-parse', 'HEAD')
    dirty = bool(git('status', '--porcelain', '--untracked-files=no'))
  except (OSError, subprocess.SubprocessError):
    return 'unknown'
  return commit + ('-dirty' if dirty else '')


def provenance() -> dict[str, Any]:
  """pfa_jax version, git commit (if any), JAX version and devices."""
  import pfa_jax  # noqa: PLC0415

  return {
    'pfa_jax_version': pfa_jax.__version__,
    'git_commit': git_commit(),
    'jax_version': jax.__version__,
    'devices': [str(d) for d in jax.devices()],
  }


def write_json(path: str | os.PathLike, obj: Any) -> None:
  """Writes ``obj`` atomically (tmp + rename); numpy scalars become numbers."""
  os.makedirs(os.path.dirname(os.fspath(path)) or '.', exist_ok=True)
  tmp = f'{os.fspath(path)}.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, default=_json_default)
  os.replace(tmp, path)


def _json_default(o):
  if isinstance(o, np.integer):
    return int(o)
  if isinstance(o, np.floating):
    return float(o)
  if isinstance(o, np.ndarray):
    return o.tolist()
  return str(o)
