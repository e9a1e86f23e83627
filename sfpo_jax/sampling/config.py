"""Sampling controls: a frozen, validated dataclass (hashable, so it can pick a compiled program)."""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to draw completions.

    Attributes:
      max_new_tokens: tokens generated per completion (the length of every `Rollout` row).
      temperature: softmax temperature; 0 is greedy decoding (argmax, no randomness).
      top_k: sample among the k most likely tokens only; 0 disables.
      top_p: nucleus sampling, the smallest set of most likely tokens whose probability reaches top_p (at the
        given temperature, after top_k); 1.0 disables.
      eos_token_ids: generating any of these ends a completion (the EOS token is kept and masked in).
      num_samples: completions per prompt (the GRPO group size G).
    """

    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    eos_token_ids: tuple[int, ...] = ()
    num_samples: int = 1

    def __post_init__(self):
        if isinstance(self.eos_token_ids, int):
            object.__setattr__(self, "eos_token_ids", (self.eos_token_ids,))
        object.__setattr__(self, "eos_token_ids", tuple(self.eos_token_ids))
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r} must be a positive int")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature={self.temperature!r} must be finite and >= 0 (0 is greedy)")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k={self.top_k!r} must be an int >= 0 (0 disables)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p!r} must be in (0, 1] (1 disables)")
        if any(not isinstance(t, int) or t < 0 for t in self.eos_token_ids):
            raise ValueError(f"eos_token_ids={self.eos_token_ids!r} must be non-negative ints")
        if not isinstance(self.num_samples, int) or self.num_samples < 1:
            raise ValueError(f"num_samples={self.num_samples!r} must be a positive int")
