"""Real math datasets as a Task: problems from :func:`sfpo_jax.data.load`, reward from the math grader."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from sfpo_jax.data import deduplicate, load, prompt_template, render_prompt
from sfpo_jax.rewards import MathGrader, default_grader, math_reward, paper_reward
from sfpo_jax.tasks.base import Problem, Task

_REWARDS = {"math": math_reward, "paper": paper_reward}
_MIXES = ("concat", "equal")


def _problems(
    name: str, split: str | None, data_dir: str | None, limit: int | None, seed: int, dedup: bool = False
) -> list[Problem]:
    ds = load(name, split=split, data_dir=data_dir)
    if dedup:
        ds = deduplicate(ds)
    order = np.arange(len(ds))
    if limit is not None and limit < len(ds):
        order = np.sort(np.random.default_rng(seed).choice(len(ds), size=limit, replace=False))
    problems, answers = ds["problem"], ds["answer"]
    return [Problem(prompt=problems[i], answer=answers[i]) for i in order]


def equal_mix(sources: Sequence[Sequence[Problem]], seed: int) -> list[Problem]:
    """The sources concatenated, each one resampled to the size of the largest, so that each is ``1 / len(sources)``
    of the list (and so of every epoch of a uniform shuffle of it).

    A source of ``n`` problems, to reach ``n_max``, is repeated whole ``n_max // n`` times, plus a subset of
    ``n_max % n`` of its problems (in source order) drawn with ``default_rng([seed, index of the source])``:
    deterministic, and every problem appears ``floor`` or ``ceil`` of ``n_max / n`` times.
    """
    n_max = max(len(s) for s in sources)
    out: list[Problem] = []
    for i, source in enumerate(sources):
        reps, extra = divmod(n_max, len(source))
        picks = np.sort(np.random.default_rng([seed, i]).choice(len(source), size=extra, replace=False))
        out.extend([*source] * reps + [source[j] for j in picks])
    return out


class MathTask(Task):
    """Train on named datasets, evaluate on others (e.g. DAPO-Math-17k + MATH train → MATH-500, AIME24, ...).

    Args:
      train: dataset name(s) for training (see ``sfpo_jax.data.SPECS``), ``train_split`` their split (default:
        each one's default split).
      eval: dataset name(s) for evaluation, ``eval_split`` their split (default: each one's default split).
        :meth:`eval_sets` keeps them apart (the trainer reports each one's accuracy); :meth:`eval_problems`
        concatenates them. Every row of each is kept (no de-duplication), as the official evaluation does.
      data_dir: local files instead of the hub (see ``sfpo_jax.data.load``).
      num_train, num_eval: optional subsets of each dataset (a seeded random subset, in dataset order; of the
        de-duplicated training sets).
      dedup: drop training rows whose problem text repeats an earlier row of the same dataset
        (``sfpo_jax.data.deduplicate``). The official runs train on the rows as they are; the official DAPO set is
        already de-duplicated by prompt index, a few percent of its problem texts repeat.
      train_mix: how several training sets combine. ``"concat"``: concatenated in the order given, so each is
        sampled in proportion to its size, as the official runs do (verl's ``RLHFDataset`` concatenates its
        parquet files and a uniform sampler draws from the whole; DAPO-Math-17k + MATH is about 70 / 30).
        ``"equal"``: each set is an equal share, the smaller ones repeated (see :func:`equal_mix`).
      reward: ``"paper"`` (1 / 0.1 / 0, the official SFPO runs) or ``"math"`` (1 / 0).
      tokenizer: a tokenizer or a path; its chat template wraps the prompts. None: plain text prompts.
      prompt: the user message, a name in ``sfpo_jax.data.PROMPTS`` (``"sfpo"``: the official SFPO message;
        ``"boxed"``: the problem + "Let's think step by step and output the final answer within \\boxed{}.")
        or a template containing ``{problem}``; the same for training and evaluation.
      seed: the seed of the subsets and of the equal mix.
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
        dedup: bool = True,
        train_mix: str = "concat",
        reward: str = "paper",
        tokenizer: Any = None,
        prompt: str = "boxed",
        seed: int = 0,
        grader: MathGrader | None = None,
    ):
        if reward not in _REWARDS:
            raise ValueError(f"reward must be one of {sorted(_REWARDS)}, got {reward!r}")
        if train_mix not in _MIXES:
            raise ValueError(f"train_mix must be one of {list(_MIXES)}, got {train_mix!r}")
        prompt_template(prompt)  # a ValueError naming the known prompts, before any data is loaded
        for arg, v in (("num_train", num_train), ("num_eval", num_eval)):
            if v is not None and v < 1:
                raise ValueError(f"{arg} must be >= 1 or None, got {v}")
        train_names = [train] if isinstance(train, str) else list(train)
        eval_names = [eval] if isinstance(eval, str) else list(eval)
        for arg, names in (("train", train_names), ("eval", eval_names)):
            if not names or len(set(names)) != len(names):
                raise ValueError(f"{arg} must name one or more distinct datasets, got {names!r}")
        self.name = f"math-{'+'.join(train_names)}-{'+'.join(eval_names)}"
        sources = [_problems(t, train_split, data_dir, num_train, seed, dedup) for t in train_names]
        self._train = equal_mix(sources, seed) if train_mix == "equal" else [p for s in sources for p in s]
        self._eval = {e: _problems(e, eval_split, data_dir, num_eval, seed) for e in eval_names}
        if isinstance(tokenizer, str):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        self.tokenizer, self.prompt, self.grader = tokenizer, prompt, grader
        self._reward_fn = _REWARDS[reward]

    def train_problems(self) -> list[Problem]:
        return list(self._train)

    def eval_problems(self) -> list[Problem]:
        return [p for problems in self._eval.values() for p in problems]

    def eval_sets(self) -> dict[str, list[Problem]]:
        """The eval problems of each dataset, by dataset name (the trainer logs ``eval/<name>/accuracy``)."""
        return {name: list(problems) for name, problems in self._eval.items()}

    def render(self, problem: Problem) -> str:
        return render_prompt(problem.prompt, self.tokenizer, prompt=self.prompt)

    def reward(self, completions: Sequence[str], answers: Sequence[str]) -> np.ndarray:
        return self._reward_fn(completions, answers, grader=self.grader)

    def reward_metrics(self) -> dict[str, float]:
        """The latest grading's ``timed_out`` items (per-item timeouts plus those cut off by the batch deadline,
        which score as ungraded), ``no_answer`` and ``errors`` counts."""
        result = (self.grader or default_grader()).last_result
        if result is None:
            return {}
        counts = result.metrics()
        return {name: float(counts[name]) for name in ("timed_out", "no_answer", "errors")}
