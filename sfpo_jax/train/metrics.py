"""Training metrics as JSON lines (``OUT/metrics.jsonl``), optionally TensorBoard, and phase timers.

File format: one JSON object per line and per row, keys in the order the row was built, always with an integer
``step``. Values are Python ``int``/``float``/``bool``/``str``/``None`` (and lists or dicts of those): JAX and
NumPy scalars are converted, arrays become lists. Non-finite floats (NaN, ±inf) are written as ``null``, so every
line is strict JSON that any reader (``json``, pandas, jq) accepts; whether a step was non-finite is visible
from the value being null (the loop also counts skipped updates in its own metric).

Durability and resuming. Each row is written with one ``write`` then ``flush`` + ``fsync``, so a process killed
at any moment loses at most the row being written, which then shows as a truncated last line; :func:`read_metrics`
drops it. ``MetricsLogger(out, resume_step=s)`` keeps exactly the rows with ``step <= s`` (the last checkpoint)
and rewrites the file atomically before appending, so a run killed and resumed from step ``s`` ends with the same
``metrics.jsonl`` as an uninterrupted run, up to the keys that measure wall-clock time. Those, and only those,
start with :data:`TIME_PREFIX` (``time/...``); :func:`deterministic` drops them for comparisons.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["TIME_PREFIX", "MetricsLogger", "PhaseTimer", "deterministic", "read_metrics", "to_json_value"]

TIME_PREFIX = "time/"
"""Prefix of every wall-clock-dependent metric; everything else in a row is a pure function of the run's config."""


