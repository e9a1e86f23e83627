"""The learner side of an RL step: ``state, metrics = learner(state, batch)``.

A :class:`Learner` takes one learner :class:`Batch` (from the rollout side, :mod:`sfpo_jax.train.rollouts`) and
the :class:`TrainState` at θ_s, optionally recomputes the old log-probs at θ_s and fills in the reference policy's
log-probs, then makes ``calls_per_batch(opt_state)`` optimizer calls, call ``c`` on mini-batch ``c % M`` with
``M = minibatches_per_epoch(opt_state)``: the transform is the one source of the schedule. Its pieces are pure
functions of arrays: the policy's token log-probs on a batch (with gradients inside the loss, or as a jitted
forward pass), and one jitted optimizer call (a mini-batch accumulated over micro-batches), built from a
:class:`sfpo_jax.rl.LossConfig` alone. The host reads the step's metrics once, after the last call, so it can
queue every call before the device has run the first.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sfpo_jax.optim import calls_per_batch, minibatches_per_epoch, sfpo_active
from sfpo_jax.parallel import logical_sharding, num_shards, param_shardings, replicate_unplaced
from sfpo_jax.rl import grpo
from sfpo_jax.train import packing
from sfpo_jax.train.lora import LoRA
from sfpo_jax.train.metrics import PhaseTimer


class TrainState(NamedTuple):
    """What a step changes: the trained params (the master weights, an ``nnx.State``: the policy's params, or with
    LoRA its adapters, see :meth:`Learner.policy_params`) and the optimizer state (which holds SFPO's slow copy and
    cycle, and the non-finite counters of ``optax.apply_if_finite``), both the size of what is trained."""

    params: nnx.State
    opt_state: optax.OptState


class Batch(NamedTuple):
    """A rollout batch laid out for the learner: N sequences of P prompt tokens then T completion tokens.

    Attributes:
      tokens: ``[N, P+T] int32``, the left-padded prompt followed by the (right-padded) completion.
      attention_mask: ``[N, P+T] bool``, real tokens.
      completion_mask: ``[N, T] bool``, completion tokens that the loss sees (up to and including EOS).
      old_logp: ``[N, T] float32``, log-probs of the completion under the rollout policy θ_s.
      advantages: ``[N] float32``, group-normalised advantages.
      ref_logp: ``[N, T] float32`` under the reference policy, or ``[N, 0]`` when no KL term is used.
      rollout_weights: ``[N, T] float32`` truncated importance weights ``min(π_old / π_sampler, C)`` of the
        rollout/learner mismatch (``loss.rollout_correction="token"``), or ``[N, 0]`` when not used.
    """

    tokens: jax.Array
    attention_mask: jax.Array
    completion_mask: jax.Array
    old_logp: jax.Array
    advantages: jax.Array
    ref_logp: jax.Array
    rollout_weights: jax.Array


def check_batch(batch: Batch) -> None:
    """Shape and dtype checks of a learner batch (at trace time: free inside ``jit``)."""
    chex.assert_rank([batch.tokens, batch.attention_mask, batch.completion_mask, batch.old_logp], 2)
    chex.assert_rank(batch.advantages, 1)
    chex.assert_equal_shape([batch.tokens, batch.attention_mask])
    chex.assert_equal_shape([batch.completion_mask, batch.old_logp])
    chex.assert_equal_shape_prefix([batch.tokens, batch.completion_mask, batch.advantages, batch.ref_logp], 1)
    chex.assert_type([batch.tokens], jnp.int32)
    chex.assert_type([batch.old_logp, batch.advantages, batch.ref_logp], jnp.float32)


def completion_logits(model, batch_tokens, attention_mask, num_completion_tokens: int):
    """``[N, T, V] float32`` logits of ``model`` at the positions that predict the last T = ``num_completion_tokens``
    tokens of ``batch_tokens [N, P+T]`` (``attention_mask [N, P+T]``)."""
    # The logit at position t predicts token t+1: the completion's T tokens are predicted by [P-1, P+T-1), so only
    # the last T + 1 positions need the LM head (as TRL's GRPOTrainer asks transformers for).
    logits = model(batch_tokens, attention_mask=attention_mask, logits_to_keep=num_completion_tokens + 1)
    return logits[:, :-1]


def completion_logprobs(model, batch_tokens, attention_mask, completion_mask):
    """Log-probs and entropies of the completion tokens under ``model``.

    Args:
      model: a :class:`sfpo_jax.models.CausalLM`.
      batch_tokens: ``[N, P+T] int32``; attention_mask: ``[N, P+T]``; completion_mask: ``[N, T]``.

    Returns:
      ``(logp, entropy)``, both ``[N, T] float32`` and zero where ``completion_mask`` is 0.
    """
    T = completion_mask.shape[1]
    logits = completion_logits(model, batch_tokens, attention_mask, T)
    return grpo.token_logprobs_and_entropy(logits, batch_tokens[:, -T:], completion_mask)


def minibatch_loss(params, graphdef, batch: Batch, loss: grpo.LossConfig, num_tokens, num_seqs,
                   layout: packing.Packed | None = None):
    """The GRPO loss of one micro-batch, normalised by the denominators that make the micro-batch losses (and
    their gradients) add up to the mini-batch's (see :func:`sfpo_jax.rl.aggregate`). With ``layout`` (this
    micro-batch's packed layout) the model computes that instead of ``batch.tokens``: the same log-probs."""
    model = nnx.merge(graphdef, params)
    logp, entropy = _logprobs(model, batch, layout)
    return grpo.policy_loss(logp, batch.old_logp, batch.advantages, batch.completion_mask, loss,
                            ref_logp=batch.ref_logp if loss.kl_coef > 0 else None, entropy=entropy,
                            rollout_weights=batch.rollout_weights if loss.rollout_correction == "token" else None,
                            num_tokens=num_tokens, num_seqs=num_seqs)


