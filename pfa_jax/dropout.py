"""Inverted dropout as one native CPU pass, its mask a hash of (key, index).

``jax.random.bernoulli`` over an activation map is slow on XLA:CPU
(threefry bits, then a compare: 71 ms for one [128, 32, 32, 64] VGG-16 map
against 15 ms here, ``benchmarks/native_levers.py``; VGG-16's training step
+11%).
:func:`dropout` draws the mask inside one native loop
(``pfa_jax/native/dropout.cc``: splitmix64 of the key's 64 bits and the
element index) and multiplies in the same pass. The mask is a pure function
of (key, index), so the backward pass is the same call on the cotangent and
nothing is stored.

Used by ``pfa_jax.models.layers.Dropout`` on the ``conv_impl='onednn'``
path. Same distribution as ``flax.linen.Dropout`` (each element kept with
probability ``1 - rate``, scaled by ``1 / (1 - rate)``), not the same
stream: a key gives different masks here and on the XLA path.

Decisions:
  * The key's 64 bits are ``jax.random.bits(key, (2,), uint32)``, so any key
    implementation works and ``fold_in`` / ``split`` behave as usual.
  * vmap: ``vmap_method='broadcast_all'``; each leading index has its own
    bits (a shared key gives every variant the same mask, as on the XLA
    path).
  * Not eligible (:func:`eligible`): non-float32 or sharded operands, no
    kernel, or ``PFA_JAX_FAST_DROPOUT=0``; then ``reference``.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from pfa_jax import conv
from pfa_jax import onednn


def reference(x, key, rate):
  """``flax.linen.Dropout``'s computation: bernoulli mask, inverted scaling."""
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jax.lax.select(keep, x / (1.0 - rate), jnp.zeros_like(x))


def eligible(x) -> bool:
  return (
    x.dtype == jnp.float32
    and x.size > 0
    and not any(conv._sharding_spec(x) or ())
    and os.environ.get('PFA_JAX_FAST_DROPOUT', '1') != '0'
    and onednn.available()
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dropout(x, bits, rate):
  return jax.ffi.ffi_call(
    'pfa_jax_dropout',
    jax.ShapeDtypeStruct(x.shape, x.dtype),
    vmap_method='broadcast_all',
  )(x, bits, rate=np.float32(rate), threads=np.int64(onednn.THREADS))


def _fwd(x, bits, rate):
  return _dropout(x, bits, rate), bits


def _bwd(rate, bits, g):
  return _dropout(g, bits, rate), np.zeros(bits.shape, jax.dtypes.float0)


_dropout.defvjp(_fwd, _bwd)


def dropout(x: jax.Array, key: jax.Array, rate: float) -> jax.Array:
  """Inverted dropout of ``x`` at ``rate`` with ``key`` (native if eligible)."""
  if not 0.0 <= rate < 1.0:
    raise ValueError(f'dropout rate must be in [0, 1), got {rate}.')
  if rate == 0.0:
    return x
  if not eligible(x):
    return reference(x, key, rate)
  bits = jax.random.bits(key, (2,), jnp.uint32)
  return _dropout(x, bits, float(rate))
