"""Supervised warm-up of a tiny Qwen2-architecture policy on a task, cached on disk.

RL needs a policy that sometimes succeeds: with a random init every reward is 0 and every GRPO advantage
vanishes. ``warmup_policy(task)`` trains a tiny char-level model on the task's train problems (prompt + target,
loss on the target and EOS only) with AdamW until greedy accuracy on the eval problems reaches
``stop_accuracy`` (default 30%, so RL has room to improve), and saves it with the tokenizer under
``$SFPO_JAX_CACHE/warmup/<task>-<hash>/`` (``~/.cache/sfpo_jax`` by default). A later call with the same task
problems and config, on the same code (this library's source and the versions of the libraries it computes with),
reuses it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from sfpo_jax.models import CausalLM, ModelConfig, from_pretrained, load_tokenizer, save_pretrained
from sfpo_jax.tasks import RAW_CHAT_TEMPLATE, Problem, TaskLike, char_tokenizer

METADATA_FILE = "warmup.json"


@dataclasses.dataclass(frozen=True)
class WarmupConfig:
    """Model size and the supervised schedule.

    Training stops at the first evaluation (every ``eval_every`` steps, on ``num_eval`` eval problems) whose
    greedy accuracy is at least ``stop_accuracy``, or after ``max_steps``.
    """

    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384
    batch_size: int = 64
    learning_rate: float = 3e-3
    weight_decay: float = 0.01
    warmup_steps: int = 20
    max_steps: int = 3000
    eval_every: int = 50
    num_eval: int = 200
    stop_accuracy: float = 0.3
    seed: int = 0

    def __post_init__(self):
        for name in (
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "intermediate_size",
            "batch_size",
            "max_steps",
            "eval_every",
            "num_eval",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"WarmupConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"WarmupConfig: hidden_size={self.hidden_size} must divide by num_heads={self.num_heads}, "
                f"which must divide by num_kv_heads={self.num_kv_heads}"
            )
        if not 0.0 < self.stop_accuracy <= 1.0:
            raise ValueError(f"WarmupConfig.stop_accuracy must be in (0, 1], got {self.stop_accuracy}")


def model_config(cfg: WarmupConfig, tokenizer, max_length: int) -> ModelConfig:
    """The tiny Qwen2 (q/k/v biases, untied head) for ``tokenizer``'s vocabulary."""
    return ModelConfig(
        architecture="qwen2",
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads,
        head_dim=cfg.hidden_size // cfg.num_heads,
        attention_bias=True,
        max_position_embeddings=max(256, 2 * max_length),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def encode_supervised(task: TaskLike, problems: Sequence[Problem], tokenizer) -> tuple[np.ndarray, ...]:
    """Right-padded ``prompt + target + EOS`` sequences.

    Returns:
      ``ids [N, L] int32``, ``mask [N, L] int32`` (1 on real tokens), ``loss_mask [N, L] float32`` (1 where the
      token at t+1 is a target or EOS token, i.e. on the positions whose next-token prediction is trained).
    """
    rows = []
    for p in problems:
        prompt = tokenizer.encode(task.render(p), add_special_tokens=False)
        target = [*tokenizer.encode(p.target, add_special_tokens=False), tokenizer.eos_token_id]
        rows.append((prompt, target))
    length = max(len(a) + len(b) for a, b in rows)
    ids = np.full((len(rows), length), tokenizer.pad_token_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    loss_mask = np.zeros((len(rows), length), np.float32)
    for i, (prompt, target) in enumerate(rows):
        n = len(prompt) + len(target)
        ids[i, :n] = prompt + target
        mask[i, :n] = 1
        loss_mask[i, len(prompt) - 1 : n - 1] = 1.0
    return ids, mask, loss_mask


def _loss(model: CausalLM, ids, mask, loss_mask):
    logits = model(ids, attention_mask=mask)[:, :-1]
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    weights = loss_mask[:, :-1]
    return (nll * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def make_greedy(graphdef, max_new_tokens: int):
    """A jitted ``greedy(params, prompt_ids [B, P] left-padded, prompt_mask [B, P]) -> tokens [B, max_new]``.

    An uncached loop: every step runs the model on the whole ``[B, P + max_new]`` buffer (fine for tiny models
    and short answers) and writes the argmax at the next slot.
    """

    @jax.jit
    def greedy(params, prompt_ids, prompt_mask):
        model = nnx.merge(graphdef, params)
        b, p = prompt_ids.shape
        ids = jnp.concatenate([prompt_ids, jnp.zeros((b, max_new_tokens), jnp.int32)], axis=1)
        mask = jnp.concatenate([prompt_mask, jnp.zeros((b, max_new_tokens), jnp.int32)], axis=1)

        def step(t, carry):
            ids, mask = carry
            logits = model(ids, attention_mask=mask)
            nxt = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, p + t - 1, axis=1, keepdims=False), -1)
            ids = jax.lax.dynamic_update_index_in_dim(ids, nxt.astype(jnp.int32), p + t, axis=1)
            mask = jax.lax.dynamic_update_index_in_dim(mask, jnp.ones((b,), jnp.int32), p + t, axis=1)
            return ids, mask

        ids, _ = jax.lax.fori_loop(0, max_new_tokens, step, (ids, mask))
        return ids[:, p:]

    return greedy


def greedy_completions(greedy, params, task: TaskLike, problems: Sequence[Problem], tokenizer) -> list[str]:
    """Greedy completions (text up to the first EOS) of ``problems``."""
    prompts = [tokenizer.encode(task.render(p), add_special_tokens=False) for p in problems]
    width = max(map(len, prompts))
    ids = np.full((len(prompts), width), tokenizer.pad_token_id, np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for i, row in enumerate(prompts):
        ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    out = np.asarray(greedy(params, ids, mask))
    texts = []
    for row in out.tolist():
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id)]
        texts.append(tokenizer.decode(row, skip_special_tokens=True))
    return texts


