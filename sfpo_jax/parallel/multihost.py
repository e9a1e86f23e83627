"""Multi-host data helpers (a TPU pod slice, a GPU cluster).

Every process runs the same training loop on the same global data order. Sampling and scoring are split: each
process takes its contiguous share of the step's prompts (whole GRPO groups), samples it on the global mesh and
grades it; the learner batch is then one global array built from the processes' local rows
(:func:`sfpo_jax.parallel.to_global`), and the metrics gather the per-row values of all processes. On one
process all of this is the identity.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from sfpo_jax.parallel.mesh import to_global

T = TypeVar("T")


def host_share(rows: Sequence[T]) -> list[T]:
    """This process's contiguous share of a global batch: rows ``[i * n / P, (i + 1) * n / P)`` of process ``i``
    of ``P``; ValueError when ``n`` does not split evenly."""
    count, index = jax.process_count(), jax.process_index()
    if len(rows) % count:
        raise ValueError(f"{len(rows)} prompts do not split evenly over {count} processes "
                         "(rollout.prompts_per_step must be a multiple of the process count)")
    share = len(rows) // count
    return list(rows[index * share : (index + 1) * share])


def all_hosts(local: np.ndarray) -> np.ndarray:
    """The rows of every process, concatenated in process order (``local`` itself on one process)."""
    if jax.process_count() == 1:
        return np.asarray(local)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(local, tiled=True))


def replicate_unplaced(tree, mesh):
    """``tree`` with every leaf not yet laid out on ``mesh`` replicated over it.

    ``tx.init`` creates the optimizer's counters (step counts, SFPO's cycle position, the non-finite count) on
    one device. Such uncommitted arrays are moved by ``jit`` as needed, but a checkpoint restores each leaf with
    the sharding of its target, committed, and the update then refuses a mix of one-device and mesh-wide
    arguments: so a resumed run on several devices needs them on the mesh from the start.
    """
    replicated = NamedSharding(mesh, PartitionSpec())

    def place(x):
        if not isinstance(x, jax.Array) or isinstance(x.sharding, NamedSharding):
            return x
        return to_global(np.asarray(x), replicated)

    return jax.tree.map(place, tree)
