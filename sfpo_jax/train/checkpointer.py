"""Orbax checkpoints of the training state (a pytree of arrays) plus a JSON ``meta`` dict, keeping the last few.

Each step is one directory ``<dir>/<step>/`` with two items: ``state`` (the array pytree, OCDBT/Zarr via
``StandardSave``) and ``meta`` (``JsonSave``: data-order position, running totals, the config dict...).

Atomicity. Orbax writes a step into ``<step>.orbax-checkpoint-tmp`` and renames it to ``<step>`` only after
every item is written, so a process killed at any moment during a save leaves the previous checkpoints intact;
step listing skips the temporary names, so :meth:`Checkpointer.latest_step` never returns a half-written step,
and opening a :class:`Checkpointer` deletes such leftovers. This protects against the process being killed
(preemption, Ctrl-C, OOM); like any rename-based scheme it relies on the filesystem for crashes of the kernel.

Multi-host. Every process must call :meth:`~Checkpointer.save` and :meth:`~Checkpointer.restore` (orbax writes
and reads each process's shards collectively and synchronises the commit); the JSON ``meta`` is written by the
primary process only (orbax's JSON handler does that) and read by all.

PRNG keys may be stored either as ``jax.random.key_data`` uint32 arrays or as typed ``jax.random.key`` arrays:
typed keys are saved as their key data and re-wrapped, with the target's implementation, on restore.
Zero-size arrays (which orbax refuses to write) are not stored; restore rebuilds them from the target.
"""

from __future__ import annotations

import errno
import math
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

__all__ = ["Checkpointer"]


def _is_typed_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _key_impl(leaf: Any) -> Any:
    """The PRNG implementation of a typed-key array or of its ``ShapeDtypeStruct`` (traced, so both work)."""
    impls: list[Any] = []
    jax.eval_shape(lambda k: impls.append(jax.random.key_impl(k)), leaf)
    return impls[0]


def _is_empty(x: Any) -> bool:
    """Zero-size arrays (e.g. an unused ring buffer of shape ``[0]``), which orbax refuses to save."""
    return isinstance(x, jax.Array | jax.ShapeDtypeStruct) and not _is_typed_key(x) and math.prod(x.shape) == 0


def _to_saved(leaf: Any) -> Any:
    """A state leaf as stored: key data for typed keys, None (nothing) for zero-size arrays."""
    if _is_empty(leaf):
        return None
    return jax.random.key_data(leaf) if _is_typed_key(leaf) else leaf


def _from_saved(target: Any, saved: Any) -> Any:
    """Inverse of :func:`_to_saved`, guided by the target leaf."""
    if _is_empty(target):
        sharding = getattr(target, "sharding", None)
        return jnp.zeros(target.shape, target.dtype, device=sharding)
    return jax.random.wrap_key_data(saved, impl=_key_impl(target)) if _is_typed_key(target) else saved


def _abstract(leaf: Any) -> Any:
    """A restore target leaf: ``ShapeDtypeStruct`` with the leaf's sharding (key data for typed keys)."""
    if _is_empty(leaf):
        return None
    if not isinstance(leaf, jax.Array | jax.ShapeDtypeStruct):
        return leaf  # numpy arrays and Python scalars: orbax restores them as such
    sharding = getattr(leaf, "sharding", None)
    if _is_typed_key(leaf):
        # Key data has the key shape plus trailing implementation dims; a NamedSharding's spec covers the leading
        # dims and leaves the trailing ones unsharded, which is exactly how key data is laid out.
        data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
        if sharding is not None and not isinstance(
            sharding, jax.sharding.NamedSharding | jax.sharding.SingleDeviceSharding
        ):
            sharding = None
        return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)


def _mismatches(saved: Any, abstract: Any, limit: int = 5) -> str:
    """A short description of how the saved metadata tree and the restore target differ ('' when they match).

    Checked before restoring because orbax's own errors for a wrong shape are long TensorStore dumps."""
    saved_flat, target_flat = ocp.tree.to_flat_dict(saved), ocp.tree.to_flat_dict(abstract)
    name = lambda path: "/".join(map(str, path))
    problems = [f"missing in checkpoint: {name(p)}" for p in target_flat if p not in saved_flat]
    problems += [f"not in target: {name(p)}" for p in saved_flat if p not in target_flat]
    for path, leaf in target_flat.items():
        meta = saved_flat.get(path)
        shape, dtype = getattr(meta, "shape", None), getattr(meta, "dtype", None)
        if meta is not None and hasattr(leaf, "shape") and shape is not None and tuple(shape) != tuple(leaf.shape):
            problems.append(f"{name(path)}: saved shape {tuple(shape)}, target shape {tuple(leaf.shape)}")
        elif meta is not None and hasattr(leaf, "dtype") and dtype is not None and dtype != leaf.dtype:
            problems.append(f"{name(path)}: saved dtype {dtype}, target dtype {leaf.dtype}")
    more = f" (and {len(problems) - limit} more)" if len(problems) > limit else ""
    return "; ".join(problems[:limit]) + more


