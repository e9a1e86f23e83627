"""The per-step sampling rule: temperature, top-k, top-p and greedy on float32 logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

# Vocabulary block of the two-level inverse-CDF search in `categorical` (see there).
_BLOCK = 256


def categorical(key: jax.Array, logits: jax.Array) -> jax.Array:
    """One draw per row from `softmax(logits)`, by inverse-CDF with a single uniform per row.

    Same distribution as `jax.random.categorical`, but that one (Gumbel-max) draws a random number per
    vocabulary entry and takes two logs of each before a variadic argmax; at `[16, 32000]` on CPU it costs more
    than the model's whole LM head. Here the search is two-level: cumulative masses of `_BLOCK`-wide blocks find
    the block, a cumulative sum inside that block finds the token, so the cost is one `exp` and one sum over the
    vocabulary.

    Args:
      key: a PRNG key, or `[B]` keys, one per row (`row_keys`): then row i's draw depends on `key[i]` and its own
        logits alone, not on the batch it sits in.
      logits: `[B, V]` float32; `-inf` entries are never drawn (each row needs one finite entry).
    Returns:
      `[B] int32` ids.
    """
    return _inverse_cdf(key, logits)[0]


def row_keys(key: jax.Array, sequences: jax.Array, positions: jax.Array) -> jax.Array:
    """The per-sequence PRNG streams of a decode step: `fold_in(fold_in(key, sequences[i]), positions[i])` for
    each row i (`sequences`, `positions`: `[B] int32`), as `[B]` keys.

    A sequence's draws thus depend on its own index and position only, never on which decode slot or batch row it
    occupies or on a global step counter: the sampler's rollout is the same whatever the number of slots."""
    return jax.vmap(lambda s, t: jax.random.fold_in(jax.random.fold_in(key, s), t))(sequences, positions)


def _uniforms(key: jax.Array, b: int) -> jax.Array:
    """`[b, 1]` float32 uniforms in [0, 1): drawn from one key, or one from each of `b` per-row keys."""
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    if key.ndim == (1 if typed else 2):
        if key.shape[0] != b:
            raise ValueError(f"{key.shape[0]} row keys for {b} rows")
        return jax.vmap(lambda k: jax.random.uniform(k, ()))(key)[:, None]
    return jax.random.uniform(key, (b, 1))


