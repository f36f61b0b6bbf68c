"""2x2 / stride-2 max-pooling as one native pass each way (VGG's pools).

XLA:CPU runs ``nn.max_pool``'s gradient as a reduce-window over
(value, index) pairs built from full-size ``iota``s: 51.6 ms forward +
backward for one [128, 32, 32, 64] map, against 2.7 ms for a loop that
remembers each window's winner (``benchmarks/native_levers.py``; VGG-16's
training step +14%). :func:`max_pool_2x2` is that loop
(``pfa_jax/native/pool.cc``): the forward pass also writes the winner's
position (uint8, 0-3), the backward pass routes the cotangent to it.

Same function as ``flax.linen.max_pool(x, (2, 2), strides=(2, 2))``; ties
go to the first maximum in (0,0), (0,1), (1,0), (1,1) order (XLA's
gradient may pick another tied element; the sum of the gradient is the
same). Not eligible (:func:`eligible`): non-float32, odd H or W, sharded,
no kernel, or ``PFA_JAX_FAST_POOL=0``; then ``flax.linen.max_pool``.
"""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pfa_jax import conv
from pfa_jax import onednn


def reference(x):
  return nn.max_pool(x, (2, 2), strides=(2, 2))


def eligible(x) -> bool:
  return (
    x.dtype == jnp.float32
    and x.ndim >= 3
    and x.shape[-3] % 2 == 0
    and x.shape[-2] % 2 == 0
    and x.size > 0
    and not any(conv._sharding_spec(x) or ())
    and os.environ.get('PFA_JAX_FAST_POOL', '1') != '0'
    and onednn.available()
  )


def _threads():
  return np.int64(onednn.THREADS)


def _fwd_call(x):
  out = x.shape[:-3] + (x.shape[-3] // 2, x.shape[-2] // 2, x.shape[-1])
  return jax.ffi.ffi_call(
    'pfa_jax_max_pool2_fwd',
    (jax.ShapeDtypeStruct(out, x.dtype), jax.ShapeDtypeStruct(out, jnp.uint8)),
    vmap_method='broadcast_all',
  )(x, threads=_threads())


@jax.custom_vjp
def _pool(x):
  return _fwd_call(x)[0]


def _pool_fwd(x):
  y, arg = _fwd_call(x)
  return y, (arg, x.shape)


def _pool_bwd(res, g):
  arg, shape = res
  dx = jax.ffi.ffi_call(
    'pfa_jax_max_pool2_bwd',
    jax.ShapeDtypeStruct(shape, g.dtype),
    vmap_method='broadcast_all',
  )(g, arg, threads=_threads())
  return (dx,)


_pool.defvjp(_pool_fwd, _pool_bwd)


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """``nn.max_pool(x, (2, 2), strides=(2, 2))``, native when eligible."""
  return _pool(x) if eligible(x) else reference(x)
