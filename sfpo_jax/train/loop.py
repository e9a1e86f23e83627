"""The RL loop: GRPO or SFPO over one rollout batch per step, readable top to bottom.

Per step: problems → ``group_size`` completions each (sampler, at the slow point θ_s) → rewards → group
advantages → optionally the old log-probs recomputed by the learner at θ_s and the reference policy's log-probs
(for a KL term) → ``calls_per_batch(opt_state)`` optimizer calls over the mini-batches (the SFPO transform decides:
K+1 epochs while active, one after its entropy switch) → metrics → periodic evaluation → checkpoint. GRPO is
the same loop with ``num_fast_steps=0``.

Determinism: the data order and every PRNG key are pure functions of ``(seed, step)``, and a checkpoint holds
params, optimizer state and counters, so a run killed at any moment and resumed ends exactly where an
uninterrupted run ends (same device count). The KL reference policy is the initial policy: it is loaded again
from ``model.path`` on resume rather than checkpointed.

Multi-host (a TPU pod slice, a GPU cluster): every process runs this loop; each samples and scores its own share
of every step's prompts, the learner sees one global batch, and process 0 alone writes metrics (see the helpers
at the end of this module).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from sfpo_jax.optim import calls_per_batch, sfpo_active
from sfpo_jax.parallel import logical_sharding, make_mesh, to_global
from sfpo_jax.rl import grpo
from sfpo_jax.sampling import Sampler, SamplingConfig
from sfpo_jax.sampling.sampler import DEFAULT_PROMPT_BUCKETS, Rollout, concat_rollouts
from sfpo_jax.train import step as learner
from sfpo_jax.train.checkpoint import Checkpointer
from sfpo_jax.train.config import Config, save_config, to_dict
from sfpo_jax.train.metrics import MetricsLogger, PhaseTimer
from sfpo_jax.train.policy import load_policy, task_from_config


class NonFiniteError(RuntimeError):
    """Too many optimizer calls in a row had non-finite loss or gradients (the last good checkpoint is kept)."""


@dataclasses.dataclass
class TrainResult:
    """What a finished run leaves in memory (everything is also on disk under ``out_dir``)."""

    model: nnx.Module
    tokenizer: Any
    opt_state: Any
    history: list[dict]
    out_dir: Path


def batch_indices(num_problems: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """Problem indices of ``step``: consecutive slices of seeded per-epoch permutations, so the data order is a
    pure function of ``(seed, step)``."""
    out: list[int] = []
    position = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(position + len(out), num_problems)
        perm = np.random.default_rng([seed, epoch]).permutation(num_problems)
        out.extend(perm[offset : offset + batch_size - len(out)].tolist())
    return np.asarray(out)


def mesh_from_config(cfg: Config):
    """The run's mesh; with no ``-1`` axis and fewer devices than the machine has, the first ones are used."""
    m, devices = cfg.mesh, jax.devices()
    size = m.data * m.fsdp * m.tensor
    if -1 not in (m.data, m.fsdp, m.tensor) and 0 < size < len(devices):
        devices = devices[:size]
    return make_mesh(m.data, m.fsdp, m.tensor, devices=devices)


