"""Run configuration: frozen dataclasses filled from YAML files and ``section.field=value`` overrides.

A config is a tree of small frozen dataclasses (one per concern) so that a YAML file mirrors it section by
section::

    model: {path: warmup:arith}
    rollout: {prompts_per_step: 16, group_size: 8}
    sfpo: {num_fast_steps: 3, alpha: 0.8}

Every value is checked against its field's annotated type when the config is built; an error names the
dotted field and the offending value.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config field is unknown, mistyped or out of range; the message names the dotted field."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The policy: ``path`` is a Hugging Face checkpoint folder or hub id, or ``warmup`` for the cached tiny
    policy that :mod:`sfpo_jax.tasks.warmup` trains on the run's task (``warmup`` holds its config fields)."""

    path: str = "warmup"
    dtype: Literal["float32", "bfloat16"] = "float32"
    remat: bool = False  # rematerialise each layer's activations in the backward pass (long sequences, big models)
    warmup: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # sfpo_jax.tasks.warmup.WarmupConfig


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """Which problems and reward: ``module.path:factory`` called with ``kwargs``."""

    name: str = "sfpo_jax.tasks:arithmetic"
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class SFPOConfig:
    """The SFPO transformation (``num_fast_steps=0`` is GRPO)."""

    num_fast_steps: int = 3
    alpha: float = 0.8
    entropy_window: int | None = 30
    entropy_threshold: float = 1.0
    slow_correction: bool = True  # False: the paper's ablation ending each batch at the repositioned point


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with global-norm clipping and a constant learning rate, as the official runs use."""

    learning_rate: float = 1e-6
    b1: float = 0.9
    b2: float = 0.999
    weight_decay: float = 0.01
    max_grad_norm: float | None = 1.0


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """Sampling of the training batch and its split into optimizer calls."""

    prompts_per_step: int = 256
    group_size: int = 8
    max_prompt_length: int = 1536
    max_new_tokens: int = 2560
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    num_minibatches: int = 4
    micro_batch_size: int | None = None
    recompute_old_logprobs: bool = False
    # Prompts per sampler call on each process (None: the process's whole share at once). Smaller values bound
    # the sampler's KV cache and prefill memory without changing the step's batch; each chunk draws its own key.
    generation_batch_size: int | None = None


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The GRPO objective (:func:`sfpo_jax.grpo.policy_loss`)."""

    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None
    agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"] = (
        "token-mean"
    )
    entropy_coef: float = 0.001
    kl_coef: float = 0.0
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    scale_adv_by_std: bool = True


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """pass@1 as the mean over ``num_samples`` samples per eval problem, every ``every`` steps and at the end."""

    every: int = 5
    num_samples: int = 4
    temperature: float = 1.0
    top_p: float = 0.7
    max_problems: int | None = None


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes (-1: all remaining devices)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Length, seed, outputs and fault handling of one run."""

    steps: int = 400
    seed: int = 0
    out: str = "runs/default"
    checkpoint_every: int = 10
    keep_checkpoints: int = 3
    max_nonfinite_in_a_row: int = 3
    tensorboard: bool = False
    progress: bool = True


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a training run needs; ``algo`` picks GRPO or SFPO over the same loop."""

    algo: Literal["grpo", "sfpo"] = "sfpo"
    model: ModelConfig = ModelConfig()
    task: TaskConfig = TaskConfig()
    sfpo: SFPOConfig = SFPOConfig()
    optim: OptimConfig = OptimConfig()
    rollout: RolloutConfig = RolloutConfig()
    loss: LossConfig = LossConfig()
    eval: EvalConfig = EvalConfig()
    mesh: MeshConfig = MeshConfig()
    run: RunConfig = RunConfig()

    def __post_init__(self):
        _check_ranges(self)

    @property
    def num_fast_steps(self) -> int:
        """K as the transform sees it: 0 for GRPO whatever the ``sfpo`` section says."""
        return 0 if self.algo == "grpo" else self.sfpo.num_fast_steps


