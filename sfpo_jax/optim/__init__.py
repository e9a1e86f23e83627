"""Optimizers: Slow-Fast Policy Optimization as an optax gradient transformation."""

from sfpo_jax.optim.sfpo import SFPOState, calls_per_batch, minibatches_per_epoch, sfpo, sfpo_active

__all__ = ["SFPOState", "calls_per_batch", "minibatches_per_epoch", "sfpo", "sfpo_active"]
