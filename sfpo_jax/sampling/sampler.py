"""Batched generation with a KV cache: one prefill pass, then a `lax.while_loop` decode loop, both jitted.

A call to `Sampler.generate` left-pads the prompts to a bucketed length P (`prompt_bucket`, or the caller's
`prompt_length`) and the batch to a bucketed size, so a training run compiles one (prefill, decode) pair per
(rows, P, sampling settings), not one per batch; `chunk_size` splits a large batch into calls that share P (so equal
chunks share one program). The prefill writes the first P-1 prompt columns of each prompt into a *bank*, a cache of
that length (so no `[B, P, V]` logits are ever computed, and a prompt's attention spans its own columns only); the
decode program (`sfpo_jax.sampling.slots.decode`) builds its cache of C = P + max_new_tokens slots per row from the
bank, feeds each row's last prompt column (real for every row, since prompts are left-padded) and then each
sampled token. With `num_samples` > 1 (GRPO's groups) the bank holds one row per prompt, copied to each of its
samples' rows: the same rollout for a fraction of the prefill.

Two decode paths, one rollout. Static (`slots=None`, or at least N sequences): every sequence in flight from the
start, the call runs until its longest row ends. Continuous batching (`slots=S` < N): S decode rows, and a row that
ends takes the next pending sequence in the same loop iteration (its prompt's bank row copied in), all in one device
call; the cache has S rows whatever N. Each sequence draws from its own PRNG stream
(`fold_in(fold_in(key, sequence), position)`), so S, `chunk_size` and the order in which rows finish change no
token; log-probs can differ by float rounding (a sum's order depends on the batch), and so, very rarely, can a draw
whose uniform falls within that rounding of a boundary between two tokens.

Precision: the programs compute in the model's compute dtype (`CausalLM.dtype`): float params (e.g. float32 masters
of a bfloat16-compute model) are cast to it once per `generate` call, and the KV cache is in it; logits, sampling
and log-probs are float32.

Sharding: with a `mesh`, params follow their logical axes (`sfpo_jax.parallel.param_shardings`), the batch is
split over the axes of the `batch` rule (data, fsdp) and the cache's kv heads over `tensor`; the jitted programs
carry these as explicit `in_shardings` / `out_shardings`. The decode slots are split over the batch axes too; the
bank (where samples or refills copy from it) is whole on every device, so that a refill is a local gather, and with
refills the outputs (rows by sequence, written from any slot) are replicated.

Multi-host: every process calls `generate` with its own prompts (the same number on each) and the same
`prompt_length`, one that does not depend on the local prompts (`prompt_length=prompt_bucket(global_longest)`, the
longest prompt of all processes); the local batches become one global array (`sfpo_jax.parallel.to_global`), and
each process gets back the `Rollout` of its own prompts. With `slots`, S counts the rows of all processes, the
sequences are numbered process by process, and every process runs the same two device calls per chunk (the decode
loop's stopping test is over the global slots).
"""

from __future__ import annotations

import enum
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sfpo_jax.models import KVCache, cast_product_operands, needs_product_cast
from sfpo_jax.parallel import logical_sharding, num_shards, param_shardings, to_global
from sfpo_jax.sampling.config import SamplingConfig
from sfpo_jax.sampling.slots import DecodeSpec, Plan, decode

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


class _Program(NamedTuple):
    prefill: Any  # (state, ids [U, P - 1], mask [U, P - 1]) -> the bank, `KVCache` [U, P - 1]
    decode: Any  # (state, bank, last [U], plan, key) -> `slots.decode`'s outputs
    prompt_sharding: Any  # of the prefill's `[U, T]` inputs, or None without a mesh
    row_sharding: Any  # of `[U]` inputs


