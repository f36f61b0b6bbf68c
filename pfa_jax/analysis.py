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
touches JAX (``python -m pfa_jax.analyze`` does not even import it): each
layer's covariance is one float32 BLAS SSYRK on the responses scaled and
shifted exactly as :mod:`pfa_jax.stats` does (a power-of-two scale from the
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
from collections.abc import Mapping, Sequence

import numpy as np
import scipy.linalg.blas

from pfa_jax import recipes
from pfa_jax import select
from pfa_jax import spectra as spectra_lib

DEFAULT_ENERGIES = (0.8, 0.85, 0.93, 0.95, 0.96, 0.97, 0.98, 0.99)


def pool_responses(x: np.typing.ArrayLike, *, name: str | None = None):
  """Validates a response array and max-pools (M, H, W, C) to (M, C).

  Args:
    x: (M, C) or (M, H, W, C) responses.
    name: layer name for error messages.

  Returns:
    A float32 (M, C) NumPy array (float32 is the statistics accumulator
    dtype; centring keeps it accurate).

  Raises:
    ValueError: on another rank, fewer than 2 samples, no units or NaN/Inf.
  """
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
  x = x.astype(np.float32, copy=False)
  if not np.all(np.isfinite(x)):
    raise ValueError(f'{where}: responses contain NaN or Inf.')
  return x


def covariance(x: np.ndarray) -> np.ndarray:
  """Unbiased float64 covariance of float32 (M, C) responses, on the host.

  The arithmetic of :mod:`pfa_jax.stats` in one pass: ``y = x / p - s``
  with ``p`` the largest power of two <= max |x| (exact, so any scalar
  scaling of ``x`` float32 holds gives the scaled covariance) and ``s`` the
  mean of ``x / p``; ``sum y y^T`` is one SSYRK.
  """
  m, c = x.shape
  amax = float(np.max(np.abs(x)))
  if amax == 0.0:
    return np.zeros((c, c))
  p = float(np.ldexp(1.0, np.frexp(amax)[1] - 1))
  z = x / np.float32(p)
  shift = z.mean(axis=0, dtype=np.float64).astype(np.float32)
  z -= shift
  g = scipy.linalg.blas.ssyrk(1.0, z.T, trans=0, lower=1)  # lower valid
  s = z.sum(axis=0, dtype=np.float64)
  cov = np.asarray(g, np.float64, order='C')
  for i in range(0, c, 256):  # in place: upper = lower^T, block by block
    b = cov[i : i + 256, i : i + 256]
    b[...] = np.tril(b) + np.tril(b, -1).T
    cov[i : i + 256, i + 256 :] = cov[i + 256 :, i : i + 256].T
  cov -= np.outer(s, s / m)
  cov *= p * p / (m - 1)
  return cov


def analyze(
  responses: Mapping[str, np.typing.ArrayLike],
  *,
  energies: Sequence[float] = DEFAULT_ENERGIES,
  kl: bool = True,
) -> dict:
  """Runs PFA (spectra, PFA-En for each tau, PFA-KL, selection) on responses.

  Args:
    responses: layer name -> (M, C) or (M, H, W, C) response array.
    energies: PFA-En thresholds, each in (0, 1]. Keys are
      ``f'energy_{tau:g}'``.
    kl: whether to include the PFA-KL recipe (key ``'kl'``).

  Returns:
    A JSON-serialisable dict with ``'spectra'`` and ``'recipes'`` (see the
    module docstring).

  Raises:
    ValueError: for an empty mapping, bad shapes, fewer than 2 samples,
      NaN/Inf values (naming the layer), or tau outside (0, 1].
  """
  if not isinstance(responses, Mapping) or not responses:
    raise ValueError('responses must be a non-empty dict layer -> array.')
  energies = [float(t) for t in energies]
  for t in energies:
    if not 0.0 < t <= 1.0:
      raise ValueError(f'Energy threshold tau must be in (0, 1], got {t!r}.')
  # Validate everything before any heavy work.
  pooled = {k: pool_responses(x, name=k) for k, x in responses.items()}
  spectra, orders = {}, {}
  for name, x in pooled.items():
    cov = covariance(x)
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
  with np.load(args.npz) as data:
    responses = {k: data[k] for k in data.files}
  try:
    result = analyze(responses, energies=args.energies, kl=not args.no_kl)
  except ValueError as e:
    parser.exit(2, f'error: {e}\n')
  sys.stdout.write(json.dumps(result, indent=args.indent) + '\n')
  return 0


if __name__ == '__main__':
  sys.exit(main())
