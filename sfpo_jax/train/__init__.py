"""The RL trainer: configuration, the rollout side and the learner side of an RL step (and their composition for
your own loop), the loop, the run folder (checkpoints, metrics) and the supervised warm-up of the CPU demo's tiny
policy."""

from sfpo_jax.train.checkpointer import Checkpointer
from sfpo_jax.train.checks import RewardError
from sfpo_jax.train.config import Config, ConfigError, load_config, save_config
from sfpo_jax.train.learner import Batch, Learner, TrainState, make_learner
from sfpo_jax.train.loop import NonFiniteError, TrainResult, train
from sfpo_jax.train.lora import LoRA
from sfpo_jax.train.metrics import MetricsLogger, PhaseTimer, deterministic, read_metrics
from sfpo_jax.train.preemption import Preempted
from sfpo_jax.train.rollouts import Position, Rollouts, TrainingPrompts, make_rollouts
from sfpo_jax.train.run_dir import ResumeError, RunDir
from sfpo_jax.train.step import RLStep, make_rl_step

__all__ = [
    "Batch",
    "Checkpointer",
    "Config",
    "ConfigError",
    "Learner",
    "LoRA",
    "MetricsLogger",
    "NonFiniteError",
    "PhaseTimer",
    "Position",
    "Preempted",
    "RLStep",
    "ResumeError",
    "RewardError",
    "Rollouts",
    "RunDir",
    "TrainResult",
    "TrainState",
    "TrainingPrompts",
    "deterministic",
    "load_config",
    "make_learner",
    "make_rl_step",
    "make_rollouts",
    "read_metrics",
    "save_config",
    "train",
]