def train(cfg: Config, *, resume: bool = False, task=None) -> TrainResult:
    """Runs the configured RL training; ``resume`` continues from the last checkpoint in ``cfg.run.out``."""
    out, is_main = Path(cfg.run.out), jax.process_index() == 0
    task = task if task is not None else task_from_config(cfg)
    mesh = mesh_from_config(cfg)
    model, tokenizer = load_policy(cfg, task, mesh=mesh)
    graphdef, params = nnx.split(model)
    # The KL reference is the initial policy, frozen: a copy, since the update donates (overwrites) `params`.
    # Taken before any checkpoint restore, so a resumed run gets it back from `model.path`.
    ref_params = jax.tree.map(jnp.copy, params) if cfg.loss.kl_coef > 0 else None
    tx = learner.make_optimizer(cfg)
    opt_state = replicate_unplaced(tx.init(params), mesh)
    bucket = SharedPromptBucket()
    sampler = Sampler(model, mesh=mesh, pad_token_id=tokenizer.pad_token_id, prompt_buckets=bucket)
    train_problems = task.train_problems()
    eval_sets = eval_sets_of(task, cfg.eval.max_problems) if cfg.eval.every else {}

    r, M, G = cfg.rollout, cfg.rollout.num_minibatches, cfg.rollout.group_size
    rollout_cfg = SamplingConfig(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_k=r.top_k,
                                 top_p=r.top_p, eos_token_ids=(tokenizer.eos_token_id,), num_samples=G)
    num_micro = learner.micro_batches_per_minibatch(r.prompts_per_step * G // M, r.micro_batch_size)
    update = learner.make_update_fn(graphdef, tx, cfg, num_micro)
    extra_logprobs = r.recompute_old_logprobs or ref_params is not None
    logprob_fn = learner.make_logprob_fn(graphdef, r.micro_batch_size) if extra_logprobs else None
    batch_sharding = logical_sharding(mesh, ("batch",))
    base_key = jax.random.key(cfg.run.seed)

    ckpt = Checkpointer(out / "checkpoints", keep=cfg.run.keep_checkpoints)
    phases = ("sample", "score", *(("logprobs",) if extra_logprobs else ()), "update", "eval")
    timer, step0 = PhaseTimer(phases), 0
    totals = {"rollouts": 0, "nonfinite_total": 0, "nonfinite_in_a_row": 0}
    if resume and ckpt.latest_step() is not None:
        (params, opt_state), meta = ckpt.restore(target=(params, opt_state))
        step0, totals = meta["step"], meta["totals"]
        timer.load(meta["timer"])
    elif ckpt.latest_step() is not None:
        raise FileExistsError(f"{out} already holds checkpoints: pass --resume to continue it, or use a new --out")
    if is_main:
        save_config(cfg, out / "config.yaml")
    logger = MetricsLogger(out, tensorboard=cfg.run.tensorboard, enabled=is_main,
                           resume_step=step0 if resume else None)

    def encode(problems):
        return [tokenizer.encode(task.render(p), add_special_tokens=False) for p in problems]

    # Encoded once: the steps index into these prompts rather than re-tokenising their problems.
    train_problems, train_prompts = within_prompt_length(train_problems, encode(train_problems), r.max_prompt_length)

    bar = tqdm(range(step0, cfg.run.steps), initial=step0, total=cfg.run.steps, desc=cfg.algo,
               disable=not (cfg.run.progress and is_main), dynamic_ncols=True)
    for step in bar:
        key = jax.random.fold_in(base_key, step)
        indices = batch_indices(len(train_problems), r.prompts_per_step, step, cfg.run.seed)
        with timer("sample"):  # each process samples and scores its own share of the step's prompts
            problems, prompts = host_share([train_problems[i] for i in indices], [train_prompts[i] for i in indices],
                                           bucket)
            rollout = generate_in_chunks(sampler, prompts, rollout_cfg, key, params, r.generation_batch_size)
        with timer("score"):
            answers = [p.answer for p in problems for _ in range(G)]
            rewards = np.asarray(task.reward(rollout.texts(tokenizer), answers), np.float32)
            advantages = np.asarray(grpo.group_advantages(rewards, G, scale_by_std=cfg.loss.scale_adv_by_std))
            batch = jax.tree.map(lambda x: to_global(x, batch_sharding), learner.make_batch(rollout, advantages))
            rewards, lengths, finish = (all_hosts(x) for x in (rewards, rollout.lengths, rollout.finish_reason))
        logprob_metrics = {}
        if extra_logprobs:
            with timer("logprobs"):
                inputs = (batch.tokens, batch.attention_mask, batch.completion_mask)
                if r.recompute_old_logprobs:  # at θ_s: `params` has not been updated yet this step
                    old_logp = logprob_fn(params, *inputs)
                    logprob_metrics["logprobs/sampler_abs_diff"] = learner.masked_mean_abs_diff(
                        old_logp, batch.old_logp, batch.completion_mask)
                    batch = batch._replace(old_logp=old_logp)
                if ref_params is not None:
                    batch = batch._replace(ref_logp=logprob_fn(ref_params, *inputs))
                logprob_metrics = {k: float(v) for k, v in logprob_metrics.items()}
                jax.block_until_ready(batch)  # so that the phase's time is the passes', not the next phase's
        with timer("update"):
            active = sfpo_active(opt_state)
            minibatches = learner.split_minibatches(batch, M)
            call_metrics = []
            for call in range(calls_per_batch(opt_state)):
                params, opt_state, m = update(params, opt_state, minibatches[call % M])
                m = jax.device_get(m)
                call_metrics.append(m)
                finite = bool(np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"]))
                totals["nonfinite_total"] += int(not finite)
                totals["nonfinite_in_a_row"] = 0 if finite else totals["nonfinite_in_a_row"] + 1
                if totals["nonfinite_in_a_row"] >= cfg.run.max_nonfinite_in_a_row:
                    raise NonFiniteError(
                        f"step {step + 1}: {totals['nonfinite_in_a_row']} optimizer calls in a row had non-finite "
                        f"loss or gradients (skipped); the last good checkpoint in {ckpt.directory} is intact")
        totals["rollouts"] += len(rewards)

        row = {"step": step + 1, "rollouts": totals["rollouts"], "sfpo_active": active,
               "optimizer_calls": len(call_metrics), "nonfinite_total": totals["nonfinite_total"],
               **rollout_metrics(rewards, lengths, finish, G), **logprob_metrics,
               **reduce_call_metrics(call_metrics), "lr": cfg.optim.learning_rate,
               "time/tokens_per_second": float(lengths.sum()) / max(timer.last("sample"), 1e-9)}
        if cfg.eval.every and ((step + 1) % cfg.eval.every == 0 or step + 1 == cfg.run.steps):
            with timer("eval"):
                eval_key = jax.random.fold_in(jax.random.fold_in(base_key, step), 1)
                row |= evaluate(sampler, params, task, eval_sets, encode, tokenizer, cfg, eval_key, bucket)
        row |= timer.totals()
        logger.log(row)
        bar.set_postfix(reward=f"{row['reward/mean']:.3f}", sfpo=active, refresh=False)
        if cfg.run.checkpoint_every and ((step + 1) % cfg.run.checkpoint_every == 0 or step + 1 == cfg.run.steps):
            meta = {"step": step + 1, "totals": totals, "timer": timer.state(), "config": to_dict(cfg)}
            ckpt.save(step + 1, (params, opt_state), meta)
    bar.close()
    ckpt.close()
    logger.close()
    nnx.update(model, params)
    return TrainResult(model=model, tokenizer=tokenizer, opt_state=opt_state, history=logger.rows, out_dir=out)


def generate_in_chunks(sampler: Sampler, prompts: list[list[int]], config: SamplingConfig, key: jax.Array,
                       params, chunk_size: int | None) -> Rollout:
    """``sampler.generate`` over ``prompts`` in calls of at most ``chunk_size`` prompts (``rollout.
    generation_batch_size``), so that the sampler's memory is bounded whatever the batch size.

    Chunk ``i`` samples with ``fold_in(key, i)``. With ``chunk_size`` None, or at least ``len(prompts)``, it is one
    call with ``key`` itself, bit for bit the unchunked rollout. The chunks share one prompt bucket (the
    :class:`SharedPromptBucket` holds the global batch's), so equal chunks reuse one compiled (prefill, decode)
    pair; a smaller last chunk compiles one more. On several processes every one makes the same number of calls,
    as their shares are equal.

    Returns:
      The chunks' rollouts concatenated: ``len(prompts) * config.num_samples`` rows, group by group.
    """
    if chunk_size is None or len(prompts) <= chunk_size:
        return sampler.generate(prompts, config, key, params=params)
    return concat_rollouts([
        sampler.generate(prompts[start : start + chunk_size], config, jax.random.fold_in(key, i), params=params)
        for i, start in enumerate(range(0, len(prompts), chunk_size))])


def rollout_metrics(rewards: np.ndarray, lengths: np.ndarray, finish_reason: np.ndarray,
                    group_size: int) -> dict[str, float]:
    """Reward, accuracy (reward ≥ 1), zero-variance groups and response lengths of one rollout batch (``[N]``
    arrays, groups of ``group_size`` consecutive rows)."""
    groups = rewards.reshape(-1, group_size)
    return {
        "reward/mean": float(rewards.mean()),
        "reward/std": float(rewards.std()),
        "accuracy": float((rewards >= 1.0).mean()),
        "zero_variance_groups": float((groups.max(1) == groups.min(1)).mean()),
        "response_length/mean": float(lengths.mean()),
        "response_length/max": int(lengths.max()),
        "finished": float((finish_reason == 0).mean()),
    }


def reduce_call_metrics(calls: list[dict]) -> dict[str, float]:
    """One row's learner metrics: the mean over the batch's optimizer calls (min / max for the ratio extremes);
    ``entropy`` is the last call's, the value SFPO's switch records."""
    out = {}
    for k in calls[0]:
        values = np.asarray([c[k] for c in calls], np.float64)
        reduce = {"ratio_min": np.min, "ratio_max": np.max}.get(k, np.mean)
        out[f"train/{k}"] = float(reduce(values))
    out["entropy"] = float(calls[-1]["entropy"])
    return out


def within_prompt_length(problems: list, prompts: list[list[int]], max_prompt_length: int) -> tuple[list, list]:
    """``(problems, prompts)`` cut to the problems whose encoded prompt has at most ``max_prompt_length`` tokens,
    in order (as verl's ``data.filter_overlong_prompts`` keeps them); ValueError if none is left."""
    kept = [i for i, ids in enumerate(prompts) if len(ids) <= max_prompt_length]
    if not kept:
        raise ValueError(f"no training problem fits rollout.max_prompt_length={max_prompt_length} tokens")
    return [problems[i] for i in kept], [prompts[i] for i in kept]


def eval_sets_of(task, max_problems: int | None) -> dict[str, list]:
    """The task's evaluation sets by name, each cut to ``max_problems``: ``task.eval_sets()`` when the task has
    several (an optional method, e.g. :class:`sfpo_jax.tasks.MathTask`), else ``{task.name: eval_problems()}``."""
    sets = task.eval_sets() if hasattr(task, "eval_sets") else {task.name: task.eval_problems()}
    if not sets or any(not problems for problems in sets.values()):
        raise ValueError(f"task {task.name!r} has an empty evaluation set: {[k for k, v in sets.items() if not v]}")
    return {name: list(problems)[:max_problems] for name, problems in sets.items()}


def evaluate(sampler, params, task, eval_sets: dict[str, list], encode, tokenizer, cfg: Config, key,
             bucket: SharedPromptBucket | None = None) -> dict[str, float]:
    """pass@1 on each eval set as the mean over ``eval.num_samples`` samples per problem (the paper's avg@k).

    Returns ``eval/<set>/accuracy`` and ``eval/<set>/reward`` per set; with several sets, first
    ``eval/average/accuracy``, the unweighted mean over the sets (the paper's "Avg." column, which
    :func:`sfpo_jax.train.summary.summarize` picks as the first accuracy key). Problems are generated
    ``rollout.prompts_per_step`` at a time, or ``rollout.generation_batch_size`` per process when that is smaller,
    so that evaluation needs no more memory than a training step (``eval.num_samples <= rollout.group_size``)
    whatever the size of the eval sets; on several processes each one samples and grades its share of every
    chunk (``bucket``: the sampler's, see :class:`SharedPromptBucket`).
    """
    e, k = cfg.eval, cfg.eval.num_samples
    scfg = SamplingConfig(max_new_tokens=cfg.rollout.max_new_tokens, temperature=e.temperature, top_p=e.top_p,
                          eos_token_ids=(tokenizer.eos_token_id,), num_samples=k)
    problems = [p for ps in eval_sets.values() for p in ps]
    chunk, rewards = cfg.rollout.prompts_per_step, []
    if cfg.rollout.generation_batch_size is not None:  # a per-process count; a chunk is split over the processes
        chunk = min(chunk, cfg.rollout.generation_batch_size * jax.process_count())
    for i, start in enumerate(range(0, len(problems), chunk)):
        part = problems[start : start + chunk]
        # Pad the chunk to equal shares (repeating its last problem); the padding's rewards are dropped below.
        part = part + part[-1:] * (-len(part) % jax.process_count())
        local, prompts = host_share(part, encode(part), bucket)
        rollout = sampler.generate(prompts, scfg, jax.random.fold_in(key, i), params=params)
        answers = [p.answer for p in local for _ in range(k)]
        local_rewards = np.asarray(task.reward(rollout.texts(tokenizer), answers), np.float32)
        rewards.append(all_hosts(local_rewards)[: min(chunk, len(problems) - start) * k])
    rewards = np.concatenate(rewards).reshape(len(problems), k)
    out, start = {}, 0
    for name, ps in eval_sets.items():
        r = rewards[start : start + len(ps)]
        out[f"eval/{name}/accuracy"], out[f"eval/{name}/reward"] = float((r >= 1.0).mean()), float(r.mean())
        start += len(ps)
    if len(eval_sets) > 1:
        average = float(np.mean([out[f"eval/{name}/accuracy"] for name in eval_sets]))
        out = {"eval/average/accuracy": average, **out}
    return out


# ------------------------------------------------------------------------------------------------ multi-host
# Every process runs this same loop on the same global data order. Sampling and scoring are split: each process
# takes its contiguous share of the step's prompts (whole GRPO groups), samples it on the global mesh and grades
# it; the learner batch is then one global array built from the processes' local rows, and the metrics gather
# the per-row values of all processes. On one process all of this is the identity.


class SharedPromptBucket:
    """The sampler's ``prompt_buckets``: the default bucket (a power of two) of the longest prompt of the
    *global* batch, set by :func:`host_share` before each call. On several processes every one must compile the
    same program shapes whatever its own prompts; on one process this is the sampler's default."""

    def __init__(self):
        self.longest = 0

    def __call__(self, local_longest: int) -> int:
        n = max(local_longest, self.longest)
        return next((b for b in DEFAULT_PROMPT_BUCKETS if b >= n), n)


def host_share(problems: list, prompts: list[list[int]], bucket: SharedPromptBucket | None = None):
    """This process's contiguous share of a global batch: ``(problems, prompts)`` cut to rows
    ``[i * n / P, (i + 1) * n / P)`` of process ``i`` of ``P``, after setting ``bucket`` from the global batch."""
    if bucket is not None:
        bucket.longest = max(map(len, prompts))
    count, index = jax.process_count(), jax.process_index()
    if len(problems) % count:
        raise ValueError(f"{len(problems)} prompts do not split evenly over {count} processes "
                         "(rollout.prompts_per_step must be a multiple of the process count)")
    share = len(problems) // count
    rows = slice(index * share, (index + 1) * share)
    return problems[rows], prompts[rows]


def replicate_unplaced(tree, mesh):
    """``tree`` with every leaf not yet laid out on ``mesh`` replicated over it.

    ``tx.init`` creates the optimizer's counters (step counts, SFPO's cycle position, the non-finite count) on
    one device. Such uncommitted arrays are moved by ``jit`` as needed, but a checkpoint restores each leaf with
    the sharding of its target, committed, and the update then refuses a mix of one-device and mesh-wide
    arguments: so a resumed run on several devices needs them on the mesh from the start.
    """
    replicated = NamedSharding(mesh, PartitionSpec())

    def place(x):
        if not isinstance(x, jax.Array) or isinstance(x.sharding, NamedSharding):
            return x
        return to_global(np.asarray(x), replicated)

    return jax.tree.map(place, tree)


def all_hosts(local: np.ndarray) -> np.ndarray:
    """The rows of every process, concatenated in process order (``local`` itself on one process)."""
    if jax.process_count() == 1:
        return np.asarray(local)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(local, tiled=True))
