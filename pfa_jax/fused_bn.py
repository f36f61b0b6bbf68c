"""Batch norm fused with a residual add and a ReLU, as one native CPU kernel.

``relu(bn(x) + residual)`` is where a CNN's training step spends its
non-convolution time on the CPU: XLA:CPU runs BN's statistics, its
normalisation, the add and the ReLU (and their gradients) as several
elementwise and reduction fusions, each reading the whole activation map.
Here the forward is one statistics pass and one elementwise pass, and the
backward is one reduction pass and one elementwise pass
(``pfa_jax/native/bn_act.cc``), in the oneDNN library so it shares the
convolutions' threads.

:func:`train` and :func:`infer` compute exactly flax's ``nn.BatchNorm``
(biased variance ``E[x^2] - E[x]^2`` clipped at 0, ``epsilon`` inside the
square root), followed by ``+ residual`` and ReLU. They are used by
``pfa_jax.models.layers.BatchNorm`` on the ``conv_impl='onednn'`` path;
:func:`reference_train` / :func:`reference_infer` are the same functions in
``jax.numpy``, which every other path runs and the tests compare against.

Decisions:
  * Channels last: ``x`` is ``[..., C]`` and is normalised over every axis
    but the last; ``scale``/``bias``/``mean``/``var`` are ``[C]``.
  * vmap: ``vmap_method='broadcast_all'``; the kernel runs one batch norm
    per leading (vmapped) index, so variants never share statistics.
  * The batch mean and variance that :func:`train` returns are for the
    running averages: they carry no gradient (``stop_gradient``), as in any
    BN layer's running-statistics update.
  * :func:`infer`'s gradient is that of :func:`reference_infer` (it is an
    affine map and a ReLU; XLA fuses it well): the native kernel is only
    its forward.
  * Narrow widths: a row of C channels that is not whole vectors (C < 16,
    or not a multiple of 16) is walked as rows of q C channels, q = 16 /
    gcd(C, 16), with the per-channel operands tiled q times: at 4-12
    channels an inference pass took 4.5-5.7x the 16-channel one on fewer bytes
    (``benchmarks/bn_widths.py``). ``set_periodic(False)`` turns it off, for
    that benchmark's A/B.
  * Not eligible (``eligible``): other dtypes, sharded operands (a custom
    call cannot be partitioned), no kernel, or ``PFA_JAX_FUSED_BN=0`` (to
    measure the lever); callers then use the reference.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from pfa_jax import conv
from pfa_jax import onednn


def _axes(x):
  return tuple(range(x.ndim - 1))


def _act(z, residual, relu):
  if residual is not None:
    z = z + residual
  return jax.nn.relu(z) if relu else z


def reference_train(x, scale, bias, *, residual=None, relu=True, eps=1e-5):
  """``(y, batch mean, batch var)`` in ``jax.numpy``: flax's training BN."""
  mean = jnp.mean(x, _axes(x))
  var = jnp.maximum(jnp.mean(jnp.square(x), _axes(x)) - jnp.square(mean), 0.0)
  y = (x - mean) * (scale * jax.lax.rsqrt(var + eps)) + bias
  return _act(y, residual, relu), mean, var


def reference_infer(
  x, scale, bias, mean, var, *, residual=None, relu=True, eps=1e-5
):
  """``y`` in ``jax.numpy``: flax's BN with running statistics."""
  y = (x - mean) * (scale * jax.lax.rsqrt(var + eps)) + bias
  return _act(y, residual, relu)


def spatial_max(y):
  """[N, ..., C] -> [N, C]: the max over every axis but the first and last."""
  return jnp.max(y, axis=tuple(range(1, y.ndim - 1)))


def reference_infer_with_max(
  x, scale, bias, mean, var, *, residual=None, relu=True, eps=1e-5
):
  """``(y, spatial_max(y))`` of :func:`reference_infer`."""
  y = reference_infer(
    x, scale, bias, mean, var, residual=residual, relu=relu, eps=eps
  )
  return y, spatial_max(y)


def check_shapes(x, residual=None, **per_channel) -> None:
  """Raises ValueError naming the operand whose shape does not fit ``x``.

  ``per_channel`` (``scale=...``, ``mean=...``) must be ``[C]`` for
  ``x = [..., C]``; ``residual`` must be ``x``'s shape.
  """
  x_shape = tuple(jnp.shape(x))
  if not x_shape:
    raise ValueError('fused_bn: x must have a channel axis, got a scalar.')
  for name, v in per_channel.items():
    if tuple(jnp.shape(v)) != x_shape[-1:]:
      raise ValueError(
        f'fused_bn: {name} has shape {tuple(jnp.shape(v))}, expected '
        f'({x_shape[-1]},) for x of shape {x_shape}.'
      )
  if residual is not None and tuple(jnp.shape(residual)) != x_shape:
    raise ValueError(
      f'fused_bn: residual has shape {tuple(jnp.shape(residual))}, '
      f"expected x's {x_shape}."
    )


def eligible(*operands) -> bool:
  """True when the native kernel can take these operands (None skipped)."""
  ops = [o for o in operands if o is not None]
  return (
    all(o.dtype == jnp.float32 for o in ops)
    and ops[0].ndim >= 1
    and ops[0].size > 0
    and not any(any(conv._sharding_spec(o) or ()) for o in ops)
    and os.environ.get('PFA_JAX_FUSED_BN', '1') != '0'
    and onednn.available()
  )


def set_periodic(on: bool) -> None:
  """Walks narrow rows as whole-vector periods (True, the default) or not."""
  if onednn.available():
    onednn._load().PfaSetBnPeriodic(int(bool(on)))


