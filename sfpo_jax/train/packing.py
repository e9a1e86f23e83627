"""Packed learner layouts: the model computes a rollout batch's real tokens only.

The padded layout (:class:`sfpo_jax.train.learner.Batch`) gives every rollout a ``[P + T]`` row: the prompt
left-padded to its bucket, the completion right-padded to ``max_new_tokens``, and each of a group's G rows
recomputes the same prompt. A packed layout lays the same tokens out as a few ``[R, L]`` rows of *segments*:

- ``"sequences"``: each rollout's real tokens (prompt then completion) as one segment; several per row up to
  ``L`` cells. Attention never crosses a segment and positions restart at 0 in each, so every token's activations
  are the padded layout's.
- ``"groups"``: the rollouts of one prompt (identical prompt tokens within a micro-batch) as one segment: the
  prompt once, then each completion, which attends to the prompt and to itself only, its positions continuing
  from the prompt's. The prompt's activations are shared, not approximated. A group too long for ``L`` is split
  into sub-groups, each with its own copy of the prompt.

Only the layout changes, never the objective: :func:`completion_logprobs` returns the same ``[n, T]`` log-probs
and entropies as the padded forward (up to float rounding), gathered back by an index map, so the loss, its
gradient, every metric and every token-mean denominator are the padded layout's by construction (the gather is
differentiable). The LM head runs only at the ``K`` cells per row that predict a loss token.

Packing is host-side numpy (:func:`pack`), per micro-batch, with shapes from bucketed budgets so that the number
of compiled programs stays small (:func:`bucket`). Arrays carry a leading ``[U]`` micro-batch axis so that the
learner's ``lax.scan`` / ``lax.map`` over micro-batches reads them as it reads the padded micro-batches.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sfpo_jax.rl import grpo

PACKING = ("none", "sequences", "groups")


class Packed(NamedTuple):
    """A batch of ``U`` micro-batches of ``n`` rollouts each, packed into ``R`` rows of ``L`` cells each.

    Attributes:
      tokens: ``[U, R, L] int32`` token ids (0 in padding cells).
      positions: ``[U, R, L] int32`` RoPE positions: from 0 in each segment; a group's completions continue
        from its prompt's length.
      segments: ``[U, R, L] int32``, 1 + the segment's index in its row; 0 marks a padding cell.
      branches: ``[U, R, L] int32``, 0 for cells every later cell of the segment sees (a whole sequence, or a
        group's prompt), k ≥ 1 for the group's k-th completion, seen only by itself.
      logit_cells: ``[U, R, K] int32``, the cell of the row whose logits predict target k.
      targets: ``[U, R, K] int32``, the token that logit predicts (0 where ``target_mask`` is False).
      target_mask: ``[U, R, K] bool``, real targets.
      unpack: ``[U, n, T] int32``, for completion token t of the micro-batch's row i, its index into the
        flattened ``[R * K]`` targets (0 where the padded layout's ``completion_mask`` is 0).
      rows: ``[U, n] int32``, the batch rows of each micro-batch, in order (a partition of the N rows).
    """

    tokens: np.ndarray
    positions: np.ndarray
    segments: np.ndarray
    branches: np.ndarray
    logit_cells: np.ndarray
    targets: np.ndarray
    target_mask: np.ndarray
    unpack: np.ndarray
    rows: np.ndarray


def attention_mask(segments: jax.Array, branches: jax.Array) -> jax.Array:
    """``[..., L, L] bool``, whether the query at cell q may attend to the key at cell s, from ``[..., L]`` segment
    and branch ids: the same real segment, causal (s ≤ q), and the key shared (branch 0) or on the query's branch."""
    seg_q, seg_k = segments[..., :, None], segments[..., None, :]
    br_q, br_k = branches[..., :, None], branches[..., None, :]
    length = segments.shape[-1]
    causal = jnp.arange(length)[None, :] <= jnp.arange(length)[:, None]
    return causal & (seg_q == seg_k) & (seg_k > 0) & ((br_k == 0) | (br_k == br_q))


def completion_logprobs(model, packed: Packed, completion_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Log-probs and entropies of one micro-batch's completion tokens from its packed layout.

    Args:
      model: a :class:`sfpo_jax.models.CausalLM`.
      packed: one micro-batch of a :class:`Packed` (no leading ``U`` axis: ``tokens [R, L]``, ``unpack [n, T]``).
      completion_mask: ``[n, T]``, the padded layout's.

    Returns:
      ``(logp, entropy)``, both ``[n, T] float32``, zero where ``completion_mask`` is 0: what
      :func:`sfpo_jax.train.learner.completion_logprobs` gives on the padded rows.
    """
    mask = attention_mask(packed.segments, packed.branches)
    logits = model(packed.tokens, attention_mask=mask, positions=packed.positions, logits_at=packed.logit_cells)
    logp, entropy = grpo.token_logprobs_and_entropy(logits, packed.targets, packed.target_mask)  # [R, K] each
    m = jnp.asarray(completion_mask).astype(bool)
    # A gather, so differentiable: each real (row, t) reads exactly one packed target, and its cotangent flows back
    # there alone.
    return tuple(jnp.where(m, x.reshape(-1)[packed.unpack], 0.0) for x in (logp, entropy))


def bucket(n: int, bits: int = 3) -> int:
    """The smallest size ≥ ``n`` of the form ``m · 2^e`` with ``m < 2^(bits + 1)``: at most ``2^bits`` sizes per
    octave (so compiles stay few), each at most ``1 / 2^bits`` (12.5%) above the sizes it stands for."""
    n = max(int(n), 1)
    step = 1 << max(n.bit_length() - 1 - bits, 0)
    return -(-n // step) * step


class _Unit(NamedTuple):
    """A segment to place: its cells, and the loss tokens it predicts as ``(cell, target, row, t)`` columns."""

    tokens: np.ndarray
    positions: np.ndarray
    branches: np.ndarray
    loss: np.ndarray  # [num_loss, 4] int64


def _real(x: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The real entries of ``x`` (where ``m``) and, for every slot, the index of its real entry (-1 if padding)."""
    return x[m], np.where(m, np.cumsum(m) - 1, -1)


def _loss_entries(rows, tokens, attn, completion_mask, prompt_len, cell_of) -> np.ndarray:
    """``[num_loss, 4]`` ``(cell, target, row, t)`` of ``rows``' loss tokens, ``cell_of(row, slot)`` mapping the
    predicting slot of the padded row to its cell in the unit (the slot before the token: P + t - 1)."""
    out = []
    for i in rows:
        ts = np.flatnonzero(completion_mask[i])
        slots = prompt_len + ts - 1
        if not attn[i, slots].all():
            raise ValueError(f"row {i}: a loss token's predicting slot is padding (the padded layout's logit there "
                             "sees no token of its own); packing needs left-padded prompts and right-padded "
                             "completions")
        out.append(np.stack([cell_of(i, slots), tokens[i, prompt_len + ts], np.full_like(ts, i), ts], axis=1))
    return np.concatenate(out) if out else np.zeros((0, 4), np.int64)


def _sequence_units(tokens, attn, completion_mask, prompt_len) -> list[_Unit]:
    units = []
    for i in range(tokens.shape[0]):
        seq, cell = _real(tokens[i], attn[i])
        loss = _loss_entries([i], tokens, attn, completion_mask, prompt_len, lambda _, s, c=cell: c[s])
        units.append(_Unit(seq, np.arange(len(seq)), np.zeros(len(seq), np.int64), loss))
    return units


def _group_units(tokens, attn, completion_mask, prompt_len, budget) -> list[_Unit]:
    """One unit per group of rows with the same real prompt tokens (in first-appearance order), split into
    sub-groups that fit ``budget`` cells, each sub-group with its prompt once."""
    groups: dict[bytes, list[int]] = {}
    for i in range(tokens.shape[0]):
        groups.setdefault(tokens[i, :prompt_len][attn[i, :prompt_len]].tobytes(), []).append(i)
    lengths = attn[:, prompt_len:].sum(1)
    units = []
    for rows in groups.values():
        p, sub = int(attn[rows[0], :prompt_len].sum()), []
        for i in [*rows, None]:  # None: flush the last sub-group
            if sub and (i is None or p + lengths[sub].sum() + lengths[i] > budget):
                units.append(_group_unit(sub, tokens, attn, completion_mask, prompt_len))
                sub = []
            if i is not None:
                sub.append(i)
    return units


def _group_unit(rows, tokens, attn, completion_mask, prompt_len) -> _Unit:
    """The prompt of ``rows`` (all the same) once, then each row's completion as a branch of its own."""
    prompt, _ = _real(tokens[rows[0], :prompt_len], attn[rows[0], :prompt_len])
    p, parts, cell_maps = len(prompt), [], {}
    start = p
    for k, i in enumerate(rows, start=1):
        comp, comp_cell = _real(tokens[i, prompt_len:], attn[i, prompt_len:])
        parts.append((comp, np.arange(p, p + len(comp)), np.full(len(comp), k)))
        # A row's own map of its prompt slots: its real prompt tokens are the shared ones, in order.
        cell_maps[i] = np.concatenate([_real(tokens[i, :prompt_len], attn[i, :prompt_len])[1],
                                       np.where(comp_cell >= 0, start + comp_cell, -1)])
        start += len(comp)
    loss = _loss_entries(rows, tokens, attn, completion_mask, prompt_len, lambda i, slots: cell_maps[i][slots])
    cat = [np.concatenate([x, *(part[j] for part in parts)]) for j, x in
           enumerate((prompt, np.arange(p), np.zeros(p, np.int64)))]
    return _Unit(*cat, loss)


def _first_fit_decreasing(sizes: list[int], capacity: int) -> list[list[int]]:
    """Bins of unit indices, each holding at most ``capacity`` cells: the longest unit first, into the first bin
    it fits (within 11/9 of the optimal number of bins)."""
    bins, free = [], []
    for u in sorted(range(len(sizes)), key=lambda u: -sizes[u]):
        for b, room in enumerate(free):
            if sizes[u] <= room:
                bins[b].append(u)
                free[b] -= sizes[u]
                break
        else:
            bins.append([u])
            free.append(capacity - sizes[u])
    return bins


def _units(mode, tokens, attn, completion_mask, prompt_len, budget) -> list[_Unit]:
    if mode == "sequences":
        return _sequence_units(tokens, attn, completion_mask, prompt_len)
    return _group_units(tokens, attn, completion_mask, prompt_len, budget)


# Bucket resolutions (mantissa bits, see `bucket`): each packed shape varies over 4 sizes per octave, so a run
# compiles few programs. (Rows of 2 lengths per octave cost W7's groups layout 1.54x its distinct tokens at 8
# rollouts per micro-batch, 4 lengths 1.35x: a micro-batch of one group fills one row, so the length is the fill.)
_ROW_BITS, _LENGTH_BITS, _LOGIT_BITS = 2, 2, 2
# The row length at which attention's per-cell work (the einsum path scores every key of the row, segments or not:
# 4 · L · heads · head_dim FLOPs per layer) equals the rest of a layer's (2 · its parameters): ~2750 for the bench
# model, ~3070 for SmolLM2-135M. The layout's cost is R · L · (1 + L / _ATTENTION_LENGTH).
_ATTENTION_LENGTH = 3072


def _layout(mode, micro, prompt_len, max_row_tokens, row_multiple):
    """``(R, L, units, bins)`` of the cheapest layout: L over the buckets from the longest rollout's real tokens (a
    group's indivisible unit: its prompt and one completion) up to ``max_row_tokens``; R the bucketed most bins of
    a micro-batch, a multiple of ``row_multiple``; the cost R · L · (1 + L / _ATTENTION_LENGTH)."""
    longest = max(int(attn.sum(1).max()) for _, attn, _ in micro)
    best, length = None, bucket(longest, _LENGTH_BITS)
    while best is None or length <= max_row_tokens:
        units = [_units(mode, *mb, prompt_len, length) for mb in micro]
        bins = [_first_fit_decreasing([len(u.tokens) for u in us], length) for us in units]
        rows = row_multiple * bucket(-(-max(len(b) for b in bins) // row_multiple), _ROW_BITS)
        cost = rows * length * (1 + length / _ATTENTION_LENGTH)
        if best is None or cost < best[0]:
            best = (cost, rows, length, units, bins)
        length = bucket(length + 1, _LENGTH_BITS)
    return best[1:]


def pack(tokens: np.ndarray, attn: np.ndarray, completion_mask: np.ndarray, mode: str, *, num_micro: int = 1,
         strided: bool = False, max_row_tokens: int | None = None, row_multiple: int = 1) -> Packed:
    """Packs a padded learner batch into ``mode``'s layout, micro-batch by micro-batch.

    Args:
      tokens: ``[N, P + T] int32``; attn: ``[N, P + T] bool`` real tokens; completion_mask: ``[N, T] bool``
        (as in :class:`sfpo_jax.train.learner.Batch`, on the host).
      mode: ``"sequences"`` or ``"groups"`` (see the module docstring).
      num_micro: U, the micro-batches the rows are split into; each is packed on its own.
      strided: micro-batch j holds rows j, j + U, … (the padded layout's split,
        :func:`sfpo_jax.train.learner.to_micro_batches`); else whole groups (or as much of each as the micro-batch
        size allows) balanced over the micro-batches by real tokens. Only an objective that reads the split
        (``micro-batch-token-mean``) needs the former.
      max_row_tokens: the most cells per packed row (default ``4 · (P + T)``; at least the longest rollout's real
        tokens, rounded up to a bucket). Within it the layout's cost model picks the length (attention's work per
        cell grows with it); the cap bounds the ``[R, L, L]`` attention scores' memory.
      row_multiple: R is a multiple of it (the mesh's batch shards).

    Returns:
      a :class:`Packed` of ``[U, R, L]`` / ``[U, R, K]`` / ``[U, N // U, T]`` numpy arrays, L, R and K
      bucketed (:func:`bucket`).
    """
    if mode not in PACKING[1:]:
        raise ValueError(f"packing mode must be one of {PACKING[1:]}, got {mode!r}")
    n, length = tokens.shape
    t = completion_mask.shape[1]
    if n % num_micro:
        raise ValueError(f"{n} rows do not split into {num_micro} equal micro-batches")
    arrays = [np.asarray(tokens), np.asarray(attn, bool), np.asarray(completion_mask, bool)]
    if strided:
        rows = np.arange(n, dtype=np.int32).reshape(-1, num_micro).T  # [U, n]
    else:
        rows = _balanced_rows(mode, *arrays[:2], length - t, num_micro)
    micro = [tuple(x[r] for x in arrays) for r in rows]
    num_rows, row_len, units, bins = _layout(mode, micro, length - t, max_row_tokens or 4 * length, row_multiple)
    per_micro = list(zip(units, bins, strict=True))
    num_logits = bucket(max(sum(len(us[u].loss) for u in b) for us, bs in per_micro for b in bs), _LOGIT_BITS)
    out = [_fill(us, bs, num_rows, row_len, num_logits, (n // num_micro, t)) for us, bs in per_micro]
    return Packed(*(np.stack(x) for x in zip(*out, strict=True)), rows=np.ascontiguousarray(rows))


def _balanced_rows(mode, tokens, attn, prompt_len, num_micro) -> np.ndarray:
    """``[U, n] int32``: the rows split into ``num_micro`` micro-batches of equal row counts and near-equal real
    tokens (every micro-batch is packed to the same shape, so the fullest one sets it). Rows move in chunks of
    consecutive rows that share a prompt (one row in ``"sequences"``; in ``"groups"`` as much of a group as the
    chunk size, the gcd of the micro-batch size and the group sizes, allows), largest chunk first into the
    least-loaded micro-batch with room."""
    n = tokens.shape[0] // num_micro
    same = [i > 0 and mode == "groups" and np.array_equal(tokens[i, :prompt_len][attn[i, :prompt_len]],
                                                          tokens[i - 1, :prompt_len][attn[i - 1, :prompt_len]])
            for i in range(tokens.shape[0])]
    starts = [i for i, s in enumerate(same) if not s] + [tokens.shape[0]]
    size = int(np.gcd.reduce([n, *np.diff(starts)]))
    chunks = np.arange(tokens.shape[0]).reshape(-1, size)
    prompt = lambda c: attn[c, :prompt_len].sum() if mode == "sequences" else attn[c[0], :prompt_len].sum()
    weight = [int(attn[c, prompt_len:].sum() + prompt(c)) for c in chunks]
    load, members = np.zeros(num_micro), [[] for _ in range(num_micro)]
    for c in sorted(range(len(chunks)), key=lambda c: -weight[c]):
        u = min((u for u in range(num_micro) if len(members[u]) < n // size), key=lambda u: load[u])
        members[u].append(c)
        load[u] += weight[c]
    return np.stack([np.sort(chunks[m].reshape(-1)) for m in members]).astype(np.int32)


def _fill(units: list[_Unit], bins: list[list[int]], rows: int, cells: int, num_logits: int,
          unpacked: tuple[int, int]) -> tuple[np.ndarray, ...]:
    """One micro-batch's :class:`Packed` arrays but ``rows`` (no ``U`` axis), ``units`` placed row by row as
    ``bins``."""
    grid = [np.zeros((rows, cells), np.int32) for _ in range(4)]  # tokens, positions, segments, branches
    logit = [np.zeros((rows, num_logits), dt) for dt in (np.int32, np.int32, bool)]
    unpack = np.zeros(unpacked, np.int32)
    for r, b in enumerate(bins):
        start, k = 0, 0
        for s, u in enumerate(b, start=1):
            unit, end = units[u], start + len(units[u].tokens)
            for dst, src in zip(grid, (unit.tokens, unit.positions, s, unit.branches), strict=True):
                dst[r, start:end] = src
            cell, target, row, t = unit.loss.T
            ks = np.arange(k, k + len(cell))
            logit[0][r, ks], logit[1][r, ks], logit[2][r, ks] = start + cell, target, True
            unpack[row, t] = r * num_logits + ks
            start, k = end, k + len(cell)
    return (*grid, *logit, unpack)


def cells(packed: Packed) -> int:
    """Token cells the model computes for ``packed``: ``U · R · L``."""
    return int(np.prod(packed.tokens.shape))
