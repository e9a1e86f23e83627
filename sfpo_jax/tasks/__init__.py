"""Tasks for RL: the Task interface, built-in verifiable toy tasks, real math datasets, a char tokenizer.

``load_task("module.path:factory", **kwargs)`` builds any task; the built-in factories are
``sfpo_jax.tasks:arithmetic``, ``sfpo_jax.tasks:countdown`` and ``sfpo_jax.tasks:math``.
"""

from sfpo_jax.tasks.arithmetic import ArithmeticTask, evaluate_chain
from sfpo_jax.tasks.base import Problem, Task, TaskLike, load_task
from sfpo_jax.tasks.countdown import CountdownTask, ExpressionError, parse_expression
from sfpo_jax.tasks.math_task import MathTask
from sfpo_jax.tasks.tokenizer import char_tokenizer, save_char_tokenizer


def arithmetic(**kwargs) -> ArithmeticTask:
    """Factory of :class:`ArithmeticTask` (for ``--task sfpo_jax.tasks:arithmetic``)."""
    return ArithmeticTask(**kwargs)


def countdown(**kwargs) -> CountdownTask:
    """Factory of :class:`CountdownTask` (for ``--task sfpo_jax.tasks:countdown``)."""
    return CountdownTask(**kwargs)


def math(**kwargs) -> MathTask:
    """Factory of :class:`MathTask` (for ``--task sfpo_jax.tasks:math``)."""
    return MathTask(**kwargs)


BUILTIN_TASKS = {"arithmetic": arithmetic, "countdown": countdown, "math": math}

__all__ = [
    "BUILTIN_TASKS",
    "ArithmeticTask",
    "CountdownTask",
    "ExpressionError",
    "MathTask",
    "Problem",
    "Task",
    "TaskLike",
    "arithmetic",
    "char_tokenizer",
    "countdown",
    "evaluate_chain",
    "load_task",
    "math",
    "parse_expression",
    "save_char_tokenizer",
]
