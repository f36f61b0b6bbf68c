"""Recipes: spectrum (tree) -> kept-width (tree).

A recipe maps the normalised spectrum lambda of every layer (see
:mod:`pfa_jax.spectra`) to the number of units to keep. Every registered recipe
has the signature ``recipe(spectra, **hparams) -> widths`` where ``spectra`` is
a layer tree (dict name -> lambda) and ``widths`` a dict name -> int; a single
1-D spectrum is also accepted and gives a single int. Every recipe keeps at
least one unit per layer.

* :func:`energy` (PFA-En): smallest k with lambda_1 + ... + lambda_k >= tau.
* :func:`kl` (PFA-KL): k = ceil(gamma C), gamma = 1 - KL(lambda || u) / log C.
* :func:`fraction`: k = ceil(gamma C) for a fixed gamma (uniform baseline).
* :func:`to_target`: the largest tau whose PFA-En recipe meets a cost target.

Round-off decisions: cumulative energies are compared with ``tau - 1e-10`` so
tau = 1 returns the numerical rank, never C + 1; ``ceil`` is applied to
``gamma C - 1e-9`` so a value that is an integer up to round-off is not
bumped up by one.

References:
  Suau et al., PFA, WACV 2020, Sec. 3.1 (PFA-En, PFA-KL, Eq. 2-3).
"""

import bisect
import math
from collections.abc import Callable, Mapping

import numpy as np

_ENERGY_TOL = 1e-10
_CEIL_TOL = 1e-9


def _as_spectrum(lam, name=None) -> np.ndarray:
  lam = np.asarray(lam, np.float64)
  if lam.ndim != 1 or lam.size < 1:
    where = f'layer {name!r}: ' if name is not None else ''
    raise ValueError(
      f'{where}a spectrum must be a non-empty 1-D array, got {lam.shape}.'
    )
  return lam


def _map_layers(fn: Callable, spectra):
  """Applies fn(lambda, name) to a single spectrum or a layer tree."""
  if isinstance(spectra, Mapping):
    return {k: fn(_as_spectrum(v, k), k) for k, v in spectra.items()}
  return fn(_as_spectrum(spectra), None)


def _check_tau(tau: float) -> float:
  tau = float(tau)
  if not 0.0 < tau <= 1.0:
    raise ValueError(f'Energy threshold tau must be in (0, 1], got {tau!r}.')
  return tau


def _energy_width(lam: np.ndarray, tau: float) -> int:
  cum = np.cumsum(lam)
  k = int(np.searchsorted(cum, tau - _ENERGY_TOL, side='left')) + 1
  return min(max(k, 1), lam.size)


def energy(spectra, tau: float):
  """PFA-En: keeps the smallest k with cumulative energy >= tau.

  Args:
    spectra: normalised descending spectrum, or a layer tree of them.
    tau: energy to preserve, in (0, 1].

  Returns:
    An int width, or a dict layer -> int for a tree.

  Raises:
    ValueError: if tau is outside (0, 1].
  """
  tau = _check_tau(tau)
  return _map_layers(lambda lam, _: _energy_width(lam, tau), spectra)


def kl_gamma(lam: np.ndarray) -> float:
  """Returns gamma = 1 - KL(lambda || uniform) / log C (0 log 0 = 0); C=1 -> 1."""
  lam = np.asarray(lam, np.float64)
  c = lam.size
  if c == 1:
    return 1.0
  pos = lam[lam > 0]
  div = float(np.sum(pos * np.log(pos * c)))
  return 1.0 - div / math.log(c)


def _kl_width(lam: np.ndarray) -> int:
  c = lam.size
  k = math.ceil(kl_gamma(lam) * c - _CEIL_TOL)
  return min(max(k, 1), c)


def kl(spectra):
  """PFA-KL: k = ceil(gamma C) with gamma = 1 - KL(lambda || u) / log C.

  Parameter free. A white (uniform) spectrum keeps all C units, a rank-1
  (Dirac) spectrum keeps 1; C = 1 keeps 1.

  Args:
    spectra: normalised spectrum, or a layer tree of them.

  Returns:
    An int width, or a dict layer -> int for a tree.
  """
  return _map_layers(lambda lam, _: _kl_width(lam), spectra)


def fraction(spectra, gamma: float):
  """Keeps k = ceil(gamma C) units per layer, clamped to [1, C]."""
  gamma = float(gamma)
  if not 0.0 < gamma <= 1.0:
    raise ValueError(f'Fraction gamma must be in (0, 1], got {gamma!r}.')

  def width(lam, _):
    c = lam.size
    return min(max(math.ceil(gamma * c - _CEIL_TOL), 1), c)

  return _map_layers(width, spectra)


def breakpoints(spectra: Mapping[str, np.ndarray]) -> np.ndarray:
  """Returns the sorted unique tau values where some layer's width changes.

  These are the cumulative energies of every layer, clipped to (0, 1], plus
  1.0. Between two consecutive breakpoints the PFA-En recipe is constant, so
  they are the only candidates for an exact target search.
  """
  cums = [np.cumsum(_as_spectrum(v, k)) for k, v in spectra.items()]
  cand = np.concatenate(cums + [np.ones(1)]) if cums else np.ones(1)
  cand = np.clip(cand, np.finfo(np.float64).tiny, 1.0)
  return np.unique(cand)


def to_target(
  spectra: Mapping[str, np.ndarray],
  cost_fn: Callable[[dict[str, int]], float],
  target: float,
) -> tuple[float, dict[str, int]]:
  """Largest tau whose PFA-En recipe satisfies ``cost_fn(widths) <= target``.

  Exact for any cost that is monotone (non-decreasing) in every width: the
  recipe only changes at the cumulative-energy breakpoints of the layers
  (:func:`breakpoints`), so this bisects over their merged sorted set.

  Args:
    spectra: layer tree of normalised spectra.
    cost_fn: maps a widths dict (layer -> int) to a cost (parameters, FLOPs).
    target: the cost budget.

  Returns:
    ``(tau, widths)``: tau = 1.0 if the PFA-En(1) network fits, otherwise the
    largest breakpoint tau* that fits; the next breakpoint does not fit.

  Raises:
    ValueError: if even one unit per layer exceeds the target (the message
      names the target and the minimum cost).
  """
  if not spectra:
    raise ValueError('to_target needs at least one layer.')
  ones = {k: 1 for k in spectra}
  min_cost = cost_fn(ones)
  if min_cost > target:
    raise ValueError(
      f'Cost target {target!r} is below the smallest possible network '
      f'(one unit per layer) with cost {min_cost!r}.'
    )
  full = energy(spectra, 1.0)
  if cost_fn(full) <= target:
    return 1.0, full
  cand = breakpoints(spectra)

  def fits(i):
    return cost_fn(energy(spectra, float(cand[i]))) <= target

  # cand[0] (smallest first eigenvalue) gives the all-ones network, which fits;
  # cand[-1] = 1 does not fit (checked above). Find the first misfit.
  first_bad = bisect.bisect_left(
    range(len(cand)), True, lo=1, key=lambda i: not fits(i)
  )
  tau = float(cand[first_bad - 1])
  return tau, energy(spectra, tau)


RECIPES: dict[str, Callable] = {
  'energy': energy,
  'kl': kl,
  'fraction': fraction,
}


def get_recipe(name: str) -> Callable:
  """Returns the recipe registered under ``name``.

  Raises:
    ValueError: for an unknown name, listing the known ones.
  """
  try:
    return RECIPES[name]
  except KeyError:
    raise ValueError(
      f'Unknown recipe {name!r}; known recipes: {sorted(RECIPES)}.'
    ) from None
