"""Tasks for RL: the Task interface, built-in verifiable toy tasks, real math datasets, a char tokenizer.

``load_task(name, **kwargs)`` builds a built-in task (:data:`BUILTIN_TASKS`: ``arithmetic``,
``column_addition``, ``countdown``, ``math``, ``word_problems``); ``import_task("module.path:factory", **kwargs)``
imports and calls your own factory.
"""

from sfpo_jax.tasks.arithmetic import ArithmeticTask, evaluate_chain
from sfpo_jax.tasks.base import Problem, Task, TaskLike, import_task, load_task
from sfpo_jax.tasks.column_addition import ColumnAdditionTask
from sfpo_jax.tasks.countdown import CountdownTask, ExpressionError, parse_expression
from sfpo_jax.tasks.math_task import MathTask
from sfpo_jax.tasks.tokenizer import RAW_CHAT_TEMPLATE, char_tokenizer, save_char_tokenizer
from sfpo_jax.tasks.word_problems import WordProblemTask


def arithmetic(**kwargs) -> ArithmeticTask:
    """Factory of :class:`ArithmeticTask` (for ``--task sfpo_jax.tasks:arithmetic``)."""
    return ArithmeticTask(**kwargs)


def column_addition(**kwargs) -> ColumnAdditionTask:
    """Factory of :class:`ColumnAdditionTask` (for ``--task sfpo_jax.tasks:column_addition``)."""
    return ColumnAdditionTask(**kwargs)


def countdown(**kwargs) -> CountdownTask:
    """Factory of :class:`CountdownTask` (for ``--task sfpo_jax.tasks:countdown``)."""
    return CountdownTask(**kwargs)


def math(**kwargs) -> MathTask:
    """Factory of :class:`MathTask` (for ``--task sfpo_jax.tasks:math``)."""
    return MathTask(**kwargs)


def word_problems(**kwargs) -> WordProblemTask:
    """Factory of :class:`WordProblemTask` (for ``--task sfpo_jax.tasks:word_problems``)."""
    return WordProblemTask(**kwargs)


BUILTIN_TASKS = {"arithmetic": arithmetic, "column_addition": column_addition, "countdown": countdown, "math": math,
                 "word_problems": word_problems}

__all__ = [
    "BUILTIN_TASKS",
    "RAW_CHAT_TEMPLATE",
    "ArithmeticTask",
    "ColumnAdditionTask",
    "CountdownTask",
    "ExpressionError",
    "MathTask",
    "Problem",
    "Task",
    "TaskLike",
    "WordProblemTask",
    "arithmetic",
    "char_tokenizer",
    "column_addition",
    "countdown",
    "evaluate_chain",
    "import_task",
    "load_task",
    "math",
    "parse_expression",
    "save_char_tokenizer",
    "word_problems",
]
