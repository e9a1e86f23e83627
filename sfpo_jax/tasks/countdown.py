"""Countdown: reach a target with the given numbers, each used at most once, and ``+ - * /`` with parentheses.

Prompt ``"3 5 7 -> 22:"``; the answer the reward receives is the spec ``"3 5 7 -> 22"``; any expression that
evaluates exactly to the target with a sub-multiset of the numbers scores 1 (``"3*5+7"``, ``"7+5*3"``). The
checker parses the expression with a small recursive-descent parser over exact fractions: nothing is evaluated by
Python, and the length and nesting are bounded.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from fractions import Fraction

import numpy as np

from sfpo_jax.tasks.arithmetic import first_line
from sfpo_jax.tasks.base import Problem, Task, split_unique

MAX_EXPRESSION_CHARS = 64
MAX_DEPTH = 16


class ExpressionError(ValueError):
    """The text is not a well-formed countdown expression."""


def _tokenize(text: str) -> list[str]:
    tokens, i = [], 0
    while i < len(text):
        c = text[i]
        if c == " ":
            i += 1
        elif c in "+-*/()":
            tokens.append(c)
            i += 1
        elif "0" <= c <= "9":
            j = i
            while j < len(text) and "0" <= text[j] <= "9":
                j += 1
            if j - i > 6:
                raise ExpressionError(f"number too long at {i}")
            tokens.append(text[i:j])
            i = j
        else:
            raise ExpressionError(f"unexpected character {c!r} at {i}")
    return tokens


def parse_expression(text: str) -> tuple[Fraction, list[int]]:
    """Value and the numbers used of an expression over non-negative integers, ``+ - * /`` and parentheses.

    Grammar: ``expr := term (('+'|'-') term)*``, ``term := atom (('*'|'/') atom)*``,
    ``atom := integer | '(' expr ')'``. No unary minus.

    Raises:
      ExpressionError: bad syntax, division by zero, longer than MAX_EXPRESSION_CHARS, deeper than MAX_DEPTH.
    """
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ExpressionError(f"longer than {MAX_EXPRESSION_CHARS} characters")
    tokens = _tokenize(text)
    pos = 0
    used: list[int] = []

    def peek():
        return tokens[pos] if pos < len(tokens) else None

    def expr(depth: int) -> Fraction:
        nonlocal pos
        value = term(depth)
        while peek() in ("+", "-"):
            op = tokens[pos]
            pos += 1
            rhs = term(depth)
            value = value + rhs if op == "+" else value - rhs
        return value

    def term(depth: int) -> Fraction:
        nonlocal pos
        value = atom(depth)
        while peek() in ("*", "/"):
            op = tokens[pos]
            pos += 1
            rhs = atom(depth)
            if op == "*":
                value = value * rhs
            elif rhs == 0:
                raise ExpressionError("division by zero")
            else:
                value = value / rhs
        return value

    def atom(depth: int) -> Fraction:
        nonlocal pos
        tok = peek()
        if tok is None:
            raise ExpressionError("unexpected end")
        if tok == "(":
            if depth >= MAX_DEPTH:
                raise ExpressionError(f"nested deeper than {MAX_DEPTH}")
            pos += 1
            value = expr(depth + 1)
            if peek() != ")":
                raise ExpressionError("missing ')'")
            pos += 1
            return value
        if tok.isdigit():
            pos += 1
            used.append(int(tok))
            return Fraction(int(tok))
        raise ExpressionError(f"unexpected {tok!r}")

    value = expr(0)
    if pos != len(tokens):
        raise ExpressionError(f"trailing {tokens[pos]!r}")
    return value, used


def format_spec(numbers: Sequence[int], target: int) -> str:
    return " ".join(map(str, numbers)) + f" -> {target}"


def parse_spec(spec: str) -> tuple[list[int], int]:
    """``"3 5 7 -> 22"`` → ``([3, 5, 7], 22)``."""
    left, _, right = spec.partition("->")
    return [int(x) for x in left.split()], int(right)


def check(completion: str, spec: str) -> bool:
    """Whether the completion's first line (``"expr"`` or ``"expr = target"``) reaches the spec's target using
    each given number at most once."""
    numbers, target = parse_spec(spec)
    text = first_line(completion).split("=", 1)[0].strip()
    try:
        value, used = parse_expression(text)
    except ExpressionError:
        return False
    return value == target and not (Counter(used) - Counter(numbers))


class CountdownTask(Task):
    """Countdown puzzles with difficulty knobs.

    A problem draws ``num_numbers`` integers in ``[1, max_number]``, combines ``uses`` of them (all by default)
    with random operators into a reference expression (division only when exact), and asks for its value as the
    target (kept in ``[1, max_target]``). The reference expression is the warm-up ``solution``.

    Args:
      num_numbers: numbers shown per problem (>= 2).
      max_number: the numbers are drawn from ``[1, max_number]``.
      ops: operators of the reference expressions, a subset of ``"+-*/"``.
      max_target: targets are in ``[1, max_target]``.
      num_train, num_eval, seed: disjoint deterministic splits.
      format_credit: reward for a completion that parses as an expression but misses (0 disables).
    """

    def __init__(
        self,
        num_numbers: int = 3,
        max_number: int = 20,
        ops: str = "+-*",
        max_target: int = 100,
        num_train: int = 5000,
        num_eval: int = 200,
        seed: int = 0,
        format_credit: float = 0.0,
    ):
        if num_numbers < 2:
            raise ValueError(f"num_numbers must be >= 2, got {num_numbers}")
        if not 2 <= max_number <= 10**6 - 1:
            raise ValueError(f"max_number must be in [2, 999999], got {max_number}")
        if not ops or set(ops) - set("+-*/"):
            raise ValueError(f"ops must be a non-empty subset of '+-*/', got {ops!r}")
        if max_target < 1:
            raise ValueError(f"max_target must be >= 1, got {max_target}")
        if not 0.0 <= format_credit < 1.0:
            raise ValueError(f"format_credit must be in [0, 1), got {format_credit}")
        self.num_numbers, self.max_number, self.ops, self.max_target = num_numbers, max_number, ops, max_target
        self.seed, self.format_credit = seed, format_credit
        self.name = f"countdown-n{num_numbers}-m{max_number}-t{max_target}-{ops}"
        self._train, self._eval = split_unique(
            self._draw, num_train, num_eval, rng=np.random.default_rng(seed), what=self.name
        )

    def _draw(self, rng: np.random.Generator):
        while True:
            numbers = sorted(int(x) for x in rng.integers(1, self.max_number + 1, size=self.num_numbers))
            order = [numbers[int(i)] for i in rng.permutation(self.num_numbers)]
            expression = str(order[0])
            value = Fraction(order[0])
            for n in order[1:]:
                op = self.ops[int(rng.integers(0, len(self.ops)))]
                if op == "/" and (n == 0 or (value / n).denominator != 1):
                    op = "+"
                # Left-to-right construction; parenthesise the running expression when precedence needs it.
                lhs = f"({expression})" if op in "*/" and any(o in expression for o in "+-") else expression
                expression = f"{lhs}{op}{n}"
                value = {"+": value + n, "-": value - n, "*": value * n, "/": value / n}[op]
            if value.denominator == 1 and 1 <= value <= self.max_target:
                spec = format_spec(numbers, int(value))
                return spec, Problem(prompt=spec + ":", answer=spec, solution=expression)

    def train_problems(self) -> list[Problem]:
        return list(self._train)

    def eval_problems(self) -> list[Problem]:
        return list(self._eval)

    def reward(self, completions: Sequence[str], answers: Sequence[str]) -> np.ndarray:
        """``[N] float32``: 1.0 where the completion's expression reaches the target with the given numbers."""
        out = np.zeros(len(completions), dtype=np.float32)
        for i, (c, a) in enumerate(zip(completions, answers, strict=True)):
            if check(c, a):
                out[i] = 1.0
            elif self.format_credit:
                try:
                    parse_expression(first_line(c).split("=", 1)[0].strip())
                    out[i] = self.format_credit
                except ExpressionError:
                    pass
        return out
