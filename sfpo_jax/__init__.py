"""sfpo-jax: Slow-Fast Policy Optimization (arXiv 2510.04072) for RL of LLM reasoning, in pure JAX."""

__version__ = "0.1.0"
