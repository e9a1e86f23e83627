"""The learner side of one RL step, as pure functions: the policy's token log-probs on a rollout batch (with
gradients inside the loss, or as a jitted forward pass for old / reference log-probs), and one jitted optimizer
call (a mini-batch accumulated over micro-batches), built from a :class:`sfpo_jax.rl.LossConfig` alone.

Everything here is a function of arrays; :mod:`sfpo_jax.train.step` decides what to call when.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sfpo_jax.rl import grpo


class Batch(NamedTuple):
    """A rollout batch laid out for the learner: N sequences of P prompt tokens then T completion tokens.

    Attributes:
      tokens: ``[N, P+T] int32``, the left-padded prompt followed by the (right-padded) completion.
      attention_mask: ``[N, P+T] bool``, real tokens.
      completion_mask: ``[N, T] bool``, completion tokens that the loss sees (up to and including EOS).
      old_logp: ``[N, T] float32``, log-probs of the completion under the rollout policy θ_s.
      advantages: ``[N] float32``, group-normalised advantages.
      ref_logp: ``[N, T] float32`` under the reference policy, or ``[N, 0]`` when no KL term is used.
    """

    tokens: jax.Array
    attention_mask: jax.Array
    completion_mask: jax.Array
    old_logp: jax.Array
    advantages: jax.Array
    ref_logp: jax.Array


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


def minibatch_loss(params, graphdef, batch: Batch, loss: grpo.LossConfig, num_tokens, num_seqs):
    """The GRPO loss of one micro-batch, normalised by the denominators that make the micro-batch losses (and
    their gradients) add up to the mini-batch's (see :func:`sfpo_jax.rl.aggregate`)."""
    model = nnx.merge(graphdef, params)
    logp, entropy = completion_logprobs(model, batch.tokens, batch.attention_mask, batch.completion_mask)
    agg = "token-mean" if loss.agg == grpo.MICRO_BATCH_TOKEN_MEAN else loss.agg
    return grpo.policy_loss(
        logp, batch.old_logp, batch.advantages, batch.completion_mask,
        clip_low=loss.clip_low, clip_high=loss.clip_high, dual_clip=loss.dual_clip, agg=agg,
        ref_logp=batch.ref_logp if loss.kl_coef > 0 else None, kl_coef=loss.kl_coef, kl_estimator=loss.kl_estimator,
        entropy=entropy, entropy_coef=loss.entropy_coef, num_tokens=num_tokens, num_seqs=num_seqs)


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


def make_update_fn(graphdef, tx: optax.GradientTransformationExtraArgs, loss: grpo.LossConfig, num_micro: int):
    """One optimizer call: gradients of a mini-batch accumulated over ``num_micro`` micro-batches
    (``lax.scan``, so memory is that of one micro-batch), then ``tx.update`` with the mini-batch's mean token
    entropy (what SFPO's switch watches), then ``apply_updates``. Params and optimizer state are donated.

    Returns ``update(params, opt_state, batch) -> (params, opt_state, metrics)``; ``metrics`` are float32
    scalars: those of :func:`sfpo_jax.rl.policy_loss` over the whole mini-batch (independent of ``num_micro``)
    and ``grad_norm``, the global norm of the gradient before clipping.
    """

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def update(params, opt_state, batch: Batch):
        check_batch(batch)
        micro = jax.tree.map(lambda x: to_micro_batches(x, num_micro), batch)
        micro_tokens = micro.completion_mask.sum(axis=(1, 2)).astype(jnp.float32)
        num_seqs = jnp.asarray(batch.completion_mask.shape[0], jnp.float32)
        grad_fn = jax.value_and_grad(minibatch_loss, has_aux=True)

        def accumulate(grads, mb_and_tokens):
            mb, tokens = mb_and_tokens
            if loss.agg == grpo.MICRO_BATCH_TOKEN_MEAN:  # verl: each micro-batch's token mean / num_micro
                num_tokens = jnp.maximum(tokens, 1) * num_micro
            else:
                num_tokens = jnp.maximum(micro_tokens.sum(), 1)
            (_, metrics), g = grad_fn(params, graphdef, Batch(*mb), loss, num_tokens, num_seqs)
            return jax.tree.map(jnp.add, grads, g), metrics

        zeros = jax.tree.map(jnp.zeros_like, params)
        grads, metrics = jax.lax.scan(accumulate, zeros, (tuple(micro), micro_tokens))
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
      ``logprob_fn(params, tokens, attention_mask, completion_mask) -> [N, T] float32``, with the inputs as in
      :class:`Batch` (``tokens``/``attention_mask`` ``[N, P+T]``, ``completion_mask`` ``[N, T]``), zero where
      ``completion_mask`` is 0, the temperature-1 log-probs the sampler reports. Compiled once per shape.
    """

    @jax.jit
    def logprob_fn(params, tokens, attention_mask, completion_mask):
        num_micro = micro_batches_per_minibatch(tokens.shape[0], micro_batch_size, what="batch size")
        micro = tuple(to_micro_batches(x, num_micro) for x in (tokens, attention_mask, completion_mask))

        def forward(mb):
            model = nnx.merge(graphdef, params)
            # No backward pass here, so nothing to rematerialise; and nnx.remat inside lax.map would have to update
            # params that belong to the enclosing trace (a TraceContextError).
            model.remat = False
            logp, _ = completion_logprobs(model, *mb)  # the entropy is dead code to XLA
            return logp

        return from_micro_batches(jax.lax.map(forward, micro))

    return logprob_fn


@jax.jit
def masked_mean_abs_diff(a: jax.Array, b: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of ``|a - b|`` over the real tokens of ``[N, T]`` arrays (0 with no real token): the gap between
    recomputed and sampler log-probs that the loop logs."""
    m = mask.astype(bool)
    return jnp.sum(jnp.where(m, jnp.abs(a - b), 0.0)) / jnp.maximum(jnp.sum(m), 1)


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
        ref_logp=np.zeros((n, 0), np.float32),  # filled by the step when a KL term needs it
    )
