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
import difflib
import inspect
import math
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import optax
import yaml

from sfpo_jax.optim import sfpo
from sfpo_jax.rl import LossConfig
from sfpo_jax.sampling import SamplingConfig
from sfpo_jax.train.lora import DEFAULT_LORA_TARGETS, LoRA
from sfpo_jax.train.packing import PACKING


class ConfigError(ValueError):
    """A config field is unknown, mistyped or out of range; the message names the dotted field."""


def check_range(name: str, value: float, *, low: float | None = None, high: float | None = None,
                low_inclusive: bool = True, high_inclusive: bool = True) -> None:
    """Raises ``ValueError("<name> must be a finite number in [low, high), got <value>")`` unless ``value`` is
    finite and within the bounds (a section's ``__post_init__`` check; :func:`from_dict` prefixes the section)."""
    ok = math.isfinite(value)
    ok = ok and (low is None or value > low or (low_inclusive and value == low))
    ok = ok and (high is None or value < high or (high_inclusive and value == high))
    if ok:
        return
    if low is not None and high is not None:
        valid = f"in {'[' if low_inclusive else '('}{low:g}, {high:g}{']' if high_inclusive else ')'}"
    elif low is not None:
        valid = f"{'>=' if low_inclusive else '>'} {low:g}"
    else:
        valid = f"{'<=' if high_inclusive else '<'} {high:g}"
    raise ValueError(f"{name} must be a finite number {valid}, got {value!r}")


