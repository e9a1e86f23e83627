"""Fast batched sampling with a KV cache: `Sampler.generate(prompts, SamplingConfig(...), key) -> Rollout`."""

from sfpo_jax.sampling.config import SamplingConfig
from sfpo_jax.sampling.ops import sample_logits, sample_with_logprobs, token_logprobs
from sfpo_jax.sampling.sampler import (
    DEFAULT_PROMPT_BUCKETS,
    FinishReason,
    Rollout,
    Sampler,
    concat_rollouts,
    prompt_bucket,
)

__all__ = [
    "DEFAULT_PROMPT_BUCKETS",
    "FinishReason",
    "Rollout",
    "Sampler",
    "SamplingConfig",
    "concat_rollouts",
    "prompt_bucket",
    "sample_logits",
    "sample_with_logprobs",
    "token_logprobs",
]
