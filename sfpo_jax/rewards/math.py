"""Time-bounded math grading with math-verify in worker processes.

Why worker processes: math-verify parses LaTeX with latex2sympy and compares with sympy, and both can run for
ever (``\\boxed{9^{9^{9^{9}}}}``) or eat all memory. Its own timeouts use ``signal.alarm``, which only works on
the main thread, so they are switched off here (``parsing_timeout=None``, ``timeout_seconds=None``) and every
item instead runs in a persistent worker process with a deadline: a worker that misses it is killed and
replaced, the item scores 0 and is counted as a timeout. This works from any thread and grades a batch in
parallel over the workers.

Safety: model text is never executed. Only the content of the completion's last balanced ``\\boxed{}`` reaches
a worker, and it is parsed with math-verify's LaTeX extraction only (ANTLR grammar → sympy objects). The
expression extractor, which hands digits-and-operators strings to sympy's ``parse_expr`` (an ``eval``), is used
for the trusted gold answers alone. Workers also run under an address-space limit so a runaway big-integer
computation fails with MemoryError instead of taking the machine down.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import multiprocessing as mp
import os
import threading
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection, wait

import numpy as np

from sfpo_jax.rewards.extract import last_boxed

# Item outcomes, as int8 codes in GradeResult.status.
OK = 0  # graded (correct or not)
NO_ANSWER = 1  # no balanced \boxed{} in the completion: scored 0 without a worker round trip
TOO_LONG = 2  # boxed answer longer than max_answer_chars: scored 0 without a worker round trip
TIMEOUT = 3  # the worker missed its deadline and was replaced
ERROR = 4  # the worker raised (including MemoryError) or died
STATUS_NAMES = ("ok", "no_answer", "too_long", "timeout", "error")


def _clean(text) -> str:
    """A str that pickles and encodes: bytes are decoded, lone surrogates / invalid UTF-8 become U+FFFD."""
    if isinstance(text, bytes | bytearray):
        return bytes(text).decode("utf-8", errors="replace")
    text = str(text)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", errors="replace").decode("utf-8")
    return text


# ----------------------------------------------------------------------------------------------------------------
# Worker side: runs in a spawned process, imports math-verify once.


def _grade_one(gold: str, pred: str) -> bool:
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


def _worker_main(conn: Connection, max_memory_mb: int) -> None:
    if max_memory_mb > 0:
        try:
            import resource

            limit = max_memory_mb * 1024 * 1024
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        except (ImportError, ValueError, OSError):  # not on this platform: the deadline still bounds time
            pass
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    import math_verify  # noqa: F401  (import once, before announcing readiness, so deadlines exclude it)

    conn.send(("ready",))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        gold, pred = msg
        try:
            conn.send(("ok", _grade_one(gold, pred)))
        except Exception:  # MemoryError, RecursionError, sympy internals: the item scores 0
            conn.send(("error", False))


# ----------------------------------------------------------------------------------------------------------------
# Parent side.


@dataclasses.dataclass(frozen=True)
class GradeResult:
    """Per-item outcome of a batch.

    Attributes:
      correct: ``[N] bool``, True where the boxed answer is equivalent to the gold answer.
      status: ``[N] int8``, one of OK, NO_ANSWER, TOO_LONG, TIMEOUT, ERROR (names in STATUS_NAMES).
    """

    correct: np.ndarray
    status: np.ndarray

    @property
    def has_answer(self) -> np.ndarray:
        """``[N] bool``: the completion has a balanced ``\\boxed{}`` (the paper's 0.1 format credit)."""
        return self.status != NO_ANSWER

    def metrics(self) -> dict[str, int]:
        """Counts per status plus ``correct`` and ``graded`` (items), for logging."""
        out = {name: int((self.status == code).sum()) for code, name in enumerate(STATUS_NAMES)}
        out["timeouts"] = out.pop("timeout")
        out["errors"] = out.pop("error")
        out["correct"] = int(self.correct.sum())
        out["graded"] = len(self.status)
        return out


class _Worker:
    def __init__(self, ctx, max_memory_mb: int):
        parent, child = ctx.Pipe(duplex=True)
        self.conn = parent
        self.proc = ctx.Process(target=_worker_main, args=(child, max_memory_mb), daemon=True)
        self.proc.start()
        child.close()
        self.ready = False
        self.item: int | None = None
        self.deadline = 0.0

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=5)
        self.conn.close()


