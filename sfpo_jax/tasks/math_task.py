"""Real math datasets as a Task: problems from :func:`sfpo_jax.data.load`, reward from the math grader."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from sfpo_jax.data import DEFAULT_INSTRUCTION, load, render_prompt
from sfpo_jax.rewards import MathGrader, math_reward, paper_reward
from sfpo_jax.tasks.base import Problem, Task

_REWARDS = {"math": math_reward, "paper": paper_reward}


def _problems(name: str, split: str | None, data_dir: str | None, limit: int | None, seed: int) -> list[Problem]:
    ds = load(name, split=split, data_dir=data_dir)
    order = np.arange(len(ds))
    if limit is not None and limit < len(ds):
        order = np.sort(np.random.default_rng(seed).choice(len(ds), size=limit, replace=False))
    problems, answers = ds["problem"], ds["answer"]
    return [Problem(prompt=problems[i], answer=answers[i]) for i in order]


class MathTask(Task):
    """Train on named datasets, evaluate on others (e.g. DAPO-Math-17k + MATH train → MATH-500, AIME24, ...).

    Args:
      train: dataset name(s) for training (see ``sfpo_jax.data.SPECS``), ``train_split`` their split (default:
        each one's default split); several names are concatenated in the order given.
      eval: dataset name(s) for evaluation, ``eval_split`` their split (default: each one's default split).
        :meth:`eval_sets` keeps them apart (the trainer reports each one's accuracy); :meth:`eval_problems`
        concatenates them.
      data_dir: local files instead of the hub (see ``sfpo_jax.data.load``).
      num_train, num_eval: optional subsets of each dataset (a seeded random subset, in dataset order).
      reward: ``"paper"`` (1 / 0.1 / 0, the official SFPO runs) or ``"math"`` (1 / 0).
      tokenizer: a tokenizer or a path; its chat template wraps the prompts. None: plain text prompts.
      instruction: appended to every problem.
      grader: a MathGrader to use (default: the shared one).
    """

    def __init__(
        self,
        train: str | Sequence[str] = "math",
        eval: str | Sequence[str] = "math500",
        *,
        train_split: str | None = None,
        eval_split: str | None = None,
        data_dir: str | None = None,
        num_train: int | None = None,
        num_eval: int | None = None,
        reward: str = "paper",
        tokenizer: Any = None,
        instruction: str | None = DEFAULT_INSTRUCTION,
        seed: int = 0,
        grader: MathGrader | None = None,
    ):
        if reward not in _REWARDS:
            raise ValueError(f"reward must be one of {sorted(_REWARDS)}, got {reward!r}")
        for arg, v in (("num_train", num_train), ("num_eval", num_eval)):
            if v is not None and v < 1:
                raise ValueError(f"{arg} must be >= 1 or None, got {v}")
        train_names = [train] if isinstance(train, str) else list(train)
        eval_names = [eval] if isinstance(eval, str) else list(eval)
        for arg, names in (("train", train_names), ("eval", eval_names)):
            if not names or len(set(names)) != len(names):
                raise ValueError(f"{arg} must name one or more distinct datasets, got {names!r}")
        self.name = f"math-{'+'.join(train_names)}-{'+'.join(eval_names)}"
        self._train = [p for t in train_names for p in _problems(t, train_split, data_dir, num_train, seed)]
        self._eval = {e: _problems(e, eval_split, data_dir, num_eval, seed) for e in eval_names}
        if isinstance(tokenizer, str):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        self.tokenizer, self.instruction, self.grader = tokenizer, instruction, grader
        self._reward_fn = _REWARDS[reward]

    def train_problems(self) -> list[Problem]:
        return list(self._train)

    def eval_problems(self) -> list[Problem]:
        return [p for problems in self._eval.values() for p in problems]

    def eval_sets(self) -> dict[str, list[Problem]]:
        """The eval problems of each dataset, by dataset name (the trainer logs ``eval/<name>/accuracy``)."""
        return {name: list(problems) for name, problems in self._eval.items()}

    def render(self, problem: Problem) -> str:
        return render_prompt(problem.prompt, self.tokenizer, instruction=self.instruction)

    def reward(self, completions: Sequence[str], answers: Sequence[str]) -> np.ndarray:
        return self._reward_fn(completions, answers, grader=self.grader)
