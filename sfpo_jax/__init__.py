"""sfpo-jax: Slow-Fast Policy Optimization (arXiv 2510.04072) for RL of LLM reasoning, in pure JAX.

The pieces, each usable on its own:

- :func:`sfpo` — SFPO as an optax transformation, chained after any optimizer; :func:`calls_per_batch`.
- :mod:`grpo` — the GRPO objective: group advantages, token log-probs, the clipped loss, KL estimators.
- :mod:`sfpo_jax.models`, :mod:`sfpo_jax.sampling`, :mod:`sfpo_jax.rewards`, :mod:`sfpo_jax.data`,
  :mod:`sfpo_jax.tasks`, :mod:`sfpo_jax.train` — the models, sampler, graders, data and RL loop.
"""

from sfpo_jax.optim import SFPOState, calls_per_batch, sfpo, sfpo_active
from sfpo_jax.rl import grpo

__version__ = "0.1.0"

__all__ = ["SFPOState", "calls_per_batch", "grpo", "sfpo", "sfpo_active"]