def _default(fn: Any, name: str) -> Any:
    """The default of argument or field ``name`` of ``fn`` (a function or a dataclass): a section that
    configures a library object takes its defaults from that object, so that no default is written twice."""
    return inspect.signature(fn).parameters[name].default


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
    """The policy (the ``model`` section): ``path`` is a Hugging Face checkpoint folder or hub id, or ``warmup``
    for the cached tiny policy that :mod:`sfpo_jax.train.warmup` trains on the run's task (``warmup`` holds
    its config fields).

    Precision as in the official runs: ``param_dtype`` is the dtype of the parameters, the optimizer state and
    SFPO's slow copy (the master weights: keep float32, since an AdamW step at lr 1e-6 is below bfloat16's
    resolution for almost every weight); ``compute_dtype`` the dtype of every matrix product's operands in the
    forward and backward passes and in sampling, accumulated in float32, and of the KV cache (None:
    ``param_dtype``). Activations between products, log-probs and losses are float32 either way (see
    ``sfpo_jax.models.CausalLM``). bfloat16 is also the faster setting on a CPU with AVX512-BF16 (BENCHMARKS.md).

    ``attention`` is how the learner's forward and backward passes and the sampler's prefill attend (``CausalLM``'s
    argument): ``einsum`` on any backend, or ``cudnn``, one fused cuDNN flash-attention kernel per layer (NVIDIA
    GPUs, bfloat16 compute; 2.2x faster forward+backward at 4 x 2048 tokens on an H100, and no float32 scores in
    memory, BENCHMARKS.md "GPU"). Decode steps always attend over their KV cache with ``einsum``.

    ``lora_rank`` > 0 trains LoRA adapters of that rank on the ``lora_targets`` kernels, scaled by
    ``lora_alpha / lora_rank`` (:class:`sfpo_jax.train.lora.LoRA`): the adapters, their optimizer state and SFPO's
    slow copy are in ``param_dtype``, and the base weights are loaded frozen in the compute dtype."""

    path: str = "warmup"
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    compute_dtype: Literal["float32", "bfloat16"] | None = None
    remat: bool = False  # rematerialise each layer's activations in the backward pass (long sequences, big models)
    attention: Literal["einsum", "cudnn"] = "einsum"
    warmup: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # sfpo_jax.train.warmup.WarmupConfig
    lora_rank: int = 0  # 0: full fine-tuning
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS

    def __post_init__(self):
        if self.attention == "cudnn" and (self.compute_dtype or self.param_dtype) != "bfloat16":
            raise ValueError(f"attention='cudnn' needs compute_dtype 'bfloat16' (cuDNN's flash attention has no "
                             f"float32 kernel), got {self.compute_dtype or self.param_dtype!r}")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank={self.lora_rank!r} must be >= 0 (0: no LoRA)")
        self.lora(seed=0)  # builds nothing parameter-sized; raises on a bad lora_* field

    def lora(self, seed: int) -> LoRA | None:
        """The LoRA adapters' spec (A initialised from ``seed``), or None for full fine-tuning."""
        if not self.lora_rank:
            return None
        return LoRA(self.lora_rank, self.lora_alpha, tuple(self.lora_targets), dtype=self.param_dtype, seed=seed)

    @property
    def load_dtype(self) -> str:
        """The dtype the policy's weights are loaded in: ``param_dtype`` (the master weights), or with LoRA the
        compute dtype (the frozen base, which every product casts to anyway)."""
        return (self.compute_dtype or self.param_dtype) if self.lora_rank else self.param_dtype


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """Which problems and reward: the built-in task ``name`` (see ``sfpo_jax.tasks.BUILTIN_TASKS``) called with
    ``kwargs``, or, when ``import_factory`` is set, the factory ``module.path:function`` that it names: that
    **imports and runs Python code**, so a config that sets it is code, to be trusted as such."""

    name: str = "arithmetic"
    import_factory: str | None = None
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class SFPOConfig:
    """The arguments of :func:`sfpo_jax.sfpo` (``num_minibatches`` comes from ``rollout``); checked by it.
    ``algo: grpo`` ignores this section."""

    num_fast_steps: int = _default(sfpo, "num_fast_steps")
    alpha: float = _default(sfpo, "alpha")
    entropy_window: int | None = _default(sfpo, "entropy_window")
    entropy_threshold: float = _default(sfpo, "entropy_threshold")
    slow_correction: bool = _default(sfpo, "slow_correction")  # False: the paper's ablation ending at θ̃

    def __post_init__(self):
        self.transform(num_minibatches=1)  # builds nothing parameter-sized; raises on a bad argument

    def transform(self, num_minibatches: int) -> optax.GradientTransformationExtraArgs:
        return sfpo(num_minibatches=num_minibatches, **dataclasses.asdict(self))


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with global-norm clipping and a constant learning rate, as the official runs use."""

    learning_rate: float = 1e-6
    b1: float = 0.9
    b2: float = 0.999
    weight_decay: float = 0.01
    max_grad_norm: float | None = 1.0

    def __post_init__(self):
        check_range("learning_rate", self.learning_rate, low=0.0, low_inclusive=False)
        check_range("weight_decay", self.weight_decay, low=0.0)
        for name in ("b1", "b2"):  # Adam's moment decays: b = 1 never forgets, the bias correction divides by 0
            check_range(name, getattr(self, name), low=0.0, high=1.0, high_inclusive=False)
        if self.max_grad_norm is not None:
            check_range("max_grad_norm", self.max_grad_norm, low=0.0, low_inclusive=False)


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """Sampling of the training batch (checked by :class:`sfpo_jax.sampling.SamplingConfig`) and its split
    into optimizer calls."""

    prompts_per_step: int = 256
    group_size: int = 8  # GRPO's group: completions per prompt, >= 2 (one completion has no baseline)
    max_prompt_length: int = 1536
    max_new_tokens: int = 2560
    temperature: float = _default(SamplingConfig, "temperature")
    top_p: float = _default(SamplingConfig, "top_p")
    top_k: int = _default(SamplingConfig, "top_k")
    num_minibatches: int = 4  # M: optimizer calls per epoch over the batch
    micro_batch_size: int | None = None
    recompute_old_logprobs: bool = False
    # Prompts per sampler call on each process (None: the process's whole share at once). Smaller values bound
    # the sampler's prefill (and, with decode_slots, its prompt bank) without changing any token of the rollout.
    generation_batch_size: int | None = None
    # DAPO's dynamic sampling (verl's algorithm.filter_groups): keep only the groups whose `filter_metric` is not
    # the same for every completion (the others have advantage 0 everywhere) and sample further rounds of
    # prompts_per_step prompts until prompts_per_step groups are kept or max_generation_rounds rounds have run
    # (verl's max_num_gen_batches, 10). Then a short batch is padded with empty groups (`short_batch: pad`: no
    # token, no weight in any denominator) or stops the run (`error`, as verl does). Surplus kept groups are
    # dropped, as in verl, so that every trained row was sampled at θ_s.
    filter_groups: bool = False
    filter_metric: Literal["reward", "accuracy"] = "reward"
    max_generation_rounds: int = 10
    short_batch: Literal["pad", "error"] = "pad"
    # Overlong completions: drop those that reached max_new_tokens from the loss (TRL's mask_truncated_completions),
    # and / or DAPO's soft overlong punishment (eq. 13; verl's reward_model.overlong_buffer): a reward penalty
    # growing linearly from 0 to overlong_penalty over the last overlong_buffer tokens (0: off).
    mask_truncated: bool = False
    overlong_buffer: int = 0
    overlong_penalty: float = 1.0
    # How the learner lays the batch out (`sfpo_jax.train.packing`): "none", every rollout a padded [P + T] row;
    # "sequences", each rollout's real tokens as a segment of a packed row; "groups", a group's prompt once followed
    # by its completions. The same objective in all three; packed rows hold at most `packing_row_tokens` tokens
    # (None: 4 (P + T)).
    packing: Literal["none", "sequences", "groups"] = "none"
    packing_row_tokens: int | None = None
    # Decode rows in flight per process (continuous batching, `Sampler.generate(slots=...)`): a row that ends takes
    # the next pending sequence at once, so the sampler's KV cache has this many rows whatever the batch, and the
    # rollout is the same token for token. None: every sequence of the process's call in flight at once (static).
    decode_slots: int | None = None

    def __post_init__(self):
        if self.packing not in PACKING:
            raise ValueError(f"packing={self.packing!r} must be one of {PACKING}")
        if self.group_size < 2:
            raise ValueError(f"group_size={self.group_size} must be >= 2: GRPO's advantage is a reward minus its "
                             "group's mean, so a group of one has no learning signal")
        checks = [("prompts_per_step", self.prompts_per_step >= 1), ("max_prompt_length", self.max_prompt_length >= 1),
                  ("num_minibatches", self.num_minibatches >= 1),
                  ("micro_batch_size", self.micro_batch_size is None or self.micro_batch_size >= 1),
                  ("generation_batch_size", self.generation_batch_size is None or self.generation_batch_size >= 1),
                  ("packing_row_tokens", self.packing_row_tokens is None or self.packing_row_tokens >= 1),
                  ("decode_slots", self.decode_slots is None or self.decode_slots >= 1)]
        for name, ok in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} must be >= 1")
        if self.prompts_per_step % self.num_minibatches:
            raise ValueError(f"num_minibatches={self.num_minibatches} must divide prompts_per_step="
                             f"{self.prompts_per_step}")
        if self.max_generation_rounds < 1:
            raise ValueError(f"max_generation_rounds={self.max_generation_rounds!r} must be >= 1")
        if not 0 <= self.overlong_buffer < self.max_new_tokens:
            raise ValueError(f"overlong_buffer={self.overlong_buffer!r} must be >= 0 and < max_new_tokens="
                             f"{self.max_new_tokens} (0: no overlong penalty)")
        if not (math.isfinite(self.overlong_penalty) and self.overlong_penalty >= 0):
            raise ValueError(f"overlong_penalty={self.overlong_penalty!r} must be a finite number >= 0")
        self.sampling(eos_token_ids=())

    def sampling(self, eos_token_ids: tuple[int, ...]) -> SamplingConfig:
        """The training rollouts' sampling controls: ``group_size`` completions per prompt."""
        return SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                              top_p=self.top_p, eos_token_ids=eos_token_ids, num_samples=self.group_size)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """pass@1 as the mean over ``num_samples`` samples per eval problem (the paper's avg@k), every ``every`` steps,
    at the end, and before the first step when ``before_train`` is set (verl's ``val_before_train``)."""

    every: int = 5
    num_samples: int = 4
    temperature: float = 1.0
    top_p: float = 0.7
    max_problems: int | None = None
    before_train: bool = False

    def __post_init__(self):
        if self.every < 0:
            raise ValueError(f"every={self.every!r} must be >= 0 (0: no evaluation)")
        if self.max_problems is not None and self.max_problems < 1:
            raise ValueError(f"max_problems={self.max_problems!r} must be >= 1 or null")
        self.sampling(max_new_tokens=1, eos_token_ids=())

    def sampling(self, max_new_tokens: int, eos_token_ids: tuple[int, ...]) -> SamplingConfig:
        return SamplingConfig(max_new_tokens=max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                              eos_token_ids=eos_token_ids, num_samples=self.num_samples)


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

    def __post_init__(self):
        for name in ("steps", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be >= 0")
        if not 0 <= self.seed < 2**63:  # numpy's and JAX's seeds are unsigned 64-bit
            raise ValueError(f"seed={self.seed!r} must be in [0, 2**63)")
        for name in ("keep_checkpoints", "max_nonfinite_in_a_row"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be >= 1")


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a training run needs; ``algo`` picks GRPO or SFPO over the same loop.

    Each section checks its own fields when built (those that configure a library object build it, so the
    object's own checks apply); :func:`from_dict` reports a failure as a :class:`ConfigError` naming the field.
    """

    # grpo-epochs: GRPO with K+1 epochs over each batch (sfpo.num_fast_steps = K), the compute-matched baseline:
    # SFPO's schedule with α = 1 (no reposition, nothing stored) and no entropy switch.
    algo: Literal["grpo", "sfpo", "grpo-epochs"] = "sfpo"
    model: PolicyConfig = PolicyConfig()
    task: TaskConfig = TaskConfig()
    sfpo: SFPOConfig = SFPOConfig()
    optim: OptimConfig = OptimConfig()
    rollout: RolloutConfig = RolloutConfig()
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    eval: EvalConfig = EvalConfig()
    mesh: MeshConfig = MeshConfig()
    run: RunConfig = RunConfig()

    def optimizer(self) -> optax.GradientTransformationExtraArgs:
        """AdamW (with global-norm clipping) followed by SFPO, by ``sfpo(num_fast_steps=0)`` for GRPO, or by
        ``sfpo(K, alpha=1, entropy_window=None)`` for GRPO with K+1 epochs, with ``rollout.num_minibatches`` calls
        per epoch.

        The inner optimizer is wrapped in :func:`optax.apply_if_finite`: a call with non-finite gradients
        leaves the params and the inner state as they are, and SFPO, which sees a zero update, still counts the
        call, so every batch gets its whole cycle (the reposition and the slow correction on their calls) and
        the next batch starts a new one. Its ``max_consecutive_errors`` is out of reach: the loop decides when
        too many in a row must stop the run (``run.max_nonfinite_in_a_row``).
        """
        o, M = self.optim, self.rollout.num_minibatches
        inner = optax.adamw(o.learning_rate, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay)
        if o.max_grad_norm is not None:
            inner = optax.chain(optax.clip_by_global_norm(o.max_grad_norm), inner)
        outer = {"sfpo": lambda: self.sfpo.transform(M),
                 "grpo": lambda: sfpo(num_fast_steps=0, num_minibatches=M),
                 "grpo-epochs": lambda: sfpo(self.sfpo.num_fast_steps, alpha=1.0, num_minibatches=M,
                                             entropy_window=None)}[self.algo]()
        return optax.chain(optax.apply_if_finite(inner, max_consecutive_errors=2**30), outer)

    def __post_init__(self):
        if self.loss.rollout_correction != "none" and not self.rollout.recompute_old_logprobs:
            raise ValueError(f"loss.rollout_correction={self.loss.rollout_correction!r} needs "
                             "rollout.recompute_old_logprobs=true: the weights compare the learner's old log-probs "
                             "with the sampler's")

    def lora(self) -> LoRA | None:
        """``model.lora(seed=run.seed)``: the run's LoRA adapters, or None for full fine-tuning."""
        return self.model.lora(seed=self.run.seed)


# --------------------------------------------------------------------------------------------------------
# Building configs from YAML and overrides.


def from_dict(data: Mapping[str, Any], cls: type = Config, *, prefix: str = "") -> Any:
    """Builds the dataclass ``cls`` from a (nested) mapping, checking every field's type."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix[:-1] or 'config'} must be a mapping (a section), got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(fields), key=str)
    if unknown:
        where = f"section {prefix[:-1]!r}" if prefix else "the top level"
        hints_ = [f"{prefix}{u}: did you mean {prefix}{m[0]}?" for u in unknown
                  if (m := difflib.get_close_matches(str(u), list(fields), n=1))]
        raise ConfigError(f"unknown field(s) {unknown} in {where}; expected one of {sorted(fields)}"
                          + "".join(f"; {h}" for h in hints_))
    kwargs = {}
    for name, value in data.items():
        path = f"{prefix}{name}"
        kwargs[name] = _coerce(value, hints[name], path)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as e:  # a section's own check: its message starts with the field's name
        raise ConfigError(f"invalid value in {prefix[:-1] or 'config'}: {prefix}{e}") from None


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
    """The config as plain nested dicts and lists, as YAML and JSON read it back (what :func:`from_dict` reads)."""
    return dataclasses.asdict(cfg, dict_factory=lambda items: {k: _plain(v) for k, v in items})


def _plain(value: Any) -> Any:
    """Tuples (e.g. ``model.lora_targets``) as lists: a stored config compares equal to the one it was saved from."""
    return [_plain(v) for v in value] if isinstance(value, tuple) else value


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
        try:
            node[leaf] = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({getattr(e, 'problem', e)}); quote "
                              "it, with a space after each ':' in a mapping") from None
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
        data = read_yaml(path)
    return from_dict(apply_overrides(data, overrides))


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping with a repeated key (PyYAML keeps the last one silently, so a
    second ``rollout:`` section would replace the first)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(f"{key_node.start_mark.name}: duplicate key {key!r} on lines {seen[key]} and "
                                  f"{line} (YAML would keep only the last); merge them into one")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A config file's mapping (``{}`` for an empty file); ConfigError on a duplicate key or a YAML error."""
    path = Path(path)
    try:
        with path.open() as f:  # a stream, so that YAML's marks (and our errors) name the file
            data = yaml.load(f, Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    return data


def save_config(cfg: Config, path: str | Path) -> None:
    """Writes the config as YAML that :func:`load_config` reads back to an equal config."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