def _check_ranges(cfg: Config) -> None:
    """Range checks that types alone do not express."""
    checks = [
        ("sfpo.num_fast_steps", cfg.sfpo.num_fast_steps >= 0),
        ("sfpo.alpha", 0.0 <= cfg.sfpo.alpha <= 1.0),
        ("sfpo.entropy_window", cfg.sfpo.entropy_window is None or cfg.sfpo.entropy_window >= 2),
        ("sfpo.entropy_threshold", math.isfinite(cfg.sfpo.entropy_threshold)),
        ("sfpo.slow_correction", cfg.sfpo.slow_correction or cfg.sfpo.num_fast_steps >= 1),
        ("optim.learning_rate", cfg.optim.learning_rate > 0),
        ("rollout.prompts_per_step", cfg.rollout.prompts_per_step >= 1),
        ("rollout.group_size", cfg.rollout.group_size >= 1),
        ("rollout.max_new_tokens", cfg.rollout.max_new_tokens >= 1),
        ("rollout.temperature", cfg.rollout.temperature >= 0),
        ("rollout.top_p", 0.0 < cfg.rollout.top_p <= 1.0),
        ("rollout.num_minibatches", cfg.rollout.num_minibatches >= 1),
        ("rollout.generation_batch_size", cfg.rollout.generation_batch_size is None
         or cfg.rollout.generation_batch_size >= 1),
        (
            "rollout.num_minibatches",
            cfg.rollout.prompts_per_step % cfg.rollout.num_minibatches == 0,
        ),
        ("eval.num_samples", cfg.eval.num_samples >= 1),
        ("eval.every", cfg.eval.every >= 0),
        ("run.steps", cfg.run.steps >= 0),
        ("run.checkpoint_every", cfg.run.checkpoint_every >= 0),
        ("run.keep_checkpoints", cfg.run.keep_checkpoints >= 1),
        ("run.max_nonfinite_in_a_row", cfg.run.max_nonfinite_in_a_row >= 1),
    ]
    for name, ok in checks:
        if not ok:
            section, field = name.split(".")
            value = getattr(getattr(cfg, section), field)
            extra = ""
            if name == "rollout.num_minibatches" and cfg.rollout.num_minibatches >= 1:
                extra = f" (must divide rollout.prompts_per_step={cfg.rollout.prompts_per_step})"
            raise ConfigError(f"invalid value for {name}: {value!r}{extra}")


# --------------------------------------------------------------------------------------------------------
# Building configs from YAML and overrides.


def from_dict(data: Mapping[str, Any], cls: type = Config, *, prefix: str = "") -> Any:
    """Builds the dataclass ``cls`` from a (nested) mapping, checking every field's type."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"section {prefix[:-1]!r}" if prefix else "the top level"
        raise ConfigError(f"unknown field(s) {unknown} in {where}; expected one of {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        path = f"{prefix}{name}"
        kwargs[name] = _coerce(value, hints[name], path)
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Checks (and mildly converts: int → float, list → tuple) ``value`` against the type ``tp``."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(value, tp, prefix=path + ".")
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, path)
            except ConfigError:
                pass
        raise ConfigError(f"invalid value for {path}: {value!r} (expected {_type_name(tp)})")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"invalid value for {path}: {value!r} (expected one of {typing.get_args(tp)})")
        return value
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"invalid value for {path}: {value!r} (expected null)")
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"invalid value for {path}: {value!r} (expected true or false)")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"invalid value for {path}: {value!r} (expected an integer)")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-5" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"invalid value for {path}: {value!r} (expected a number)")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"invalid value for {path}: {value!r} (expected a string)")
        return value
    if origin in (Mapping, dict) or tp is Any:
        if origin and not isinstance(value, Mapping):
            raise ConfigError(f"invalid value for {path}: {value!r} (expected a mapping)")
        return dict(value) if isinstance(value, Mapping) else value
    if origin in (tuple, Sequence):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"invalid value for {path}: {value!r} (expected a list)")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        return tuple(_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value))
    raise TypeError(f"unsupported config type {tp} at {path}")  # a bug in this module, not in the input


def _type_name(tp: Any) -> str:
    return " | ".join("null" if a is type(None) else getattr(a, "__name__", str(a)) for a in typing.get_args(tp))


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain nested dicts (what :func:`from_dict` reads back)."""
    return dataclasses.asdict(cfg)


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Applies ``section.field=value`` strings to a nested dict; values are parsed as YAML scalars."""
    data = _deep_copy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form section.field=value")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[leaf] = yaml.safe_load(raw) if raw else ""
    return data


def _deep_copy(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in data.items()}


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Reads a YAML config (``None``: the defaults), applies overrides, validates, returns a :class:`Config`."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
    return from_dict(apply_overrides(data, overrides))


def save_config(cfg: Config, path: str | Path) -> None:
    """Writes the config as YAML that :func:`load_config` reads back to an equal config."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