class MathGrader:
    """A reusable pool of grading workers.

    Workers start lazily on the first call (a spawned Python importing sympy takes about a second) and stay
    up until ``close()``; use ``with MathGrader() as g:`` or the module-level default (closed at exit).
    Calls are serialised by a lock, so one grader can be shared by threads.

    Args:
      num_workers: worker processes; default ``min(8, os.cpu_count())``.
      timeout: per-item deadline in seconds, counted from the moment a ready worker receives the item.
      max_answer_chars: boxed answers longer than this score 0 without being parsed.
      max_memory_mb: address-space limit of each worker (0 disables it).
      start_method: multiprocessing start method; "spawn" or "forkserver" (never "fork": the parent may hold
        JAX/XLA threads, and forking a threaded process is unsafe).
    """

    def __init__(
        self,
        num_workers: int | None = None,
        *,
        timeout: float = 5.0,
        max_answer_chars: int = 1000,
        max_memory_mb: int = 2048,
        start_method: str = "spawn",
    ):
        if num_workers is None:
            num_workers = max(1, min(8, os.cpu_count() or 1))
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        if max_answer_chars < 1:
            raise ValueError(f"max_answer_chars must be >= 1, got {max_answer_chars}")
        if max_memory_mb < 0:
            raise ValueError(f"max_memory_mb must be >= 0, got {max_memory_mb}")
        if start_method not in ("spawn", "forkserver"):
            raise ValueError(f"start_method must be 'spawn' or 'forkserver', got {start_method!r}")
        self.num_workers = num_workers
        self.timeout = float(timeout)
        self.max_answer_chars = max_answer_chars
        self.max_memory_mb = max_memory_mb
        self._ctx = mp.get_context(start_method)
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self._closed = False
        # Cumulative counts over every call, for a trainer that logs them.
        self.stats: dict[str, int] = dict.fromkeys((*STATUS_NAMES[:3], "timeouts", "errors", "correct", "graded"), 0)

    # -- lifecycle --------------------------------------------------------------------------------------------
    def __enter__(self) -> MathGrader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stops the workers. Idempotent; a closed grader raises on use."""
        with self._lock:
            self._closed = True
            for w in self._workers:
                if w.ready and w.item is None:  # an idle worker exits cleanly; any other is killed
                    try:
                        w.conn.send(None)
                    except OSError:
                        pass
            for w in self._workers:
                if w.ready and w.item is None:
                    w.proc.join(timeout=1)
                w.kill()
            self._workers = []

    def start(self, timeout: float = 60.0) -> MathGrader:
        """Starts the workers now and waits until they are ready (otherwise the first ``grade`` call does it).

        Raises:
          RuntimeError: a worker exits during start-up, or is not ready within ``timeout`` seconds.
        """
        with self._lock:
            self._ensure_workers()
            deadline = time.monotonic() + timeout
            for w in self._workers:
                if w.ready:
                    continue
                if not w.conn.poll(max(0.0, deadline - time.monotonic())):
                    raise RuntimeError(f"grading workers not ready after {timeout} s")
                self._receive_ready(w)
        return self

    def _receive_ready(self, w: _Worker) -> None:
        try:
            w.conn.recv()
        except (EOFError, OSError) as e:  # died while importing: retrying would loop for ever
            raise RuntimeError(
                f"a grading worker exited during start-up (exit code {w.proc.exitcode}); "
                f"max_memory_mb={self.max_memory_mb} may be too small"
            ) from e
        w.ready = True

    def _ensure_workers(self) -> None:
        if self._closed:
            raise RuntimeError("MathGrader is closed")
        for w in [w for w in self._workers if not w.proc.is_alive()]:
            w.kill()
            self._workers.remove(w)
        while len(self._workers) < self.num_workers:
            self._workers.append(_Worker(self._ctx, self.max_memory_mb))

    # -- grading ----------------------------------------------------------------------------------------------
    def grade(self, completions: Sequence[str], answers: Sequence[str]) -> GradeResult:
        """Grades ``completions[i]`` against the gold ``answers[i]``.

        Returns within about ``timeout`` seconds per item per worker, whatever the input.
        """
        if len(completions) != len(answers):
            raise ValueError(f"completions and answers differ in length: {len(completions)} != {len(answers)}")
        n = len(completions)
        correct = np.zeros(n, dtype=bool)
        status = np.full(n, OK, dtype=np.int8)
        jobs: list[tuple[int, str, str]] = []
        for i, (c, a) in enumerate(zip(completions, answers, strict=True)):
            boxed = last_boxed(_clean(c), limit=self.max_answer_chars)
            if boxed is None or not boxed.strip():
                status[i] = NO_ANSWER
            elif len(boxed) > self.max_answer_chars:
                status[i] = TOO_LONG
            else:
                jobs.append((i, _clean(a), boxed))
        if jobs:
            with self._lock:
                self._run(jobs, correct, status)
        result = GradeResult(correct=correct, status=status)
        with self._lock:
            for k, v in result.metrics().items():
                self.stats[k] += v
        return result

    def _run(self, jobs: list[tuple[int, str, str]], correct: np.ndarray, status: np.ndarray) -> None:
        self._ensure_workers()
        pending = list(reversed(jobs))
        busy: dict[Connection, _Worker] = {}
        starting: dict[Connection, _Worker] = {w.conn: w for w in self._workers if not w.ready}
        idle = [w for w in self._workers if w.ready]

        def dispatch() -> None:
            while idle and pending:
                w = idle.pop()
                i, gold, pred = pending.pop()
                try:
                    w.conn.send((gold, pred))
                except OSError:
                    pending.append((i, gold, pred))
                    replace(w)
                    continue
                w.item, w.deadline = i, time.monotonic() + self.timeout
                busy[w.conn] = w

        def replace(w: _Worker) -> None:
            w.kill()
            self._workers.remove(w)
            fresh = _Worker(self._ctx, self.max_memory_mb)
            self._workers.append(fresh)
            starting[fresh.conn] = fresh

        while pending or busy:
            dispatch()
            now = time.monotonic()
            wait_for = min((w.deadline for w in busy.values()), default=now + 1.0) - now
            ready = wait([*busy, *starting], timeout=max(0.0, wait_for))
            for conn in ready:
                if conn in starting:
                    w = starting.pop(conn)
                    self._receive_ready(w)
                    idle.append(w)
                    continue
                w = busy.pop(conn)
                try:
                    kind, value = conn.recv()
                except (EOFError, OSError):  # the worker died (e.g. killed by the OS): the item scores 0
                    status[w.item] = ERROR
                    replace(w)
                    continue
                if kind == "ok":
                    correct[w.item] = value
                else:
                    status[w.item] = ERROR
                w.item = None
                idle.append(w)
            now = time.monotonic()
            for conn, w in list(busy.items()):
                if now >= w.deadline:
                    del busy[conn]
                    status[w.item] = TIMEOUT
                    replace(w)


_DEFAULT: MathGrader | None = None
_DEFAULT_LOCK = threading.Lock()


def default_grader() -> MathGrader:
    """The shared module-level grader (created on first use, closed at interpreter exit)."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None or _DEFAULT._closed:
            _DEFAULT = MathGrader()
            atexit.register(_DEFAULT.close)
        return _DEFAULT


def math_reward(
    completions: Sequence[str], answers: Sequence[str], *, grader: MathGrader | None = None, **kwargs
) -> np.ndarray:
    """``[N] float32``: 1.0 where the last ``\\boxed{}`` of a completion is equivalent to its gold answer, else 0.

    Extra keyword arguments (prompts, ...) are accepted and ignored, as TRL-style reward functions receive them.
    Timeouts score 0 and are counted in ``grader.stats``.
    """
    del kwargs
    result = (grader or default_grader()).grade(completions, answers)
    return result.correct.astype(np.float32)


def paper_reward(
    completions: Sequence[str], answers: Sequence[str], *, grader: MathGrader | None = None, **kwargs
) -> np.ndarray:
    """``[N] float32``: the official SFPO reward: 1.0 correct boxed answer, 0.1 wrong boxed answer, 0.0 none."""
    del kwargs
    result = (grader or default_grader()).grade(completions, answers)
    return np.where(result.correct, 1.0, np.where(result.has_answer, 0.1, 0.0)).astype(np.float32)
