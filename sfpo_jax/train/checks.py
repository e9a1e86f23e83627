"""Checks where user code and data meet the trainer, made once and early with errors that say what to fix:
the rewards a task's reward function returns (every call), and the encoded prompts against the model and the
rollout limits (at setup, over every training and evaluation prompt, instead of at the step that first meets a
bad one)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from sfpo_jax.parallel import all_hosts

__all__ = ["RewardError", "check_prompts_fit", "checked_rewards", "prompts_within", "sets_within"]


class RewardError(ValueError):
    """A reward function returned something other than one finite number per completion."""


def _name(fn: Callable) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


def checked_rewards(reward_fn: Callable, completions: Sequence[str], answers: Sequence[str]) -> np.ndarray:
    """``reward_fn(completions, answers)`` as ``[N] float32``, N = ``len(completions)``; RewardError naming the
    function and the offending rows when it returns another shape or a non-finite value (a NaN reward would
    otherwise make its mini-batch's update non-finite, skipped in silence).

    On several processes every process calls it on its own share, and all of them raise when one does (one tiny
    all-gather), so that none is left waiting for the others in the step's next collective."""
    rewards, problem = _rewards_or_problem(reward_fn, reward_fn(completions, answers), len(completions))
    if jax.process_count() > 1:
        failed = np.flatnonzero(all_hosts(np.asarray([problem is not None], np.int32)))
        if problem is None and failed.size:
            problem = f"the reward function {_name(reward_fn)} failed on process {failed[0]} (its error says how)"
    if problem is not None:
        raise RewardError(problem)
    return rewards


def _rewards_or_problem(reward_fn: Callable, raw: Any, n: int) -> tuple[np.ndarray | None, str | None]:
    try:
        rewards = np.asarray(raw, np.float32)
    except (TypeError, ValueError) as e:
        return None, (f"the reward function {_name(reward_fn)} returned {type(raw).__name__} that is not an array of "
                      f"numbers ({e})")
    if rewards.shape != (n,):
        return None, (f"the reward function {_name(reward_fn)} returned shape {rewards.shape} for {n} completions; "
                      f"it must return one reward per completion, shape ({n},)")
    bad = np.flatnonzero(~np.isfinite(rewards))
    if bad.size:
        shown = ", ".join(f"{i}: {rewards[i]}" for i in bad[:8]) + (", ..." if bad.size > 8 else "")
        return None, (f"the reward function {_name(reward_fn)} returned {bad.size} non-finite reward(s) of {n} "
                      f"(row: value {shown}; row i is completion i % group_size of prompt i // group_size); "
                      "a reward must be a finite number")
    return rewards, None


def prompts_within(items: Sequence[Any], prompts: Sequence[Sequence[int]], max_prompt_length: int
                   ) -> tuple[list, list, int]:
    """``(items, prompts, dropped)``: the items (problems) whose encoded prompt has at most ``max_prompt_length``
    tokens, in order (as verl's ``data.filter_overlong_prompts`` keeps them), and how many were dropped;
    ValueError if none is left."""
    kept = [i for i, ids in enumerate(prompts) if len(ids) <= max_prompt_length]
    if not kept:
        raise ValueError(f"no problem fits rollout.max_prompt_length={max_prompt_length} tokens (the shortest "
                         f"prompt has {min(map(len, prompts), default=0)})")
    return [items[i] for i in kept], [prompts[i] for i in kept], len(prompts) - len(kept)


def sets_within(sets: Mapping[str, Sequence[Any]], encode: Callable, max_prompt_length: int
                ) -> tuple[dict[str, list], dict[str, list[list[int]]], dict[str, int]]:
    """:func:`prompts_within` for each named set: ``(sets, prompts, dropped)``, all by set name."""
    out, prompts, dropped = {}, {}, {}
    for name, items in sets.items():
        try:
            out[name], prompts[name], dropped[name] = prompts_within(items, encode(items), max_prompt_length)
        except ValueError as e:
            raise ValueError(f"evaluation set {name!r}: {e}") from None
    return out, prompts, dropped


def check_prompts_fit(prompts: Mapping[str, Sequence[Sequence[int]]], tokenizer, model_config,
                      max_new_tokens: int) -> None:
    """ValueError unless every token id of ``prompts`` (by set name) and the tokenizer's EOS / pad ids lie in the
    model's vocabulary, and the longest prompt plus ``max_new_tokens`` fits the model's positions (the sampler's
    cache), naming the sizes."""
    vocab = model_config.vocab_size
    for name, rows in prompts.items():
        for i, ids in enumerate(rows):
            if ids and max(ids) >= vocab:
                raise ValueError(f"the tokenizer ({len(tokenizer)} tokens) gives ids beyond the model's vocabulary "
                                 f"({vocab}): {name} prompt {i} holds id {max(ids)}; use the model's own tokenizer")
    for what in ("eos_token_id", "pad_token_id"):
        t = getattr(tokenizer, what, None)
        if t is not None and t >= vocab:
            raise ValueError(f"the tokenizer's {what}={t} is beyond the model's vocabulary ({vocab})")
    longest = max((len(ids) for rows in prompts.values() for ids in rows), default=0)
    limit = model_config.max_position_embeddings
    if longest + max_new_tokens > limit:
        raise ValueError(f"the longest prompt ({longest} tokens) plus rollout.max_new_tokens={max_new_tokens} "
                         f"does not fit the model's max_position_embeddings={limit}: lower "
                         "rollout.max_prompt_length or rollout.max_new_tokens")