def _logprobs(model, batch: Batch, layout: packing.Packed | None):
    if layout is None:
        return completion_logprobs(model, batch.tokens, batch.attention_mask, batch.completion_mask)
    return packing.completion_logprobs(model, layout, batch.completion_mask)


def micro_batches(batch: Batch, num_micro: int, layout: packing.Packed | None) -> Batch:
    """``batch`` as ``[num_micro, N // num_micro, ...]`` micro-batches: strided (:func:`to_micro_batches`), or
    the rows of ``layout.rows`` (a packed layout's partition; any partition gives the same mini-batch objective
    but ``micro-batch-token-mean``'s, for which `packing.pack` keeps the strided one)."""
    if layout is None:
        return jax.tree.map(lambda x: to_micro_batches(x, num_micro), batch)
    if layout.rows.shape[0] != num_micro:
        raise ValueError(f"the packed layout has {layout.rows.shape[0]} micro-batches, the update {num_micro}")
    return jax.tree.map(lambda x: x[layout.rows], batch)


# Metrics of `grpo.policy_loss` that are already normalised by the whole mini-batch (they add up over its
# micro-batches); the others are averages over a micro-batch's own tokens, and the extremes.
_ADDITIVE_METRICS = ("loss", "pg_loss", "kl")
_EXTREMES = {"ratio_min": jnp.min, "ratio_max": jnp.max}


def reduce_micro_metrics(metrics: dict[str, jax.Array], tokens: jax.Array) -> dict[str, jax.Array]:
    """One mini-batch's metrics from its micro-batches' (``[num_micro]`` each, ``tokens`` their real-token
    counts): sums of the additive ones, token-weighted means of the per-token averages, min / max of the
    extremes, so that every metric is the same however the mini-batch is split."""
    weights = tokens / jnp.maximum(tokens.sum(), 1)

    def reduce(name, m):
        if name in _ADDITIVE_METRICS:
            return m.sum()
        if name in _EXTREMES:
            return _EXTREMES[name](m)
        return jnp.sum(m * weights)

    return {name: reduce(name, m) for name, m in metrics.items()}


