"""Verifiable rewards: time-bounded math grading (math-verify in worker processes), format reward, combination."""

from sfpo_jax.rewards.combine import RewardFn, combine_rewards, format_reward
from sfpo_jax.rewards.extract import has_boxed, last_boxed, verl_boxed
from sfpo_jax.rewards.math import (
    STATUS_NAMES,
    GradeResult,
    MathGrader,
    default_grader,
    math_reward,
    paper_reward,
)

__all__ = [
    "STATUS_NAMES",
    "GradeResult",
    "MathGrader",
    "RewardFn",
    "combine_rewards",
    "default_grader",
    "format_reward",
    "has_boxed",
    "last_boxed",
    "math_reward",
    "paper_reward",
    "verl_boxed",
]
