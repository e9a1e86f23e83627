"""The Task interface the trainer consumes, and ``load_task("module.path:factory")`` for user tasks.

A task is anything with ``name``, ``train_problems()``, ``eval_problems()``, ``reward(completions, answers)`` and
``render(problem)``; subclassing :class:`Task` gives ``render`` for free. A user task fits in one file::

    # my_task.py
    from sfpo_jax.tasks import Problem, Task

    class Parity(Task):
        name = "parity"
        def train_problems(self): return [Problem(f"{n} odd?", "yes" if n % 2 else "no") for n in range(0, 900)]
        def eval_problems(self): return [Problem(f"{n} odd?", "yes" if n % 2 else "no") for n in range(900, 1000)]
        def reward(self, completions, answers):
            return np.array([c.strip() == a for c, a in zip(completions, answers)], np.float32)

    def make(**kwargs): return Parity()

and trains with ``experiments/train.py --task my_task:make``.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
import os
import sys
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np


@dataclasses.dataclass(frozen=True)
class Problem:
    """One prompt with what the reward needs to check a completion.

    Attributes:
      prompt: the problem text (``Task.render`` turns it into the model's input).
      answer: what ``Task.reward`` compares completions against (a gold answer, or a checker's spec).
      solution: a reference completion for supervised warm-up; None means ``answer`` itself.
    """

    prompt: str
    answer: str
    solution: str | None = None

    @property
    def target(self) -> str:
        """The supervised warm-up target: ``solution`` if given, else ``answer``."""
        return self.answer if self.solution is None else self.solution


@runtime_checkable
class TaskLike(Protocol):
    """The structural interface the trainer relies on (``Task`` subclasses satisfy it)."""

    name: str

    def train_problems(self) -> list[Problem]: ...

    def eval_problems(self) -> list[Problem]: ...

    def reward(self, completions: Sequence[str], answers: Sequence[str]) -> np.ndarray: ...

    def render(self, problem: Problem) -> str: ...


class Task(abc.ABC):
    """Base class of tasks: train / eval problems (disjoint, deterministic) and a reward.

    ``reward(completions, answers)`` returns ``[N] float32``; ``render(problem)`` is the prompt text the policy
    sees (default: ``problem.prompt`` unchanged).
    """

    name: str = "task"

    @abc.abstractmethod
    def train_problems(self) -> list[Problem]:
        """The training problems, in a fixed order for a fixed configuration."""

    @abc.abstractmethod
    def eval_problems(self) -> list[Problem]:
        """The held-out problems (disjoint from the training ones)."""

    @abc.abstractmethod
    def reward(self, completions: Sequence[str], answers: Sequence[str]) -> np.ndarray:
        """``[N] float32`` rewards of ``completions[i]`` against ``answers[i]``."""

    def render(self, problem: Problem) -> str:
        """The prompt text for ``problem``."""
        return problem.prompt

    def reward_metrics(self) -> dict[str, float]:
        """Counts about the latest :meth:`reward` call that a trainer logs as ``reward/<name>`` (e.g. grading
        timeouts); none by default."""
        return {}


_REQUIRED = ("name", "train_problems", "eval_problems", "reward", "render")


def load_task(name: str, **kwargs: Any) -> TaskLike:
    """Builds the built-in task ``name`` (see ``sfpo_jax.tasks.BUILTIN_TASKS``) with ``kwargs``.

    Only registered tasks: a name never imports a module (a config file naming a task cannot run code). To
    build a task from your own code, use :func:`import_task`.
    """
    from sfpo_jax.tasks import BUILTIN_TASKS

    if name not in BUILTIN_TASKS:
        hint = " (a module.path:factory is imported by task.import_factory / --task)" if ":" in str(name) else ""
        raise ValueError(f"unknown task {name!r}: built-in tasks are {sorted(BUILTIN_TASKS)}{hint}")
    return _checked(BUILTIN_TASKS[name](**kwargs), name)


def import_task(spec: str, **kwargs: Any) -> TaskLike:
    """Imports the factory ``"module.path:function"`` and returns ``function(**kwargs)``: this runs the module's
    code. The module is looked up on ``sys.path`` and then in the current directory (as ``python -m`` would),
    so ``my_task.py`` beside you works as ``my_task:make``.

    Raises:
      ValueError: the spec is malformed, the module or factory does not exist, or the factory is not callable.
      TypeError: the factory's result lacks part of the task interface (the message lists what).
    """
    module_name, _, attr = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if not module_name or not attr:
        raise ValueError(f"task factory must be 'module.path:function', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        cwd = os.getcwd()
        if cwd in sys.path or e.name != module_name.split(".")[0]:
            raise ValueError(f"task factory {spec!r}: cannot import module {module_name!r} ({e})") from e
        sys.path.insert(0, cwd)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e2:
            raise ValueError(f"task factory {spec!r}: cannot import module {module_name!r} ({e2})") from e2
        finally:
            sys.path.remove(cwd)
    factory = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise ValueError(f"task factory {spec!r}: module {module_name!r} has no attribute {attr!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise ValueError(f"task factory {spec!r}: {attr!r} is not callable")
    return _checked(factory(**kwargs), spec)


def _checked(task: Any, spec: str) -> TaskLike:
    missing = [m for m in _REQUIRED if not hasattr(task, m)]
    if missing:
        raise TypeError(f"task {spec!r} returned {type(task).__name__} without {missing}; see sfpo_jax.tasks.Task")
    return task


def split_unique(generate, num_train: int, num_eval: int, *, rng: np.random.Generator, what: str):
    """Draws unique problems with ``generate(rng) -> (key, problem)``: the first ``num_eval`` distinct keys form
    the eval split, the next ``num_train`` the train split, so the two are disjoint and the eval split does not
    depend on ``num_train``.

    Raises:
      ValueError: the problem space is too small for ``num_train + num_eval`` distinct problems.
    """
    if num_train < 0 or num_eval < 0:
        raise ValueError(f"num_train and num_eval must be >= 0, got {num_train} and {num_eval}")
    total = num_train + num_eval
    seen: set = set()
    out = []
    budget = 50 * total + 1000
    while len(out) < total and budget > 0:
        budget -= 1
        key, problem = generate(rng)
        if key not in seen:
            seen.add(key)
            out.append(problem)
    if len(out) < total:
        raise ValueError(
            f"{what}: found only {len(out)} distinct problems, but num_train + num_eval = {total}; "
            "raise the difficulty or ask for fewer problems"
        )
    return out[num_eval:], out[:num_eval]
