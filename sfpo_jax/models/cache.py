"""The key/value cache for incremental decoding: a plain pytree that crosses jit boundaries and can be donated."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


def storage_dtype(dtype) -> jnp.dtype:
    """The dtype a cache of `dtype` keys and values is stored in: bfloat16 as its raw bits, `uint16`.

    Why: XLA:CPU has no bfloat16 kernels outside matrix products and normalizes every other bfloat16 op to
    float32, the cache's in-place slot write included: it converted the whole cache to float32 and back in every
    layer of every decode step (W1: 9.9 vs 7.1 ms per step). On the raw bits the write is an integer copy of one
    slot, and reading a layer back as bfloat16 is a bitcast."""
    dtype = jnp.dtype(dtype)
    return jnp.dtype(jnp.uint16) if dtype == jnp.bfloat16 else dtype


def as_storage(x: jax.Array, storage: jnp.dtype) -> jax.Array:
    """`x` (keys or values, any float dtype) in the cache's `storage` dtype (`storage_dtype`)."""
    if storage == jnp.uint16:
        return jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), jnp.uint16)
    return x.astype(storage)


def from_storage(x: jax.Array, dtype) -> jax.Array:
    """Cache contents `x` as `dtype` values (the dtype the cache was initialised with)."""
    if x.dtype == jnp.uint16:
        return jax.lax.bitcast_convert_type(x, jnp.bfloat16).astype(dtype)
    return x.astype(dtype)


class KVCache(NamedTuple):
    """Keys and values of every layer for a batch of sequences, written slot by slot.

    All rows share the write position `index`: a left-padded prompt fills slots `[0, T)` with its padding
    masked out, and every decode step then writes one slot for all rows. The caller keeps `index + T <=
    max_length`: under jit the write position cannot be checked, and `dynamic_update_slice` would clamp it
    (overwriting the last slots).

    Attributes:
      k: `[num_layers, B, num_kv_heads, head_dim, S]`, keys after RoPE (and q/k norm), transposed: a decode
        step's scores `q [G, D] @ k [D, S]` per (row, kv head) are then a plain matrix product, which XLA:CPU
        runs ~1.4× faster than the `q @ k[S, D]ᵀ` form.
      v: `[num_layers, B, num_kv_heads, S, head_dim]`, values.
        Both in `storage_dtype(dtype)` (bfloat16 as raw `uint16` bits; `from_storage` reads them).
        Heads come before slots in both, so that one layer's slice is what the attention products read, with no
        transpose per decode step.
      mask: `[B, S] bool`, whether a slot holds a real token (padding and unwritten slots are False).
      num_tokens: `[B] int32`, real tokens stored per row; the next token's RoPE position.
      index: `int32` scalar, the next slot to write, shared by all rows.
    """

    k: jax.Array
    v: jax.Array
    mask: jax.Array
    num_tokens: jax.Array
    index: jax.Array

    @classmethod
    def init(cls, num_layers: int, batch_size: int, max_length: int, num_kv_heads: int, head_dim: int,
             dtype=jnp.float32) -> KVCache:
        """An empty cache of `max_length` slots per row, holding `dtype` keys and values."""
        storage = storage_dtype(dtype)
        return cls(
            k=jnp.zeros((num_layers, batch_size, num_kv_heads, head_dim, max_length), storage),
            v=jnp.zeros((num_layers, batch_size, num_kv_heads, max_length, head_dim), storage),
            mask=jnp.zeros((batch_size, max_length), jnp.bool_),
            num_tokens=jnp.zeros((batch_size,), jnp.int32),
            index=jnp.zeros((), jnp.int32),
        )

    @property
    def max_length(self) -> int:
        return self.mask.shape[1]

    def extend(self, max_length: int) -> KVCache:
        """This cache with `max_length` slots per row; the added slots are empty (zero, masked out).

        A prompt prefilled into a cache of its own length attends over its own columns only; extended
        afterwards, the cache then holds the completion. Prefilling straight into the full-length cache gives the
        same result, but its attention scores span every slot, `[B, heads, P, P + max_new_tokens]`, which for long
        generations dwarfs the rest of the sampler's memory.
        """
        extra = max_length - self.max_length
        if extra < 0:
            raise ValueError(f"cannot shrink a cache of max_length={self.max_length} to {max_length}")
        pad = lambda x, axis: jnp.pad(x, [(0, extra if a == axis else 0) for a in range(x.ndim)])
        return self._replace(k=pad(self.k, 4), v=pad(self.v, 3), mask=pad(self.mask, 1))

    def take_rows(self, rows: jax.Array) -> KVCache:
        """The cache whose row `i` is this cache's row `rows[i]` (`rows`: `[B'] int32`, repeats allowed), e.g. a
        prompt prefilled once and copied for each of its samples."""
        take = lambda x, axis: jnp.take(x, rows, axis=axis, mode="clip")
        return self._replace(k=take(self.k, 1), v=take(self.v, 1), mask=take(self.mask, 0),
                             num_tokens=take(self.num_tokens, 0))

    @staticmethod
    def logical_axes() -> KVCache:
        """Logical axis names of each field, e.g. for `jax.tree.map(f, cache, KVCache.logical_axes())`
        (the cache's leaves are a prefix of this tree, so `f` receives each field's tuple of names)."""
        return KVCache(k=("layers", "batch", "kv_heads", "head_dim", "cache_seq"),
                       v=("layers", "batch", "kv_heads", "cache_seq", "head_dim"),
                       mask=("batch", "cache_seq"), num_tokens=("batch",), index=())
