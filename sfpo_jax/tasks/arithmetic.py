"""Multi-step integer arithmetic: ``"12+7*3="`` → ``"33"``, with the usual precedence (``*`` before ``+``/``-``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sfpo_jax.tasks.base import Problem, Task, split_unique

_OPS = "+-*"


def evaluate_chain(numbers: Sequence[int], ops: Sequence[str]) -> int:
    """The value of ``n0 op0 n1 op1 n2 ...`` with ``*`` binding tighter than ``+`` and ``-`` (no eval)."""
    terms = [numbers[0]]
    signs = [1]
    for op, n in zip(ops, numbers[1:], strict=True):
        if op == "*":
            terms[-1] *= n
        else:
            terms.append(n)
            signs.append(1 if op == "+" else -1)
    return sum(s * t for s, t in zip(signs, terms, strict=True))


def first_line(text: str) -> str:
    """The completion's answer: its first line, stripped (models may keep talking after it)."""
    return text.strip().split("\n", 1)[0].strip()


class ArithmeticTask(Task):
    """Chained integer arithmetic with difficulty knobs.

    Args:
      num_operands: operands per problem (>= 2); a range ``(lo, hi)`` draws the count uniformly per problem.
      digits: operands are drawn uniformly from ``[0, 10**digits)``.
      ops: the operators to draw from, a subset of ``"+-*"``.
      num_train, num_eval: sizes of the disjoint splits.
      seed: the splits are a deterministic function of every argument.
      format_credit: reward for a wrong completion that is still an integer (0 disables partial credit).
    """

    def __init__(
        self,
        num_operands: int | tuple[int, int] = 3,
        digits: int = 1,
        ops: str = "+-*",
        num_train: int = 5000,
        num_eval: int = 200,
        seed: int = 0,
        format_credit: float = 0.0,
    ):
        lo, hi = (num_operands, num_operands) if isinstance(num_operands, int) else tuple(num_operands)
        if not 2 <= lo <= hi:
            raise ValueError(f"num_operands must be >= 2 (or a range lo <= hi with lo >= 2), got {num_operands!r}")
        if not 1 <= digits <= 6:
            raise ValueError(f"digits must be in [1, 6], got {digits}")
        if not ops or set(ops) - set(_OPS):
            raise ValueError(f"ops must be a non-empty subset of {_OPS!r}, got {ops!r}")
        if not 0.0 <= format_credit < 1.0:
            raise ValueError(f"format_credit must be in [0, 1), got {format_credit}")
        self.num_operands = (lo, hi)
        self.digits, self.ops, self.seed, self.format_credit = digits, ops, seed, format_credit
        self.name = f"arithmetic-n{lo}{'' if lo == hi else f'-{hi}'}-d{digits}-{ops}"
        self._train, self._eval = split_unique(
            self._draw, num_train, num_eval, rng=np.random.default_rng(seed), what=self.name
        )

    def _draw(self, rng: np.random.Generator):
        n = int(rng.integers(self.num_operands[0], self.num_operands[1] + 1))
        numbers = [int(x) for x in rng.integers(0, 10**self.digits, size=n)]
        ops = [self.ops[int(i)] for i in rng.integers(0, len(self.ops), size=n - 1)]
        text = "".join(f"{a}{op}" for a, op in zip(numbers, ops, strict=False)) + f"{numbers[-1]}="
        return text, Problem(prompt=text, answer=str(evaluate_chain(numbers, ops)))

    def train_problems(self) -> list[Problem]:
        return list(self._train)

    def eval_problems(self) -> list[Problem]:
        return list(self._eval)

    def reward(self, completions: Sequence[str], answers: Sequence[str]) -> np.ndarray:
        """``[N] float32``: 1.0 where the first line of the completion is exactly the answer (else 0, or
        ``format_credit`` for an integer)."""
        out = np.zeros(len(completions), dtype=np.float32)
        for i, (c, a) in enumerate(zip(completions, answers, strict=True)):
            got = first_line(c)
            if got == a:
                out[i] = 1.0
            elif self.format_credit and got.lstrip("-").isdigit() and got.isascii():
                out[i] = self.format_credit
        return out
