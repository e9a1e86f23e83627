"""Batched generation with a KV cache: one prefill pass, then a `lax.while_loop` decode loop, both jitted.

A call to `Sampler.generate` left-pads the prompts to a bucketed length P (`prompt_bucket`, or the caller's
`prompt_length`) and the batch to a bucketed size B, so a training run compiles one (prefill, decode) pair per
(B, P, sampling settings), not one per batch; `chunk_size` splits a large batch into calls of bounded memory that
share P (so equal chunks share one program). The prefill writes the first P-1 prompt columns into a fresh cache of
that length, extends it to the full cache length S and returns only the cache (so no `[B, P, V]` logits are ever
computed); the decode program, which receives the cache donated, starts by feeding the last prompt column (real for
every row, since prompts are left-padded) and then feeds back each sampled token. With `num_samples` > 1 (GRPO's
groups) the prefill runs once per prompt, not once per sample, and copies each prompt's cache rows to its samples'
rows: the same rollout for a fraction of the prefill.

Precision: the programs compute in the model's compute dtype (`CausalLM.dtype`): float params (e.g. float32 masters
of a bfloat16-compute model) are cast to it once per `generate` call, and the KV cache is in it; logits, sampling
and log-probs are float32.

Sharding: with a `mesh`, params follow their logical axes (`sfpo_jax.parallel.param_shardings`), the batch is
split over the axes of the `batch` rule (data, fsdp) and the cache's kv heads over `tensor`; the jitted programs
carry these as explicit `in_shardings` / `out_shardings`.

Multi-host: every process calls `generate` with its own prompts (the same number on each) and the same
`prompt_length`, one that does not depend on the local prompts (`prompt_length=prompt_bucket(global_longest)`, the
longest prompt of all processes); the local batches become one global array (`sfpo_jax.parallel.to_global`), and
each process gets back the `Rollout` of its own prompts.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sfpo_jax.models import KVCache, cast_product_operands, needs_product_cast
from sfpo_jax.parallel import logical_sharding, num_shards, param_shardings, to_global
from sfpo_jax.sampling.config import SamplingConfig
from sfpo_jax.sampling.ops import sample_with_logprobs

DEFAULT_PROMPT_BUCKETS = tuple(2**i for i in range(4, 16))  # 16 … 32768


def prompt_bucket(longest: int) -> int:
    """The default padded prompt length of a batch whose longest prompt has `longest` tokens: the smallest of
    `DEFAULT_PROMPT_BUCKETS` (16, 32, …, 32768) that fits, or `longest` itself beyond the largest.

    A multi-host caller passes `prompt_length=prompt_bucket(global_longest)` to `Sampler.generate`, so that every
    process pads to the same length whatever its own prompts.
    """
    if isinstance(longest, bool) or not isinstance(longest, int | np.integer) or longest < 1:
        raise ValueError(f"longest={longest!r} must be a positive int")
    return next((b for b in DEFAULT_PROMPT_BUCKETS if b >= longest), int(longest))


def _round_up(n: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is at least `n`."""
    return -(-n // multiple) * multiple


class FinishReason(enum.IntEnum):
    """Why a completion ended (the codes in `Rollout.finish_reason`)."""

    EOS = 0  # generated one of `SamplingConfig.eos_token_ids` (kept, masked in)
    LENGTH = 1  # reached `max_new_tokens`


class Rollout(NamedTuple):
    """Completions of N = len(prompts) · num_samples sequences, laid out group by group (prompt 0's samples
    first). NumPy arrays on the host.

    Attributes:
      prompt_tokens: `[N, P] int32`, the left-padded (bucketed) prompts, repeated per sample.
      prompt_mask: `[N, P] bool`, True on real prompt tokens.
      tokens: `[N, max_new_tokens] int32`, generated ids, the pad id after the end.
      logprobs: `[N, max_new_tokens] float32`, log-probability of each generated token under the policy at
        temperature 1 (log_softmax of the raw logits, whatever the sampling controls), 0 where masked.
      mask: `[N, max_new_tokens] bool`, generated tokens up to and including EOS.
      lengths: `[N] int32`, `mask.sum(-1)`.
      finish_reason: `[N] int32`, `FinishReason` codes.
    """

    prompt_tokens: np.ndarray
    prompt_mask: np.ndarray
    tokens: np.ndarray
    logprobs: np.ndarray
    mask: np.ndarray
    lengths: np.ndarray
    finish_reason: np.ndarray

    def texts(self, tokenizer, skip_special_tokens: bool = True) -> list[str]:
        """Each completion decoded up to and including its EOS token (dropped with `skip_special_tokens`)."""
        return [tokenizer.decode(row[m].tolist(), skip_special_tokens=skip_special_tokens)
                for row, m in zip(self.tokens, self.mask, strict=True)]


def concat_rollouts(rollouts: Sequence[Rollout]) -> Rollout:
    """One `Rollout` holding the rows of `rollouts` in order, every field concatenated along axis 0 (e.g. a batch
    sampled in several `Sampler.generate` calls).

    Every rollout must have the same prompt width P (the same prompt length) and the same `max_new_tokens`;
    ValueError otherwise, naming the field. (`Sampler.generate(chunk_size=...)` uses it for its chunks.)
    """
    if not rollouts:
        raise ValueError("concat_rollouts needs at least one rollout")
    for name in Rollout._fields:
        widths = {getattr(r, name).shape[1:] for r in rollouts}
        if len(widths) > 1:
            raise ValueError(f"rollouts differ in the trailing shape of {name}: {sorted(widths)} (sample them "
                             "with one prompt length and one max_new_tokens)")
    return Rollout(*(np.concatenate(fields, axis=0) for fields in zip(*rollouts, strict=True)))


@dataclasses.dataclass(frozen=True)
class _DecodeSpec:
    """The static part of the decode program."""

    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    eos_token_ids: tuple[int, ...]
    pad_token_id: int


class _Program(NamedTuple):
    prefill: Any
    decode: Any
    prompt_sharding: Any  # of the prefill's `[B or prefill_rows, T]` inputs, or None without a mesh
    row_sharding: Any  # of `[B]` inputs


class Sampler:
    """Generates completions from a `CausalLM` (see the module docstring).

    Args:
      model: a `sfpo_jax.models.CausalLM`; its current state is used unless `generate` gets `params`.
      mesh: a `jax.sharding.Mesh` from `sfpo_jax.parallel.make_mesh`; None runs on the default device.
      rules: logical-axis rules (default `sfpo_jax.parallel.DEFAULT_RULES`).
      pad_token_id: the id written to padding (left of prompts, after completions).
      prompt_buckets: increasing prompt lengths to pad to (the smallest that fits; longer prompts are rejected);
        None pads to `prompt_bucket(longest)`. `generate(prompt_length=...)` overrides either.
      max_cache_length: cache slots per row; by default the prompt length plus `max_new_tokens`. Setting it
        fixes the decode program's cache size, and prompts longer than `max_cache_length - max_new_tokens` are
        rejected.
      batch_multiple: the batch is padded to a multiple of this (and of the number of batch shards), so that
        batches of nearby sizes share a program.
    """

    def __init__(self, model: nnx.Module, *, mesh: Mesh | None = None, rules: Mapping | None = None,
                 pad_token_id: int = 0, prompt_buckets: Sequence[int] | None = None,
                 max_cache_length: int | None = None, batch_multiple: int = 8):
        self.model = model
        self.vocab_size = model.config.vocab_size
        if not isinstance(pad_token_id, int) or not 0 <= pad_token_id < self.vocab_size:
            raise ValueError(f"pad_token_id={pad_token_id!r} must be an id in [0, {self.vocab_size})")
        if prompt_buckets is not None:
            if callable(prompt_buckets):
                raise TypeError("prompt_buckets must be a sequence of ints (a function is no longer accepted: pass "
                                "generate(..., prompt_length=...) instead)")
            prompt_buckets = tuple(prompt_buckets)
            if not prompt_buckets or any(not isinstance(b, int) or b < 1 for b in prompt_buckets) or list(
                    prompt_buckets) != sorted(set(prompt_buckets)):
                raise ValueError(f"prompt_buckets={prompt_buckets!r} must be increasing positive ints")
        if max_cache_length is not None and (not isinstance(max_cache_length, int) or max_cache_length < 2):
            raise ValueError(f"max_cache_length={max_cache_length!r} must be an int >= 2")
        if not isinstance(batch_multiple, int) or batch_multiple < 1:
            raise ValueError(f"batch_multiple={batch_multiple!r} must be a positive int")
        self.mesh, self.rules = mesh, rules
        self.pad_token_id = pad_token_id
        self.prompt_buckets = prompt_buckets
        self.max_cache_length = max_cache_length
        self._graphdef, state = nnx.split(model)
        self._param_shardings = None if mesh is None else param_shardings(state, mesh, rules)
        self.compute_dtype = getattr(model, "dtype", None)
        self._cast = None  # the jitted `cast_product_operands`, built on first use
        self._batch_shards = 1 if mesh is None else num_shards(logical_sharding(mesh, ("batch",), rules))
        self.batch_multiple = math.lcm(batch_multiple, self._batch_shards)
        self._programs: dict[tuple, _Program] = {}
        self.num_traces = 0  # how many times a prefill / decode program was traced (= compiled): tests, logs

    # ----------------------------------------------------------------------------------------------- shapes
    def _prompt_bucket(self, longest: int) -> int:
        if self.prompt_buckets is None:
            return prompt_bucket(longest)
        for b in self.prompt_buckets:
            if b >= longest:
                return b
        raise ValueError(f"a prompt of {longest} tokens is longer than the largest of prompt_buckets="
                         f"{self.prompt_buckets}")

    def _lengths(self, prompts, config: SamplingConfig, prompt_length: int | None) -> tuple[int, int]:
        """(prompt length P, cache length S) of the whole batch; raises on bad input."""
        if not isinstance(config, SamplingConfig):
            raise TypeError(f"config must be a SamplingConfig, got {type(config).__name__}")
        if isinstance(prompts, np.ndarray | jax.Array) or not isinstance(prompts, Sequence) or not prompts:
            raise ValueError("prompts must be a non-empty list of token-id lists")
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompts[{i}] is empty")
            arr = np.asarray(p)
            if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
                raise ValueError(f"prompts[{i}] must be a flat list of ints")
            if arr.min() < 0 or arr.max() >= self.vocab_size:
                raise ValueError(f"prompts[{i}] has token ids outside the vocabulary [0, {self.vocab_size}): "
                                 f"min {arr.min()}, max {arr.max()}")
        bad = [t for t in config.eos_token_ids if t >= self.vocab_size]
        if bad:
            raise ValueError(f"eos_token_ids={config.eos_token_ids} has ids outside [0, {self.vocab_size})")
        longest, new = max(len(p) for p in prompts), config.max_new_tokens
        limit = self.max_cache_length or self.model.config.max_position_embeddings
        name = "max_cache_length" if self.max_cache_length else "max_position_embeddings"
        if longest + new > limit:
            raise ValueError(f"a prompt of {longest} tokens plus max_new_tokens={new} does not fit in the cache "
                             f"({name}={limit})")
        if prompt_length is None:
            p = self._prompt_bucket(longest)
        elif isinstance(prompt_length, bool) or not isinstance(prompt_length, int | np.integer):
            raise ValueError(f"prompt_length={prompt_length!r} must be an int")
        elif prompt_length < longest:
            raise ValueError(f"prompt_length={prompt_length} is shorter than the longest prompt ({longest} tokens)")
        else:
            p = int(prompt_length)
        if self.max_cache_length:
            return min(p, self.max_cache_length - new), self.max_cache_length
        return p, p + new

    # --------------------------------------------------------------------------------------------- programs
    def _program(self, b: int, p: int, s: int, spec: _DecodeSpec, prefill_rows: int | None = None) -> _Program:
        """The (prefill, decode) pair of a batch of `b` rows, prompts of `p` columns, `s` cache slots. With
        `prefill_rows`, the prefill takes that many rows (one per prompt) and a `[b]` row index that copies them
        into the decode batch's rows (one per sample)."""
        key = (b, p, s, spec, prefill_rows)
        if key in self._programs:
            return self._programs[key]
        graphdef = self._graphdef

        def prefill(state, ids, mask, rows=None):
            self.num_traces += 1
            model = nnx.merge(graphdef, state)
            # Prefilled into a cache of the prompt's own length, then extended to S slots: the prompt's attention
            # scores span its P - 1 columns, not all S slots (7.3 → 0.55 GB of temporaries for 8 prompts of 1k
            # tokens and 8k new ones on a small model).
            cache = model.init_cache(ids.shape[0], ids.shape[1])
            if ids.shape[1] > 0:
                _, cache = model(ids, attention_mask=mask, cache=cache)  # logits unused: XLA drops the LM head
            return (cache if rows is None else cache.take_rows(rows)).extend(s)

        def decode(state, cache, last, key):
            self.num_traces += 1
            return _decode_loop(nnx.merge(graphdef, state), cache, last, key, spec)

        if self.mesh is None:
            prog = _Program(jax.jit(prefill), jax.jit(decode, donate_argnums=1), None, None)
        else:
            shard = lambda axes, shape: logical_sharding(self.mesh, axes, self.rules, shape)
            cache_shapes = jax.eval_shape(lambda: self.model.init_cache(b, s))
            cache_sh = jax.tree.map(lambda axes, x: shard(axes, x.shape), KVCache.logical_axes(), cache_shapes,
                                    is_leaf=lambda x: type(x) is tuple)
            rows2, rows1 = shard(("batch", None), (b, 2)), shard(("batch",), (b,))
            prompts2 = shard(("batch", None), (prefill_rows or b, 2))
            replicated = NamedSharding(self.mesh, PartitionSpec())
            params = self._param_shardings
            inputs = (params, prompts2, prompts2) + (() if prefill_rows is None else (rows1,))
            prog = _Program(
                jax.jit(prefill, in_shardings=inputs, out_shardings=cache_sh),
                jax.jit(decode, in_shardings=(params, cache_sh, rows1, replicated),
                        out_shardings=(rows2, rows2, rows1, rows1, cache_sh), donate_argnums=1),
                prompts2, rows1)
        self._programs[key] = prog
        return prog

    def _put(self, x: np.ndarray, sharding):
        return jnp.asarray(x) if sharding is None else to_global(x, sharding)

    def _get(self, x: jax.Array) -> np.ndarray:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            x = multihost_utils.global_array_to_host_local_array(x, self.mesh, x.sharding.spec)
        return np.asarray(x)

    def _compute_params(self, state):
        """`state` with the model's product operands in the compute dtype (`cast_product_operands`; once per
        `generate` call, so that neither program casts a weight per decode step); `state` itself when nothing
        needs a cast (params already in it)."""
        dtype = self.compute_dtype
        # Decided from the paths and dtypes: tracing the cast just to check cost ~2-4 ms of host time per call.
        if dtype is None or not needs_product_cast(state, dtype):
            return state
        if self._cast is None:
            placed = {} if self._param_shardings is None else {"out_shardings": self._param_shardings}
            self._cast = jax.jit(lambda tree: cast_product_operands(tree, dtype), **placed)
        return self._cast(state)

    # ------------------------------------------------------------------------------------------------ generate
    def generate(self, prompts: Sequence[Sequence[int]], config: SamplingConfig, key: jax.Array, *,
                 params: nnx.State | None = None, prompt_length: int | None = None,
                 chunk_size: int | None = None) -> Rollout:
        """Samples `config.num_samples` completions of every prompt.

        Args:
          prompts: token-id lists of any (non-zero) lengths.
          config: the sampling controls.
          key: a PRNG key; the same key gives the same rollout.
          params: an `nnx.State` of the same model (`nnx.state(model)` / `nnx.split(model)[1]`, e.g. updated by
            the trainer) to sample with instead of the model's current state; only the values may differ, so
            this never recompiles. Float leaves are cast to the model's compute dtype (once per call).
          prompt_length: pad the prompts to exactly this many columns instead of the bucket of the longest
            (`prompt_bucket`, or the constructor's `prompt_buckets`); at least the longest prompt's length
            (ValueError otherwise). With `max_cache_length` it is clamped to `max_cache_length - max_new_tokens`
            like a bucket. Multi-host callers pass the same value on every process.
          chunk_size: sample at most this many prompts per (prefill, decode) call, so that memory is bounded
            whatever the batch size: chunk `i` (prompts `[i * chunk_size, (i + 1) * chunk_size)`) samples with
            `jax.random.fold_in(key, i)`. None, or at least `len(prompts)`, is one call with `key` itself (the
            unchunked rollout, bit for bit). All chunks are padded to the whole batch's prompt length, so equal
            chunks reuse one compiled program (a smaller last chunk may compile one more), and the rollout is the
            chunks' rollouts concatenated.
        Returns:
          A `Rollout` of N = len(prompts) · num_samples rows, group by group.
        """
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                       or chunk_size < 1):
            raise ValueError(f"chunk_size={chunk_size!r} must be a positive int or None")
        p, s = self._lengths(prompts, config, prompt_length)
        spec = _DecodeSpec(config.max_new_tokens, float(config.temperature), config.top_k, float(config.top_p),
                           config.eos_token_ids, self.pad_token_id)
        state = nnx.state(self.model) if params is None else params
        if self._param_shardings is not None:
            state = jax.device_put(state, self._param_shardings)  # no copy when already placed so
        state = self._compute_params(state)
        if chunk_size is None or len(prompts) <= chunk_size:
            return self._generate(prompts, config, key, state, spec, p, s)
        return concat_rollouts([
            self._generate(prompts[start : start + chunk_size], config, jax.random.fold_in(key, i), state, spec, p, s)
            for i, start in enumerate(range(0, len(prompts), chunk_size))])

    def _left_pad(self, prompts, copies: int, b: int, p: int) -> tuple[np.ndarray, np.ndarray]:
        """`(ids, mask)`, both `[b, p]`: `copies` rows of each prompt, left-padded to `p` columns, in order, then
        batch padding rows with one real (pad) token in the last column, so that every row's last column is real."""
        ids = np.full((b, p), self.pad_token_id, np.int32)
        mask = np.zeros((b, p), bool)
        for i, prompt in enumerate(prompts):
            rows = slice(i * copies, (i + 1) * copies)
            ids[rows, p - len(prompt):] = prompt
            mask[rows, p - len(prompt):] = True
        mask[len(prompts) * copies:, -1] = True
        return ids, mask

    def _generate(self, prompts, config: SamplingConfig, key, state, spec: _DecodeSpec, p: int, s: int) -> Rollout:
        """One (prefill, decode) call on `prompts` padded to `p` columns, with `state` already in the compute dtype
        and placed."""
        g = config.num_samples
        n = len(prompts) * g
        b = _round_up(n, self.batch_multiple)
        ids, mask = self._left_pad(prompts, g, b, p)
        # The samples of a prompt share its prefill: the prefill runs on one row per prompt (padded to a power of
        # two, so that few programs serve any number of prompts) and its cache rows are copied to the samples' rows
        # (a prompt's cache does not depend on what is sampled after it).
        u = _round_up(1 << (len(prompts) - 1).bit_length(), self._batch_shards)
        if g > 1 and u < b:
            prog = self._program(b, p, s, spec, prefill_rows=u)
            prefill_ids, prefill_mask = self._left_pad(prompts, 1, u, p)
            # Row r of the batch is sample r % g of prompt r // g; a batch padding row (r >= n) copies any row, its
            # output is dropped.
            rows = np.minimum(np.arange(b) // g, u - 1).astype(np.int32)
            rows += jax.process_index() * u  # to_global's layout: each process's rows, in process order
            copy = (self._put(rows, prog.row_sharding),)
        else:
            prog = self._program(b, p, s, spec)
            prefill_ids, prefill_mask, copy = ids, mask, ()
        cache = prog.prefill(state, self._put(prefill_ids[:, :-1], prog.prompt_sharding),
                             self._put(prefill_mask[:, :-1], prog.prompt_sharding), *copy)
        # The final cache is returned only so that the donated one can be updated in place; it is dropped here.
        tokens, logprobs, lengths, eos, _ = prog.decode(state, cache, self._put(ids[:, -1], prog.row_sharding), key)
        tokens, logprobs, lengths, eos = (self._get(x)[:n] for x in (tokens, logprobs, lengths, eos))
        steps = np.arange(config.max_new_tokens)
        return Rollout(
            prompt_tokens=ids[:n], prompt_mask=mask[:n], tokens=tokens, logprobs=logprobs,
            mask=steps[None, :] < lengths[:, None], lengths=lengths,
            finish_reason=np.where(eos, FinishReason.EOS, FinishReason.LENGTH).astype(np.int32))


def _decode_loop(model, cache: KVCache, last: jax.Array, key: jax.Array, spec: _DecodeSpec):
    """Generates up to `spec.max_new_tokens` tokens per row, stopping once every row has produced an EOS.

    Args:
      model: the merged `CausalLM`.
      cache: holds the prompts but their last column.
      last: `[B] int32`, the last prompt column (fed first).
      key: PRNG key; step t samples with `fold_in(key, t)`.
    Returns:
      `tokens [B, M] int32` (pad after the end), `logprobs [B, M] float32` (0 after the end), `lengths [B] int32`,
      `eos [B] bool` (whether the row ended with an EOS), and the final cache.
    """
    b, m = last.shape[0], spec.max_new_tokens
    eos_ids = jnp.asarray(spec.eos_token_ids, jnp.int32)

    def cond(carry):
        step, _, _, done, *_ = carry
        return (step < m) & ~jnp.all(done)

    def body(carry):
        step, cache, token, done, tokens, logprobs, lengths = carry
        logits, cache = model(token[:, None], cache=cache)
        logits = logits[:, 0]
        new, logp = sample_with_logprobs(jax.random.fold_in(key, step), logits, temperature=spec.temperature,
                                         top_k=spec.top_k, top_p=spec.top_p)
        new = jnp.where(done, spec.pad_token_id, new)
        logp = jnp.where(done, 0.0, logp)
        tokens = lax.dynamic_update_slice(tokens, new[:, None], (0, step))
        logprobs = lax.dynamic_update_slice(logprobs, logp[:, None], (0, step))
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | jnp.isin(new, eos_ids)
        return step + 1, cache, new, done, tokens, logprobs, lengths

    init = (jnp.zeros((), jnp.int32), cache, last, jnp.zeros((b,), jnp.bool_),
            jnp.full((b, m), spec.pad_token_id, jnp.int32), jnp.zeros((b, m), jnp.float32),
            jnp.zeros((b,), jnp.int32))
    _, cache, _, done, tokens, logprobs, lengths = lax.while_loop(cond, body, init)
    return tokens, logprobs, lengths, done, cache
