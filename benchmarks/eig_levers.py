"""Where the wide ``analyze`` job's time goes, and two eigensolver levers.

  python -m benchmarks.eig_levers [--m 8192] [--c 4096] [--repeats 3]

On the synthetic 4096-unit job of ``benchmarks.analyze_cold`` (issue 12
section 0), times each phase of ``analysis.analyze`` for one layer (the
covariance SSYRK, the Pearson removal order, the float64 eigenvalues), then
three levers on the eigenvalues, against the library's
``spectra.eigvalsh`` in the same run:

* ``kd``: LAPACK's two stages called directly (``dsytrd_sy2sb``,
  ``dsytrd_sb2st``, ``dsterf``) with band widths other than
  ``ilaenv2stage``'s default;
* ``float32``: ``ssyevd_2stage`` on the float32 covariance, and its largest
  eigenvalue error relative to the top float64 eigenvalue;
* ``lda``: the eigensolver on the covariance in a C-order [C, C] array
  (``unpadded``) against the library's padded rows (``padded``,
  :func:`spectra.square`), same driver and threads, alternating first.

``--only`` picks the levers (``kd,float32,lda``; default all); the phases
are always timed. ``--name`` names the JSON (default ``eig_levers``).

Needs NumPy's bundled OpenBLAS (``pfa_jax.openblas.available``). Writes
``benchmarks/results/<name>.json``.
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
_ALL = ('kd', 'float32', 'lda')


def _ref(v):
  return ctypes.byref(_I64(v))


def _ptr(a):
  return a.ctypes.data_as(ctypes.c_void_p)


def _two_stage(lib, a, kd):
  """Eigenvalues of C-order ``a`` (destroyed) via the three LAPACK stages."""
  n, info, ldab = a.shape[0], _I64(0), kd + 1
  ab, tau, q = np.zeros((n, ldab)), np.zeros(n), np.zeros(1)
  sy2sb = lib.scipy_dsytrd_sy2sb_64_
  args = (b'L', _ref(n), _ref(kd), _ptr(a), _ref(n), _ptr(ab), _ref(ldab))
  sy2sb(*args, _ptr(tau), _ptr(q), _ref(-1), ctypes.byref(info), _I64(1))
  work = np.zeros(int(q[0]))
  sy2sb(
    *args, _ptr(tau), _ptr(work), _ref(work.size), ctypes.byref(info), _I64(1)
  )
  if info.value:
    raise RuntimeError(f'dsytrd_sy2sb info={info.value}')
  d, e, hq, wq = np.zeros(n), np.zeros(n - 1), np.zeros(1), np.zeros(1)
  sb2st = lib.scipy_dsytrd_sb2st_64_
  args = (b'Y', b'N', b'L', _ref(n), _ref(kd), _ptr(ab), _ref(ldab))
  lens = (_I64(1), _I64(1), _I64(1))
  sb2st(*args, _ptr(d), _ptr(e), _ptr(hq), _ref(-1), _ptr(wq), _ref(-1),
        ctypes.byref(info), *lens)  # fmt: skip
  hous, work = np.zeros(max(1, int(hq[0]))), np.zeros(max(1, int(wq[0])))
  sb2st(*args, _ptr(d), _ptr(e), _ptr(hous), _ref(hous.size), _ptr(work),
        _ref(work.size), ctypes.byref(info), *lens)  # fmt: skip
  if info.value:
    raise RuntimeError(f'dsytrd_sb2st info={info.value}')
  lib.scipy_dsterf_64_(_ref(n), _ptr(d), _ptr(e), ctypes.byref(info))
  return np.sort(d)


def _timed(fn, *args, **kw):
  t = time.perf_counter()
  out = fn(*args, **kw)
  return time.perf_counter() - t, out


def run(m: int, c: int, repeats: int, kds=(32, 64, 128), only=_ALL) -> dict:
  bound = openblas._lib()  # noqa: SLF001  (the module's own loaded library)
  if bound is None:
    raise SystemExit("NumPy's bundled OpenBLAS is not here: nothing to time.")
  lib = bound.cdll
  kds = tuple(kd for kd in kds if kd < c) if 'kd' in only else ()
  rng = np.random.default_rng(0)
  x = pfa_core._synthetic(rng, m, c)  # noqa: SLF001
  times = {k: [] for k in ('covariance', 'order', 'eigvalsh')}
  times.update({f'kd{kd}': [] for kd in kds})
  times.update({k: [] for k in ('float32',) if k in only})
  times.update({k: [] for k in ('unpadded', 'padded') if 'lda' in only})
  ssyevd = lib.scipy_LAPACKE_ssyevd_2stage64_
  ssyevd.restype = _I64
  ssyevd.argtypes = [ctypes.c_int, ctypes.c_char, ctypes.c_char, _I64]
  ssyevd.argtypes += [ctypes.c_void_p, _I64, ctypes.c_void_p]
  err32 = None
  two_stage = c >= spectra.TWO_STAGE_MIN_C
  for i in range(repeats):  # interleaved: drift hits every variant alike
    t, cov = _timed(analysis.covariance, x.copy(), overwrite=True)
    times['covariance'].append(t)
    times['order'].append(_timed(select.removal_order, cov)[0])
    t, w = _timed(spectra.eigvalsh, cov.copy(), overwrite=True)
    times['eigvalsh'].append(t)
    with openblas.threads(spectra.solver_threads(c)):
      for kd in kds:
        t, d = _timed(_two_stage, lib, cov.copy(), kd)
        times[f'kd{kd}'].append(t)
        if np.max(np.abs(d - w)) > 1e-10 * w.max():
          raise RuntimeError(f'kd={kd}: eigenvalues differ from eigvalsh')
      if 'float32' in only:
        a32, w32 = cov.astype(np.float32), np.empty(c, np.float32)
        t = time.perf_counter()
        info = ssyevd(102, b'N', b'L', c, _ptr(a32), c, _ptr(w32))
        times['float32'].append(time.perf_counter() - t)
        if info:
          raise RuntimeError(f'ssyevd_2stage info={info}')
        err = float(np.max(np.abs(w32 - w)) / w.max())
        err32 = max(err32 or 0.0, err)
      if 'lda' in only:
        for pad in (False, True)[:: 1 if i % 2 else -1]:
          a = spectra.square(c) if pad else np.empty((c, c))
          a[...] = cov  # touched before the clock starts
          t, d = _timed(openblas.eigvalsh_upper, a, two_stage=two_stage)
          times['padded' if pad else 'unpadded'].append(t)
          if np.max(np.abs(d - w)) > 1e-12 * w.max():
            raise RuntimeError(f'lda pad={pad}: eigenvalues differ')
  med = {k: statistics.median(v) for k, v in times.items()}
  out = {
    'm': m,
    'c': c,
    'lda': spectra.lda(c),
    'repeats': repeats,
    'times_s': times,
    'median_s': med,
    'ratio_to_eigvalsh': {
      k: med[k] / med['eigvalsh'] for k in med if k.startswith(('kd', 'f'))
    },
    'float32_max_rel_error': err32,
  }
  if 'lda' in only:
    pairs = [p / u for p, u in zip(times['padded'], times['unpadded'])]
    out['padded_to_unpadded'] = {
      'median': med['padded'] / med['unpadded'],
      'pairs': pairs,
    }
  return out


def main(argv=None) -> dict:
  p = argparse.ArgumentParser()
  p.add_argument('--m', type=int, default=8192)
  p.add_argument('--c', type=int, default=4096)
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--only', default=','.join(_ALL))
  p.add_argument('--name', type=common.file_stem, default='eig_levers')
  a = p.parse_args(argv)
  only = tuple(a.only.split(','))
  unknown = set(only) - set(_ALL)
  if unknown:
    p.error(f'unknown --only {sorted(unknown)}; choose from {_ALL}')
  r = run(a.m, a.c, a.repeats, only=only)
  common.print_table(
    [(k, f'{v:.3f}') for k, v in r['median_s'].items()], ('phase', 'median s')
  )
  if r['float32_max_rel_error'] is not None:
    print(f'float32 max relative error: {r["float32_max_rel_error"]:.1e}')
  if 'padded_to_unpadded' in r:
    print(f'padded / unpadded: {r["padded_to_unpadded"]["median"]:.3f}')
  path = common.write(
    a.name,
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
