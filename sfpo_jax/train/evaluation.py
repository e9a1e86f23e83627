"""Held-out evaluation: pass@1 as the mean over ``k`` samples per problem (the paper's avg@k), per eval set."""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np

from sfpo_jax.parallel import all_hosts, host_share
from sfpo_jax.sampling import Sampler, SamplingConfig, prompt_bucket
from sfpo_jax.tasks import Problem
from sfpo_jax.train.checks import checked_rewards


def eval_sets_of(task, max_problems: int | None) -> dict[str, list[Problem]]:
    """The task's evaluation sets by name, each cut to ``max_problems``: ``task.eval_sets()`` when the task has
    several (an optional method, e.g. :class:`sfpo_jax.tasks.MathTask`), else ``{task.name: eval_problems()}``."""
    sets = task.eval_sets() if hasattr(task, "eval_sets") else {task.name: task.eval_problems()}
    if not sets or any(not problems for problems in sets.values()):
        raise ValueError(f"task {task.name!r} has an empty evaluation set: {[k for k, v in sets.items() if not v]}")
    return {name: list(problems)[:max_problems] for name, problems in sets.items()}


def evaluate(sampler: Sampler, params, eval_sets: dict[str, list[Problem]], encode: Callable,
             reward_fn: Callable, tokenizer, sampling: SamplingConfig, chunk_size: int, key: jax.Array
             ) -> dict[str, float]:
    """Samples ``sampling.num_samples`` completions of every eval problem and grades them.

    Args:
      sampler, params: the policy to evaluate.
      eval_sets: problems by set name; ``encode(problems) -> token-id lists`` renders and tokenises them.
      reward_fn: ``(completions, answers) -> rewards``; a reward >= 1 counts as correct.
      sampling: the evaluation's sampling controls (the paper: 4 samples at temperature 1, top_p 0.7).
      chunk_size: problems per sampler call over all processes (so evaluation needs no more memory than a
        training step, whatever the size of the eval sets); on several processes each one samples and grades its
        share of every chunk.
      key: chunk ``i`` samples with ``fold_in(key, i)``.

    Returns:
      Per set, ``eval/<set>/accuracy``, the fraction of samples with a reward >= 1 (the official trainer's
      ``val/test_score/<set>``, which zeroes the paper reward's scores below 0.95 before averaging: the curves lay
      over the paper's), and ``eval/<set>/reward``, the mean reward (with the paper's 1 / 0.1 / 0 reward it also
      credits boxed wrong answers); with several sets, first ``eval/average/accuracy`` and
      ``eval/average/reward``, the unweighted means over the sets (the paper's "Avg." column).
    """
    k, count = sampling.num_samples, jax.process_count()
    problems = [p for ps in eval_sets.values() for p in ps]
    rewards = []
    for i, start in enumerate(range(0, len(problems), chunk_size)):
        part = problems[start : start + chunk_size]
        # Pad the chunk to equal shares (repeating its last problem); the padding's rewards are dropped below.
        part = part + part[-1:] * (-len(part) % count)
        prompts = encode(part)
        local = host_share(list(zip(part, prompts, strict=True)))
        rollout = sampler.generate([ids for _, ids in local], sampling, jax.random.fold_in(key, i), params=params,
                                   prompt_length=prompt_bucket(max(map(len, prompts))))
        answers = [p.answer for p, _ in local for _ in range(k)]
        local_rewards = checked_rewards(reward_fn, rollout.texts(tokenizer), answers)
        rewards.append(all_hosts(local_rewards)[: min(chunk_size, len(problems) - start) * k])
    rewards = np.concatenate(rewards).reshape(len(problems), k)
    out, start = {}, 0
    for name, ps in eval_sets.items():
        r = rewards[start : start + len(ps)]
        out[f"eval/{name}/accuracy"], out[f"eval/{name}/reward"] = float((r >= 1.0).mean()), float(r.mean())
        start += len(ps)
    if len(eval_sets) > 1:
        average = {f"eval/average/{m}": float(np.mean([out[f"eval/{name}/{m}"] for name in eval_sets]))
                   for m in ("accuracy", "reward")}
        out = average | out
    return out
