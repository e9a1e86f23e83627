"""The decode engine: N sequences through S decode slots, a slot refilled on device as soon as its row ends.

Real completions are ragged (W7: mean 54 tokens, max 256): a batch decoded until its longest row ends spends most
of its row-steps on rows that have finished. Here a decode program holds S slots (a KV cache of S rows) and a
*bank*: each prompt's prefilled cache (its first P - 1 columns), computed once per prompt. Whenever a slot's
sequence ends (EOS or `max_new_tokens`), the next pending sequence takes the slot in the same loop iteration: its
prompt's bank row is copied into the slot's cache row, and the slot feeds its last prompt token next step. The
whole rollout is one `lax.while_loop`, one device call: no host sync per token or per refill.

One cache write position for every row (`KVCache.index`) but rows at different positions: the model always writes
the fed token at the last cache slot C - 1 (the *staging* slot, masked in for every row), and after the step each
row's staged key and value move to its own slot P - 1 + j (j: tokens its sequence has generated). A row's cache is
then its prompt in slots `[0, P - 1)`, its fed tokens in `[P - 1, P - 1 + j)` and the current one in C - 1, the
same set of keys the static layout holds (attention does not depend on the slots' order, up to float rounding of
the softmax's sum), in a cache of the static one's C = P + M slots.

Randomness: each sequence draws from its own stream, `fold_in(fold_in(key, sequence), position)` (`row_keys`),
sequence being its index in the whole rollout; so the rollout does not depend on S, on which slot a sequence gets,
or on the order in which rows finish. The static path (S ≥ N: every sequence in flight from the start, no refill)
uses the same streams, and its model writes at the shared position as before (no staging).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from sfpo_jax.models import KVCache
from sfpo_jax.sampling.ops import row_keys, sample_with_logprobs


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
    """The static part of the decode program."""

    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    eos_token_ids: tuple[int, ...]
    pad_token_id: int


class Plan(NamedTuple):
    """Where each sequence starts and reads from; built on the host (`int32`), the same on every process.

    Attributes:
      slot_seq: `[S]`, the sequence each slot starts with, or `n_out = len(seq_row)` for none.
      seq_row: `[n_out]`, each sequence's row of the bank (its prompt's prefilled cache) and of `last`.
      seq_key: `[n_out]`, each sequence's PRNG stream index: its position in the whole rollout (over chunks and
        processes), so that chunking and process layout change no draw.
      num_seqs: `()`, the real sequences; `[num_seqs, n_out)` are padding, never scheduled.
    """

    slot_seq: jax.Array
    seq_row: jax.Array
    seq_key: jax.Array
    num_seqs: jax.Array


class _Carry(NamedTuple):
    """The decode loop's state. Slot fields are `[S]`; output fields have T rows: one per slot on the static path,
    one per sequence (`n_out`) with refills."""

    step: jax.Array  # () int32, decode steps run
    cache: KVCache  # S rows
    seq: jax.Array  # [S] int32, the slot's sequence; n_out: none (free, or finished with nothing pending)
    key_id: jax.Array  # [S] int32, its PRNG stream index
    length: jax.Array  # [S] int32, tokens its sequence has generated
    token: jax.Array  # [S] int32, the token to feed next
    eos: jax.Array  # [S] bool, its sequence ended on an EOS
    next_seq: jax.Array  # () int32, the first pending sequence
    tokens: jax.Array  # [T, M] int32
    logprobs: jax.Array  # [T, M] float32
    lengths: jax.Array  # [T] int32 (with refills; the static path reads `length`)
    ended_eos: jax.Array  # [T] bool (likewise `eos`)


def decode(model, bank: KVCache, last: jax.Array, plan: Plan, key: jax.Array, spec: DecodeSpec, *,
           cache_length: int, refills: int, direct: bool, constrain=lambda cache: cache):
    """Decodes every sequence of `plan` to its end through `S = len(plan.slot_seq)` slots.

    Args:
      model: the merged `CausalLM`.
      bank: the prefilled prompts, `[U]` rows of `P - 1` slots (all but each prompt's last column).
      last: `[U] int32`, each bank row's last prompt column (a sequence's first fed token).
      plan: see `Plan`.
      key: the rollout's PRNG key; sequence i's token t is drawn with `row_keys` (i = `plan.seq_key`).
      cache_length: C, the decode cache's slots per row (at least P + max_new_tokens).
      refills: 0 for the static path (the plan places every sequence at the start); else at most this many slots
        are refilled per step (a static bound: the bank rows are gathered for that many each step, used or not).
      direct: the bank is the slots' cache itself (static path, one bank row per slot): no copy.
      constrain: `KVCache -> KVCache`, placing the slots' cache (on a mesh: `with_sharding_constraint` to its
        batch-split sharding, which nothing else in the program fixes).
    Returns:
      `(tokens [T, M] int32, logprobs [T, M] float32, lengths [T] int32, eos [T] bool, steps () int32)`, T rows
      per slot (static) or per sequence (`n_out`, with refills); pad / 0 after each end.
    """
    s, n_out, m = plan.slot_seq.shape[0], plan.seq_row.shape[0], spec.max_new_tokens
    rows = s if refills == 0 else n_out
    if direct:
        cache = bank.extend(cache_length)
    else:
        cache = model.init_cache(s, cache_length)._replace(index=bank.index)
    cache = constrain(cache)
    zeros = jnp.zeros((s,), jnp.int32)
    c = _Carry(jnp.zeros((), jnp.int32), cache, jnp.full((s,), n_out, jnp.int32), zeros, zeros, zeros,
               jnp.zeros((s,), jnp.bool_), jnp.zeros((), jnp.int32),
               jnp.full((rows, m), spec.pad_token_id, jnp.int32), jnp.zeros((rows, m), jnp.float32),
               jnp.zeros((rows,), jnp.int32), jnp.zeros((rows,), jnp.bool_))
    placed = plan.slot_seq < n_out
    c = _place(c, bank, last, plan, jnp.arange(s, dtype=jnp.int32), plan.slot_seq, placed, copy=not direct)
    c = c._replace(next_seq=jnp.sum(placed, dtype=jnp.int32))  # with refills the plan places sequences 0 … S - 1

    def body(c):
        c = _step(c, model, key, spec, n_out, bank.max_length, staged=refills > 0)
        c = c if refills == 0 else _refill(c, bank, last, plan, refills)
        return c._replace(cache=constrain(c.cache))

    c = lax.while_loop(lambda c: jnp.any(c.seq < n_out), body, c)
    if refills == 0:
        return c.tokens, c.logprobs, c.length, c.eos, c.step
    return c.tokens, c.logprobs, c.lengths, c.ended_eos, c.step


def _step(c: _Carry, model, key, spec: DecodeSpec, n_out: int, prompt_slots: int, staged: bool) -> _Carry:
    """One decode step of every slot: feed `c.token`, draw the next token, record it, free the slots whose
    sequence ends. `staged`: rows are at different positions (refills), so the model writes at the staging slot;
    otherwise every active row is at position `c.step`, the cache's shared write position."""
    active = c.seq < n_out
    cache = c.cache
    if staged:
        cache = cache._replace(index=jnp.asarray(cache.max_length - 1, jnp.int32))  # the staging slot
    logits, cache = model(c.token[:, None], cache=cache)
    new, logp = sample_with_logprobs(row_keys(key, c.key_id, c.length), logits[:, 0], temperature=spec.temperature,
                                     top_k=spec.top_k, top_p=spec.top_p)
    new = jnp.where(active, new, spec.pad_token_id)
    logp = jnp.where(active, logp, 0.0)
    if staged:  # move each active row's staged key/value to its own slot
        cache = _store_staged(cache, jnp.where(active, prompt_slots + c.length, cache.max_length))
    is_eos = active & jnp.isin(new, jnp.asarray(spec.eos_token_ids, jnp.int32))
    length = c.length + active
    ended = active & (is_eos | (length >= spec.max_new_tokens))
    if staged:
        row = jnp.where(active, c.seq, n_out)  # out of range: dropped
        c = c._replace(tokens=c.tokens.at[row, c.length].set(new, mode="drop"),
                       logprobs=c.logprobs.at[row, c.length].set(logp, mode="drop"),
                       lengths=c.lengths.at[row].set(length, mode="drop"),
                       ended_eos=c.ended_eos.at[row].set(is_eos, mode="drop"))
    else:  # slot = output row, and every active row is at position `step`
        c = c._replace(tokens=lax.dynamic_update_slice(c.tokens, new[:, None], (0, c.step)),
                       logprobs=lax.dynamic_update_slice(c.logprobs, logp[:, None], (0, c.step)))
    return c._replace(step=c.step + 1, cache=cache, seq=jnp.where(ended, n_out, c.seq), length=length,
                      token=new, eos=c.eos | is_eos)


