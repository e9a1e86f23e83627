"""Named specs of the paper's math datasets: where each lives upstream and how its rows map to problem / answer.

The official SFPO data scripts (``Code/SFPO/examples/data_preprocess/*.py`` of github.com/Urheen/SFPO) fix the
sources and the answer extraction; the specs follow them. Training:

| name              | repo id: splits                            | problem           | answer → gradeable answer      |
|-------------------|--------------------------------------------|-------------------|--------------------------------|
| dapo_math_17k     | haizhongzheng/DAPO-Math-17K-cleaned: train | prompt            | target                         |
| math              | xDAN2099/lighteval-MATH: train, test       | problem           | verl's last box of solution    |
| dapo_math_17k_raw | BytedTsinghua-SIA/DAPO-Math-17k: train     | prompt.0.content* | reward_model.ground_truth      |
| gsm8k             | openai/gsm8k (main): train, test           | question          | after ``####``, commas removed |

Evaluation (the official ``test_*.py`` scripts):

| name             | repo id: splits                     | problem  | answer → gradeable answer         |
|------------------|-------------------------------------|----------|-----------------------------------|
| math500          | HuggingFaceH4/MATH-500: test        | problem  | answer                            |
| aime24           | HuggingFaceH4/aime_2024: train      | problem  | answer                            |
| matharena_aime25 | MathArena/aime_2025: train          | problem  | answer (an integer)               |
| aimo_amc         | AI-MO/aimo-validation-amc: train    | problem  | answer (``142.0`` → ``142``), 83  |
| minerva_math     | math-ai/minervamath: test           | question | answer                            |
| olympiadbench    | math-ai/olympiadbench: test         | question | final_answer[0] without ``$``     |
| aime25           | math-ai/aime25: test                | problem  | answer (not the official AIME 25) |
| amc23            | math-ai/amc23: test                 | question | answer, 40 (not the official AMC) |

``dapo_math_17k`` is the de-duplicated, unwrapped DAPO set that ``dapo_math.py`` loads; ``dapo_math_17k_raw`` is
the original upload, which repeats each of its ~17k prompts about 100 times inside DAPO's own "Solve ... Answer:
$Answer" wrapper (*: removed here, as it contradicts a boxed-answer prompt). ``math`` takes the ground truth as
``lighteval_math.py`` does, with verl's ``remove_boxed(last_boxed_only_string(solution))``
(:func:`sfpo_jax.rewards.extract.verl_boxed`); a solution it finds no box in is an error, as it is there.

Problems are kept verbatim (only checked to be non-empty text): the official prompt inserts them unchanged.
Answers are stripped. Each spec's ``keep`` lists upstream columns carried through unchanged (e.g. MATH's
``level`` and ``type``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from sfpo_jax.rewards import last_boxed, verl_boxed


class DatasetFormatError(ValueError):
    """A row or column of a dataset does not have the upstream schema; the message names where."""


def _text(value: Any) -> str:
    """A non-empty string; numbers are accepted (AMC answers are floats upstream) and printed without ``.0``."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"expected text, got {value!r}")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"expected a finite number, got {value!r}")
        return str(int(value)) if value.is_integer() else repr(value)
    if not isinstance(value, str):
        raise ValueError(f"expected text, got {type(value).__name__}")
    if not value.strip():
        raise ValueError("empty text")
    return value.strip()


def problem_text(value: Any) -> str:
    """A problem statement: non-empty text, returned verbatim (whitespace included, as the official prompt uses it)."""
    if not isinstance(value, str):
        got = repr(value) if value is None else type(value).__name__
        raise ValueError(f"expected text, got {got}")
    if not value.strip():
        raise ValueError("empty text")
    return value


def gsm8k_answer(solution: Any) -> str:
    """``"... #### 1,234"`` → ``"1234"``."""
    text = _text(solution)
    if "####" not in text:
        raise ValueError("no '####' final-answer marker")
    answer = text.rsplit("####", 1)[1].strip().replace(",", "")
    if not answer:
        raise ValueError("nothing after '####'")
    return answer


def boxed_answer(solution: Any) -> str:
    """The last balanced ``\\boxed{}`` of a worked solution (MATH)."""
    answer = last_boxed(_text(solution))
    if answer is None or not answer.strip():
        raise ValueError("no balanced \\boxed{...} in the solution")
    return answer.strip()