def to_json_value(x: Any) -> Any:
    """``x`` as plain JSON data: NumPy/JAX scalars → ``bool``/``int``/``float``, arrays → (nested) lists,
    non-finite floats → ``None``, tuples → lists, mappings → dicts with string keys."""
    if x is None or isinstance(x, bool | str):
        return x
    if isinstance(x, int):
        return int(x)
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, Mapping):
        return {str(k): to_json_value(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [to_json_value(v) for v in x]
    if hasattr(x, "__array__") or isinstance(x, np.generic):  # jax.Array, np.ndarray, NumPy scalars
        a = np.asarray(x)
        if a.ndim:
            return [to_json_value(v) for v in a]
        if a.dtype == np.bool_:
            return bool(a)
        if np.issubdtype(a.dtype, np.integer):
            return int(a)
        return to_json_value(float(a))  # float16/32/64 and bfloat16
    raise TypeError(f"cannot write a value of type {type(x).__name__} as a metric: {x!r}")


def deterministic(row: Mapping[str, Any]) -> dict[str, Any]:
    """``row`` without its wall-clock keys (those starting with :data:`TIME_PREFIX`)."""
    return {k: v for k, v in row.items() if not k.startswith(TIME_PREFIX)}


def _parse_lines(text: str, path: Path) -> list[tuple[dict[str, Any], str]]:
    """(row, line) pairs; a last line without its newline that is not valid JSON (a killed write) is dropped."""
    lines = text.split("\n")
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:  # no newline after it: the write was cut short
                break
            raise ValueError(f"{path}:{i + 1}: not a JSON object: {line[:80]!r}") from e
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{i + 1}: not a JSON object: {line[:80]!r}")
        out.append((row, line))
    return out


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` file (a directory means ``<dir>/metrics.jsonl``), tolerating a truncated
    last line. Raises ``ValueError`` naming the line for any other malformed line."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    return [row for row, _ in _parse_lines(path.read_text(), path)]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class MetricsLogger:
    """Appends metric rows to ``out_dir/metrics.jsonl`` (and TensorBoard), keeping them in :attr:`rows`.

    Args:
      out_dir: the run directory (created if missing).
      tensorboard: also write scalars with tensorboardX to ``out_dir/tensorboard`` (numbers and bools only).
      enabled: write files at all; pass ``jax.process_index() == 0`` so that one process writes. A disabled
        logger still converts rows and keeps them in :attr:`rows`.
      resume_step: None starts a fresh file (an existing one is replaced). An int ``s`` continues a run restored
        from step ``s``: rows with ``step <= s`` are kept (and loaded into :attr:`rows`), later ones dropped,
        TensorBoard events after ``s`` purged.
    """

    def __init__(
        self,
        out_dir: str | Path,
        *,
        tensorboard: bool = False,
        enabled: bool = True,
        resume_step: int | None = None,
    ):
        if resume_step is not None and (isinstance(resume_step, bool) or resume_step < 0):
            raise ValueError(f"resume_step must be None or a non-negative int, got {resume_step!r}")
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / "metrics.jsonl"
        self.enabled = enabled
        self.rows: list[dict[str, Any]] = []
        self._file = None
        self._writer = None
        kept: list[str] = []
        if resume_step is not None and self.path.exists():
            pairs = [
                (r, line)
                for r, line in _parse_lines(self.path.read_text(), self.path)
                if r.get("step", math.inf) <= resume_step
            ]
            self.rows = [r for r, _ in pairs]
            kept = [line for _, line in pairs]
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w") as f:  # atomic rewrite: a kill here leaves the old file whole
            f.write("".join(line + "\n" for line in kept))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        _fsync_dir(self.out_dir)
        self._file = open(self.path, "a")  # kept open for the run; closed in close()
        if tensorboard:
            from tensorboardX import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            self._writer = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=purge)

    def log(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """Converts ``row`` (see :func:`to_json_value`), appends it durably and returns the converted row.

        ``row`` must have an integer ``step`` greater than the previous row's."""
        step = row.get("step")
        if isinstance(step, bool) or not isinstance(to_json_value(step), int):
            raise ValueError(f"a metrics row needs an integer 'step', got {step!r}")
        converted = {str(k): to_json_value(v) for k, v in row.items()}
        if self.rows and converted["step"] <= self.rows[-1]["step"]:
            raise ValueError(f"step {converted['step']} is not after the previous row's step {self.rows[-1]['step']}")
        self.rows.append(converted)
        if self._file is not None:
            self._file.write(json.dumps(converted, allow_nan=False) + "\n")
            self._file.flush()
            os.fsync(self._file.fileno())
        if self._writer is not None:
            for key, value in converted.items():
                if key != "step" and isinstance(value, int | float):  # bools are ints
                    self._writer.add_scalar(key, float(value), global_step=converted["step"])
            self._writer.flush()
        return converted

    def close(self) -> None:
        """Closes the files (idempotent)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PhaseTimer:
    """Cumulative wall-clock seconds per phase of the loop, continued across resumes via :meth:`state`/:meth:`load`.

    ``with timer("sample"): ...`` adds the block's duration to the phase. :meth:`totals` gives ``time/<phase>``
    for every phase plus ``time/total``: the sum over the phases not in ``exclude_from_total`` (by default all but
    ``eval``), i.e. the training wall-clock that learning-efficiency comparisons use. Time spent outside any
    phase (logging, checkpointing) is not counted.
    """

    def __init__(
        self,
        phases: Sequence[str] = ("sample", "score", "update", "eval"),
        *,
        exclude_from_total: Sequence[str] = ("eval",),
    ):
        if "total" in phases:
            raise ValueError(f"phases must not contain 'total' (it is the sum), got {tuple(phases)!r}")
        self._totals: dict[str, float] = dict.fromkeys(phases, 0.0)
        self._last: dict[str, float] = {}
        self._exclude = frozenset(exclude_from_total)

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        """Times the ``with`` block as ``phase`` (a phase not given at construction is added)."""
        if phase == "total":
            raise ValueError("phase 'total' is reserved for the sum of the phases")
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self._totals[phase] = self._totals.get(phase, 0.0) + elapsed
            self._last[phase] = elapsed

    def last(self, phase: str) -> float:
        """Seconds of the most recent block timed as ``phase`` (0.0 before the first)."""
        return self._last.get(phase, 0.0)

    def totals(self) -> dict[str, float]:
        """``{"time/<phase>": cumulative seconds, ..., "time/total": training seconds}``."""
        out = {f"{TIME_PREFIX}{p}": t for p, t in self._totals.items()}
        out[f"{TIME_PREFIX}total"] = sum(t for p, t in self._totals.items() if p not in self._exclude)
        return out

    def state(self) -> dict[str, float]:
        """The cumulative totals as JSON, for a checkpoint's meta."""
        return dict(self._totals)

    def load(self, state: Mapping[str, float]) -> None:
        """Continues from totals saved by :meth:`state` (replacing the current ones)."""
        self._totals = {**dict.fromkeys(self._totals, 0.0), **{str(k): float(v) for k, v in state.items()}}
        self._last = {}
