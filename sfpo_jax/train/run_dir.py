"""A run's output folder: ``config.yaml``, ``metrics.jsonl`` and ``checkpoints/``, opened fresh or resumed.

Nothing is overwritten by mistake and nothing is written before it is known to be right:

- one run at a time: the folder is locked (``.lock``, an exclusive ``flock`` held for the whole run and released
  by the kernel when the process dies, so it is never stale); a second run on it refuses at once, naming the
  holder's pid and host. ``flock`` is reliable on local disks; on NFS it depends on the server;
- a fresh run refuses a folder that already holds checkpoints or metric rows (``--resume`` continues it); one with
  neither (a run that failed before its first step) counts as fresh;
- a resumed run of a folder with metric rows but no checkpoint (stopped before its first save, e.g. on a full
  disk) starts at step 0 and says so, keeping the old rows in ``metrics.jsonl.no-checkpoint`` rather than
  truncating them;
- a resumed run refuses a config that differs from the stored one in a field that changes the training
  trajectory (naming the fields; :data:`RESUMABLE_FIELDS` may change, e.g. ``run.steps``);
- it resumes from the newest checkpoint that reads back, saying which unreadable ones it skipped, or names the
  files to delete when none does;
- ``config.yaml`` is written last, after the checkpoint and ``metrics.jsonl`` have been validated.
"""

from __future__ import annotations

import fcntl
import os
import socket
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from sfpo_jax.train.checkpointer import Checkpointer
from sfpo_jax.train.config import Config, save_config, to_dict
from sfpo_jax.train.metrics import MetricsLogger

# Settings a resumed run may change without changing what it computes for the steps it shares with the first.
RESUMABLE_FIELDS = frozenset({
    "run.steps", "run.out", "run.progress", "run.tensorboard", "run.checkpoint_every", "run.keep_checkpoints",
    "run.max_nonfinite_in_a_row",
})


class ResumeError(RuntimeError):
    """The run folder cannot be resumed (or overwritten) as asked; the message says what to do."""


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in data.items():
        if isinstance(v, Mapping) and not (prefix and k in ("kwargs", "warmup")):
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(stored: Mapping[str, Any], current: Config) -> list[str]:
    """The dotted fields whose value in ``current`` differs from the ``stored`` config dict, except
    :data:`RESUMABLE_FIELDS` (a missing or new field counts as a change)."""
    old, new = _flatten(stored), _flatten(to_dict(current))
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k, ...) != new.get(k, ...))
    return [k for k in changed if k not in RESUMABLE_FIELDS]