def _store_staged(cache: KVCache, slot: jax.Array) -> KVCache:
    """`cache` with each row's staged key and value (slot C - 1) copied to its own `slot [S]` (C: dropped), which
    is then masked in. A scatter of one slot per row and layer: `[L, S, KVH, D]` values, not the cache."""
    rows, staging = jnp.arange(slot.shape[0]), cache.max_length - 1
    k = cache.k.at[:, rows, :, :, slot].set(jnp.moveaxis(cache.k[:, :, :, :, staging], 1, 0), mode="drop")
    v = cache.v.at[:, rows, :, slot, :].set(jnp.moveaxis(cache.v[:, :, :, staging, :], 1, 0), mode="drop")
    return cache._replace(k=k, v=v, mask=cache.mask.at[rows, slot].set(True, mode="drop"))


def _refill(c: _Carry, bank: KVCache, last: jax.Array, plan: Plan, refills: int) -> _Carry:
    """The first `refills` free slots (lowest index first) take the next pending sequences, in order."""
    s = c.seq.shape[0]
    free = c.seq >= plan.seq_row.shape[0]
    slot = jnp.nonzero(free, size=refills, fill_value=s)[0].astype(jnp.int32)
    seq = c.next_seq + jnp.arange(refills, dtype=jnp.int32)
    ok = (slot < s) & (seq < plan.num_seqs)  # a prefix: both are
    c = _place(c, bank, last, plan, slot, seq, ok, copy=True)
    return c._replace(next_seq=c.next_seq + jnp.sum(ok, dtype=jnp.int32))