def _inverse_cdf(key: jax.Array, logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`categorical`'s draw, and the row's log-normalizer `logsumexp(logits) [B]` from the same exponentials."""
    b, v = logits.shape
    nb = -(-v // _BLOCK)
    peak = jnp.max(logits, axis=-1, keepdims=True)
    probs = jnp.exp(logits - peak)  # unnormalised, max 1
    blocks = jnp.pad(probs, ((0, 0), (0, nb * _BLOCK - v))).reshape(b, nb, _BLOCK)
    block_cdf = jnp.cumsum(blocks.sum(-1), axis=-1)  # [B, nb]
    total = block_cdf[:, -1:]
    # u in [0, total): strictly below the total even after rounding, so some block's cdf exceeds it.
    u = jnp.minimum(_uniforms(key, b) * total, jnp.nextafter(total, 0.0))
    # The first entry whose cdf exceeds u; its cdf rose past u, so its mass is positive (zero-mass entries never
    # raise a float sum).
    j = jnp.sum(block_cdf <= u, axis=-1)  # [B] < nb
    before = jnp.where(j > 0, jnp.take_along_axis(block_cdf, jnp.maximum(j - 1, 0)[:, None], -1)[:, 0], 0.0)
    inner = jnp.take_along_axis(blocks, j[:, None, None], axis=1)[:, 0]  # [B, _BLOCK]
    k = jnp.sum(before[:, None] + jnp.cumsum(inner, axis=-1) <= u, axis=-1)
    # The in-block sum may round below the block cdf: clamp to the block's last positive entry.
    last = _BLOCK - 1 - jnp.argmax(inner[:, ::-1] > 0, axis=-1)
    ids = (j * _BLOCK + jnp.minimum(k, last)).astype(jnp.int32)
    return ids, (peak + jnp.log(total))[:, 0]


def argmax(logits: jax.Array) -> jax.Array:
    """`jnp.argmax(logits, -1)` for `[B, V]` float logits (ties to the lowest id), as `[B] int32`: a max, then the
    lowest id attaining it. Two plain reductions, which XLA:CPU vectorises; `jnp.argmax`'s single variadic
    (value, index) reduction is not, and at `[16, 32000]` costs more than the rest of the decode step's sampling."""
    v = logits.shape[-1]
    best = jnp.max(logits, axis=-1, keepdims=True)
    ids = lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    # A NaN row matches no id; clamp so that it still yields a valid one.
    return jnp.minimum(jnp.min(jnp.where(logits == best, ids, v), axis=-1), v - 1).astype(jnp.int32)


def sample_logits(key: jax.Array, logits: jax.Array, *, temperature: float, top_k: int = 0,
                  top_p: float = 1.0) -> jax.Array:
    """Draws one token per row.

    Args:
      key: a PRNG key, or `[B]` keys, one per row (see `categorical`); unused when `temperature == 0`.
      logits: `[B, V] float32` raw logits.
      temperature, top_k, top_p: Python scalars (static: each combination is its own program), see
        `SamplingConfig`; the tokens kept are `filter_logits`'.
    Returns:
      `[B] int32` token ids.
    """
    if temperature == 0:
        return argmax(logits)
    scaled = logits.astype(jnp.float32) / temperature
    if _no_filter(scaled.shape[-1], top_k, top_p):
        return categorical(key, scaled)  # no sort: the common RL setting
    threshold, inside, values, indices = _threshold(scaled, top_k, top_p)

    def among_candidates():
        choice = categorical(key, jnp.where(values >= threshold, values, -jnp.inf))
        return jnp.take_along_axis(indices, choice[:, None], axis=-1)[:, 0]

    return lax.cond(jnp.all(inside), among_candidates,
                    lambda: categorical(key, jnp.where(scaled >= threshold, scaled, -jnp.inf)))


def filter_logits(logits: jax.Array, *, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """`logits [B, V]` (already divided by the temperature) with the tokens that top-k, then top-p, rule out set
    to `-inf`: the semantics of transformers' `TopKLogitsWarper` followed by `TopPLogitsWarper`.

    top-k keeps every token whose logit is at least the k-th largest (so more than k on a tie at the k-th value);
    top-p then keeps, in order of decreasing logit, each token while the probability mass before it (renormalised
    over the tokens top-k kept) is below `top_p`: the smallest set reaching top_p, the token that crosses it
    included. A token tied with the last one kept is kept too, where transformers keeps an arbitrary part of such a
    tie (whichever its sort puts last); the kept set is thus `logits >= threshold` for a per-row threshold, a
    function of the values alone, not of the token ids. `sample_logits` draws from exactly this set.

    Cost: the threshold comes from the largest logits (`lax.top_k` of top_k, or of `_TOP_P_CANDIDATES` for top-p
    alone); only a top-p set larger than those sorts the whole vocabulary (on XLA:CPU ~100 ms at `[16, 32000]`,
    several decode steps). `sample_logits` then draws among those candidates, or over the vocabulary when the kept
    set reaches beyond them (a tie across the last candidate).
    """
    if _no_filter(logits.shape[-1], top_k, top_p):
        return logits
    threshold = _threshold(logits, top_k, top_p)[0]
    return jnp.where(logits >= threshold, logits, -jnp.inf)


# How many of the largest logits top-p alone searches for its threshold before sorting the whole vocabulary.
_TOP_P_CANDIDATES = 256


def _no_filter(vocab: int, top_k: int, top_p: float) -> bool:
    return min(top_k, vocab) in (0, vocab) and top_p >= 1.0


def _threshold(logits: jax.Array, top_k: int, top_p: float):
    """`(threshold [B, 1], inside [B], values [B, m], indices [B, m])`: `filter_logits` keeps `logits >=
    threshold`; `values` (decreasing) and `indices` are the m largest logits and their ids, the n = top_k (or, for
    top-p alone, `_TOP_P_CANDIDATES`) candidates plus a sentinel, m = min(n + 1, V); `inside`: every kept token is
    among the candidates (the sentinel is below the threshold).

    The candidates are read with reductions and masks, never sliced: XLA:CPU turns a `lax.top_k` whose output is
    sliced into a full sort.
    """
    v = logits.shape[-1]
    k = min(top_k, v)
    n = k if 0 < k < v else min(v, _TOP_P_CANDIDATES)
    m = min(n + 1, v)
    values, indices = lax.top_k(logits, m)
    position = lax.broadcasted_iota(jnp.int32, values.shape, 1)
    sentinel = jnp.min(values, axis=-1, keepdims=True) if m > n else jnp.full((values.shape[0], 1), -jnp.inf)
    peak = jnp.max(values, axis=-1, keepdims=True)
    weights = jnp.where(position < n, jnp.exp(values - peak), 0.0)  # the candidates' softmax terms
    if 0 < k < v:
        threshold = jnp.min(jnp.where(position < k, values, jnp.inf), axis=-1, keepdims=True)  # the k-th
        if top_p < 1.0:
            # Tokens tied with the k-th beyond the k candidates are kept by top-k and weigh in top-p's softmax.
            extra = jnp.sum(logits >= threshold, axis=-1, keepdims=True) - k
            total = jnp.sum(weights, axis=-1, keepdims=True) + extra * jnp.exp(threshold - peak)
            threshold = _top_p_threshold(values, total, top_p, weights)[0]
        return threshold, (sentinel < threshold)[:, 0], values, indices
    total = jnp.sum(jnp.exp(logits - peak), axis=-1, keepdims=True)  # over the whole vocabulary
    threshold, found = _top_p_threshold(values, total, top_p, weights)
    if m > n:  # the top-p set may reach beyond the candidates: then sort them all
        def full_sort():
            ordered = -lax.sort(-logits, dimension=-1)
            return _top_p_threshold(ordered, total, top_p, jnp.exp(ordered - peak))[0]

        threshold = lax.cond(jnp.all(found), lambda: threshold, full_sort)
    return threshold, (sentinel < threshold)[:, 0], values, indices


def _top_p_threshold(values: jax.Array, total: jax.Array, top_p: float, weights: jax.Array):
    """`(threshold [B, 1], found [B])`: the smallest of the decreasing `values [B, n]` that top-p keeps, among those
    with nonzero `weights` (their `exp(value - peak)`; 0 marks the ones top-p may not keep), given the softmax
    normaliser `total` of all the tokens it may keep; `found` is whether the weighted values' mass reaches top_p
    (if not, the threshold is the last weighted value, and the tokens beyond the values are unaccounted for)."""
    probs = weights / total
    cumulative = jnp.cumsum(probs, axis=-1)
    before = cumulative - probs  # mass of the tokens before each one
    # The kept values are a prefix (the first always: its `before` is 0 < top_p) up to the first crossing or the
    # first without weight.
    stop = (before >= top_p) | (weights == 0)
    kept = jnp.where(jnp.any(stop, axis=-1), jnp.argmax(stop, axis=-1), values.shape[-1])
    found = jnp.max(cumulative, axis=-1) >= top_p
    return jnp.take_along_axis(values, kept[:, None] - 1, axis=-1), found


def sample_with_logprobs(key: jax.Array, logits: jax.Array, *, temperature: float, top_k: int = 0,
                         top_p: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """`sample_logits` and the drawn tokens' `token_logprobs`, what a decode step needs: `([B] int32, [B] float32)`.

    In the common RL setting (temperature 1, no top-k/top-p) the sampling distribution is the policy itself, so
    the log-normaliser comes from the draw's own exponentials: one pass over the vocabulary instead of two (on
    CPU a second `[B, V]` logsumexp costs about as much as the draw).
    """
    if temperature == 1 and top_k == 0 and top_p >= 1.0:
        logits = logits.astype(jnp.float32)
        tokens, log_normalizer = _inverse_cdf(key, logits)
        return tokens, jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0] - log_normalizer
    tokens = sample_logits(key, logits, temperature=temperature, top_k=top_k, top_p=top_p)
    return tokens, token_logprobs(logits, tokens)


def token_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """`log_softmax(logits)[tokens]` in float32: `logits [B, V]`, `tokens [B]` → `[B]` (the policy at
    temperature 1, what the GRPO ratio compares against)."""
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)
