"""Shared type aliases for pfa_jax.

A *layer tree* is a flat ``dict`` keyed by prunable-layer name (for example
``'conv3'`` or ``'stage2_block0/conv1'``); its values are per-layer arrays or
numbers. All PFA intermediates (statistics, spectra, widths, keep-sets) are
layer trees, so they compose with ``jax.tree.map``.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

Array = jax.Array
ArrayLike = jax.typing.ArrayLike
Params = Mapping[str, Any]
Variables = Mapping[str, Any]  # {'params': ..., 'batch_stats': ...}
Batch = Mapping[str, Any]  # {'image': [N, H, W, C], 'label': [N], 'mask': [N]}
LayerTree = Mapping[str, Any]
Widths = Mapping[str, int]  # layer name -> number of kept units
KeepSets = Mapping[str, Sequence[int] | np.ndarray]  # layer -> sorted indices
