"""The RL trainer: configuration, one RL step, the loop, the run folder (checkpoints, metrics) and the
supervised warm-up of the CPU demo's tiny policy."""

from sfpo_jax.train.checkpointer import Checkpointer
from sfpo_jax.train.checks import RewardError
from sfpo_jax.train.config import Config, ConfigError, load_config, save_config
from sfpo_jax.train.loop import NonFiniteError, TrainResult, train
from sfpo_jax.train.metrics import MetricsLogger, PhaseTimer, deterministic, read_metrics
from sfpo_jax.train.preemption import Preempted
from sfpo_jax.train.run_dir import ResumeError, RunDir
from sfpo_jax.train.step import RLStep, TrainState, make_rl_step

__all__ = [
    "Checkpointer",
    "Config",
    "ConfigError",
    "MetricsLogger",
    "NonFiniteError",
    "PhaseTimer",
    "Preempted",
    "RLStep",
    "ResumeError",
    "RewardError",
    "RunDir",
    "TrainResult",
    "TrainState",
    "deterministic",
    "load_config",
    "make_rl_step",
    "read_metrics",
    "save_config",
    "train",
]
