"""The rollout side of an RL step: which prompts are trained, and their rollouts laid out as one learner batch.

:class:`Rollouts` owns the training prompts (:class:`TrainingPrompts`, a seeded data order) and everything that
decides which sequences a step trains: ``batch, metrics, position = rollouts.next(params, position, key)``
samples ``group_size`` completions of the next ``prompts_per_step`` prompts at θ_s = ``params``, grades them,
computes the group advantages and returns the learner :class:`~sfpo_jax.train.learner.Batch` (a global array over
the mesh) with the rollout metrics. Where it stands in the data is an explicit value, :class:`Position`: the
loop checkpoints it beside the train state, so a resumed run consumes exactly the prompts an uninterrupted one
would, however many a step consumed.

Multi-host: every process computes the same data order and samples and grades its own share of each step's
prompts (:func:`sfpo_jax.parallel.host_share`); the batch is assembled as one global array.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import nnx

from sfpo_jax.parallel import all_hosts, host_share, to_global
from sfpo_jax.rl import LossConfig, group_advantages
from sfpo_jax.sampling import FinishReason, Sampler, SamplingConfig, prompt_bucket
from sfpo_jax.train import checks, learner
from sfpo_jax.train.metrics import PhaseTimer

RewardFn = Callable[[Sequence[str], Sequence[str]], np.ndarray]


class ShortBatchError(RuntimeError):
    """Group filtering kept fewer than ``prompts_per_step`` groups in ``max_generation_rounds`` rounds, with
    ``rollout.short_batch=error``: a setting the user can change (the message names it)."""


class Position(NamedTuple):
    """Where the rollout side stands: ``step`` learner batches produced, ``cursor`` prompts consumed from the data
    order (every consumed prompt was sampled ``group_size`` times: ``cursor · group_size`` rollouts so far)."""

    step: int = 0
    cursor: int = 0


@dataclasses.dataclass(frozen=True)
class TrainingPrompts:
    """The training prompts as token ids, their reference answers, and the data order: consecutive slices of
    seeded per-epoch permutations, so the prompts at any cursor are a pure function of ``(seed, cursor)``."""

    ids: Sequence[Sequence[int]]
    answers: Sequence[str]
    seed: int

    def __post_init__(self):
        if not self.ids:
            raise ValueError("TrainingPrompts needs at least one prompt")
        if len(self.ids) != len(self.answers):
            raise ValueError(f"{len(self.ids)} prompts but {len(self.answers)} answers")

    def indices(self, cursor: int, count: int) -> np.ndarray:
        """``[count]`` prompt indices at positions ``cursor … cursor + count - 1`` of the data order."""
        n, out = len(self.ids), []
        while len(out) < count:
            epoch, offset = divmod(cursor + len(out), n)
            perm = np.random.default_rng([self.seed, epoch]).permutation(n)
            out.extend(perm[offset : offset + count - len(out)].tolist())
        return np.asarray(out)


class _Round(NamedTuple):
    """One generation round: this process's rows as a host learner batch, and every process's per-row values."""

    batch: learner.Batch  # this process's rows, NumPy
    rewards: np.ndarray  # [N] float32, the rewards the advantages see (the task's, plus any overlong penalty)
    task_rewards: np.ndarray  # [N] float32, the task's rewards
    lengths: np.ndarray  # [N] int32
    finish: np.ndarray  # [N] int32, FinishReason codes
    reward_counts: dict[str, float]  # the task's counters of this round's reward call, summed over processes


@dataclasses.dataclass(frozen=True)
class Rollouts:
    """The rollout side, built by :func:`make_rollouts`.

    Attributes:
      sampler: draws the rollouts (``sampling``: its controls, ``group_size`` samples per prompt).
      tokenizer: decodes completions for ``reward_fn(completions, answers) -> [N] float32``.
      reward_metrics: ``() -> {name: count}`` about the latest ``reward_fn`` call (e.g. a task's
        ``reward_metrics``: grading timeouts), logged as ``reward/<name>`` summed over the processes; or None.
      config: the :class:`sfpo_jax.train.config.RolloutConfig`: batch size, generation chunks, group filtering,
        overlong handling.
      scale_adv_by_std: GRPO's std-normalised advantages (``LossConfig.scale_adv_by_std``).
      batch_sharding: of the learner batch's rows over the mesh (None: one device).
      data: the training prompts that :meth:`next` draws from (None: only :meth:`generate` on given prompts).
    """

    sampler: Sampler
    sampling: SamplingConfig
    tokenizer: Any
    reward_fn: RewardFn
    reward_metrics: Callable[[], dict[str, float]] | None
    config: Any
    scale_adv_by_std: bool
    batch_sharding: Any
    data: TrainingPrompts | None = None

    def next(self, params: nnx.State, position: Position, key: jax.Array, *, timer: PhaseTimer | None = None
             ) -> tuple[learner.Batch, dict[str, Any], Position]:
        """The learner batch of the step at ``position``, sampled at ``params``.

        Round ``r`` of the step samples the next ``prompts_per_step`` prompts of the data order with the key
        ``fold_in(key, step)`` (round 0) or ``fold_in(fold_in(key, step), r)``. Without ``filter_groups`` a step is
        one round. With it, rounds go on until ``prompts_per_step`` groups with a signal are kept (the first ones,
        in data order; the surplus is dropped) or ``max_generation_rounds`` have run (then ``short_batch``).

        Returns:
          ``(batch, metrics, position)``: the batch, its rollout metrics (over every sampled rollout, kept or not,
          with ``rollout/generation_rounds``, ``rollout/prompts_sampled`` and ``rollout/kept_groups``) and the
          position after it.
        """
        if self.data is None:
            raise ValueError("these Rollouts were built without training prompts (make_rollouts(..., data=None)): "
                             "call generate() with prompts of your own")
        timer = timer if timer is not None else PhaseTimer()
        cfg, G = self.config, self.sampling.num_samples
        step_key, cursor = jax.random.fold_in(key, position.step), position.cursor
        rounds, kept, sample_seconds = [], [], 0.0
        for r in range(cfg.max_generation_rounds if cfg.filter_groups else 1):
            indices = self.data.indices(cursor, cfg.prompts_per_step)
            cursor += len(indices)
            prompts = [self.data.ids[i] for i in indices]
            rounds.append(self._round(params, host_share(prompts), host_share([self.data.answers[i] for i in indices]),
                                      step_key if r == 0 else jax.random.fold_in(step_key, r),
                                      prompt_bucket(max(map(len, prompts))), timer))
            sample_seconds += timer.last("sample")
            kept += [(r, g) for g in np.flatnonzero(self._has_signal(rounds[-1]))]
            if len(kept) >= cfg.prompts_per_step:
                break
        if not cfg.filter_groups:
            batch = rounds[0].batch
        elif len(kept) < cfg.prompts_per_step and cfg.short_batch == "error":
            raise ShortBatchError(
                f"step {position.step + 1}: only {len(kept)} of rollout.prompts_per_step={cfg.prompts_per_step} "
                f"groups had a signal after rollout.max_generation_rounds={len(rounds)} rounds of "
                f"{cfg.prompts_per_step} prompts (rollout.filter_metric={cfg.filter_metric!r}); raise "
                "max_generation_rounds, or set rollout.short_batch=pad to train on the groups kept")
        else:
            batch = self._assemble(rounds, kept[: cfg.prompts_per_step])
        metrics = _round_metrics(rounds, G, sample_seconds)
        metrics |= {"rollout/generation_rounds": len(rounds), "rollout/prompts_sampled": cursor - position.cursor,
                    "rollout/kept_groups": min(len(kept), cfg.prompts_per_step) if cfg.filter_groups
                    else cfg.prompts_per_step}
        batch = jax.tree.map(lambda x: to_global(x, self.batch_sharding), batch)
        return batch, metrics, Position(position.step + 1, cursor)

    def generate(self, params: nnx.State, prompts: Sequence[Sequence[int]], answers: Sequence[str], key: jax.Array,
                 *, prompt_length: int | None = None, timer: PhaseTimer | None = None
                 ) -> tuple[learner.Batch, dict[str, Any]]:
        """Samples, grades and lays out the rollouts of given prompts (one round: no group filtering).

        Args:
          params: the rollout policy θ_s.
          prompts: this process's prompts as token ids; ``answers`` their reference answers, one per prompt.
          key: the sampler's PRNG key (everything else is deterministic).
          prompt_length: pad prompts to this many tokens (the same on every process of a multi-host run, e.g.
            ``prompt_bucket`` of the global batch's longest prompt); None: the sampler's bucket.
          timer: adds the seconds of the phases ``sample`` and ``score`` (default: a fresh timer).

        Returns:
          ``(batch, metrics)``: the learner batch over every process's rollouts, and their metrics (reward,
          accuracy, zero-variance groups, lengths, tokens per second, the task's reward counters).
        """
        timer = timer if timer is not None else PhaseTimer()
        rnd = self._round(params, prompts, answers, key, prompt_length, timer)
        batch = jax.tree.map(lambda x: to_global(x, self.batch_sharding), rnd.batch)
        return batch, _round_metrics([rnd], self.sampling.num_samples, timer.last("sample"))

    def _round(self, params, prompts, answers, key, prompt_length, timer: PhaseTimer) -> _Round:
        """Samples and grades one round of this process's prompts."""
        cfg, G = self.config, self.sampling.num_samples
        with timer("sample"):
            slots = None if cfg.decode_slots is None else cfg.decode_slots * jax.process_count()
            rollout = self.sampler.generate(prompts, self.sampling, key, params=params, prompt_length=prompt_length,
                                            chunk_size=cfg.generation_batch_size, slots=slots)
        with timer("score"):
            task_rewards = checks.checked_rewards(self.reward_fn, rollout.texts(self.tokenizer),
                                                  [a for a in answers for _ in range(G)])
            rewards = task_rewards
            if cfg.overlong_buffer:
                rewards = rewards + overlong_penalty(rollout.lengths, cfg.max_new_tokens, cfg.overlong_buffer,
                                                     cfg.overlong_penalty)
            advantages = np.asarray(group_advantages(rewards, G, scale_by_std=self.scale_adv_by_std))
            batch = learner.make_batch(rollout, advantages)
            if cfg.mask_truncated:  # TRL's mask_truncated_completions: out of the loss and of every denominator
                finished = rollout.finish_reason != FinishReason.LENGTH
                batch = batch._replace(completion_mask=batch.completion_mask & finished[:, None])
            counts = self.reward_metrics() if self.reward_metrics is not None else {}
            totals = all_hosts(np.asarray([list(counts.values())], np.float64)).sum(0) if counts else []
        return _Round(batch, *(all_hosts(x) for x in (rewards, task_rewards, rollout.lengths, rollout.finish_reason)),
                      reward_counts=dict(zip(counts, map(float, totals), strict=True)))

    def _has_signal(self, rnd: _Round) -> np.ndarray:
        """``[num_groups] bool``: whether a group's ``filter_metric`` differs between its completions (all True
        without filtering)."""
        if not self.config.filter_groups:
            return np.ones(len(rnd.rewards) // self.sampling.num_samples, bool)
        signal = rnd.rewards if self.config.filter_metric == "reward" else (rnd.task_rewards >= 1.0)
        groups = np.asarray(signal, np.float32).reshape(-1, self.sampling.num_samples)
        return groups.max(1) != groups.min(1)

    def _assemble(self, rounds: list[_Round], kept: list[tuple[int, int]]) -> learner.Batch:
        """This process's share of the kept groups (``(round, global group)`` pairs, in order), padded with empty
        groups up to ``prompts_per_step``: a host batch. Rows sampled on another process are fetched through a
        host all-gather of each round (the rounds' prompt widths are first left-padded to the widest)."""
        G, P = self.sampling.num_samples, self.config.prompts_per_step
        width = max(r.batch.tokens.shape[1] for r in rounds)
        rows = [_left_pad(r.batch, width, self.tokenizer.pad_token_id) for r in rounds]
        if jax.process_count() > 1:
            rows = [b._replace(**{f: all_hosts(getattr(b, f)) for f in _ROW_FIELDS}) for b in rows]
        share = P // jax.process_count()
        mine = (kept + [None] * (P - len(kept)))[jax.process_index() * share : (jax.process_index() + 1) * share]
        empty = _empty_group(rows[0], G)
        groups = [empty if k is None else jax.tree.map(lambda x, k=k: x[k[1] * G : (k[1] + 1) * G], rows[k[0]])
                  for k in mine]
        batch = jax.tree.map(lambda *xs: np.concatenate(xs, axis=0), *groups)
        n = len(batch.advantages)
        return batch._replace(ref_logp=np.zeros((n, 0), np.float32), rollout_weights=np.zeros((n, 0), np.float32))


# The fields a rollout fills (the learner fills the others, zero-width here).
_ROW_FIELDS = ("tokens", "attention_mask", "completion_mask", "old_logp", "advantages")


def _left_pad(batch: learner.Batch, width: int, pad_id: int) -> learner.Batch:
    """``batch`` with its prompts left-padded so that ``tokens`` is ``[N, width]`` (positions count real tokens
    only, so the padding changes no log-prob)."""
    extra = width - batch.tokens.shape[1]
    if not extra:
        return batch
    n = batch.tokens.shape[0]
    return batch._replace(tokens=np.concatenate([np.full((n, extra), pad_id, np.int32), batch.tokens], axis=1),
                          attention_mask=np.concatenate([np.zeros((n, extra), bool), batch.attention_mask], axis=1))


def _empty_group(like: learner.Batch, group_size: int) -> learner.Batch:
    """A group of ``group_size`` rows with no token: no weight in the loss, its gradient or any denominator."""
    return learner.Batch(*(np.zeros((group_size, *x.shape[1:]), x.dtype) for x in like))


def overlong_penalty(lengths: np.ndarray, max_new_tokens: int, buffer: int, factor: float) -> np.ndarray:
    """DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13; verl's ``overlong_buffer``): ``[N] float32``,
    0 up to ``max_new_tokens - buffer`` tokens, then falling linearly to ``-factor`` at ``max_new_tokens``:
    ``min(0, -(length - (max_new_tokens - buffer)) / buffer · factor)``."""
    exceed = np.asarray(lengths, np.float32) - (max_new_tokens - buffer)
    return np.minimum(-exceed / buffer * factor, 0.0).astype(np.float32)


def _round_metrics(rounds: list[_Round], group_size: int, sample_seconds: float) -> dict[str, float]:
    """The rollout metrics of a step's rounds, over every sampled rollout (kept or not)."""
    cat = lambda name: np.concatenate([getattr(r, name) for r in rounds])
    rewards, task_rewards, lengths = cat("rewards"), cat("task_rewards"), cat("lengths")
    metrics = rollout_metrics(task_rewards, lengths, cat("finish"), group_size, rewards)
    for name in rounds[0].reward_counts:
        metrics[f"reward/{name}"] = float(sum(r.reward_counts[name] for r in rounds))
    if not np.array_equal(rewards, task_rewards):
        metrics["reward/overlong_penalty"] = float((rewards - task_rewards).mean())
    metrics["time/tokens_per_second"] = float(lengths.sum()) / max(sample_seconds, 1e-9)
    return metrics


def make_rollouts(model: nnx.Module, tokenizer, reward_fn: RewardFn, rollout, loss: LossConfig, *, mesh=None,
                  reward_metrics: Callable[[], dict[str, float]] | None = None,
                  data: TrainingPrompts | None = None) -> Rollouts:
    """The rollout side of an RL run.

    Args:
      model: the policy whose params :meth:`Rollouts.next` is given (its graph builds the sampler).
      tokenizer: a Hugging Face tokenizer (its pad and EOS ids drive the sampler).
      reward_fn: ``(completions, answers) -> [N]`` rewards, e.g. a task's ``reward``.
      rollout: a :class:`sfpo_jax.train.config.RolloutConfig` (batch size, sampling controls, filtering).
      loss: the objective (its advantage normalisation).
      mesh: the device mesh (None: the default device).
      reward_metrics: see :class:`Rollouts` (e.g. ``task.reward_metrics``).
      data: the training prompts (None: use :meth:`Rollouts.generate` on prompts of your own).
    """
    return Rollouts(
        sampler=Sampler(model, mesh=mesh, pad_token_id=tokenizer.pad_token_id),
        sampling=rollout.sampling(eos_token_ids=(tokenizer.eos_token_id,)),
        tokenizer=tokenizer,
        reward_fn=reward_fn,
        reward_metrics=reward_metrics,
        config=rollout,
        scale_adv_by_std=loss.scale_adv_by_std,
        batch_sharding=learner.batch_sharding(mesh, rollout.prompts_per_step * rollout.group_size),
        data=data,
    )


def rollout_metrics(rewards: np.ndarray, lengths: np.ndarray, finish_reason: np.ndarray, group_size: int,
                    shaped_rewards: np.ndarray | None = None) -> dict[str, float]:
    """Reward, accuracy (reward ≥ 1), zero-variance groups and response lengths of rollouts (``[N]`` arrays, groups
    of ``group_size`` consecutive rows); a group has zero variance when the rewards its advantages see
    (``shaped_rewards``, default ``rewards``) are all equal."""
    groups = (rewards if shaped_rewards is None else shaped_rewards).reshape(-1, group_size)
    return {
        "reward/mean": float(rewards.mean()),
        "reward/std": float(rewards.std()),
        "accuracy": float((rewards >= 1.0).mean()),
        "zero_variance_groups": float((groups.max(1) == groups.min(1)).mean()),
        "response_length/mean": float(lengths.mean()),
        "response_length/max": int(lengths.max()),
        "finished": float((finish_reason == 0).mean()),
    }
