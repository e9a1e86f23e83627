"""The per-step sampling rule: temperature, top-k, top-p and greedy on float32 logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def sample_logits(key: jax.Array, logits: jax.Array, *, temperature: float, top_k: int = 0,
                  top_p: float = 1.0) -> jax.Array:
    """Draws one token per row.

    Args:
      key: a PRNG key (unused when `temperature == 0`).
      logits: `[B, V] float32` raw logits.
      temperature, top_k, top_p: Python scalars (static: each combination is its own program), see
        `SamplingConfig`.
    Returns:
      `[B] int32` token ids.
    """
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits.astype(jnp.float32) / temperature
    if top_k == 0 and top_p >= 1.0:
        return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)
    # Candidates sorted by decreasing logit: lax.top_k when k is set (already sorted, so top-p needs no second
    # sort), a full sort only when top-p alone is asked for.
    if top_k > 0:
        values, indices = lax.top_k(scaled, min(top_k, scaled.shape[-1]))
    else:
        iota = lax.broadcasted_iota(jnp.int32, scaled.shape, scaled.ndim - 1)
        neg, indices = lax.sort((-scaled, iota), dimension=-1, num_keys=1)
        values = -neg
    if top_p < 1.0:
        probs = jax.nn.softmax(values, axis=-1)
        # Keep a candidate while the probability mass before it is below top_p: the smallest set reaching top_p
        # (the most likely token is always kept).
        before = jnp.cumsum(probs, axis=-1) - probs
        values = jnp.where(before < top_p, values, -jnp.inf)
    choice = jax.random.categorical(key, values, axis=-1)
    return jnp.take_along_axis(indices, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


def token_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """`log_softmax(logits)[tokens]` in float32: `logits [B, V]`, `tokens [B]` → `[B]` (the policy at
    temperature 1, what the GRPO ratio compares against)."""
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)
