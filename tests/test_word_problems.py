"""Arithmetic word problems: seeded disjoint splits, answers recomputed from the text by an independent parser,
the paper's 1 / 0.1 / 0 reward on hand-written completions, prompt rendering (chat turns with worked examples)."""

import re

import numpy as np
import pytest

from sfpo_jax.rewards import MathGrader
from sfpo_jax.tasks import BUILTIN_TASKS, Problem, TaskLike, WordProblemTask, load_task
from sfpo_jax.tasks.word_problems import DEMOS, solve

# Each sentence of a story, as the test reads it back: (pattern, operation); the first matching pattern wins.
SENTENCES = [
    (r"^\w+ has (\d+) \w+ of \w+ with (\d+) \w+ in each\.$", "*"),
    (r"^\w+ (?:has|collects) (\d+) \w+\.$", "start"),
    (r"^(?:He|She) (?:buys|finds) (\d+) more\.$", "+"),
    (r"^A friend gives (?:him|her) (\d+) more\.$", "+"),
    (r"^(?:He|She) (?:gives (\d+) to a friend|loses (\d+) of them|gives away (\d+))\.$", "-"),
    (r"^(?:He|She) shares them equally among (\d+) friends\.$", "/"),
]


def parse(text: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """``(ops, numbers)`` of a problem, read from its sentences; its value is computed here without ``solve``."""
    *story, question = re.split(r"(?<=\.) ", text)
    assert question.startswith("How many ") and question.endswith("?"), text
    ops, numbers = [], []
    for sentence in story:
        for pattern, op in SENTENCES:
            m = re.match(pattern, sentence)
            if m:
                numbers += [int(g) for g in m.groups() if g is not None]
                if op != "start":
                    ops.append(op)
                break
        else:
            raise AssertionError(f"unparsed sentence {sentence!r} in {text!r}")
    return tuple(ops), tuple(numbers)


def value(ops, numbers) -> int:
    v, rest = numbers[0], list(numbers[1:])
    for op in ops:
        n = rest.pop(0)
        v = {"+": v + n, "-": v - n, "*": v * n, "/": v / n}[op]
    assert not rest and v == int(v)
    return int(v)


def test_splits_are_seeded_disjoint_and_sized():
    a, b, c = (WordProblemTask(num_steps=(1, 2), num_train=400, num_eval=60, seed=s) for s in (0, 0, 1))
    assert a.train_problems() == b.train_problems() and a.eval_problems() == b.eval_problems()
    assert a.train_problems() != c.train_problems() and a.eval_problems() != c.eval_problems()
    assert len(a.train_problems()) == 400 and len(a.eval_problems()) == 60 and isinstance(a, TaskLike)
    # Disjoint in their arithmetic, not only in their wording: no (operations, numbers) is in both splits. The eval
    # problems are distinct; the train split may repeat an arithmetic (its draws follow the generator).
    train = {parse(p.prompt) for p in a.train_problems()}
    evals = {parse(p.prompt) for p in a.eval_problems()}
    assert len(evals) == 60 and not train & evals


def test_both_splits_have_the_generators_mix_of_steps():
    """One-step problems are few (145 with + and - up to 10): distinct train problems would run out of them."""
    task = WordProblemTask(num_steps=(1, 2), max_value=10, num_train=2000, num_eval=64)
    one_step = [np.mean([len(parse(p.prompt)[0]) == 1 for p in ps]) for ps in (task.eval_problems(),
                                                                                 task.train_problems())]
    assert 0.35 < one_step[0] < 0.65 and 0.35 < one_step[1] < 0.65, one_step


def test_eval_split_does_not_depend_on_train_size():
    small = WordProblemTask(num_steps=(1, 2), num_train=10, num_eval=40)
    big = WordProblemTask(num_steps=(1, 2), num_train=800, num_eval=40)
    assert small.eval_problems() == big.eval_problems()


@pytest.mark.parametrize("kwargs", [
    {"num_steps": 1, "ops": "+-", "max_value": 10},
    {"num_steps": (1, 2), "ops": "+-", "max_value": 10},
    {"num_steps": (1, 3), "ops": "+-*/", "max_value": 20, "max_factor": 6},
    {"num_steps": 2, "ops": "*/", "max_factor": 9},
])
def test_answers_are_right_and_within_the_ranges(kwargs):
    task = WordProblemTask(num_train=100, num_eval=30, **kwargs)
    lo, hi = task.num_steps
    seen_ops = set()
    for p in task.train_problems() + task.eval_problems():
        ops, numbers = parse(p.prompt)
        assert p.answer == str(value(ops, numbers)) == str(solve(numbers, ops)), p
        assert int(p.answer) >= 1 and lo <= len(ops) <= hi and set(ops) <= set(task.ops), p
        assert "*" not in ops[1:] and "/" not in ops[:-1], p
        factors = [numbers[0], numbers[1]] if ops[0] == "*" else []
        divisors = [numbers[-1]] if ops[-1] == "/" else []
        assert all(2 <= n <= task.max_factor for n in factors + divisors), p
        amounts = numbers[len(factors) or 0:len(numbers) - len(divisors)]
        assert all(1 <= n <= task.max_value for n in amounts), p
        if ops[-1] == "/":
            assert p.prompt.endswith("does each friend get?")
        seen_ops |= set(ops)
    assert seen_ops == set(task.ops)


def test_solve():
    assert solve([7, 4], "-") == 3
    assert solve([3, 6, 5], "*+") == 23  # left to right: (3 * 6) + 5
    assert solve([5, 3, 4], "+/") == 2  # (5 + 3) / 4
    with pytest.raises(ValueError, match="whole number"):
        solve([7, 2], "/")


def test_paper_reward_of_hand_written_completions():
    task = WordProblemTask(num_train=20, num_eval=5, grader=MathGrader(num_workers=1))
    try:
        completions = [
            "Tom starts with 7 apples and gives away 4: 7 - 4 = 3. The answer is \\boxed{3}.",  # right
            "7 - 4 = 3, so \\boxed{3.0}",  # the same number
            "First \\boxed{2}, no: \\boxed{3}",  # the last box counts
            "7 - 4 = 2. The answer is \\boxed{2}.",  # wrong, boxed
            "\\boxed{}",  # an empty box is a (wrong) answer for the official extraction
            "The answer is 3.",  # right but not boxed
            "",
        ]
        answers = ["3"] * len(completions)
        np.testing.assert_array_equal(task.reward(completions, answers), np.float32([1, 1, 1, 0.1, 0.1, 0, 0]))
        assert task.reward_metrics() == {"no_answer": 2.0, "timed_out": 0.0, "errors": 0.0}  # logged by the trainer
        binary = WordProblemTask(num_train=20, num_eval=5, reward="math", grader=task.grader)
        np.testing.assert_array_equal(binary.reward(completions, answers), [1, 1, 1, 0, 0, 0, 0])
        # Every demo's solution is right under its own task's reward.
        demos = task.reward([d.solution for d in DEMOS], [d.answer for d in DEMOS])
        np.testing.assert_array_equal(demos, np.ones(len(DEMOS)))
    finally:
        task.grader.close()


class ChatTokenizer:
    """A stand-in for a Hugging Face tokenizer: its chat template writes each message as ``<role>content``."""

    chat_template = "stub"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        assert not tokenize
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


def test_render_with_worked_examples_as_chat_turns():
    problem = Problem("Ivy has 2 shells. She finds 5 more. How many shells does Ivy have now?", "7")
    suffix = " Let's think step by step and output the final answer within \\boxed{}."
    task = WordProblemTask(num_train=10, num_eval=5, tokenizer=ChatTokenizer(), shots=2)
    expected = "".join(f"<user>{d.prompt}{suffix}<assistant>{d.solution}" for d in DEMOS[:2])
    assert task.render(problem) == f"{expected}<user>{problem.prompt}{suffix}<assistant>"
    task = WordProblemTask(num_train=10, num_eval=5, tokenizer=ChatTokenizer(), shots=1, prompt="plain", system="S")
    assert task.render(problem) == f"<system>S<user>{DEMOS[0].prompt}<assistant>{DEMOS[0].solution}" \
        f"<user>{problem.prompt}<assistant>"
    # No shots: the data package's render_prompt (one user turn); no tokenizer: plain paragraphs.
    assert WordProblemTask(num_train=10, num_eval=5, tokenizer=ChatTokenizer()).render(problem) == \
        f"<user>{problem.prompt}{suffix}<assistant>"
    plain = WordProblemTask(num_train=10, num_eval=5, shots=1, prompt="plain").render(problem)
    assert plain == f"{DEMOS[0].prompt}\n{DEMOS[0].solution}\n\n{problem.prompt}"


def test_registered_and_loaded_by_name():
    assert "word_problems" in BUILTIN_TASKS
    task = load_task("word_problems", num_steps=[1, 2], max_value=10, num_train=50, num_eval=10)
    assert task.num_steps == (1, 2) and len(task.train_problems()) == 50


@pytest.mark.parametrize("kwargs, match", [
    ({"num_steps": 0}, "num_steps"),
    ({"num_steps": (3, 2)}, "num_steps"),
    ({"ops": "+x"}, "ops"),
    ({"ops": ""}, "ops"),
    ({"ops": "*", "num_steps": 2}, "cannot make"),
    ({"ops": "*/", "num_steps": 3}, "cannot make"),
    ({"max_value": 1}, "max_value"),
    ({"reward": "exact"}, "reward"),
    ({"prompt": "no placeholder"}, "prompt"),
    ({"shots": len(DEMOS) + 1}, "shots"),
    ({"ops": "+", "max_value": 3, "num_eval": 20}, "found only 9 distinct problems"),
    ({"ops": "+", "max_value": 3, "num_eval": 9}, "holds almost every problem"),
    ({"num_eval": 0}, "num_eval"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WordProblemTask(**{"num_train": 20, "num_eval": 5, **kwargs})
