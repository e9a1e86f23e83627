"""The RL trainer: configuration, the loop, checkpoints, metrics and the learning-efficiency summary."""

from sfpo_jax.train.checkpoint import Checkpointer
from sfpo_jax.train.config import Config, ConfigError, load_config, save_config
from sfpo_jax.train.loop import NonFiniteError, TrainResult, train
from sfpo_jax.train.metrics import MetricsLogger, PhaseTimer, deterministic, read_metrics
from sfpo_jax.train.summary import plot_ablation, plot_curves, render_markdown, summarize

__all__ = [
    "Checkpointer",
    "Config",
    "ConfigError",
    "MetricsLogger",
    "NonFiniteError",
    "PhaseTimer",
    "TrainResult",
    "deterministic",
    "load_config",
    "plot_ablation",
    "plot_curves",
    "read_metrics",
    "render_markdown",
    "save_config",
    "summarize",
    "train",
]
