"""Time-bounded math grading with math-verify in worker processes.

Why worker processes: math-verify parses LaTeX with latex2sympy and compares with sympy, and both can run for
ever (``\\boxed{9^{9^{9^{9}}}}``) or eat all memory. Its own timeouts use ``signal.alarm``, which only works on
the main thread, so they are switched off here (``parsing_timeout=None``, ``timeout_seconds=None``) and every
item instead runs in a persistent worker process with a deadline: a worker that misses it is killed and
replaced, the item scores 0 and is counted as a timeout. This works from any thread and grades a batch in
parallel over the workers. A whole batch also has a deadline that scales with its size, not with its count of
hanging items: one item ``timeout`` (what its hanging items would cost if they all ran in parallel) plus
``item_seconds`` for each round of the other items over the workers, capped at ``batch_timeout``. Items still
ungraded when it passes score 0 and are counted (status ``deadline``): 8 hanging answers on 2 workers cost about
one timeout, not four in a row.

The workers are plain ``python -P .../rewards/_worker.py`` subprocesses talking over pipes, not
``multiprocessing`` children: the ``spawn``/``forkserver`` start methods re-import the caller's ``__main__``,
which breaks scripts without an ``if __name__ == "__main__":`` guard and code typed into a REPL. They import
neither the caller's code nor JAX; they see the caller's ``sys.path``.

Safety: model text is never executed. Only the extracted boxed answer reaches a worker, and it is parsed with
math-verify's LaTeX extraction only (ANTLR grammar → sympy objects). The expression extractor, which hands
digits-and-operators strings to sympy's ``parse_expr`` (an ``eval``), is used for the trusted gold answers
alone. Workers also run under an address-space limit so a runaway big-integer computation fails with
MemoryError instead of taking the machine down.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait

import numpy as np

from sfpo_jax.rewards.extract import last_boxed, verl_boxed

# Item outcomes, as int8 codes in GradeResult.status.
OK = 0  # graded (correct or not)
NO_ANSWER = 1  # no boxed answer in the completion: scored 0 without a worker round trip
TOO_LONG = 2  # boxed answer longer than max_answer_chars: scored as wrong without a worker round trip
TIMEOUT = 3  # the worker missed the item's deadline and was replaced
ERROR = 4  # the worker raised (including MemoryError) or died
EMPTY = 5  # boxed answer empty or blank (``\boxed{}``): scored as wrong without a worker round trip
DEADLINE = 6  # not graded before the batch deadline: scored as wrong
STATUS_NAMES = ("ok", "no_answer", "too_long", "timeout", "error", "empty", "deadline")

_WORKER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_worker.py")


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


@dataclasses.dataclass(frozen=True)
class GradeResult:
    """Per-item outcome of a batch.

    Attributes:
      correct: ``[N] bool``, True where the boxed answer is equivalent to the gold answer.
      status: ``[N] int8``, one of OK, NO_ANSWER, TOO_LONG, TIMEOUT, ERROR, EMPTY, DEADLINE (names in
        STATUS_NAMES).
      elapsed: wall-clock seconds the ``grade`` call took.
    """

    correct: np.ndarray
    status: np.ndarray
    elapsed: float = 0.0

    @property
    def has_answer(self) -> np.ndarray:
        """``[N] bool``: the completion has a boxed answer, possibly empty (the paper's 0.1 format credit)."""
        return self.status != NO_ANSWER

    @property
    def timed_out(self) -> int:
        """Items not graded in time: per-item timeouts plus those cut off by the batch deadline."""
        return int(((self.status == TIMEOUT) | (self.status == DEADLINE)).sum())

    def math_rewards(self) -> np.ndarray:
        """``[N] float32``: 1.0 correct, else 0.0 (``math_reward``)."""
        return self.correct.astype(np.float32)

    def paper_rewards(self) -> np.ndarray:
        """``[N] float32``: 1.0 correct, 0.1 boxed but not correct (or not graded in time), 0.0 no box."""
        return np.where(self.correct, 1.0, np.where(self.has_answer, 0.1, 0.0)).astype(np.float32)

    def metrics(self) -> dict[str, int]:
        """Counts per status (``timeouts``, ``errors``, ``deadline``, ...), ``timed_out`` (timeouts + deadline),
        ``correct`` and ``graded`` (items), for logging."""
        out = {name: int((self.status == code).sum()) for code, name in enumerate(STATUS_NAMES)}
        out["timeouts"] = out.pop("timeout")
        out["errors"] = out.pop("error")
        out["timed_out"] = out["timeouts"] + out["deadline"]
        out["correct"] = int(self.correct.sum())
        out["graded"] = len(self.status)
        return out


class _Worker:
    """One ``python -P _worker.py`` subprocess; ``conn`` receives from it (and is what ``wait`` watches)."""

    def __init__(self, max_memory_mb: int):
        if not sys.executable:
            raise RuntimeError("cannot start grading workers: sys.executable is empty (an embedded interpreter?)")
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-P", _WORKER_SCRIPT], stdin=to_child_r, stdout=from_child_w, close_fds=True
            )
        except BaseException:
            os.close(to_child_w)
            os.close(from_child_r)
            raise
        finally:
            os.close(to_child_r)
            os.close(from_child_w)
        self.conn = Connection(from_child_r, writable=False)
        self.tx = Connection(to_child_w, readable=False)
        self.ready = False
        self.spawned = time.monotonic()
        self.item: int | None = None
        self.deadline = 0.0
        try:
            self.tx.send({"sys_path": list(sys.path), "max_memory_mb": max_memory_mb})
        except OSError:  # it died at once: the start-up check reports how
            pass

    def alive(self) -> bool:
        return self.proc.poll() is None

    def how_it_ended(self) -> str:
        try:
            code = self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            return "closed its pipe but is still running"
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            hint = " (the kernel's out-of-memory killer sends SIGKILL)" if -code == signal.SIGKILL else ""
            return f"was killed by {name}{hint}"
        return f"exited with code {code}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self.conn.close()
        self.tx.close()