def _attrs(relu, eps):
  return dict(
    eps=np.float32(eps), relu=bool(relu), threads=np.int64(onednn.THREADS)
  )


def _f32(shape):
  return jax.ShapeDtypeStruct(shape, jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _train(x, residual, scale, bias, relu, eps):
  return _train_fwd(x, residual, scale, bias, relu, eps)[0]


def _train_fwd(x, residual, scale, bias, relu, eps):
  c = scale.shape
  target = 'pfa_jax_bn_train_fwd' + ('_res' if residual is not None else '')
  args = (x,) + ((residual,) if residual is not None else ()) + (scale, bias)
  y, mean, var = jax.ffi.ffi_call(
    target, (_f32(x.shape), _f32(c), _f32(c)), vmap_method='broadcast_all'
  )(*args, **_attrs(relu, eps))
  return (y, mean, var), (x, y, scale, mean, var, residual is not None)


def _train_bwd(relu, eps, res, g):
  x, y, scale, mean, var, has_res = res
  dy = g[0]  # the statistics' cotangents are zero (stop_gradient outside)
  c = scale.shape
  outs = (_f32(x.shape),) + ((_f32(x.shape),) if has_res else ())
  outs += (_f32(c), _f32(c))
  target = 'pfa_jax_bn_train_bwd' + ('_res' if has_res else '')
  got = jax.ffi.ffi_call(target, outs, vmap_method='broadcast_all')(
    x, y, dy, scale, mean, var, **_attrs(relu, eps)
  )
  if has_res:
    dx, dres, dscale, dbias = got
  else:
    (dx, dscale, dbias), dres = got, None
  return dx, dres, dscale, dbias


_train.defvjp(_train_fwd, _train_bwd)


def train(x, scale, bias, *, residual=None, relu=True, eps=1e-5):
  """``(y, batch mean, batch var)``: training BN + residual + ReLU, native.

  Same function as :func:`reference_train`; falls back to it when the
  operands are not :func:`eligible`. Shapes are checked first
  (:func:`check_shapes`).
  """
  check_shapes(x, residual, scale=scale, bias=bias)
  if not eligible(x, residual, scale, bias):
    return reference_train(
      x, scale, bias, residual=residual, relu=relu, eps=eps
    )
  y, mean, var = _train(x, residual, scale, bias, relu, float(eps))
  return y, jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _infer(x, residual, scale, bias, mean, var, relu, eps):
  target = 'pfa_jax_bn_infer' + ('_res' if residual is not None else '')
  args = (x,) + ((residual,) if residual is not None else ())
  return jax.ffi.ffi_call(target, _f32(x.shape), vmap_method='broadcast_all')(
    *args, scale, bias, mean, var, **_attrs(relu, eps)
  )


def _infer_fwd(x, residual, scale, bias, mean, var, relu, eps):
  out = _infer(x, residual, scale, bias, mean, var, relu, eps)
  return out, (x, residual, scale, bias, mean, var)


def _reference_vjp(reference, relu, eps, res, g):
  """The VJP of ``reference`` (an inference function) at the saved operands."""

  def f(x, residual, scale, bias, mean, var):
    return reference(
      x, scale, bias, mean, var, residual=residual, relu=relu, eps=eps
    )

  return jax.vjp(f, *res)[1](g)


_infer_bwd = functools.partial(_reference_vjp, reference_infer)


_infer.defvjp(_infer_fwd, _infer_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _infer_max(x, residual, scale, bias, mean, var, relu, eps):
  n, c = x.shape[0], x.shape[-1]
  target = 'pfa_jax_bn_infer_max' + ('_res' if residual is not None else '')
  args = (x,) + ((residual,) if residual is not None else ())
  return jax.ffi.ffi_call(
    target, (_f32(x.shape), _f32((n, c))), vmap_method='broadcast_all'
  )(*args, scale, bias, mean, var, **_attrs(relu, eps))


def _infer_max_fwd(x, residual, scale, bias, mean, var, relu, eps):
  out = _infer_max(x, residual, scale, bias, mean, var, relu, eps)
  return out, (x, residual, scale, bias, mean, var)


_infer_max.defvjp(
  _infer_max_fwd, functools.partial(_reference_vjp, reference_infer_with_max)
)


def infer_with_max(
  x, scale, bias, mean, var, *, residual=None, relu=True, eps=1e-5
):
  """``(y, spatial_max(y))``: :func:`infer` and its PFA response, one pass.

  ``x`` is ``[N, ..., C]`` with at least one spatial axis. The max is taken
  while each sample's rows are in cache, instead of re-reading the map
  (the collection pass's overhead). Falls back to
  :func:`reference_infer_with_max` when not :func:`eligible`.
  """
  check_shapes(x, residual, scale=scale, bias=bias, mean=mean, var=var)
  if x.ndim < 3 or not eligible(x, residual, scale, bias, mean, var):
    return reference_infer_with_max(
      x, scale, bias, mean, var, residual=residual, relu=relu, eps=eps
    )
  return _infer_max(x, residual, scale, bias, mean, var, relu, float(eps))


def infer(x, scale, bias, mean, var, *, residual=None, relu=True, eps=1e-5):
  """``y``: BN with running statistics + residual + ReLU, native.

  Same function as :func:`reference_infer`; falls back to it when the
  operands are not :func:`eligible`. Shapes are checked first.
  """
  check_shapes(x, residual, scale=scale, bias=bias, mean=mean, var=var)
  if not eligible(x, residual, scale, bias, mean, var):
    return reference_infer(
      x, scale, bias, mean, var, residual=residual, relu=relu, eps=eps
    )
  return _infer(x, residual, scale, bias, mean, var, relu, float(eps))
