"""Meshes, logical-axis sharding rules, multi-host initialisation and data helpers."""

from sfpo_jax.parallel.mesh import (
    DEFAULT_RULES,
    MESH_AXES,
    initialize_distributed,
    logical_sharding,
    make_mesh,
    num_shards,
    param_shardings,
    shard_model,
    shard_state,
    to_global,
)
from sfpo_jax.parallel.multihost import all_hosts, host_share, replicate_unplaced

__all__ = [
    "DEFAULT_RULES",
    "MESH_AXES",
    "all_hosts",
    "host_share",
    "initialize_distributed",
    "logical_sharding",
    "make_mesh",
    "num_shards",
    "param_shardings",
    "replicate_unplaced",
    "shard_model",
    "shard_state",
    "to_global",
]
