"""sga-jax: Spatial Gram Alignment for ultra-high-resolution image synthesis, in JAX/Flax."""

__version__ = "0.1.0"
