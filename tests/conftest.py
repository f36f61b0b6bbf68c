"""Test setup: 8 fake CPU devices, set once before JAX initialises a backend."""

import os

os.environ['XLA_FLAGS'] = (
  os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
).strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
# TF (used by tfds) must never grab an accelerator or many threads in tests.
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')

import jax  # noqa: E402  (after XLA_FLAGS, deliberately)

# Tests are dominated by XLA:CPU compile time (a tiny CNN's init: 13.7 s
# optimised vs 1.9 s here); the numerics under test do not depend on it.
jax.config.update('jax_disable_most_optimizations', True)