def accuracy(task: TaskLike, completions: Sequence[str], problems: Sequence[Problem]) -> float:
    """Fraction of completions with full reward (``reward >= 1``)."""
    rewards = np.asarray(task.reward(list(completions), [p.answer for p in problems]))
    return float((rewards >= 1.0).mean())


def train_warmup(task: TaskLike, cfg: WarmupConfig = WarmupConfig(), tokenizer=None, *, log=None):
    """Trains a fresh tiny policy on ``task`` (no caching).

    Returns:
      ``(model, tokenizer, metrics)`` with metrics ``steps``, ``eval_accuracy``, ``train_loss``, ``seconds``
      and the accuracy ``history``.
    """
    start = time.perf_counter()
    tokenizer = tokenizer or char_tokenizer(chat_template=RAW_CHAT_TEMPLATE)
    train, evals = task.train_problems(), task.eval_problems()[: cfg.num_eval]
    if not train or not evals:
        raise ValueError(f"task {task.name!r} needs train and eval problems, got {len(train)} and {len(evals)}")
    ids, mask, loss_mask = encode_supervised(task, train, tokenizer)
    max_new = max(len(tokenizer.encode(p.target, add_special_tokens=False)) for p in train + evals) + 2
    model = CausalLM(model_config(cfg, tokenizer, ids.shape[1] + max_new), rngs=nnx.Rngs(cfg.seed))
    graphdef, params = nnx.split(model)
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, cfg.warmup_steps, cfg.max_steps)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=cfg.weight_decay))
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, opt_state, ids, mask, loss_mask):
        loss, grads = jax.value_and_grad(lambda p: _loss(nnx.merge(graphdef, p), ids, mask, loss_mask))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    greedy = make_greedy(graphdef, max_new)
    rng = np.random.default_rng(cfg.seed)
    history, acc, loss, step = [], 0.0, float("nan"), 0
    order = rng.permutation(len(train))
    cursor = 0
    bar = tqdm(total=cfg.max_steps, desc=f"warm-up {task.name} (supervised, once; cached)", leave=False,
               dynamic_ncols=True)
    while step < cfg.max_steps:
        if cursor + cfg.batch_size > len(order):
            order, cursor = rng.permutation(len(train)), 0
        idx = (
            order[cursor : cursor + cfg.batch_size]
            if len(train) >= cfg.batch_size
            else rng.integers(0, len(train), cfg.batch_size)
        )
        cursor += cfg.batch_size
        params, opt_state, loss = train_step(params, opt_state, ids[idx], mask[idx], loss_mask[idx])
        step += 1
        bar.update()
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            acc = accuracy(task, greedy_completions(greedy, params, task, evals, tokenizer), evals)
            history.append((step, acc))
            bar.set_postfix(greedy_accuracy=f"{acc:.2f}", target=cfg.stop_accuracy)
            if log:
                log(f"warm-up step {step}: loss {float(loss):.3f} eval accuracy {acc:.2f}")
            if acc >= cfg.stop_accuracy:
                break
    bar.close()
    model = nnx.merge(graphdef, params)
    metrics = {
        "steps": step,
        "eval_accuracy": acc,
        "train_loss": float(loss),
        "seconds": time.perf_counter() - start,
        "history": history,
    }
    return model, tokenizer, metrics


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$SFPO_JAX_CACHE``, else ``~/.cache/sfpo_jax``."""
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("SFPO_JAX_CACHE", Path.home() / ".cache" / "sfpo_jax"))


# What a warm-up's weights depend on beside its task and config: this library's source (the `sfpo_jax` folder) and
# the libraries whose numerics it computes with.
LIBRARY_ROOT = Path(__file__).resolve().parents[1]
NUMERIC_LIBRARIES = ("jax", "jaxlib", "flax", "optax")


@functools.cache
def code_fingerprint(root: Path = LIBRARY_ROOT, libraries: Sequence[str] = NUMERIC_LIBRARIES) -> str:
    """A hash of every ``.py`` file under ``root`` (this library, by default) and of the installed versions of
    ``libraries``: the code that decides a warm-up's weights beside its task and config.

    Why: a warm-up trained by other code has other weights. A change of rounding in the model (same math) once moved
    a cached column-addition warm-up's train loss from 0.0224 to 0.0237, and a main job that reused the old cache
    printed another table than the code's own. So a cached warm-up is reused by the same code only.
    """
    h = hashlib.sha256()
    for name in libraries:
        h.update(f"{name}=={importlib.metadata.version(name)}\n".encode())
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\x00" + path.read_bytes() + b"\x00")
    return h.hexdigest()


def cache_key(task: TaskLike, cfg: WarmupConfig) -> str:
    """``<task name>-<hash>``: the hash covers every train/eval problem, the warm-up config and the code
    (:func:`code_fingerprint`)."""
    h = hashlib.sha256(json.dumps([dataclasses.asdict(cfg), RAW_CHAT_TEMPLATE, code_fingerprint()],
                                  sort_keys=True).encode())
    for p in (*task.train_problems(), None, *task.eval_problems()[: cfg.num_eval]):
        h.update(b"\x00" if p is None else json.dumps([task.render(p), p.target, p.answer]).encode())
    safe = "".join(c if c.isalnum() or c in "-_.+" else "_" for c in task.name)
    return f"{safe}-{h.hexdigest()[:12]}"


def warmup_policy(
    task: TaskLike,
    cfg: WarmupConfig = WarmupConfig(),
    *,
    cache_dir: str | os.PathLike | None = None,
    force: bool = False,
    log=None,
) -> Path:
    """The folder of the warmed-up policy for ``task`` (Hugging Face format: model, tokenizer, ``warmup.json``),
    trained now unless the cache already has it (or ``force``).

    Load it with ``sfpo_jax.models.from_pretrained(path)`` and ``sfpo_jax.models.load_tokenizer(path)``.
    """
    path = cache_root(cache_dir) / "warmup" / cache_key(task, cfg)
    if (path / METADATA_FILE).is_file() and not force:
        return path
    model, tokenizer, metrics = train_warmup(task, cfg, log=log)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write next to the target and rename, so a concurrent or interrupted run never leaves a half-written cache.
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".tmp-"))
    try:
        save_pretrained(model, tmp)
        tokenizer.save_pretrained(tmp)
        meta = {"task": task.name, "config": dataclasses.asdict(cfg), **metrics}
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2))
        if path.exists():
            if (path / METADATA_FILE).is_file() and not force:
                return path  # another process finished the same warm-up first: keep its files
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return path


def load_warmup(task: TaskLike, cfg: WarmupConfig = WarmupConfig(), *, cache_dir=None, dtype=jnp.float32, log=None):
    """``(model, tokenizer, metadata)`` of the warmed-up policy, training it first when not cached."""
    path = warmup_policy(task, cfg, cache_dir=cache_dir, log=log)
    meta = json.loads((path / METADATA_FILE).read_text())
    return from_pretrained(path, dtype=dtype), load_tokenizer(path), meta