class FolderLock:
    """An exclusive, non-blocking ``flock`` on ``<folder>/.lock`` holding ``"pid <pid> on <host>"``; ResumeError
    naming the holder when another process has it. :meth:`release` is idempotent."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / ".lock"
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "an unknown process"
            os.close(fd)
            raise ResumeError(f"{folder} is in use by another run ({holder}): wait for it to end, or use another "
                              "--out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the file releases the flock
            self._fd = None


def metric_rows(path: Path) -> int:
    """How many rows ``metrics.jsonl`` holds (non-empty lines, unparsed; 0 when there is no file)."""
    if not path.exists():
        return 0
    with path.open() as f:
        return sum(1 for line in f if line.strip())


class RunDir:
    """The output folder of one run (``cfg.run.out``); see the module docstring.

    Use: ``with RunDir(cfg, resume=...) as run:``, ``state, meta = run.restore(initial_state)``, then :meth:`log`
    rows and :meth:`save` checkpoints; leaving the block (or :meth:`close`) releases the folder.
    """

    def __init__(self, cfg: Config, *, resume: bool, is_main: bool = True):
        self.cfg, self.resume, self.is_main = cfg, resume, is_main
        self.out = Path(cfg.run.out)
        self.resume_step: int | None = None
        self.logger: MetricsLogger | None = None
        self.checkpointer: Checkpointer | None = None
        # Locked before the checkpointer opens: opening it deletes temporary checkpoints, e.g. another run's.
        self._lock = FolderLock(self.out) if is_main else None
        try:
            self.checkpointer = Checkpointer(self.out / "checkpoints", keep=cfg.run.keep_checkpoints)
            self._check_folder()
        except BaseException:
            self.close()
            raise

    def _check_folder(self) -> None:
        rows, steps = metric_rows(self.out / "metrics.jsonl"), self.checkpointer.all_steps()
        if not self.resume and (steps or rows):
            raise ResumeError(f"{self.out} already holds a run ({'checkpoints' if steps else 'metrics.jsonl'}"
                              "): pass --resume to continue it, or use a new --out")
        if self.resume and steps:
            self._check_config()
        elif self.resume and rows and self.is_main:
            kept = self.out / "metrics.jsonl.no-checkpoint"
            (self.out / "metrics.jsonl").replace(kept)
            warnings.warn(f"{self.out} has {rows} metric rows but no checkpoint (the run stopped before its first "
                          f"save): starting again at step 0; the old rows are kept in {kept}", stacklevel=3)

    def _check_config(self) -> None:
        path = self.out / "config.yaml"
        if not path.exists():
            raise ResumeError(f"cannot resume {self.out}: its config.yaml is missing, so exactness cannot be checked")
        changed = config_changes(yaml.safe_load(path.read_text()) or {}, self.cfg)
        if changed:
            raise ResumeError(f"cannot resume {self.out}: the config differs from the stored {path} in {changed}, "
                              "which would break exact resume (only "
                              f"{sorted(RESUMABLE_FIELDS)} may change); use a new --out")

    def restore(self, state: Any) -> tuple[Any, dict[str, Any]]:
        """``(state, meta)`` to continue from: the newest readable checkpoint when resuming, else
        ``(state, {"step": 0, "timer": {}})``; ``meta`` also holds what :meth:`save` was given as ``extra`` (e.g.
        the rollout side's position). Then opens ``metrics.jsonl`` (keeping the rows up to that step) and writes
        ``config.yaml``."""
        meta: dict[str, Any] = {"step": 0, "timer": {}}
        step = 0
        if self.resume:
            steps = self.checkpointer.all_steps()
            for candidate in reversed(steps):
                try:
                    state, meta = self.checkpointer.restore(candidate, target=state)
                    meta = dict(meta)
                except Exception as e:  # orbax / TensorStore errors name neither the step nor the file
                    warnings.warn(f"checkpoint step {candidate} in {self.checkpointer.directory} is unreadable "
                                  f"({type(e).__name__}: {str(e).splitlines()[0][:300]}); trying an older one",
                                  stacklevel=2)
                    continue
                step = meta["step"]
                if candidate != steps[-1]:
                    newer = [s for s in steps if s > candidate]
                    for s in newer:  # unreadable; later saves must come after the step resumed from
                        self.checkpointer.delete(s)
                    warnings.warn(f"resuming {self.out} from step {step}, the newest intact checkpoint (deleted the "
                                  f"unreadable steps {newer})", stacklevel=2)
                break
            else:
                if steps:
                    raise ResumeError(f"no checkpoint in {self.checkpointer.directory} can be read (steps {steps}); "
                                      f"delete {self.out} to start over, or restore its checkpoints from a backup")
            self.resume_step = step
        self.logger = MetricsLogger(self.out, tensorboard=self.cfg.run.tensorboard, enabled=self.is_main,
                                    resume_step=self.resume_step)
        if self.is_main:
            save_config(self.cfg, self.out / "config.yaml")
        return state, meta

    def log(self, row: Mapping[str, Any]) -> None:
        self.logger.log(row)

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self.logger.rows

    def save(self, step: int, state: Any, timer_state: Mapping[str, float], **extra: Any) -> None:
        """Checkpoints ``state`` as ``step`` (with the phase timer's totals, the config and the JSON-serialisable
        ``extra`` entries, returned in :meth:`restore`'s ``meta``)."""
        self.checkpointer.save(step, state, {"step": step, "timer": dict(timer_state), "config": to_dict(self.cfg),
                                             **extra})

    def close(self) -> None:
        """Closes the checkpointer and the metrics, then releases the folder's lock (idempotent)."""
        if self.checkpointer is not None:
            self.checkpointer.close()
            self.checkpointer = None
        if self.logger is not None:
            self.logger.close()
        if self._lock is not None:
            self._lock.release()

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