def verl_boxed_answer(solution: Any) -> str:
    """The ground truth ``lighteval_math.py`` takes from a MATH solution: verl's last box (:func:`verl_boxed`)."""
    answer = verl_boxed(_text(solution))
    if answer is None or not answer.strip():
        raise ValueError("no \\boxed{...} that verl's last_boxed_only_string / remove_boxed accept in the solution")
    return answer.strip()


def first_answer(value: Any) -> str:
    """OlympiadBench's ``final_answer`` list → its first entry with ``$`` delimiters removed."""
    if isinstance(value, str) or not hasattr(value, "__len__") or len(value) == 0:
        raise ValueError(f"expected a non-empty list of answers, got {value!r}")
    return _text(_text(value[0]).replace("$", ""))


_DAPO_PREFIX = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
)
_DAPO_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'


def dapo_problem(content: Any) -> str:
    """DAPO's user message → the bare problem (its own answer-format instruction would fight the boxed one)."""
    return problem_text(problem_text(content).removeprefix(_DAPO_PREFIX).removesuffix(_DAPO_SUFFIX))


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset lives and how one upstream row becomes ``(problem, answer)``.

    Attributes:
      name: the short name ``load`` takes.
      repo_id, config: Hugging Face hub dataset id and configuration (None: the default one).
      splits: the upstream splits.
      problem_field, answer_field: paths into a row; ``.`` descends into structs, integers index lists
        (``"prompt.0.content"``).
      problem_fn, answer_fn: map the raw field value to text; raise ValueError on a malformed value.
      keep: upstream columns copied to the loaded dataset as they are.
    """

    name: str
    repo_id: str
    config: str | None
    splits: tuple[str, ...]
    problem_field: str
    answer_field: str
    problem_fn: Callable[[Any], str] = problem_text
    answer_fn: Callable[[Any], str] = _text
    keep: tuple[str, ...] = ()

    @property
    def default_split(self) -> str:
        """``"train"`` when there is one, else the first split."""
        return "train" if "train" in self.splits else self.splits[0]


SPECS: dict[str, DatasetSpec] = {
    s.name: s
    for s in (
        # Training sets of the official runs (dapo_math.py, lighteval_math.py).
        DatasetSpec("dapo_math_17k", "haizhongzheng/DAPO-Math-17K-cleaned", None, ("train",), "prompt", "target"),
        DatasetSpec(
            "math",
            "xDAN2099/lighteval-MATH",
            None,
            ("train", "test"),
            "problem",
            "solution",
            answer_fn=verl_boxed_answer,
            keep=("level", "type"),
        ),
        DatasetSpec(
            "dapo_math_17k_raw",
            "BytedTsinghua-SIA/DAPO-Math-17k",
            None,
            ("train",),
            "prompt.0.content",
            "reward_model.ground_truth",
            problem_fn=dapo_problem,
        ),
        DatasetSpec("gsm8k", "openai/gsm8k", "main", ("train", "test"), "question", "answer", answer_fn=gsm8k_answer),
        # Evaluation sets of the official runs (test_*.py).
        DatasetSpec(
            "math500", "HuggingFaceH4/MATH-500", None, ("test",), "problem", "answer", keep=("level", "subject")
        ),
        DatasetSpec("aime24", "HuggingFaceH4/aime_2024", None, ("train",), "problem", "answer"),
        DatasetSpec("matharena_aime25", "MathArena/aime_2025", None, ("train",), "problem", "answer"),
        DatasetSpec("aimo_amc", "AI-MO/aimo-validation-amc", None, ("train",), "problem", "answer"),
        DatasetSpec("minerva_math", "math-ai/minervamath", None, ("test",), "question", "answer"),
        DatasetSpec(
            "olympiadbench",
            "math-ai/olympiadbench",
            None,
            ("test",),
            "question",
            "final_answer",
            answer_fn=first_answer,
        ),
        # Other mirrors of AIME 2025 and AMC (not the official evaluation's).
        DatasetSpec("aime25", "math-ai/aime25", None, ("test",), "problem", "answer"),
        DatasetSpec("amc23", "math-ai/amc23", None, ("test",), "question", "answer"),
    )
}