def make_update_fn(graphdef, tx: optax.GradientTransformationExtraArgs, loss: grpo.LossConfig, num_micro: int,
                   merge: Callable | None = None):
    """One optimizer call: gradients of a mini-batch accumulated over ``num_micro`` micro-batches
    (``lax.scan``, so memory is that of one micro-batch), then ``tx.update`` with the mini-batch's mean token
    entropy (what SFPO's switch watches), then ``apply_updates``. Params and optimizer state are donated.

    ``merge(frozen, params) -> the policy's full params`` (e.g. :meth:`sfpo_jax.train.lora.LoRA.merge`) makes
    ``params`` the trained part only: the loss runs the model on the merge (per micro-batch, inside the gradient,
    so the gradient and its accumulator have the trained part's size) and ``frozen`` is neither differentiated nor
    donated. None: ``params`` are the policy's full params.

    Returns ``update(params, opt_state, batch, layout=None, frozen=None) -> (params, opt_state, metrics)``;
    ``metrics`` are float32 scalars: those of :func:`sfpo_jax.rl.policy_loss` over the whole mini-batch
    (independent of ``num_micro``) and ``grad_norm``, the global norm of the gradient before clipping. ``layout``:
    the mini-batch packed (:func:`sfpo_jax.train.packing.pack` with ``num_micro`` micro-batches), which the model
    then computes instead of the padded rows, for the same objective. Compiled once per shape.
    """

    def trained_loss(params, frozen, *args):
        return minibatch_loss(params if merge is None else merge(frozen, params), *args)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def update(params, opt_state, batch: Batch, layout: packing.Packed | None = None, frozen=None):
        check_batch(batch)
        micro = micro_batches(batch, num_micro, layout)
        micro_tokens = micro.completion_mask.sum(axis=(1, 2)).astype(jnp.float32)
        # Rows with a completion token: every sampled row has one (its first token, or EOS); the empty groups that
        # pad a short filtered batch and the completions masked as truncated have none, and weigh nothing.
        num_seqs = jnp.maximum(jnp.sum(jnp.any(batch.completion_mask, axis=1)), 1).astype(jnp.float32)
        grad_fn = jax.value_and_grad(trained_loss, has_aux=True)

        def accumulate(grads, xs):
            mb, tokens, mb_layout = xs
            if loss.agg == grpo.MICRO_BATCH_TOKEN_MEAN:  # verl: each micro-batch's token mean / num_micro
                num_tokens = jnp.maximum(tokens, 1) * num_micro
            else:
                num_tokens = jnp.maximum(micro_tokens.sum(), 1)
            (_, metrics), g = grad_fn(params, frozen, graphdef, Batch(*mb), loss, num_tokens, num_seqs, mb_layout)
            return jax.tree.map(jnp.add, grads, g), metrics

        zeros = jax.tree.map(jnp.zeros_like, params)
        grads, metrics = jax.lax.scan(accumulate, zeros, (tuple(micro), micro_tokens, layout))
        metrics = reduce_micro_metrics(metrics, micro_tokens)
        metrics["grad_norm"] = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, opt_state, params, entropy=metrics["entropy"])
        params = optax.apply_updates(params, updates)
        return params, opt_state, metrics

    return update


