"""One RL step on prompts of your own, for your own loop: the rollout side and the learner side composed::

    rl_step, state = make_rl_step(model, tokenizer, task.reward, cfg.optimizer(), cfg.rollout, cfg.loss)
    for step in range(num_steps):
        state, metrics = rl_step(state, prompts, answers, jax.random.fold_in(key, step))

is ``batch, m = rl_step.rollouts.generate(rl_step.learner.policy_params(state), prompts, answers, key)``
(:mod:`sfpo_jax.train.rollouts`: sample ``group_size`` completions at θ_s, grade, group advantages) then ``state,
m2 = rl_step.learner(state, batch)`` (:mod:`sfpo_jax.train.learner`: old / reference log-probs if configured, then
``calls_per_batch(opt_state)`` optimizer calls over the mini-batches). GRPO is the same step with
``sfpo(num_fast_steps=0)``; ``lora=cfg.lora()`` trains LoRA adapters (``state.params``) on a frozen base.
``train()`` runs the same two sides, with the rollout side drawing the prompts from its own data order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import optax
from flax import nnx

from sfpo_jax.rl import LossConfig
from sfpo_jax.train.learner import Learner, TrainState, make_learner
from sfpo_jax.train.lora import LoRA
from sfpo_jax.train.metrics import PhaseTimer
from sfpo_jax.train.rollouts import RewardFn, Rollouts, make_rollouts


@dataclasses.dataclass(frozen=True)
class RLStep:
    """One GRPO / SFPO step on given prompts, built by :func:`make_rl_step`; ``state, metrics = rl_step(state,
    prompts, answers, key)``. ``rollouts`` and ``learner`` are the two sides, usable on their own."""

    rollouts: Rollouts
    learner: Learner

    @property
    def sampler(self):
        return self.rollouts.sampler

    @property
    def sampling(self):
        return self.rollouts.sampling

    def __call__(self, state: TrainState, prompts: Sequence[Sequence[int]], answers: Sequence[str], key: jax.Array,
                 *, prompt_length: int | None = None, timer: PhaseTimer | None = None
                 ) -> tuple[TrainState, dict[str, Any]]:
        """Samples, scores and learns on one batch.

        Args:
          state: the params θ_s and optimizer state at the start of the step (donated: do not reuse them).
          prompts: this process's prompts as token ids; ``answers`` their reference answers, one per prompt.
          key: the step's PRNG key (the sampler's; everything else is deterministic).
          prompt_length: see :meth:`Rollouts.generate`.
          timer: adds the seconds of the phases ``sample``, ``score``, ``logprobs`` and ``update``.

        Returns:
          ``(state, metrics)``: the state after the batch's optimizer calls, and the rollout and learner metrics.
        """
        timer = timer if timer is not None else PhaseTimer()
        batch, metrics = self.rollouts.generate(self.learner.policy_params(state), prompts, answers, key,
                                                prompt_length=prompt_length, timer=timer)
        state, learner_metrics = self.learner(state, batch, timer=timer)
        return state, metrics | learner_metrics


def make_rl_step(model: nnx.Module, tokenizer, reward_fn: RewardFn, tx: optax.GradientTransformationExtraArgs,
                 rollout, loss: LossConfig, *, mesh=None, reward_metrics: Callable[[], dict[str, float]] | None = None,
                 lora: LoRA | None = None) -> tuple[RLStep, TrainState]:
    """The step function and the initial state of an RL run on prompts of your own: :func:`make_rollouts` and
    :func:`make_learner` (see them for the arguments; ``tx``'s SFPO ``num_minibatches`` must equal
    ``rollout.num_minibatches``)."""
    rollouts = make_rollouts(model, tokenizer, reward_fn, rollout, loss, mesh=mesh, reward_metrics=reward_metrics)
    learner, state = make_learner(model, tx, rollout, loss, mesh=mesh, lora=lora)
    return RLStep(rollouts, learner), state
