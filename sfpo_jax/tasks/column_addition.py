"""Column addition with a written scratchpad, and a warm-up teacher that sometimes forgets to carry.

Prompt ``"358+467="``; the completion works the columns from the ones digit, writing each column's sum, then the
answer after ``;``::

    8+7=15,5+6+1=12,3+4+1=8;825

Only the answer after the last ``;`` of the first line is graded (1 if it equals the sum, else 0), so the reward
checks the result, not the working. Completions are tens of characters: with a character-level policy, sampling
is most of an RL step, as with the chains of thought of the paper's models.

The warm-up targets (``Problem.solution``) come from a *careless teacher*: at each carry it forgets the carry
with probability ``teacher_error`` (writing ``5+6=11`` where ``5+6+1=12`` is right) and carries on consistently
from its mistake, reaching a wrong answer. A policy imitating it has the skill but applies it unreliably, so its
sampled accuracy starts low and RL can raise it by making the policy carry every time: a model with latent
ability that RL elicits, as the paper's base models have for math.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sfpo_jax.tasks.arithmetic import first_line
from sfpo_jax.tasks.base import Problem, Task, split_unique

ANSWER_MARK = ";"


def column_steps(a: int, b: int, digits: int, forgets: Sequence[bool] = ()) -> tuple[str, int]:
    """The scratchpad of ``a + b`` over ``digits`` columns and the answer it reaches.

    ``forgets[i]`` drops the carry into column ``i`` (ones = 0) when there is one; the working stays consistent
    with the mistake, so the answer is wrong exactly when a carry was dropped.
    """
    steps, carry, total = [], 0, 0
    for i in range(digits):
        x, y = a // 10**i % 10, b // 10**i % 10
        if carry and i < len(forgets) and forgets[i]:
            carry = 0
        s = x + y + carry
        steps.append(f"{x}+{y}{'+1' if carry else ''}={s}")
        total += s % 10 * 10**i
        carry = s // 10
    total += carry * 10**digits
    return ",".join(steps) + ANSWER_MARK + str(total), total


def final_answer(completion: str) -> str:
    """What is graded: the text after the last ``;`` of the completion's first line (stripped), or ``""``."""
    line = first_line(completion)
    return line.rpartition(ANSWER_MARK)[2].strip() if ANSWER_MARK in line else ""


class ColumnAdditionTask(Task):
    """``digits``-digit additions with a column scratchpad; warm-up targets from a careless teacher.

    Args:
      digits: both operands have exactly this many digits, zero-padded in the prompt (``"058+467="``), so every
        column sits at a fixed position.
      teacher_error: probability that the warm-up teacher forgets a carry (per carry), in [0, 1).
      num_train, num_eval: sizes of the disjoint splits of distinct problems.
      seed: the splits and the teacher's mistakes are a deterministic function of every argument.
    """

    def __init__(self, digits: int = 3, teacher_error: float = 0.5, num_train: int = 5000, num_eval: int = 200,
                 seed: int = 0):
        if not 1 <= digits <= 6:
            raise ValueError(f"digits must be in [1, 6], got {digits}")
        if not 0.0 <= teacher_error < 1.0:
            raise ValueError(f"teacher_error must be in [0, 1), got {teacher_error}")
        self.digits, self.teacher_error, self.seed = digits, teacher_error, seed
        self.name = f"column-addition-d{digits}-e{teacher_error:g}"
        rng = np.random.default_rng(seed)
        self._train, self._eval = split_unique(self._draw, num_train, num_eval, rng=rng, what=self.name)

    def _draw(self, rng: np.random.Generator):
        a, b = (int(x) for x in rng.integers(0, 10**self.digits, size=2))
        forgets = rng.random(self.digits) < self.teacher_error
        solution, _ = column_steps(a, b, self.digits, forgets)
        prompt = f"{a:0{self.digits}d}+{b:0{self.digits}d}="
        return (a, b), Problem(prompt=prompt, answer=str(a + b), solution=solution)

    def train_problems(self) -> list[Problem]:
        return list(self._train)

    def eval_problems(self) -> list[Problem]:
        return list(self._eval)

    def reward(self, completions: Sequence[str], answers: Sequence[str]) -> np.ndarray:
        """``[N] float32``: 1.0 where the completion's final answer is exactly the sum, else 0."""
        return np.array([final_answer(c) == a for c, a in zip(completions, answers, strict=True)], np.float32)
