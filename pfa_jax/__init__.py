"""pfa_jax: Principal Filter Analysis and structured pruning in JAX/Flax."""

__version__ = '0.1.0'