class _Shape(NamedTuple):
    """What picks a compiled (prefill, decode) pair: the static shapes and settings of one call."""

    slots: int  # S, decode rows
    n_out: int  # sequences padded (the sentinel of a free slot)
    bank_rows: int  # U, prefilled rows over all processes
    prompt_length: int  # P
    cache_length: int  # C
    spec: DecodeSpec
    refills: int  # 0: the static path
    direct: bool  # the bank is the slots' cache (static path, a bank row per slot)


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
        self.row_steps = 0  # decode row-steps (rows in flight x decode steps) of the last `generate`: benchmarks

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
    def _program(self, shape: _Shape) -> _Program:
        """The (prefill, decode) pair of one `_Shape`, compiled on first use."""
        if shape in self._programs:
            return self._programs[shape]
        graphdef, u = self._graphdef, shape.bank_rows

        def prefill(state, ids, mask):
            self.num_traces += 1
            model = nnx.merge(graphdef, state)
            # Prefilled into a cache of the prompt's own length P - 1 (decode extends or copies it into C slots):
            # the prompt's attention scores span its P - 1 columns, not all C (7.3 → 0.55 GB of temporaries for 8
            # prompts of 1k tokens and 8k new ones on a small model).
            cache = model.init_cache(ids.shape[0], ids.shape[1])
            if ids.shape[1] > 0:
                _, cache = model(ids, attention_mask=mask, cache=cache)  # logits unused: XLA drops the LM head
            return cache

        def run(state, bank, last, plan, key, constrain=lambda cache: cache):
            self.num_traces += 1
            return decode(nnx.merge(graphdef, state), bank, last, plan, key, shape.spec,
                          cache_length=shape.cache_length, refills=shape.refills, direct=shape.direct,
                          constrain=constrain)

        if self.mesh is None:
            prog = _Program(jax.jit(prefill), jax.jit(run), None, None)
        else:
            shard = lambda axes, dims: logical_sharding(self.mesh, axes, self.rules, dims)
            is_axes = lambda x: type(x) is tuple

            def cache_sharding(rows, length, batch):  # the bank unsplit over batch axes where `batch` is None
                shapes = jax.eval_shape(lambda: self.model.init_cache(rows, length))
                return jax.tree.map(lambda axes, x: shard(tuple(batch if a == "batch" else a for a in axes), x.shape),
                                    KVCache.logical_axes(), shapes, is_leaf=is_axes)

            slots_sh = cache_sharding(shape.slots, shape.cache_length, "batch")
            # A refilled slot reads any prompt: the bank is whole on every device (a gather, not a collective,
            # per refill); so is it where samples copy their prompt's row at the start.
            bank_sh = cache_sharding(u, shape.prompt_length - 1, "batch" if shape.direct else None)
            prompts2, rows1 = shard(("batch", None), (u, 2)), shard(("batch",), (u,))
            whole = NamedSharding(self.mesh, PartitionSpec())
            params = self._param_shardings
            constrain = lambda cache: jax.lax.with_sharding_constraint(cache, slots_sh)
            if shape.refills:  # outputs indexed by sequence, written from any slot
                outs = whole
            else:  # by slot
                outs = (shard(("batch", None), (shape.slots, 2)),) * 2 + (shard(("batch",), (shape.slots,)),) * 2
                outs += (whole,)
            prog = _Program(
                jax.jit(prefill, in_shardings=(params, prompts2, prompts2), out_shardings=bank_sh),
                jax.jit(functools.partial(run, constrain=constrain), in_shardings=(params, bank_sh, rows1, whole,
                        whole), out_shardings=outs),
                prompts2, rows1)
        self._programs[shape] = prog
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
                 chunk_size: int | None = None, slots: int | None = None) -> Rollout:
        """Samples `config.num_samples` completions of every prompt.

        A rollout is a function of (params, prompts, config, key) alone: sequence i (its index in the whole
        rollout, over chunks and processes) draws its token t with `fold_in(fold_in(key, i), t)`, so `slots` and
        `chunk_size` change no token (and log-probs only by float rounding: a batch's composition can change the
        order of a sum).

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
          chunk_size: prefill and decode at most this many prompts per call, padded to the whole batch's prompt
            length (so equal chunks share programs): bounds the prompt bank and the output rows; the rollout is
            the unchunked one. None: all at once.
          slots: decode the N = len(prompts) · num_samples sequences (over all processes) through this many
            decode rows (continuous batching, `sfpo_jax.sampling.slots`): when a row ends, the next pending
            sequence takes it in the same device call. The decode cache has `slots` rows whatever N; a multiple
            of the batch shards of the mesh. None, or at least N: every sequence in flight at once (the static
            path: one call decodes until its longest row ends).
        Returns:
          A `Rollout` of N = len(prompts) · num_samples rows, group by group.
        """
        for name, value in (("chunk_size", chunk_size), ("slots", slots)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}={value!r} must be a positive int or None")
        if slots is not None and slots % self._batch_shards:
            raise ValueError(f"slots={slots} must be a multiple of the mesh's {self._batch_shards} batch shards")
        p, s = self._lengths(prompts, config, prompt_length)
        spec = DecodeSpec(config.max_new_tokens, float(config.temperature), config.top_k, float(config.top_p),
                          config.eos_token_ids, self.pad_token_id)
        state = nnx.state(self.model) if params is None else params
        if self._param_shardings is not None:
            state = jax.device_put(state, self._param_shardings)  # no copy when already placed so
        state = self._compute_params(state)
        chunk = len(prompts) if chunk_size is None else chunk_size
        self.row_steps = 0
        return concat_rollouts([
            self._generate(prompts[start : start + chunk], config, key, state, spec, p, s, slots,
                           (start, len(prompts)))
            for start in range(0, len(prompts), chunk)])

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

    def _generate(self, prompts, config: SamplingConfig, key, state, spec: DecodeSpec, p: int, c: int,
                  slots: int | None, chunk: tuple[int, int]) -> Rollout:
        """One (prefill, decode) call on `prompts` padded to `p` columns, `c` cache slots, with `state` already in
        the compute dtype and placed; `chunk`: (the first prompt's index, the prompts of the whole call) on this
        process, for the sequences' PRNG indices."""
        g, pc, n = config.num_samples, jax.process_count(), len(prompts) * config.num_samples
        total = pc * n  # sequences over all processes, process by process
        # The samples of a prompt share its prefill: one bank row per prompt (padded to a power of two, so that few
        # programs serve any number of prompts), copied to each sample's slot; or, where that saves nothing, the
        # static batch itself (a row per sample).
        u = _round_up(1 << (len(prompts) - 1).bit_length(), self._batch_shards)
        refill = slots is not None and total > slots
        b = _round_up(n, self.batch_multiple)  # the static path's rows per process
        rows = slots if refill else pc * b  # decode rows over all processes
        direct = not refill and (g == 1 or u >= b)
        copies, u = (g, b) if direct else (1, u)  # bank rows per prompt, per process
        # Sequences padded to a power of two (only the outputs' rows), so that few programs serve any number.
        n_out = _round_up(1 << (total - 1).bit_length(), self.batch_multiple) if refill else rows
        ids, mask = self._left_pad(prompts, copies, u, p)
        plan = _plan(n, g // copies, u, b, rows, n_out, refill, chunk, g)
        refills = max(1, rows // _SLOTS_PER_REFILL) if refill else 0
        prog = self._program(_Shape(rows, n_out, pc * u, p, c, spec, refills, direct))
        bank = prog.prefill(state, self._put(ids[:, :-1], prog.prompt_sharding),
                            self._put(mask[:, :-1], prog.prompt_sharding))
        out = prog.decode(state, bank, self._put(ids[:, -1], prog.row_sharding), plan, key)
        tokens, logprobs, lengths, eos, steps = (self._get(x) for x in out)
        self.row_steps += rows * int(steps)
        mine = slice(jax.process_index() * n, (jax.process_index() + 1) * n) if refill else slice(0, n)
        tokens, logprobs, lengths, eos = (x[mine] for x in (tokens, logprobs, lengths, eos))
        ids, mask = (np.repeat(x[:len(prompts) * copies:copies], g, axis=0) for x in (ids, mask))
        steps = np.arange(config.max_new_tokens)
        return Rollout(
            prompt_tokens=ids, prompt_mask=mask, tokens=tokens, logprobs=logprobs,
            mask=steps[None, :] < lengths[:, None], lengths=lengths,
            finish_reason=np.where(eos, FinishReason.EOS, FinishReason.LENGTH).astype(np.int32))


# With refills, at most one slot in this many takes a new sequence per decode step (at least one): the bank rows of
# that many are gathered every step, used or not, and rows end far less often than that (W7: 1 in 54 per step).
_SLOTS_PER_REFILL = 16


def _plan(n: int, per_row: int, u: int, b: int, rows: int, n_out: int, refill: bool, chunk: tuple[int, int],
          g: int) -> Plan:
    """The `Plan` of one call: `n` sequences per process, the bank's `u` rows per process holding `per_row`
    consecutive sequences each (a prompt's g samples, or 1), `rows` slots (with `refill`), else `b` rows per
    process (the static layout); `chunk` = (first prompt,
    prompts of the whole call) on this process. Sequence s (over all processes, process by process) is sequence
    i = s % n of process s // n, and its PRNG index is its position in the whole unchunked rollout of all
    processes."""
    pc = jax.process_count()
    seq = np.arange(n_out)
    proc, i = seq // n, seq % n
    first, whole = chunk
    seq_row = np.where(seq < pc * n, proc * u + i // per_row, 0)
    seq_key = np.where(seq < pc * n, (proc * whole + first) * g + i, 0)
    slot = np.arange(rows)
    if refill:  # the first sequences in order; the others wait for a free slot
        slot_seq = np.where(slot < pc * n, slot, n_out)
    else:  # each process's batch rows: its sequences, then padding
        slot_seq = np.where(slot % b < n, (slot // b) * n + slot % b, n_out)
    return Plan(*(x.astype(np.int32) for x in (slot_seq, seq_row, seq_key)), np.int32(pc * n))
