"""One-call PFA analysis of in-memory response matrices (+ CLI).

``analyze(responses)`` takes ``{layer: responses}`` with responses of shape
(M, C) (dense layers, or already pooled) or (M, H, W, C) (conv maps, which are
spatially max-pooled as in the paper), and returns a JSON-serialisable dict::

  {
    "spectra": {layer: [lambda_1, ..., lambda_C]},
    "recipes": {
      "energy_0.8": {layer: {"width": k, "kept": [sorted indices]}},
      ...,
      "kl": {layer: {"width": k, "kept": [...]}},
    },
  }

Statistics and spectra are computed once per layer and the selection
removal order once per layer, then reused by every recipe.

Decision: the responses are already in host memory, so this path never
touches JAX or SciPy (``python -m pfa_jax.analyze`` imports NumPy and
nothing heavier; :mod:`pfa_jax.openblas`): each layer's covariance is one
float32 BLAS SSYRK on the responses shifted (and, outside a safe range,
scaled) exactly as :mod:`pfa_jax.stats` does (a power-of-two scale from the
largest ``|x|``, the float64 mean as shift), finished in float64. Each
layer's float64 covariance is then handed to the selection and, last, to
LAPACK with ``overwrite`` (no extra [C, C] copy).

Command line (prints the same JSON to stdout)::

  python -m pfa_jax.analyze responses.npz [--energies 0.8,0.9] [--no-kl]

where each array of the ``.npz`` is a layer.
"""

import argparse
import json
import sys
import zipfile
from collections.abc import Mapping, Sequence

import numpy as np

from pfa_jax import hostmem
from pfa_jax import openblas
from pfa_jax import recipes
from pfa_jax import select
from pfa_jax import spectra as spectra_lib

DEFAULT_ENERGIES = (0.8, 0.85, 0.93, 0.95, 0.96, 0.97, 0.98, 0.99)


# Within [2^-32, 2^32] scaling by the power of two p changes no float32
# value's digits and no SSYRK product can overflow or underflow (M < 2^50), so
# the scaling pass is skipped there: y = x - mean is then x / p - mean / p
# times p, exactly.
_SAFE_SCALE = (2.0**-32, 2.0**32)


def _validate(x: np.typing.ArrayLike, name: str | None):
  """Checks and max-pools one layer's responses; returns (x, max |x|)."""
  where = f'layer {name!r}' if name is not None else 'layer'
  x = np.asarray(x)
  if x.dtype.kind not in 'fiub':
    raise ValueError(f'{where}: responses must be numeric, got {x.dtype}.')
  if x.ndim == 4:
    if 0 in x.shape[1:3]:
      raise ValueError(f'{where}: empty spatial dimensions {x.shape}.')
    x = x.max(axis=(1, 2))
  elif x.ndim != 2:
    raise ValueError(
      f'{where}: responses must be (M, C) or (M, H, W, C), got a '
      f'{x.ndim}-D array of shape {x.shape}.'
    )
  if x.shape[0] < 2:
    raise ValueError(f'{where}: need at least 2 samples, got {x.shape[0]}.')
  if x.shape[1] < 1:
    raise ValueError(f'{where}: responses have no units (shape {x.shape}).')
  x = np.ascontiguousarray(x, np.float32)
  # max/min propagate NaN and see Inf: two reads, no [M, C] temporary.
  amax = max(float(x.max()), -float(x.min()))
  if not np.isfinite(amax):
    raise ValueError(f'{where}: responses contain NaN or Inf.')
  return x, amax


def pool_responses(x: np.typing.ArrayLike, *, name: str | None = None):
  """Validates a response array and max-pools (M, H, W, C) to (M, C).

  Args:
    x: (M, C) or (M, H, W, C) responses.
    name: layer name for error messages.

  Returns:
    A C-order float32 (M, C) NumPy array (float32 is the statistics
    accumulator dtype; centring keeps it accurate).

  Raises:
    ValueError: on another rank, fewer than 2 samples, no units or NaN/Inf.
  """
  return _validate(x, name)[0]