def to_micro_batches(x: jax.Array, num_micro: int) -> jax.Array:
    """``[N, ...] → [num_micro, N // num_micro, ...]``, micro-batch ``j`` holding rows ``j, j + num_micro, …``.

    Strided rather than contiguous on purpose: the batch is sharded in contiguous blocks over the ``batch``
    mesh axes, and a strided split leaves every micro-batch spread over all of them (each device slices its own
    block, no communication). A contiguous split would put whole micro-batches on single shards, and XLA
    all-gathers the batch and runs every micro-batch replicated instead. Inverse: :func:`from_micro_batches`.
    """
    n = x.shape[0]
    if n % num_micro:
        raise ValueError(f"{n} rows do not split into {num_micro} equal micro-batches")
    return x.reshape(n // num_micro, num_micro, *x.shape[1:]).swapaxes(0, 1)


def from_micro_batches(x: jax.Array) -> jax.Array:
    """Inverse of :func:`to_micro_batches`: ``[num_micro, B, ...] → [num_micro * B, ...]`` in the original row order."""
    return x.swapaxes(0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def make_logprob_fn(graphdef, micro_batch_size: int | None):
    """A jitted forward pass giving the completion log-probs of a whole rollout batch under some params.

    The loop uses it for the two extra log-prob passes of a step: the *old* log-probs recomputed by the learner
    at θ_s (``rollout.recompute_old_logprobs``: the learner's own numerics, e.g. bf16 training vs a sampler that
    differs, instead of the sampler's) and the *reference* policy's log-probs for the KL term
    (``loss.kl_coef > 0``). No gradients, so a micro-batch costs one forward pass; ``lax.map`` over
    micro-batches of ``micro_batch_size`` rows keeps memory at one micro-batch's logits, and the strided split
    (:func:`to_micro_batches`) keeps each micro-batch sharded over the batch axes like the update's.

    Args:
      graphdef: the model's ``nnx.GraphDef`` (from ``nnx.split``).
      micro_batch_size: rows per forward pass; None: the whole batch at once. Must divide the batch size.

    Returns:
      ``logprob_fn(params, tokens, attention_mask, completion_mask, layout=None) -> [N, T] float32``, with the
      inputs as in :class:`Batch` (``tokens``/``attention_mask`` ``[N, P+T]``, ``completion_mask`` ``[N, T]``),
      zero where ``completion_mask`` is 0, the temperature-1 log-probs the sampler reports. ``layout``: the batch
      packed (:func:`sfpo_jax.train.packing.pack`, ``N / micro_batch_size`` micro-batches), computed instead of
      the padded rows. Compiled once per shape.
    """

    @jax.jit
    def logprob_fn(params, tokens, attention_mask, completion_mask, layout: packing.Packed | None = None):
        num_micro = micro_batches_per_minibatch(tokens.shape[0], micro_batch_size, what="batch size")
        batch = Batch(tokens, attention_mask, completion_mask, *(jnp.zeros(tokens.shape[:1]),) * 4)
        micro = micro_batches(batch, num_micro, layout)

        def forward(xs):
            mb, mb_layout = xs
            model = nnx.merge(graphdef, params)
            # No backward pass here, so nothing to rematerialise; and nnx.remat inside lax.map would have to update
            # params that belong to the enclosing trace (a TraceContextError).
            model.remat = False
            logp, _ = _logprobs(model, Batch(*mb), mb_layout)  # the entropy is dead code to XLA
            return logp

        logp = jax.lax.map(forward, (tuple(micro), layout))
        if layout is None:
            return from_micro_batches(logp)
        # The layout's rows are a partition of the batch: scatter each micro-batch's rows back to their place.
        return jnp.zeros(completion_mask.shape, jnp.float32).at[layout.rows.reshape(-1)].set(
            logp.reshape(-1, logp.shape[-1]))

    return logprob_fn


@jax.jit
def masked_mean_abs_diff(a: jax.Array, b: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of ``|a - b|`` over the real tokens of ``[N, T]`` arrays (0 with no real token): the gap between
    recomputed and sampler log-probs that the loop logs."""
    m = mask.astype(bool)
    return jnp.sum(jnp.where(m, jnp.abs(a - b), 0.0)) / jnp.maximum(jnp.sum(m), 1)


@functools.partial(jax.jit, static_argnames="cap")
def rollout_correction_weights(old_logp: jax.Array, sampler_logp: jax.Array, mask: jax.Array, cap: float
                               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Truncated importance sampling of the rollout/learner mismatch (verl's rollout correction, TRL's vLLM
    importance sampling): ``[N, T] float32`` weights ``min(exp(old_logp − sampler_logp), cap)`` on the real tokens
    (0 elsewhere), and their ``rollout_correction/weight_mean`` and ``/capped_frac`` over the real tokens."""
    m = mask.astype(bool)
    log_w = jnp.clip(jnp.where(m, old_logp - sampler_logp, 0.0), -20.0, 20.0)
    w = jnp.where(m, jnp.minimum(jnp.exp(log_w), cap), 0.0)
    n = jnp.maximum(jnp.sum(m), 1)
    return w, {"rollout_correction/weight_mean": jnp.sum(w) / n,
               "rollout_correction/capped_frac": jnp.sum(m & (w >= cap)) / n}


def split_minibatches(batch: Batch, num_minibatches: int) -> list[Batch]:
    """Splits a batch along its first axis into ``num_minibatches`` equal, contiguous mini-batches.

    Contiguous slices keep whole GRPO groups together when the number of prompts divides evenly.
    """
    n = batch.tokens.shape[0]
    if n % num_minibatches:
        raise ValueError(f"batch of {n} sequences does not split into num_minibatches={num_minibatches}")
    size = n // num_minibatches
    return [Batch(*(x[i * size : (i + 1) * size] for x in batch)) for i in range(num_minibatches)]


def micro_batches_per_minibatch(minibatch_size: int, micro_batch_size: int | None, *,
                                what: str = "mini-batch size") -> int:
    """How many micro-batches one mini-batch (or any batch; ``what`` names it in errors) is split into
    (1 when ``micro_batch_size`` is None)."""
    if micro_batch_size is None or micro_batch_size >= minibatch_size:
        return 1
    if minibatch_size % micro_batch_size:
        raise ValueError(f"rollout.micro_batch_size={micro_batch_size} must divide the {what} {minibatch_size}")
    return minibatch_size // micro_batch_size


def make_batch(rollout, advantages: np.ndarray) -> Batch:
    """Lays a sampler :class:`~sfpo_jax.sampling.Rollout` and its advantages out as a learner :class:`Batch`."""
    tokens = np.concatenate([np.asarray(rollout.prompt_tokens), np.asarray(rollout.tokens)], axis=1)
    mask = np.concatenate([np.asarray(rollout.prompt_mask), np.asarray(rollout.mask)], axis=1)
    n = tokens.shape[0]
    return Batch(
        tokens=tokens.astype(np.int32),
        attention_mask=mask.astype(bool),
        completion_mask=np.asarray(rollout.mask, bool),
        old_logp=np.asarray(rollout.logprobs, np.float32),
        advantages=np.asarray(advantages, np.float32),
        ref_logp=np.zeros((n, 0), np.float32),  # filled by the learner when a KL term needs it
        rollout_weights=np.zeros((n, 0), np.float32),  # filled by the learner under loss.rollout_correction
    )


def batch_sharding(mesh, rows: int):
    """The sharding of a learner batch's ``rows`` over the mesh's batch axes (None without a mesh); ValueError if
    the rows do not split evenly over them."""
    if mesh is None:
        return None
    sharding = logical_sharding(mesh, ("batch",))
    if rows % (shards := num_shards(sharding)):
        raise ValueError(
            f"the learner batch of {rows} rows (rollout.prompts_per_step x group_size) does not split over the "
            f"mesh's {shards} batch shards ({dict(mesh.shape)}): make the rows a multiple of {shards}, or use a "
            f"mesh whose data x fsdp size divides {rows}")
    return sharding


@dataclasses.dataclass(frozen=True)
class Learner:
    """The learner side of an RL step, built by :func:`make_learner`; ``state, metrics = learner(state, batch)``.

    Attributes:
      update: the jitted optimizer call (:func:`make_update_fn`).
      logprob_fn: the jitted forward pass for old / reference log-probs (:func:`make_logprob_fn`), or None when
        neither is used.
      ref_params: the frozen KL reference policy's params, or None without a KL term.
      num_minibatches: M, read from the transform's state when the learner was built.
      recompute_old_logprobs: take the ratio's denominator from the learner's forward at θ_s, not the sampler's.
      rollout_correction_cap: C of the truncated importance weights ``min(π_old / π_sampler, C)`` that correct the
        rollout/learner mismatch (``loss.rollout_correction="token"``), or None without the correction.
      layouts: the packed layouts the model computes (``rollout.packing``); None: the padded rows.
      frozen: with LoRA, the base params (never updated nor donated; ``TrainState.params`` are the adapters);
        None: the state's params are the whole policy.
      merge: with LoRA, the jitted ``(frozen, adapters) -> policy params`` (:meth:`sfpo_jax.train.lora.LoRA.merge`).
    """

    update: Callable
    logprob_fn: Callable | None
    ref_params: nnx.State | None
    num_minibatches: int
    recompute_old_logprobs: bool
    rollout_correction_cap: float | None = None
    layouts: Layouts | None = None
    frozen: nnx.State | None = None
    merge: Callable | None = None

    def policy_params(self, state: TrainState) -> nnx.State:
        """The policy's full params at ``state`` (an ``nnx.State`` of the model): what the sampler, evaluation and
        export take. ``state.params`` itself without LoRA; with it, the base merged with the adapters (one new
        param-sized array tree, in the base's dtype)."""
        return state.params if self.merge is None else self.merge(self.frozen, state.params)

    def __call__(self, state: TrainState, batch: Batch, *, timer: PhaseTimer | None = None
                 ) -> tuple[TrainState, dict[str, Any]]:
        """Learns on one batch: ``calls_per_batch(opt_state)`` optimizer calls over its M mini-batches.

        Args:
          state: the params θ_s (the batch's rollout policy) and optimizer state (donated: do not reuse them).
          batch: the whole step's learner batch, ``[N, ...]`` global arrays (N divisible by M).
          timer: adds the seconds of the phases ``logprobs`` and ``update`` (default: a fresh timer).

        Returns:
          ``(state, metrics)``: the state after the calls, and host floats: ``train/<name>`` (the mean over the
          calls of :func:`make_update_fn`'s metrics; min / max for the ratio extremes), ``entropy`` (the mean over
          the last epoch: what SFPO's switch records), ``sfpo_active`` and ``optimizer_calls`` (at the batch's
          start), the non-finite counters, and ``logprobs/sampler_abs_diff`` when old log-probs are recomputed.
        """
        timer = timer if timer is not None else PhaseTimer()
        params, opt_state = state
        device_metrics = {}
        host = None if self.layouts is None else jax.device_get(batch[:3])  # tokens and masks, to pack
        if self.logprob_fn is not None:
            with timer("logprobs"):
                layout = None if host is None else self.layouts.logprob_pass(*host)
                batch, device_metrics = self._extra_logprobs(state, batch, layout)
        with timer("update"):
            active, num_calls = sfpo_active(opt_state), calls_per_batch(opt_state)
            minibatches = split_minibatches(batch, self.num_minibatches)
            layouts = ([None] * self.num_minibatches if host is None else
                       self.layouts.minibatches(*host, self.num_minibatches))
            calls = []
            # The SFPO transform's cycle and the mini-batches are both counted from the batch's first call: a
            # non-finite call still counts (see `Config.optimizer`), so call c is mini-batch c % M.
            for call in range(num_calls):
                c = call % self.num_minibatches
                params, opt_state, m = self.update(params, opt_state, minibatches[c], layouts[c], self.frozen)
                calls.append(m)
            # One host sync for the whole step, after the last call: the host queues every call without waiting.
            calls, device_metrics, nonfinite = jax.device_get((calls, device_metrics, _nonfinite_state(opt_state)))
        in_a_row, total = (0, 0) if nonfinite is None else (int(nonfinite[0]), int(nonfinite[1]))
        metrics = {"sfpo_active": active, "optimizer_calls": num_calls, "nonfinite_in_a_row": in_a_row,
                   "nonfinite_total": total, **reduce_call_metrics(calls, self.num_minibatches),
                   **{k: float(v) for k, v in device_metrics.items()}}
        return TrainState(params, opt_state), metrics

    def _extra_logprobs(self, state: TrainState, batch: Batch, layout) -> tuple[Batch, dict[str, jax.Array]]:
        """The batch with its old log-probs recomputed at θ_s (``state``, not yet updated this step) and / or the
        reference policy's log-probs filled in, computed in ``layout`` (None: the padded rows); the
        sampler-vs-learner gap as a device scalar."""
        inputs, metrics = (batch.tokens, batch.attention_mask, batch.completion_mask, layout), {}
        if self.recompute_old_logprobs:
            old_logp = self.logprob_fn(self.policy_params(state), *inputs)
            metrics["logprobs/sampler_abs_diff"] = masked_mean_abs_diff(old_logp, batch.old_logp,
                                                                        batch.completion_mask)
            if self.rollout_correction_cap is not None:
                weights, weight_metrics = rollout_correction_weights(old_logp, batch.old_logp, batch.completion_mask,
                                                                     self.rollout_correction_cap)
                batch, metrics = batch._replace(rollout_weights=weights), metrics | weight_metrics
            batch = batch._replace(old_logp=old_logp)
        if self.ref_params is not None:
            batch = batch._replace(ref_logp=self.logprob_fn(self.ref_params, *inputs))
        jax.block_until_ready(batch)  # so that the phase's time is the passes', not the next phase's
        return batch, metrics


@dataclasses.dataclass(frozen=True)
class Layouts:
    """The learner's packed layouts (``rollout.packing``, :mod:`sfpo_jax.train.packing`) of a batch's host copy,
    placed with their rows over the mesh's batch shards: one for the log-prob pass, one per mini-batch.

    Attributes:
      mode: ``"sequences"`` or ``"groups"``; max_row_tokens: ``rollout.packing_row_tokens``.
      sharding: of a layout's ``[U, R, ...]`` arrays (rows over the batch axes), or None.
      num_micro: micro-batches per mini-batch in the update; logprob_micro: per batch in the log-prob pass.
      strided: the update's micro-batches are the padded layout's (``micro-batch-token-mean`` reads the split).
    """

    mode: str
    max_row_tokens: int | None
    sharding: Any
    num_micro: int
    logprob_micro: int
    strided: bool

    def pack(self, tokens, attention_mask, completion_mask, num_micro: int, strided: bool) -> packing.Packed:
        row_multiple = 1 if self.sharding is None else num_shards(self.sharding, 1)
        packed = packing.pack(tokens, attention_mask, completion_mask, self.mode, num_micro=num_micro,
                              strided=strided, max_row_tokens=self.max_row_tokens, row_multiple=row_multiple)
        if self.sharding is None:
            return jax.device_put(packed)
        # The packed rows over the batch shards (R is a multiple of them); the small index maps of the padded rows
        # (a micro-batch may have fewer rows than shards) replicated.
        replicated = jax.sharding.NamedSharding(self.sharding.mesh, jax.sharding.PartitionSpec())
        return jax.device_put(packed, packing.Packed(*[self.sharding] * 7, replicated, replicated))

    def logprob_pass(self, tokens, attention_mask, completion_mask) -> packing.Packed:
        """The whole batch's layout (its micro-batches' rows are free: the pass's output is per row)."""
        return self.pack(tokens, attention_mask, completion_mask, self.logprob_micro, False)

    def minibatches(self, tokens, attention_mask, completion_mask, num_minibatches: int) -> list[packing.Packed]:
        """One layout per contiguous mini-batch (:func:`split_minibatches`)."""
        size = tokens.shape[0] // num_minibatches
        return [self.pack(*(x[m * size:(m + 1) * size] for x in (tokens, attention_mask, completion_mask)),
                          self.num_micro, self.strided) for m in range(num_minibatches)]


def make_layouts(rollout, loss: grpo.LossConfig, mesh, num_micro: int) -> Layouts | None:
    """The learner's :class:`Layouts` for ``rollout.packing`` (None for ``"none"``)."""
    if rollout.packing == "none":
        return None
    if jax.process_count() > 1:
        raise ValueError(f"rollout.packing={rollout.packing!r} packs on one host, and a multi-process run feeds each "
                         "process's rows from its own: use rollout.packing=none")
    rows = rollout.prompts_per_step * rollout.group_size
    return Layouts(rollout.packing, rollout.packing_row_tokens,
                   None if mesh is None else logical_sharding(mesh, (None, "batch")), num_micro,
                   micro_batches_per_minibatch(rows, rollout.micro_batch_size, what="batch size"),
                   loss.agg == grpo.MICRO_BATCH_TOKEN_MEAN)


def make_learner(model: nnx.Module, tx: optax.GradientTransformationExtraArgs, rollout, loss: grpo.LossConfig, *,
                 mesh=None, lora: LoRA | None = None) -> tuple[Learner, TrainState]:
    """The learner of an RL run and its initial state.

    Args:
      model: the policy (a :class:`sfpo_jax.models.CausalLM`, sharded over ``mesh`` if given); its params are the
        initial state, and with ``loss.kl_coef > 0`` a frozen copy of them is the KL reference.
      tx: the optimizer, an SFPO transform chained last (``Config.optimizer()``; ``sfpo(num_fast_steps=0)`` for
        GRPO), whose ``num_minibatches`` must equal ``rollout.num_minibatches``.
      rollout: a :class:`sfpo_jax.train.config.RolloutConfig` (the batch's rows, mini- and micro-batch sizes).
      loss: the objective.
      mesh: the device mesh (None: the default device).
      lora: train low-rank adapters only (``Config.lora()``): the state's params are then ``lora.init(model)``,
        the model's own params (load them in the compute dtype, as ``load_policy`` does) stay frozen as
        :attr:`Learner.frozen`, and they are the KL reference, without a copy.

    Raises:
      ValueError: when the transform's M differs from ``rollout.num_minibatches`` (each batch would silently get
        another schedule than the one configured), or the batch does not split over the mesh or the micro-batches.
    """
    graphdef, params = nnx.split(model)
    frozen = None
    if lora is not None:
        frozen, params = params, lora.init(model, mesh=mesh)
    opt_state = tx.init(params)
    M = minibatches_per_epoch(opt_state)
    if M != rollout.num_minibatches:
        raise ValueError(
            f"the optimizer's SFPO transform has num_minibatches={M} but rollout.num_minibatches="
            f"{rollout.num_minibatches}: build it with sfpo(..., num_minibatches={rollout.num_minibatches}) "
            "(Config.optimizer() does), so that every epoch is one call per mini-batch")
    rows = rollout.prompts_per_step * rollout.group_size
    batch_sharding(mesh, rows)
    # The KL reference is the initial policy: the frozen base with LoRA, else a copy, since the update donates
    # (overwrites) `params`.
    ref_params = None
    if loss.kl_coef > 0:
        ref_params = frozen if frozen is not None else jax.tree.map(jnp.copy, params)
    num_micro = micro_batches_per_minibatch(rows // M, rollout.micro_batch_size)
    extra_logprobs = rollout.recompute_old_logprobs or ref_params is not None
    learner = Learner(
        update=make_update_fn(graphdef, tx, loss, num_micro, merge=None if lora is None else lora.merge),
        logprob_fn=make_logprob_fn(graphdef, rollout.micro_batch_size) if extra_logprobs else None,
        ref_params=ref_params,
        num_minibatches=M,
        recompute_old_logprobs=rollout.recompute_old_logprobs,
        rollout_correction_cap=loss.rollout_correction_cap if loss.rollout_correction == "token" else None,
        layouts=make_layouts(rollout, loss, mesh, num_micro),
        frozen=frozen,
        merge=None if lora is None else _jitted_merge(lora, frozen, mesh),
    )
    return learner, TrainState(params, opt_state if mesh is None else replicate_unplaced(opt_state, mesh))


def _jitted_merge(lora: LoRA, frozen: nnx.State, mesh) -> Callable:
    """``lora.merge`` jitted, its result laid out as the model's params (the layout the sampler's programs take)."""
    placed = {} if mesh is None else {"out_shardings": param_shardings(frozen, mesh)}
    return jax.jit(lora.merge, **placed)


def _nonfinite_state(opt_state: optax.OptState) -> tuple[jax.Array, jax.Array] | None:
    """``(in_a_row, total)`` device counts of optimizer calls skipped for non-finite gradients, from the
    ``optax.apply_if_finite`` in ``opt_state`` (None without one)."""
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ApplyIfFiniteState))
             if isinstance(s, optax.ApplyIfFiniteState)]
    return (found[0].notfinite_count, found[0].total_notfinite) if found else None


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