class Checkpointer:
    """Saves and restores ``(train_state, meta)`` per step in ``directory``, keeping the last ``keep`` steps.

    Args:
      directory: where step directories go (created if missing).
      keep: how many of the most recent checkpoints to keep (≥ 1).
      async_save: if True, :meth:`save` returns once the arrays are copied to host memory and the files are
        written in a background thread (the next save, :meth:`wait` and :meth:`close` wait for it). The default
        is synchronous: when :meth:`save` returns the step is committed on disk, so the training loop can treat
        "the last checkpoint" and "the metrics written so far" as one consistent point, and nothing is in flight
        when the process is killed. Saves are rare and small next to a rollout step, so little is lost.

    Use as a context manager or call :meth:`close`.
    """

    def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = False):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep!r}")
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=True,  # remove `<step>.orbax-checkpoint-tmp` dirs left by killed saves
        )
        # Handlers registered up front so that a fresh manager can read item metadata before any save.
        handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def latest_step(self) -> int | None:
        """The most recent fully written step, or None when there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Every fully written step still kept, ascending."""
        return sorted(self._manager.all_steps())

    def save(self, step: int, train_state: Any, meta: dict[str, Any]) -> None:
        """Writes ``train_state`` (a pytree of arrays; NamedTuples, int32 scalars, typed PRNG keys, zero-size arrays)
        and the JSON-serialisable ``meta`` as ``step``, then deletes checkpoints beyond the last ``keep``.

        ``step`` must be greater than every step already saved here (a run that is not resumed must use a fresh
        directory).
        """
        latest = self.latest_step()
        if latest is not None and step <= latest:
            raise ValueError(f"step {step!r} is not after the latest checkpoint {latest} in {self.directory}")
        state = jax.tree.map(_to_saved, train_state)
        self._check_free_space(state)
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self._manager.save(step, args=args, force=True)  # the loop decides when to save, not orbax's policy

    def _check_free_space(self, state: Any, margin: int = 1 << 20) -> None:
        """OSError(ENOSPC) before writing when the disk cannot hold the state's raw bytes (plus ``margin``): orbax
        fails on a full disk from several writer threads at once, each with its own traceback, and the one line
        that matters is lost among them. Only a first guard: a disk that fills up during the save still fails
        there, and the previous checkpoints stay intact either way."""
        need = sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(state)) + margin
        free = shutil.disk_usage(self.directory).free
        if free < need:
            raise OSError(errno.ENOSPC, f"No space left on device: a checkpoint needs about {need / 2**20:.1f} MiB, "
                          f"{free / 2**20:.1f} MiB are free", str(self.directory))

    def restore(self, step: int | None = None, *, target: Any) -> tuple[Any, dict[str, Any]]:
        """Reads ``step`` (default: the latest) into the structure of ``target``.

        Args:
          step: which step; None for :meth:`latest_step`.
          target: a pytree with the saved structure whose leaves are live arrays or ``jax.ShapeDtypeStruct``
            (e.g. from ``jax.eval_shape``); each restored array gets the leaf's shape, dtype and sharding, so a
            sharded run restores sharded. Leaves without a sharding fall back to the sharding saved on disk.

        Returns:
          ``(train_state, meta)``.

        Raises:
          FileNotFoundError: there is no checkpoint, or no checkpoint at ``step``.
          ValueError: the checkpoint does not match ``target`` (structure, shapes).
        """
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        step = steps[-1] if step is None else step
        if step not in steps:
            raise FileNotFoundError(f"no checkpoint for step {step!r} in {self.directory}; available: {steps}")
        abstract = jax.tree.map(_abstract, target)
        problems = _mismatches(self._manager.item_metadata(step)["state"].tree, abstract)
        if problems:
            raise ValueError(f"checkpoint step {step} in {self.directory} does not match the target: {problems}")
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        try:
            restored = self._manager.restore(step, args=args)
        except ValueError as e:  # what the check above cannot see, e.g. a container type orbax cannot rebuild
            raise ValueError(f"checkpoint step {step} in {self.directory} does not match the target: {e}") from e
        # `restored.state` has None where the target has zero-size leaves: the target's leaves are a prefix of it.
        return jax.tree.map(_from_saved, target, restored.state), restored.meta

    def delete(self, step: int) -> None:
        """Deletes the checkpoint of ``step`` (e.g. one that no longer reads back)."""
        self._manager.delete(step)

    def wait(self) -> None:
        """Blocks until an asynchronous save in flight is committed (a no-op for synchronous saves)."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for any save in flight and releases orbax's resources."""
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
