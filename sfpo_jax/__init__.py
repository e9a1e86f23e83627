"""sfpo-jax: Slow-Fast Policy Optimization (arXiv 2510.04072) for RL of LLM reasoning, in pure JAX.

Architecture: layers, what each may import, and one step's data flow
=====================================================================

Each package is usable on its own; a package imports only those below it in this list (and never the ones
above), and only through their public ``__init__`` names::

  host       malloc settings: keep freed memory for reuse; huge pages (opt-in)        (stdlib)
  optim      SFPO as an optax transformation: sfpo(), SFPOState, calls_per_batch()    (jax, optax)
  rl         the GRPO objective: LossConfig, group_advantages, policy_loss, ...       (jax)
  parallel   Mesh, logical-axis sharding rules, multi-host init and data helpers      (jax)
  models     Flax NNX decoder LMs, Hugging Face / GGUF checkpoint I/O, KV cache       (parallel)
  sampling   Sampler: jitted prefill + decode with a KV cache; SamplingConfig         (models, parallel)
  rewards    math grading (math-verify in time-bounded worker processes), extraction  (nothing above)
  data       named dataset specs loaded with `datasets`, prompt rendering             (rewards)
  tasks      Task = problems + reward + prompt rendering; built-in tasks registry     (data, rewards)
  train      config, rollout side, learner side, the loop, run folder, warm-up         (all of the above)
  analysis   cross-run learning-efficiency summaries and plots                        (numpy, matplotlib)

One RL step is two sides with one explicit value between them, a learner ``Batch``::

  rollout side (sfpo_jax.train.rollouts.Rollouts): owns the training prompts and the data cursor
    batch, rollout_metrics, position = rollouts.next(params θ_s, position, key)
      TrainingPrompts.indices(position.cursor, prompts_per_step) ──Sampler(params θ_s)──> Rollout
      ──task.reward──> rewards ──group_advantages──> learner Batch (global array over the mesh)

  learner side (sfpo_jax.train.learner.Learner): owns the optimizer calls
    state, learner_metrics = learner(state, batch)
      ──[logprob_fn at θ_s / reference]──> old and reference log-probs (optional)
      ──calls_per_batch(opt_state) × update(params, opt_state, minibatch[c % M])──> params, opt_state
      ──one device_get──> metrics          M = minibatches_per_epoch(opt_state): the transform is its one source

With LoRA (``model.lora_rank``, :mod:`sfpo_jax.train.lora`) the state's params are the adapters only, the base is
frozen, and ``learner.policy_params(state)`` (the base merged with the adapters) is the θ_s that the rollout side,
evaluation and export take; without it, that is ``state.params``.

``update`` is one jitted call: the GRPO loss's gradient accumulated over micro-batches, then
``tx.update(grads, opt_state, params, entropy=...)`` of ``chain(apply_if_finite(adamw), sfpo(K, α, M))``. The
transform, not the loop, decides the schedule: (K+1)·M calls per batch while SFPO is active (its K-th epoch ends by
repositioning to θ̃), M after its entropy switch. The :class:`~sfpo_jax.train.rollouts.Position` (batches produced,
prompts consumed) is checkpointed with the state, so resume is exact whatever a step consumed.
:func:`sfpo_jax.train.train` is the loop around the two sides: setup, steps, evaluation, checkpoints;
:func:`sfpo_jax.train.make_rl_step` composes them for a loop of your own on prompts you pick.

Subpackages are imported on first use (``sfpo_jax.rewards.math_reward(...)`` after ``import sfpo_jax``), so
``import sfpo_jax`` stays light.
"""

import importlib

from sfpo_jax.optim import SFPOState, calls_per_batch, sfpo, sfpo_active
from sfpo_jax.rl import grpo

__version__ = "0.1.0"

_SUBPACKAGES = ("analysis", "data", "models", "optim", "parallel", "rewards", "rl", "sampling", "tasks", "train")


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        return importlib.import_module(f"sfpo_jax.{name}")
    raise AttributeError(f"module 'sfpo_jax' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_SUBPACKAGES])


__all__ = ["SFPOState", "calls_per_batch", "grpo", "sfpo", "sfpo_active"]
