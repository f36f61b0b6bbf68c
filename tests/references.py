"""Independent float64 references shared by several test files."""

import numpy as np


def similarity(maps, mask=None):
  """Central Filter's D: a per-image loop over channel pairs with
  np.corrcoef in float64, the degenerate maps by METHODS' table."""
  maps = np.asarray(maps, np.float64)
  n, c = maps.shape[0], maps.shape[-1]
  x = maps.reshape(n, -1, c)
  total, count = np.zeros((c, c)), 0
  for i in range(n):
    if mask is not None and not mask[i]:
      continue
    count += 1
    for a in range(c):
      for b in range(c):
        u, v = x[i, :, a], x[i, :, b]
        cu, cv = np.ptp(u) == 0, np.ptp(v) == 0
        zu, zv = not np.any(u), not np.any(v)
        if cu and cv:
          s = 1.0
        elif zu or zv:
          s = -1.0
        elif cu or cv:
          s = 0.0
        else:
          s = np.corrcoef(u, v)[0, 1]
        total[a, b] += s
  d = total / count
  np.fill_diagonal(d, 1.0)
  return d
