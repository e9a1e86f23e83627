"""Format reward and weighted combination of reward functions (TRL-style: ``fn(completions, answers, **kwargs)``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from sfpo_jax.rewards.extract import last_boxed

RewardFn = Callable[..., np.ndarray]


def format_reward(completions: Sequence[str], answers: Sequence[str] | None = None, **kwargs) -> np.ndarray:
    """``[N] float32``: 1.0 where a completion has exactly one non-empty balanced ``\\boxed{}``, else 0.0.

    ``answers`` is accepted for a uniform signature and ignored. Exactly one box, so that a policy cannot farm the
    credit by boxing several candidates.
    """
    del answers, kwargs
    out = np.zeros(len(completions), dtype=np.float32)
    for i, c in enumerate(completions):
        content = last_boxed(c)
        if content is not None and content.strip() and c.count("\\boxed") + c.count("\\fbox") == 1:
            out[i] = 1.0
    return out


def combine_rewards(fns: Sequence[tuple[RewardFn, float]]) -> RewardFn:
    """One reward function returning ``sum_j weight_j * fn_j(completions, answers, **kwargs)`` as ``[N] float32``.

    >>> reward = combine_rewards([(math_reward, 1.0), (format_reward, 0.1)])
    """
    fns = list(fns)
    if not fns:
        raise ValueError("fns must name at least one (reward_fn, weight) pair, got an empty sequence")
    for j, pair in enumerate(fns):
        if not (isinstance(pair, tuple) and len(pair) == 2 and callable(pair[0])):
            raise ValueError(f"fns[{j}] must be a (callable, weight) pair, got {pair!r}")
        if not np.isfinite(pair[1]):
            raise ValueError(f"fns[{j}] weight must be finite, got {pair[1]!r}")

    def combined(completions: Sequence[str], answers: Sequence[str], **kwargs) -> np.ndarray:
        total = np.zeros(len(completions), dtype=np.float32)
        for fn, weight in fns:
            r = np.asarray(fn(completions, answers, **kwargs), dtype=np.float32)
            if r.shape != total.shape:
                raise ValueError(
                    f"reward function {getattr(fn, '__name__', fn)!r} returned shape {r.shape}, expected {total.shape}"
                )
            total += np.float32(weight) * r
        return total

    combined.__name__ = "combined(" + ", ".join(f"{getattr(f, '__name__', 'fn')}*{w:g}" for f, w in fns) + ")"
    return combined