def _place(c: _Carry, bank: KVCache, last: jax.Array, plan: Plan, slot: jax.Array, seq: jax.Array,
           ok: jax.Array, copy: bool) -> _Carry:
    """Slot `slot[i]` starts sequence `seq[i]` where `ok[i]` (all `[R]`): with `copy`, its cache row becomes the
    sequence's prompt (the bank row in slots `[0, P - 1)`, nothing after), and its state a fresh sequence's."""
    s, n_out = c.seq.shape[0], plan.seq_row.shape[0]
    slot = jnp.where(ok, slot, s)  # out of range: dropped
    safe = jnp.minimum(seq, n_out - 1)
    row = plan.seq_row[safe]
    put = lambda x, value: x.at[slot].set(value, mode="drop")
    cache = c.cache
    if copy:
        src, p1 = bank.take_rows(row), bank.max_length
        cache = cache._replace(
            k=cache.k.at[:, slot, :, :, :p1].set(src.k, mode="drop"),
            v=cache.v.at[:, slot, :, :p1, :].set(src.v, mode="drop"),
            mask=put(cache.mask, jnp.pad(src.mask, ((0, 0), (0, cache.max_length - p1)))),
            num_tokens=put(cache.num_tokens, src.num_tokens))
    return c._replace(cache=cache, seq=put(c.seq, seq), key_id=put(c.key_id, plan.seq_key[safe]),
                      length=put(c.length, 0), token=put(c.token, last[row]), eos=put(c.eos, False))