def covariance(
  x: np.ndarray,
  amax: float | None = None,
  *,
  overwrite: bool = False,
  out: np.ndarray | None = None,
) -> np.ndarray:
  """Unbiased float64 covariance of float32 (M, C) responses, on the host.

  The arithmetic of :mod:`pfa_jax.stats` in one pass: ``y = x / p - s``
  with ``p`` the largest power of two <= max |x| (exact, so any scalar
  scaling of ``x`` float32 holds gives the scaled covariance) and ``s`` the
  mean of ``x / p``; ``sum y y^T`` is one SSYRK. ``amax`` (max |x|, when the
  caller has it) saves two reads; ``overwrite`` lets ``x``'s memory serve
  as scratch (``y``, then the result when M >= 2C): one [M, C] buffer
  fewer, and ``x`` holds no responses afterwards.

  The result is a [C, C] view whose rows are :func:`spectra.lda` long (the
  layout LAPACK is fastest on, taken in place by ``spectrum(...,
  overwrite=True)``): in ``out`` when given (a writeable float64 [C, C]
  array, e.g. from :func:`spectra.square`; it may share memory with ``x``
  when ``overwrite``, since ``x`` is dead by the time it is written), else in
  the centred buffer's memory when it fits, else in a new buffer.
  """
  x = np.ascontiguousarray(x, np.float32)
  m, c = x.shape
  if amax is None:
    amax = max(float(x.max()), -float(x.min()))
  if out is not None and (
    out.shape != (c, c) or out.dtype != np.float64 or not out.flags.writeable
  ):
    raise ValueError(
      f'out must be a writeable float64 ({c}, {c}) array, got {out.dtype} '
      f'{out.shape}.'
    )
  if amax == 0.0:
    if out is None:
      return np.zeros((c, c))
    out[...] = 0.0
    return out
  p = float(np.ldexp(1.0, np.frexp(amax)[1] - 1))
  mean = x.mean(axis=0, dtype=np.float64)
  y = x if overwrite else np.empty_like(x)
  if _SAFE_SCALE[0] <= p <= _SAFE_SCALE[1]:
    p = 1.0
    np.subtract(x, mean.astype(np.float32), out=y)
  else:
    np.multiply(x, np.float32(1.0 / p), out=y)
    y -= (mean / p).astype(np.float32)
  g = openblas.syrk_upper(y)  # upper triangle valid
  s = y.sum(axis=0, dtype=np.float64)
  # y is dead now: when it is large enough (M >= 2C) the float64 result
  # takes its memory, not another [C, C] of fresh pages (in a cold process
  # their first touch costs ~0.3 s per 128 MB here).
  cov = out
  if cov is None:
    cov = spectra_lib.square(c, y)
  if cov is None:
    cov = spectra_lib.square(c)
  scale = p * p / (m - 1)
  sm = s / m
  for i in range(0, c, 256):  # block rows: convert and finish the upper
    rows = cov[i : i + 256, i:]  # triangle, then mirror it into the lower
    rows[...] = g[i : i + 256, i:]
    rows -= np.outer(s[i : i + 256], sm[i:])
    rows *= scale
    blk = rows[:, :256]
    blk[...] = np.triu(blk) + np.triu(blk, 1).T
    cov[i + 256 :, i : i + 256] = rows[:, 256:].T
  return cov


def analyze(
  responses: Mapping[str, np.typing.ArrayLike],
  *,
  energies: Sequence[float] = DEFAULT_ENERGIES,
  kl: bool = True,
  overwrite_responses: bool = False,
) -> dict:
  """Runs PFA (spectra, PFA-En for each tau, PFA-KL, selection) on responses.

  Args:
    responses: layer name -> (M, C) or (M, H, W, C) response array.
    energies: PFA-En thresholds, each in (0, 1]. Keys are
      ``f'energy_{tau:g}'``.
    kl: whether to include the PFA-KL recipe (key ``'kl'``).
    overwrite_responses: let the statistics use float32 (M, C) arrays as
      scratch memory (they hold no responses afterwards; saves their size
      in memory and the first touch of it; the CLI's arrays are its own).

  Returns:
    A JSON-serialisable dict with ``'spectra'`` and ``'recipes'`` (see the
    module docstring).

  Raises:
    ValueError: for an empty mapping, bad shapes, fewer than 2 samples,
      NaN/Inf values (naming the layer), or tau outside (0, 1].
  """
  return _analyze(responses, energies, kl, overwrite_responses, {})


def _analyze(responses, energies, kl, overwrite_responses, outs):
  """:func:`analyze`, with optional per-layer ``covariance(..., out=)``."""
  if not isinstance(responses, Mapping) or not responses:
    raise ValueError('responses must be a non-empty dict layer -> array.')
  energies = [float(t) for t in energies]
  for t in energies:
    if not 0.0 < t <= 1.0:
      raise ValueError(f'Energy threshold tau must be in (0, 1], got {t!r}.')
  # Validate everything before any heavy work.
  pooled = {k: _validate(x, k) for k, x in responses.items()}
  spectra, orders = {}, {}
  for name, (x, amax) in pooled.items():
    out = outs.get(name)
    cov = covariance(x, amax, overwrite=overwrite_responses, out=out)
    orders[name] = select.removal_order(cov, name=name)
    spectra[name] = spectra_lib.spectrum(cov, name=name, overwrite=True)

  def entry(widths):
    keep = select.keep_sets(orders, widths)
    return {
      k: {'width': int(widths[k]), 'kept': keep[k].tolist()} for k in widths
    }

  out_recipes = {}
  for t in energies:
    out_recipes[f'energy_{t:g}'] = entry(recipes.energy(spectra, t))
  if kl:
    out_recipes['kl'] = entry(recipes.kl(spectra))
  return {
    'spectra': {k: v.tolist() for k, v in spectra.items()},
    'recipes': out_recipes,
  }


