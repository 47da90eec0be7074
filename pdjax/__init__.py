"""pdjax: audit diffusion models for backdoors, in JAX."""

__version__ = "0.1.0"
