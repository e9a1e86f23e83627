"""Meshes, logical-axis sharding rules and multi-host initialisation."""

from sfpo_jax.parallel.mesh import (
    DEFAULT_RULES,
    MESH_AXES,
    initialize_distributed,
    logical_sharding,
    make_mesh,
    param_shardings,
    shard_model,
    shard_state,
    to_global,
)

__all__ = [
    "DEFAULT_RULES",
    "MESH_AXES",
    "initialize_distributed",
    "logical_sharding",
    "make_mesh",
    "param_shardings",
    "shard_model",
    "shard_state",
    "to_global",
]