_READ_CHUNK = 1 << 20  # bytes per read from a (possibly compressed) member


def load_npz(path: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """Reads an ``.npz`` as :func:`numpy.load` does, with room for the results.

  Each (M, C) or (M, H, W, C) array is read into a buffer large enough to
  hold the layer's float64 [C, C] covariance with padded rows
  (:func:`spectra.square`) as well; the statistics write that over the
  responses once they are done with them. The result then lands in memory
  the process has already touched (in a cold process fresh pages cost ~0.3 s
  per 128 MB here), and LAPACK gets its faster layout even when M = 2C
  leaves the responses' own memory a few rows short of it.

  Returns:
    ``(responses, outs)``: layer -> array as ``numpy.load`` gives it, and
    layer -> float64 [C, C] view of that array's buffer, for
    ``covariance(..., overwrite=True, out=...)`` (it overwrites the
    responses). Arrays of another rank, Fortran order or object dtype are
    read by NumPy itself and get no entry in ``outs``.

  Raises:
    ValueError: for a missing file, one that is not an ``.npz`` (zip)
      archive, or a member that ends early.
  """
  responses, outs = {}, {}
  try:
    archive = zipfile.ZipFile(path)
  except (OSError, zipfile.BadZipFile) as e:
    raise ValueError(f'cannot read {path!r} as an .npz archive: {e}') from e
  with archive:
    for member in archive.namelist():
      name = member[:-4] if member.endswith('.npy') else member
      where = f'{path}: array {name!r}'
      try:
        with archive.open(member) as f:
          buf, x = _read_with_room(f, where)
        if buf is None:  # not a response layout: NumPy reads it
          with archive.open(member) as f:
            x = np.lib.format.read_array(f, allow_pickle=False)
      except ValueError as e:  # NumPy's format errors name no member
        if where in str(e):
          raise
        raise ValueError(f'{where}: {e}') from e
      if buf is not None:
        outs[name] = spectra_lib.square(x.shape[-1], buf)
      responses[name] = x
  return responses, outs


def _read_with_room(f, where):
  """Reads one ``.npy`` stream into a buffer with room for its covariance.

  Returns ``(buffer, array)``, or ``(None, None)`` for a format version,
  rank, order or dtype :func:`load_npz` leaves to NumPy.
  """
  fmt = np.lib.format
  version = fmt.read_magic(f)
  if version == (1, 0):
    shape, fortran, dtype = fmt.read_array_header_1_0(f)
  elif version == (2, 0):
    shape, fortran, dtype = fmt.read_array_header_2_0(f)
  else:
    return None, None
  if fortran or len(shape) not in (2, 4) or dtype.hasobject:
    return None, None
  c = shape[-1]
  nbytes = int(np.prod(shape)) * dtype.itemsize
  buf = np.empty(max(nbytes, 8 * c * spectra_lib.lda(c)), np.uint8)
  view = memoryview(buf)[:nbytes]
  done = 0
  while done < nbytes:
    got = f.readinto(view[done : done + _READ_CHUNK])
    if not got:
      raise ValueError(f'{where} ends after {done} of {nbytes} bytes.')
    done += got
  return buf, buf[:nbytes].view(dtype).reshape(shape)


def _parse_energies(text: str) -> list[float]:
  if not text.strip():
    return []
  return [float(t) for t in text.split(',')]


def main(argv: Sequence[str] | None = None) -> int:
  """CLI entry: prints ``analyze()`` of an .npz file as JSON."""
  parser = argparse.ArgumentParser(
    prog='python -m pfa_jax.analyze', description=__doc__.split('\n')[0]
  )
  parser.add_argument(
    'npz', help='.npz file, one (M, C)/(M, H, W, C) array per layer'
  )
  parser.add_argument(
    '--energies',
    type=_parse_energies,
    default=list(DEFAULT_ENERGIES),
    help='comma-separated PFA-En thresholds (default: %(default)s)',
  )
  parser.add_argument('--no-kl', action='store_true', help='skip PFA-KL')
  parser.add_argument('--indent', type=int, default=None, help='JSON indent')
  args = parser.parse_args(argv)
  hostmem.retain_freed_memory()  # a freed [C, C] buffer is reused, not unmapped
  try:
    responses, outs = load_npz(args.npz)
    result = _analyze(responses, args.energies, not args.no_kl, True, outs)
  except ValueError as e:
    parser.exit(2, f'error: {e}\n')
  sys.stdout.write(json.dumps(result, indent=args.indent) + '\n')
  return 0


if __name__ == '__main__':
  sys.exit(main())