class MathGrader:
    """A reusable pool of grading workers.

    Workers start lazily on the first call (a fresh Python importing sympy takes about a second) and stay
    up until ``close()``; use ``with MathGrader() as g:`` or the module-level default (closed at exit).
    Calls are serialised by a lock, so one grader can be shared by threads. Works from scripts with or without
    a ``__main__`` guard, notebooks and the REPL.

    Args:
      num_workers: worker processes; default ``min(8, os.cpu_count())``.
      timeout: per-item deadline in seconds, counted from the moment a ready worker receives the item.
      batch_timeout: the most seconds the grading of a whole ``grade`` call may take (None: no cap); see
        :meth:`batch_seconds` for the deadline itself. Counted once the call has a ready worker (after the
        linear-time answer extraction, and after any other thread's call); items not graded by then get status
        DEADLINE (not correct) and in-flight workers are replaced.
      item_seconds: the batch deadline's allowance per answer and worker (None: the deadline is ``batch_timeout``
        alone, whatever the batch). math-verify takes ~10-50 ms for an ordinary answer, so the default leaves
        10x room for a loaded machine.
      max_answer_chars: boxed answers longer than this are not parsed (scored as wrong).
      max_memory_mb: address-space limit of each worker (0 disables it).

    Attributes:
      stats: cumulative ``GradeResult.metrics()`` counts over every call.
      last_result: the GradeResult of the latest call (None before the first), e.g. for a trainer to log
        ``last_result.metrics()["timed_out"]`` after calling ``math_reward``/``paper_reward``.
    """

    def __init__(
        self,
        num_workers: int | None = None,
        *,
        timeout: float = 5.0,
        batch_timeout: float | None = 60.0,
        item_seconds: float | None = 0.5,
        max_answer_chars: int = 1000,
        max_memory_mb: int = 2048,
    ):
        if num_workers is None:
            num_workers = max(1, min(8, os.cpu_count() or 1))
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        if batch_timeout is not None and not batch_timeout > 0:
            raise ValueError(f"batch_timeout must be > 0 seconds or None, got {batch_timeout}")
        if item_seconds is not None and not item_seconds >= 0:
            raise ValueError(f"item_seconds must be >= 0 seconds or None, got {item_seconds}")
        if max_answer_chars < 1:
            raise ValueError(f"max_answer_chars must be >= 1, got {max_answer_chars}")
        if max_memory_mb < 0:
            raise ValueError(f"max_memory_mb must be >= 0, got {max_memory_mb}")
        self.num_workers = num_workers
        self.timeout = float(timeout)
        self.batch_timeout = None if batch_timeout is None else float(batch_timeout)
        self.item_seconds = None if item_seconds is None else float(item_seconds)
        self.startup_seconds = 0.0
        self.max_answer_chars = max_answer_chars
        self.max_memory_mb = max_memory_mb
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self._closed = False
        self.stats: dict[str, int] = dict.fromkeys(GradeResult(np.zeros(0, bool), np.zeros(0, np.int8)).metrics(), 0)
        self.last_result: GradeResult | None = None

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
                        w.tx.send(None)
                    except OSError:
                        pass
            for w in self._workers:
                if w.ready and w.item is None:
                    try:
                        w.proc.wait(timeout=1)
                    except subprocess.TimeoutExpired:
                        pass
                w.kill()
            self._workers = []

    def start(self, timeout: float = 60.0) -> MathGrader:
        """Starts the workers now and waits until they are ready (otherwise the first ``grade`` call does it).

        Raises:
          RuntimeError: a worker fails during start-up (the message says why), or is not ready within
            ``timeout`` seconds.
        """
        with self._lock:
            self._ensure_workers()
            deadline = time.monotonic() + timeout
            for w in list(self._workers):
                if w.ready:
                    continue
                if not w.conn.poll(max(0.0, deadline - time.monotonic())):
                    raise RuntimeError(f"grading workers not ready after {timeout} s")
                self._receive_ready(w)
        return self

    def _receive_ready(self, w: _Worker) -> None:
        """Reads a starting worker's first message; raises with the reason when it failed to start."""
        try:
            msg = w.conn.recv()
        except (EOFError, OSError):
            msg = None
        if msg is not None and msg[0] == "ready":
            w.ready = True
            # What replacing a killed worker costs: the slowest start-up seen (a loaded machine: several seconds).
            self.startup_seconds = max(self.startup_seconds, time.monotonic() - w.spawned)
            return
        # Retrying would fail the same way for ever: drop the worker and say why.
        self._workers.remove(w)
        if msg is None:
            w.kill()
            raise RuntimeError(
                f"a grading worker {w.how_it_ended()} during start-up, before reporting an error "
                f"(its stderr, above, may say more; {sys.executable} -P {_WORKER_SCRIPT})"
            )
        w.kill()
        tb = str(msg[1])
        cause = tb.strip().splitlines()[-1] if tb.strip() else "unknown error"
        hint = ""
        if "MemoryError" in cause:
            hint = f"; max_memory_mb={self.max_memory_mb} is too small to import math-verify (raise it; 0: no limit)"
        raise RuntimeError(f"a grading worker failed to start: {cause}{hint}\n\nworker traceback:\n{tb}")

    def _ensure_workers(self) -> None:
        if self._closed:
            raise RuntimeError("MathGrader is closed")
        for w in [w for w in self._workers if not w.alive()]:
            w.kill()
            self._workers.remove(w)
        while len(self._workers) < self.num_workers:
            self._workers.append(_Worker(self.max_memory_mb))

    def batch_seconds(self, num_answers: int) -> float | None:
        """The grading deadline of a batch of ``num_answers`` boxed answers, in seconds (None: none): ``timeout``
        + the slowest worker start-up seen (what replacing a hung worker costs) + ``item_seconds`` x
        ceil(num_answers / num_workers), at most ``batch_timeout``. Hanging answers then cost about one timeout
        together, however many they are, instead of one per worker round."""
        if self.item_seconds is None:
            return self.batch_timeout
        rounds = -(-num_answers // self.num_workers)
        scaled = self.timeout + self.startup_seconds + self.item_seconds * rounds
        return scaled if self.batch_timeout is None else min(scaled, self.batch_timeout)

    # -- grading ----------------------------------------------------------------------------------------------
    def grade(
        self,
        completions: Sequence[str],
        answers: Sequence[str],
        *,
        extract: Callable[[str], str | None] | None = None,
    ) -> GradeResult:
        """Grades ``completions[i]`` against the gold ``answers[i]``.

        ``extract`` maps a completion to its answer (None: no answer); default :func:`last_boxed`, and
        :func:`verl_boxed` gives the official SFPO extraction. Extraction is linear in the text's length; the
        grading then takes at most about ``batch_timeout`` seconds, and each item at most about ``timeout``.
        """
        if len(completions) != len(answers):
            raise ValueError(f"completions and answers differ in length: {len(completions)} != {len(answers)}")
        t0 = time.monotonic()
        n = len(completions)
        correct = np.zeros(n, dtype=bool)
        status = np.full(n, OK, dtype=np.int8)
        jobs: list[tuple[int, str, str]] = []
        for i, (c, a) in enumerate(zip(completions, answers, strict=True)):
            text = _clean(c)
            boxed = last_boxed(text, limit=self.max_answer_chars) if extract is None else extract(text)
            if boxed is None:
                status[i] = NO_ANSWER
            elif not boxed.strip():
                status[i] = EMPTY
            elif len(boxed) > self.max_answer_chars:
                status[i] = TOO_LONG
            else:
                jobs.append((i, _clean(a), boxed))
        if jobs:
            with self._lock:
                self._run(jobs, correct, status)
        result = GradeResult(correct=correct, status=status, elapsed=time.monotonic() - t0)
        with self._lock:
            for k, v in result.metrics().items():
                self.stats[k] += v
            self.last_result = result
        return result

    def _run(self, jobs: list[tuple[int, str, str]], correct: np.ndarray, status: np.ndarray) -> None:
        """Grades ``jobs`` over the workers within :meth:`batch_seconds`.

        A worker that has spent ``item_seconds`` on one item is probably on a hanging one: a spare worker takes
        its place for the rest of the queue (at most ``num_workers`` spares at a time, so memory stays within
        twice the pool's), so that hanging items wait for their timeouts side by side while the other items are
        still graded. The spares are stopped when the call ends."""
        self._ensure_workers()
        pending = list(reversed(jobs))
        busy: dict[Connection, _Worker] = {}
        starting: dict[Connection, _Worker] = {w.conn: w for w in self._workers if not w.ready}
        idle = [w for w in self._workers if w.ready]
        # The deadline runs while some worker is up: replacements of killed workers (of this batch or the previous
        # one) may all be starting (a second, several on a loaded machine), which must not eat the batch's budget.
        budget = self.batch_seconds(len(jobs)) if idle else None
        deadline = None if budget is None else time.monotonic() + budget

        def dispatch() -> None:
            while idle and pending:
                w = idle.pop()
                i, gold, pred = pending.pop()
                try:
                    w.tx.send((gold, pred))
                except OSError:
                    pending.append((i, gold, pred))
                    replace(w)
                    continue
                w.item, w.deadline = i, time.monotonic() + self.timeout
                busy[w.conn] = w

        def replace(w: _Worker | None) -> None:
            if w is not None:
                w.kill()
                self._workers.remove(w)
            fresh = _Worker(self.max_memory_mb)
            self._workers.append(fresh)
            starting[fresh.conn] = fresh

        finished = False
        try:
            while pending or busy:
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    break
                dispatch()
                for _ in range(self._spares_wanted(busy.values(), now) if pending else 0):
                    replace(None)
                wake = min((w.deadline for w in busy.values()), default=now + 1.0)
                if self.item_seconds is not None and pending:  # when a busy worker turns slow
                    wake = min([wake, *(w.deadline - self.timeout + self.item_seconds for w in busy.values()
                                        if w.deadline - self.timeout + self.item_seconds > now)])
                if deadline is not None:
                    wake = min(wake, deadline)
                stalled = not busy and not idle  # every worker is starting: that time is not the batch's
                ready = wait([*busy, *starting], timeout=max(0.0, wake - now))
                if stalled and deadline is not None:
                    deadline += time.monotonic() - now
                for conn in ready:
                    if conn in starting:
                        w = starting.pop(conn)
                        self._receive_ready(w)
                        idle.append(w)
                        if deadline is None and (budget := self.batch_seconds(len(jobs))) is not None:
                            deadline = time.monotonic() + budget
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
            finished = True
        finally:
            self._end_batch(pending, busy, status, replace if finished else None)

    def _spares_wanted(self, busy, now: float) -> int:
        """How many workers to add: one per busy worker past ``item_seconds`` on its item, beyond the spares
        already up, with at most ``num_workers`` spares in all."""
        if self.item_seconds is None:
            return 0
        slow = sum(now >= w.deadline - self.timeout + self.item_seconds for w in busy)
        spares = len(self._workers) - self.num_workers
        return max(0, min(slow, self.num_workers) - spares)

    def _end_batch(self, pending, busy: dict, status: np.ndarray, replace: Callable | None) -> None:
        """After the loop: what is not graded scores 0 as DEADLINE (the batch deadline passed, or an exception
        such as KeyboardInterrupt is on its way); in-flight workers are killed, so that none answers a later
        call, and replaced (``replace``; None: not), then the pool is cut back to ``num_workers``."""
        for i, _, _ in pending:
            status[i] = DEADLINE
        for w in list(busy.values()):
            status[w.item] = DEADLINE
            if replace is not None:
                replace(w)  # the replacement starts in the background, ready for the next call
            else:
                w.kill()
                self._workers.remove(w)
        surplus = len(self._workers) - self.num_workers  # the spares: those still starting go first
        for w in sorted(self._workers, key=lambda w: w.ready)[: max(0, surplus)]:
            w.kill()
            self._workers.remove(w)


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
    Timeouts and items cut off by the batch deadline score 0; the call's GradeResult (counts in
    ``.metrics()``) is ``grader.last_result`` (``default_grader().last_result`` without ``grader``).
    """
    del kwargs
    return (grader or default_grader()).grade(completions, answers).math_rewards()


def paper_reward(
    completions: Sequence[str], answers: Sequence[str], *, grader: MathGrader | None = None, **kwargs
) -> np.ndarray:
    """``[N] float32``: the official SFPO reward: 1.0 correct boxed answer, 0.1 other boxed answer, 0.0 none.

    The answer is extracted as the official code does (:func:`verl_boxed`: ``\\boxed{}`` is a wrong answer,
    worth 0.1; ``\\fbox{3}`` is no answer). A boxed answer not graded in time (item timeout, batch deadline)
    keeps its 0.1, as the official reward gives 0.1 when math-verify's own timeout fires. The call's
    GradeResult is ``grader.last_result``.
    """
    del kwargs
    return (grader or default_grader()).grade(completions, answers, extract=verl_boxed).paper_rewards()
