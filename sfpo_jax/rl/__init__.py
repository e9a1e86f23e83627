"""RL objectives. `grpo`: group advantages, token log-probs and entropy, the clipped surrogate, KL estimators."""

from sfpo_jax.rl import grpo
from sfpo_jax.rl.grpo import (
    AGGREGATIONS,
    KL_ESTIMATORS,
    LossConfig,
    aggregate,
    group_advantages,
    kl_estimate,
    policy_loss,
    token_logprobs_and_entropy,
)

__all__ = [
    "AGGREGATIONS",
    "KL_ESTIMATORS",
    "LossConfig",
    "aggregate",
    "group_advantages",
    "grpo",
    "kl_estimate",
    "policy_loss",
    "token_logprobs_and_entropy",
]
