"""Device mesh, logical-axis rules, and sharding of models by the logical names on their parameters."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from types import MappingProxyType

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis → mesh axis (or axes, tried in order). `data` and `fsdp` both split the batch; `fsdp` also splits
# the parameters' embed axis (ZeRO-3 style: gathered per layer by XLA); `tensor` splits heads / mlp / vocab
# (Megatron style). Per-head and per-layer axes are never split.
DEFAULT_RULES: Mapping[str, str | tuple[str, ...] | None] = MappingProxyType({
    "batch": ("data", "fsdp"),
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "head_dim": None,
    "norm": None,
    "layers": None,
    "seq": None,
    "cache_seq": None,
})


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes ("data", "fsdp", "tensor"); one size may be -1 (all remaining devices).

    Raises ValueError naming the axis when a size is invalid or the sizes do not divide the device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    for name, size in sizes.items():
        if size == 0 or size < -1:
            raise ValueError(f"mesh axis {name}={size} must be positive or -1")
    auto = [n for n, s in sizes.items() if s == -1]
    if len(auto) > 1:
        raise ValueError(f"only one mesh axis may be -1, got {', '.join(f'{n}=-1' for n in auto)}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if auto:
        if len(devices) % fixed:
            raise ValueError(f"mesh axis {auto[0]}=-1: the other axes ({fixed} devices) do not divide "
                             f"{len(devices)} devices")
        sizes[auto[0]] = len(devices) // fixed
    elif fixed != len(devices):
        raise ValueError(f"mesh data={data} × fsdp={fsdp} × tensor={tensor} = {fixed} devices, have {len(devices)}")
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES, axis_types, devices=devices)


def logical_sharding(mesh: Mesh, logical_axes: Sequence[str | None], rules: Mapping | None = DEFAULT_RULES,
                     shape: Sequence[int] | None = None) -> NamedSharding:
    """The `NamedSharding` of an array whose dimensions have the given logical names.

    A logical axis maps to the mesh axes that `rules` (None: `DEFAULT_RULES`) give it. A mesh axis of size 1,
    one already used by an earlier dimension, or (when `shape` is given) one whose size does not divide the
    dimension is simply not used: that dimension is replicated over it instead. `None` names replicate.
    """
    rules = DEFAULT_RULES if rules is None else rules
    used: set[str] = set()
    spec = []
    for dim, name in enumerate(logical_axes):
        if name is not None and name not in rules:
            raise ValueError(f"logical axis {name!r} has no rule; known: {', '.join(sorted(rules))}")
        target = rules.get(name) if name is not None else None
        target = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        keep = [a for a in target if mesh.shape[a] > 1 and a not in used]
        if shape is not None:
            while keep and shape[dim] % math.prod(mesh.shape[a] for a in keep):
                keep.pop()
        used.update(keep)
        spec.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
    return NamedSharding(mesh, PartitionSpec(*spec))


def num_shards(sharding: NamedSharding, dim: int = 0) -> int:
    """How many ways `sharding` splits dimension `dim` (the product of the mesh axes its spec names there)."""
    axes = sharding.spec[dim] if dim < len(sharding.spec) else None
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(sharding.mesh.shape[a] for a in axes)


def to_global(local: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from every process's local rows (in process order), placed with `sharding`; on one process
    simply `device_put`. Multi-host data feeding (the sampler's prompts, the learner's batch) goes through here."""
    if jax.process_count() == 1:
        return jax.device_put(local, sharding)
    return jax.make_array_from_process_local_data(sharding, local)


def _variable_sharding(var: nnx.Variable, mesh: Mesh, rules: Mapping | None) -> NamedSharding:
    shape = var.shape
    axes = var.get_metadata().get("out_sharding") or (None,) * len(shape)
    return logical_sharding(mesh, axes, rules, shape)


def param_shardings(tree, mesh: Mesh, rules: Mapping | None = None):
    """The `NamedSharding` of every variable of a module or `nnx.State` (abstract or concrete), from the logical
    axis names in each variable's `out_sharding` metadata; returned in the same structure (each Variable's value
    replaced by its sharding), like `nnx.get_named_sharding`."""
    state = nnx.state(tree) if isinstance(tree, nnx.Module) else tree
    return jax.tree.map(lambda v: v.replace(_variable_sharding(v, mesh, rules)), state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_state(state: nnx.State, mesh: Mesh, rules: Mapping | None = None) -> nnx.State:
    """`state` placed on `mesh` by its logical axes (a new State; the input's buffers are not changed)."""
    return jax.device_put(state, param_shardings(state, mesh, rules))


def shard_model(model: nnx.Module, mesh: Mesh, rules: Mapping | None = None) -> None:
    """Re-places every variable of `model` on `mesh` by its logical axes, in place."""
    nnx.update(model, shard_state(nnx.state(model), mesh, rules))


def initialize_distributed() -> bool:
    """Calls `jax.distributed.initialize()` when this is one of several processes, and returns whether it did.

    Multi-process is recognised from an explicit coordinator (`JAX_COORDINATOR_ADDRESS`, with
    `JAX_NUM_PROCESSES` / `JAX_PROCESS_ID`), SLURM with more than one task, Open MPI with more than one rank,
    or a multi-host TPU slice; JAX's own cluster detection fills in the rest. On one process it does nothing,
    so entry points can call it unconditionally. Must run before any other JAX call.
    """
    if jax.distributed.is_initialized():
        return False
    env = os.environ
    if "JAX_COORDINATOR_ADDRESS" in env:
        jax.distributed.initialize(
            coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(env["JAX_NUM_PROCESSES"]) if "JAX_NUM_PROCESSES" in env else None,
            process_id=int(env["JAX_PROCESS_ID"]) if "JAX_PROCESS_ID" in env else None,
        )
        return True
    multi = (
        int(env.get("SLURM_NTASKS", "1")) > 1
        or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
        or "," in env.get("TPU_WORKER_HOSTNAMES", "")
    )
    if multi:
        jax.distributed.initialize()
    return multi
