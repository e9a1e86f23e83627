"""A grading worker process: ``python -P <this file>``, started by :class:`sfpo_jax.rewards.MathGrader`.

Run as a script of its own rather than through ``multiprocessing``: the ``spawn`` and ``forkserver`` start
methods re-import the caller's ``__main__`` in every worker, which breaks (or re-runs) a script without an
``if __name__ == "__main__":`` guard, and cannot work at all for code typed into a REPL. A script run by path
imports nothing of the caller's and nothing of ``sfpo_jax`` (so not JAX either): only the standard library and
math-verify. ``-P`` keeps this file's directory off ``sys.path``, where ``math.py`` would shadow the standard
``math`` module.

Protocol, over ``multiprocessing.connection.Connection`` framing: the parent writes to the worker's stdin, the
worker answers on its original stdout (fd 1 is then pointed at stderr, so stray prints cannot corrupt the
stream).

- parent → worker, once: ``{"sys_path": [...], "max_memory_mb": int}``; worker → parent: ``("ready",)`` or
  ``("startup_error", traceback_text)``.
- then per item: ``(gold, pred)`` → ``("ok", bool)`` or ``("error", False)``; ``None`` → the worker exits.

The worker ignores SIGINT (a Ctrl-C in the parent's terminal or notebook must not kill it mid-item: the parent
owns its lifetime), and exits when its stdin closes or its parent dies.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback


def grade_one(gold: str, pred: str) -> bool:
    """Whether the boxed prediction ``pred`` is equivalent to the gold answer ``gold`` (math-verify).

    Model text (``pred``) is parsed with the LaTeX extraction only (ANTLR grammar → sympy objects), never with
    the expression extractor, which hands strings to sympy's ``parse_expr`` (an ``eval``); that one is used for
    the trusted gold answers alone.
    """
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    gold_parsed = parse("\\boxed{" + gold + "}", [LatexExtractionConfig()], parsing_timeout=None)
    if not gold_parsed:
        gold_parsed = parse(gold, [LatexExtractionConfig(), ExprExtractionConfig()], parsing_timeout=None)
    if not gold_parsed:
        return False
    pred_parsed = parse(
        "\\boxed{" + pred + "}",
        [LatexExtractionConfig(boxed_match_priority=0, try_extract_without_anchor=False)],
        parsing_timeout=None,
    )
    if not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


def _exit_when_orphaned(parent: int) -> None:
    """A daemon thread: ends the process when its parent dies (an item can hang for ever, never reading EOF)."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(0)


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()
    threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True).start()

    from multiprocessing.connection import Connection

    out_fd = os.dup(1)
    os.dup2(2, 1)
    rx = Connection(0, writable=False)
    tx = Connection(out_fd, readable=False)
    try:
        config = rx.recv()
        sys.path[:] = config["sys_path"]
        max_memory_mb = config["max_memory_mb"]
        if max_memory_mb > 0:
            try:
                import resource

                limit = max_memory_mb * 1024 * 1024
                resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
            except (ImportError, ValueError, OSError):  # not on this platform: the deadline still bounds time
                pass
        import logging

        logging.getLogger("math_verify").setLevel(logging.ERROR)
        import math_verify  # noqa: F401  (imported once, before announcing readiness, so deadlines exclude it)
    except (EOFError, OSError):
        return
    except BaseException:
        try:
            tx.send(("startup_error", traceback.format_exc()))
        except OSError:
            pass
        return
    tx.send(("ready",))
    while True:
        try:
            msg = rx.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        gold, pred = msg
        try:
            result = ("ok", grade_one(gold, pred))
        except Exception:  # MemoryError, RecursionError, sympy internals: the item scores 0
            result = ("error", False)
        try:
            tx.send(result)
        except OSError:
            return


if __name__ == "__main__":
    main()
