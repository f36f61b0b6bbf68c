"""Where the wide ``analyze`` job's time goes, and two eigensolver levers.

  python -m benchmarks.eig_levers [--m 8192] [--c 4096] [--repeats 3]

On the synthetic 4096-unit job of ``benchmarks.analyze_cold`` (issue 12
section 0), times each phase of ``analysis.analyze`` for one layer (the
covariance SSYRK, the Pearson removal order, the float64 eigenvalues), the
order run alongside LAPACK's single-threaded stage (``order_alongside``,
what ``analyze`` does) against the order then LAPACK's one-call
``dsyevd_2stage`` (``order_then_eigvalsh``, what it did before), then two
levers on the eigenvalues, against the library's ``spectra.eigvalsh`` in
the same run:

* ``kd``: LAPACK's two stages (``dsytrd_sy2sb``, ``dsytrd_sb2st``,
  ``dsterf``; :mod:`pfa_jax.openblas`) with band widths other than
  ``ilaenv2stage``'s default (``openblas.band_width``);
* ``float32``: ``ssyevd_2stage`` on the float32 covariance, and its largest
  eigenvalue error relative to the top float64 eigenvalue.

Needs NumPy's bundled OpenBLAS (``pfa_jax.openblas.available``). Writes
``benchmarks/results/eig_levers.json``.
"""

import argparse
import ctypes
import statistics
import time

import numpy as np

from benchmarks import common
from benchmarks import pfa_core
from pfa_jax import analysis
from pfa_jax import openblas
from pfa_jax import select
from pfa_jax import spectra

_I64 = ctypes.c_int64


def _ptr(a):
  return a.ctypes.data_as(ctypes.c_void_p)


def _two_stage(a, kd):
  """Eigenvalues of C-order ``a`` (destroyed) via LAPACK's two stages."""
  band = openblas.band_reduce_upper(a, kd)
  with openblas.threads(1):
    return openblas.band_eigvalsh(band)


def _timed(fn, *args, **kw):
  t = time.perf_counter()
  out = fn(*args, **kw)
  return time.perf_counter() - t, out


def run(m: int, c: int, repeats: int, kds=(32, 48, 64)) -> dict:
  bound = openblas._lib()  # noqa: SLF001  (the module's own loaded library)
  if bound is None:
    raise SystemExit("NumPy's bundled OpenBLAS is not here: nothing to time.")
  lib = bound.cdll
  kds = tuple(kd for kd in kds if kd < c)
  rng = np.random.default_rng(0)
  x = pfa_core._synthetic(rng, m, c)  # noqa: SLF001
  times = {k: [] for k in ('covariance', 'order', 'eigvalsh')}
  times.update(lapacke_2stage=[], order_then_eigvalsh=[], order_alongside=[])
  times.update({f'kd{kd}': [] for kd in kds}, float32=[])
  lapacke = {}
  for t in 'sd':
    fn = lapacke[t] = getattr(lib, f'scipy_LAPACKE_{t}syevd_2stage64_')
    fn.restype = _I64
    fn.argtypes = [ctypes.c_int, ctypes.c_char, ctypes.c_char, _I64]
    fn.argtypes += [ctypes.c_void_p, _I64, ctypes.c_void_p]
  err32 = 0.0
  for _ in range(repeats):  # interleaved: drift hits every variant alike
    t, cov = _timed(analysis.covariance, x.copy(), overwrite=True)
    times['covariance'].append(t)
    times['order'].append(_timed(select.removal_order, cov)[0])
    t, w = _timed(spectra.eigvalsh, cov.copy(), overwrite=True)
    times['eigvalsh'].append(t)
    # analyze's per-layer work before this session's lever (the order, then
    # LAPACK's one-call two-stage driver) and with it (the removal loop on
    # the core LAPACK's serial stage leaves idle).
    a, w64 = cov.copy(), np.empty(c)
    t = time.perf_counter()
    select.removal_order(a)
    with openblas.threads(spectra.solver_threads(c)):
      t1 = time.perf_counter()
      info = lapacke['d'](102, b'N', b'L', c, _ptr(a), c, _ptr(w64))
    t2 = time.perf_counter()
    times['lapacke_2stage'].append(t2 - t1)
    times['order_then_eigvalsh'].append(t2 - t)
    if info or np.max(np.abs(w64 - w)) > 1e-10 * w.max():
      raise RuntimeError(f'dsyevd_2stage (info={info}) differs from eigvalsh')
    a = cov.copy()
    t = time.perf_counter()
    r = select.correlation(a)
    spectra.eigvalsh(
      a, overwrite=True, alongside=lambda r=r: select.correlation_order(*r, c)
    )
    times['order_alongside'].append(time.perf_counter() - t)
    with openblas.threads(spectra.solver_threads(c)):
      for kd in kds:
        t, d = _timed(_two_stage, cov.copy(), kd)
        times[f'kd{kd}'].append(t)
        if np.max(np.abs(d - w)) > 1e-10 * w.max():
          raise RuntimeError(f'kd={kd}: eigenvalues differ from eigvalsh')
      a32, w32 = cov.astype(np.float32), np.empty(c, np.float32)
      t = time.perf_counter()
      info = lapacke['s'](102, b'N', b'L', c, _ptr(a32), c, _ptr(w32))
      times['float32'].append(time.perf_counter() - t)
      if info:
        raise RuntimeError(f'ssyevd_2stage info={info}')
    err32 = max(err32, float(np.max(np.abs(w32 - w)) / w.max()))
  med = {k: statistics.median(v) for k, v in times.items()}
  return {
    'm': m,
    'c': c,
    'repeats': repeats,
    'median_s': med,
    'ratio_to_eigvalsh': {
      k: med[k] / med['eigvalsh']
      for k in med
      if k.startswith(('kd', 'f', 'lapacke'))
    },
    'order_alongside_to_order_then_eigvalsh': (
      med['order_alongside'] / med['order_then_eigvalsh']
    ),
    'float32_max_rel_error': err32,
  }


def main(argv=None) -> dict:
  p = argparse.ArgumentParser()
  p.add_argument('--m', type=int, default=8192)
  p.add_argument('--c', type=int, default=4096)
  p.add_argument('--repeats', type=int, default=3)
  a = p.parse_args(argv)
  r = run(a.m, a.c, a.repeats)
  common.print_table(
    [(k, f'{v:.3f}') for k, v in r['median_s'].items()], ('phase', 'median s')
  )
  print(f'float32 max relative error: {r["float32_max_rel_error"]:.1e}')
  path = common.write(
    'eig_levers',
    {
      'load_average_start': list(common.START_LOAD),
      'loaded': common.loaded(),
      **r,
    },
  )
  print(f'wrote {path}')
  return r


if __name__ == '__main__':
  main()
