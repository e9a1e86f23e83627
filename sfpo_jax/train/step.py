"""One RL step, as a function a user can call in their own loop::

    rl_step, state = make_rl_step(model, tokenizer, task.reward, cfg.optimizer(), cfg.rollout, cfg.loss)
    for step in range(num_steps):
        state, metrics = rl_step(state, prompts, answers, jax.random.fold_in(key, step))

A step is: prompts → ``group_size`` completions each (the sampler, at the slow point θ_s) → rewards → group
advantages → optionally the old log-probs recomputed by the learner at θ_s and the reference policy's log-probs
(for a KL term) → ``calls_per_batch(opt_state)`` optimizer calls over the mini-batches (the SFPO transform decides:
K+1 epochs while active, one after its entropy switch) → metrics. GRPO is the same step with
``sfpo(num_fast_steps=0)``. Everything but sampling and grading is jitted; the state is a pytree of arrays.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sfpo_jax.optim import calls_per_batch, sfpo_active
from sfpo_jax.parallel import all_hosts, logical_sharding, num_shards, replicate_unplaced, to_global
from sfpo_jax.rl import LossConfig, group_advantages
from sfpo_jax.sampling import Sampler, SamplingConfig
from sfpo_jax.train import learner
from sfpo_jax.train.metrics import PhaseTimer

RewardFn = Callable[[Sequence[str], Sequence[str]], np.ndarray]


class TrainState(NamedTuple):
    """What a step changes: the policy's params (the master weights, an ``nnx.State``) and the optimizer state
    (which holds SFPO's slow copy and cycle, and the non-finite counters of ``optax.apply_if_finite``)."""

    params: nnx.State
    opt_state: optax.OptState


@dataclasses.dataclass(frozen=True)
class RLStep:
    """One GRPO / SFPO step on one batch of prompts; built by :func:`make_rl_step`, called as
    ``state, metrics = rl_step(state, prompts, answers, key)``.

    Attributes:
      sampler: draws the rollouts (``sampling``: its controls, ``group_size`` samples per prompt).
      tokenizer: decodes completions for ``reward_fn(completions, answers) -> [N] float32``.
      reward_metrics: ``() -> {name: count}`` about the latest ``reward_fn`` call (e.g. a task's
        ``reward_metrics``: grading timeouts), logged as ``reward/<name>`` summed over the processes; or None.
      update: the learner's jitted optimizer call (:func:`sfpo_jax.train.learner.make_update_fn`).
      logprob_fn: the learner's jitted forward pass for old / reference log-probs, or None when neither is used.
      ref_params: the frozen KL reference policy's params, or None without a KL term.
      num_minibatches: M, the optimizer calls per epoch over the batch (as given to the SFPO transform).
      loss: the objective (advantages are normalised by ``loss.scale_adv_by_std``).
      recompute_old_logprobs: take the ratio's denominator from the learner's forward at θ_s, not the sampler's.
      generation_batch_size: prompts per sampler call (None: all at once).
      batch_sharding: of the learner batch's rows over the mesh.
    """

    sampler: Sampler
    sampling: SamplingConfig
    tokenizer: Any
    reward_fn: RewardFn
    reward_metrics: Callable[[], dict[str, float]] | None
    update: Callable
    logprob_fn: Callable | None
    ref_params: nnx.State | None
    num_minibatches: int
    loss: LossConfig
    recompute_old_logprobs: bool
    generation_batch_size: int | None
    batch_sharding: Any
    decode_slots: int | None = None  # decode rows in flight over all processes (`Sampler.generate(slots=...)`)

    def __call__(self, state: TrainState, prompts: Sequence[Sequence[int]], answers: Sequence[str], key: jax.Array,
                 *, prompt_length: int | None = None, timer: PhaseTimer | None = None
                 ) -> tuple[TrainState, dict[str, Any]]:
        """Samples, scores and learns on one batch.

        Args:
          state: the params θ_s and optimizer state at the start of the step (donated: do not reuse them).
          prompts: this process's prompts as token ids; ``answers`` their reference answers, one per prompt.
          key: the step's PRNG key (the sampler's; everything else is deterministic).
          prompt_length: pad prompts to this many tokens (the same on every process of a multi-host run, e.g.
            ``sfpo_jax.sampling.prompt_bucket`` of the global batch's longest prompt); None: the sampler's bucket.
          timer: adds the seconds of the phases ``sample``, ``score``, ``logprobs`` and ``update`` (default: a
            fresh timer).

        Returns:
          ``(state, metrics)``: the state after the batch's optimizer calls, and the batch's metrics over every
          process's rollouts (reward, accuracy, lengths, the learner's mean over the calls, ...).
        """
        timer = timer if timer is not None else PhaseTimer()
        params, opt_state = state
        G = self.sampling.num_samples
        with timer("sample"):
            rollout = self.sampler.generate(prompts, self.sampling, key, params=params, prompt_length=prompt_length,
                                            chunk_size=self.generation_batch_size, slots=self.decode_slots)
        with timer("score"):
            rewards = np.asarray(self.reward_fn(rollout.texts(self.tokenizer), [a for a in answers for _ in range(G)]),
                                 np.float32)
            advantages = np.asarray(group_advantages(rewards, G, scale_by_std=self.loss.scale_adv_by_std))
            batch = jax.tree.map(lambda x: to_global(x, self.batch_sharding), learner.make_batch(rollout, advantages))
            rewards, lengths, finish = (all_hosts(x) for x in (rewards, rollout.lengths, rollout.finish_reason))
        metrics = rollout_metrics(rewards, lengths, finish, G)
        if self.reward_metrics is not None:
            counts = self.reward_metrics()
            totals = all_hosts(np.asarray([list(counts.values())], np.float64)).sum(0)
            metrics |= {f"reward/{name}": float(v) for name, v in zip(counts, totals, strict=True)}
        if self.logprob_fn is not None:
            with timer("logprobs"):
                batch, logprob_metrics = self._extra_logprobs(params, batch)
            metrics |= logprob_metrics
        with timer("update"):
            active = sfpo_active(opt_state)
            minibatches = learner.split_minibatches(batch, self.num_minibatches)
            calls = []
            # The SFPO transform's cycle and the mini-batches are both counted from the batch's first call:
            # a non-finite call still counts (see `Config.optimizer`), so call c is mini-batch c % M.
            for call in range(calls_per_batch(opt_state)):
                params, opt_state, m = self.update(params, opt_state, minibatches[call % self.num_minibatches])
                calls.append(jax.device_get(m))
        in_a_row, total = nonfinite_counts(opt_state)
        metrics |= {"sfpo_active": active, "optimizer_calls": len(calls), "nonfinite_in_a_row": in_a_row,
                    "nonfinite_total": total, **reduce_call_metrics(calls, self.num_minibatches),
                    "time/tokens_per_second": float(lengths.sum()) / max(timer.last("sample"), 1e-9)}
        return TrainState(params, opt_state), metrics

    def _extra_logprobs(self, params, batch: learner.Batch) -> tuple[learner.Batch, dict[str, float]]:
        """The batch with its old log-probs recomputed at θ_s (``params``, not yet updated this step) and / or the
        reference policy's log-probs filled in."""
        inputs, metrics = (batch.tokens, batch.attention_mask, batch.completion_mask), {}
        if self.recompute_old_logprobs:
            old_logp = self.logprob_fn(params, *inputs)
            metrics["logprobs/sampler_abs_diff"] = float(
                learner.masked_mean_abs_diff(old_logp, batch.old_logp, batch.completion_mask))
            batch = batch._replace(old_logp=old_logp)
        if self.ref_params is not None:
            batch = batch._replace(ref_logp=self.logprob_fn(self.ref_params, *inputs))
        jax.block_until_ready(batch)  # so that the phase's time is the passes', not the next phase's
        return batch, metrics


def make_rl_step(model: nnx.Module, tokenizer, reward_fn: RewardFn, tx: optax.GradientTransformationExtraArgs,
                 rollout, loss: LossConfig, *, mesh=None, reward_metrics: Callable[[], dict[str, float]] | None = None
                 ) -> tuple[RLStep, TrainState]:
    """The step function and the initial state of an RL run.

    Args:
      model: the policy (a :class:`sfpo_jax.models.CausalLM`, sharded over ``mesh`` if given); its params are the
        initial state, and with ``loss.kl_coef > 0`` a frozen copy of them is the KL reference.
      tokenizer: a Hugging Face tokenizer (its pad and EOS ids drive the sampler).
      reward_fn: ``(completions, answers) -> [N]`` rewards, e.g. a task's ``reward``.
      tx: the optimizer, an SFPO transform chained last (``Config.optimizer()``; ``sfpo(num_fast_steps=0)`` for
        GRPO) with ``num_minibatches == rollout.num_minibatches``.
      rollout: a :class:`sfpo_jax.train.config.RolloutConfig` (batch, sampling and mini/micro-batch sizes).
      loss: the objective.
      mesh: the device mesh (None: the default device).
      reward_metrics: see :class:`RLStep` (e.g. ``task.reward_metrics``).
    """
    rows = rollout.prompts_per_step * rollout.group_size
    batch_sharding = None if mesh is None else logical_sharding(mesh, ("batch",))
    if batch_sharding is not None and rows % (shards := num_shards(batch_sharding)):
        raise ValueError(
            f"the learner batch of {rows} rows (rollout.prompts_per_step={rollout.prompts_per_step} x group_size="
            f"{rollout.group_size}) does not split over the mesh's {shards} batch shards "
            f"({dict(mesh.shape)}): make the rows a multiple of {shards}, or use a mesh whose data x fsdp size "
            f"divides {rows}")
    graphdef, params = nnx.split(model)
    # The KL reference is the initial policy, frozen: a copy, since the update donates (overwrites) `params`.
    ref_params = jax.tree.map(jnp.copy, params) if loss.kl_coef > 0 else None
    minibatch = rows // rollout.num_minibatches
    num_micro = learner.micro_batches_per_minibatch(minibatch, rollout.micro_batch_size)
    extra_logprobs = rollout.recompute_old_logprobs or ref_params is not None
    step = RLStep(
        sampler=Sampler(model, mesh=mesh, pad_token_id=tokenizer.pad_token_id),
        sampling=rollout.sampling(eos_token_ids=(tokenizer.eos_token_id,)),
        tokenizer=tokenizer,
        reward_fn=reward_fn,
        reward_metrics=reward_metrics,
        update=learner.make_update_fn(graphdef, tx, loss, num_micro),
        logprob_fn=learner.make_logprob_fn(graphdef, rollout.micro_batch_size) if extra_logprobs else None,
        ref_params=ref_params,
        num_minibatches=rollout.num_minibatches,
        loss=loss,
        recompute_old_logprobs=rollout.recompute_old_logprobs,
        generation_batch_size=rollout.generation_batch_size,
        batch_sharding=batch_sharding,
        decode_slots=None if rollout.decode_slots is None else rollout.decode_slots * jax.process_count(),
    )
    opt_state = tx.init(params)
    return step, TrainState(params, opt_state if mesh is None else replicate_unplaced(opt_state, mesh))


def nonfinite_counts(opt_state: optax.OptState) -> tuple[int, int]:
    """``(in_a_row, total)`` optimizer calls skipped for non-finite gradients, from the state of the
    ``optax.apply_if_finite`` in ``opt_state`` (``(0, 0)`` without one). A host sync."""
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ApplyIfFiniteState))
             if isinstance(s, optax.ApplyIfFiniteState)]
    if not found:
        return 0, 0
    return int(found[0].notfinite_count), int(found[0].total_notfinite)


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


def reduce_call_metrics(calls: list[dict], num_minibatches: int) -> dict[str, float]:
    """One row's learner metrics: ``train/<name>``, the mean over the batch's optimizer calls (min / max for the
    ratio extremes); ``entropy``, the mean over the batch's last epoch, the value that SFPO's switch records."""
    out = {}
    for k in calls[0]:
        values = np.asarray([c[k] for c in calls], np.float64)
        reduce = {"ratio_min": np.min, "ratio_max": np.max}.get(k, np.mean)
        out[f"train/{k}"] = float(reduce(values))
    out["entropy"] = float(np.mean([c["entropy"] for c in calls[-num_minibatches:]]))
    return out
