"""Flax NNX decoder-only LM covering Qwen2 / Qwen2.5, Qwen3 and Llama 3, numerically matching transformers.

Parameter names mirror the Hugging Face module tree (`layers[i].self_attn.q_proj.kernel` ↔
`model.layers.{i}.self_attn.q_proj.weight`), so checkpoint mapping stays a table (see `checkpoint.py`).
Every parameter carries logical axis names in its `out_sharding` metadata (`nnx.get_partition_spec`); the
rules in `sfpo_jax.parallel` turn them into mesh shardings, so model code never mentions devices.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from sfpo_jax.models.cache import KVCache, as_storage, from_storage
from sfpo_jax.models.config import ModelConfig

# Masked attention scores: large and finite, so a query with no visible key (a padding row) gives a uniform
# softmax instead of NaN.
_MASK_VALUE = -1e30
_INIT_STD = 0.02


def _param(value: jax.Array, axes: Sequence[str | None]) -> nnx.Param:
    # eager_sharding=False: the logical names are metadata only; `sfpo_jax.parallel` maps them to a mesh.
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """RoPE inverse frequencies `[head_dim // 2] float32` from `rope_theta` and `rope_scaling` (HF semantics,
    including the `llama3` frequency-dependent scaling)."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type") == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths (low frequencies) are divided by `factor`, short ones kept, the band between blended.
        scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = np.where(medium, smoothed, scaled)
    return inv_freq.astype(np.float32)


def rope_angles(positions: jax.Array, inv_freq: np.ndarray, max_position: int | None = None
                ) -> tuple[jax.Array, jax.Array]:
    """`(cos, sin)`, each `[B, T, 1, head_dim] float32`, of the RoPE angles of `positions [B, T]`, shared by q and k
    of every layer.

    With `max_position` (the positions are known to lie in `[0, max_position)`), the angles are looked up in a
    `[max_position, head_dim]` table instead of evaluated per position: XLA fuses cos/sin into every consumer and
    would otherwise evaluate them once per head in each of the 2 · num_layers rotations (3–7% of a CPU decode step);
    a table lookup fuses for free, and in a decode loop the table is loop-invariant, built once.
    """
    if max_position is not None:
        angles = jnp.arange(max_position, dtype=jnp.float32)[:, None] * inv_freq  # [P, D/2]
        angles = jnp.concatenate([angles, angles], axis=-1)
        return tuple(table[positions][:, :, None, :] for table in (jnp.cos(angles), jnp.sin(angles)))
    freqs = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, angles: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotates `x [B, T, heads, head_dim]` by `angles = rope_angles(...)` (HF `rotate_half` layout: the two halves
    of head_dim are the real and imaginary parts)."""
    cos, sin = (a.astype(x.dtype) for a in angles)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


class RMSNorm(nnx.Module):
    """`scale * x / rms(x)` over the last axis, in float32 (like every activation, see `CausalLM`)."""

    def __init__(self, dim: int, eps: float, *, param_dtype, axis_name: str = "norm"):
        self.scale = _param(jnp.ones((dim,), param_dtype), (axis_name,))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        return self.scale[...].astype(jnp.float32) * x * lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)


class Dense(nnx.Module):
    """Contracts the trailing `len(in_shape)` axes of x with a kernel `[*in_shape, *out_shape]` (+ bias), the
    product in `dtype` with a float32 result (`einsum_f32`)."""

    def __init__(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...], in_axes: tuple[str, ...],
                 out_axes: tuple[str, ...], *, use_bias: bool, param_dtype, dtype, rngs: nnx.Rngs):
        init = jax.nn.initializers.normal(_INIT_STD)
        self.kernel = _param(init(rngs.params(), (*in_shape, *out_shape), param_dtype), (*in_axes, *out_axes))
        self.bias = _param(jnp.zeros(out_shape, param_dtype), out_axes) if use_bias else None
        self.n_in = len(in_shape)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...]
        batch, contracted = _LETTERS[:x.ndim - self.n_in], _LETTERS[x.ndim - self.n_in:x.ndim]
        out = _LETTERS[x.ndim:x.ndim + kernel.ndim - self.n_in]
        y = einsum_f32(f"{batch}{contracted},{contracted}{out}->{batch}{out}", x, kernel, self.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y


_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def einsum_f32(subscripts: str, a: jax.Array, b: jax.Array, dtype=None) -> jax.Array:
    """`jnp.einsum(subscripts, a, b)` of the operands cast to `dtype` (default: their promoted dtype), accumulated
    and returned in float32; its backward products run in `dtype` too. Every matrix product of the model is one.

    Forward: `out = einsum(a_c, b_c)` in float32, with `a_c, b_c = a, b` cast to `dtype`. Backward, for the
    float32 cotangent `g`: `g_c = g` cast to `dtype`, `da = einsum(g_c, b_c)`, `db = einsum(a_c, g_c)`, accumulated
    in float32 and returned in a's and b's own dtypes, so float32 master weights get float32 gradients without a
    bfloat16 rounding of their own (the products' inputs are rounded, as in any bf16 mixed-precision backward).
    For float32 operands this is plain autodiff. The residuals kept for the backward are `a_c, b_c`: half the bytes
    of the float32 activations in bfloat16.

    Why one product with a float32 result (`preferred_element_type`) rather than a bfloat16 product: it is what
    GPU / TPU matrix units do natively, and on XLA:CPU (AVX512-BF16) it runs in YNNPACK's bf16 kernels at ~1.8x
    the float32 rate (measured at the update's shapes: 860 vs 470 GFLOP/s), while a bfloat16-result product falls
    to Eigen at 0.1-0.9x the float32 rate. On XLA:CPU such a product must come out in dot_general's own layout
    (batch dims, then a's free dims, then b's): where XLA would fold a transpose of the result into it, its Eigen
    fallback fails ("Unsupported element type for DotThunk::Execute: BF16 x BF16 = F32"), so the model writes its
    products in that order (and the backward products below are then in it too).

    Args:
      subscripts: `"lhs,rhs->out"`, every index of a term also in another term (no index summed over within one
        operand) and once per term (no diagonal).
      dtype: the operands' dtype in the products, e.g. `model.dtype`.
    """
    _terms(subscripts)  # checked here, where both the primal and the differentiated call pass
    dtype = jnp.dtype(dtype) if dtype is not None else jnp.promote_types(a.dtype, b.dtype)
    return _einsum_f32(subscripts, dtype, jnp.dtype(a.dtype), jnp.dtype(b.dtype), a, b)


def _terms(subscripts: str) -> tuple[str, str, str]:
    inputs, out = subscripts.replace(" ", "").split("->")
    lhs, rhs = inputs.split(",")
    for term, others in ((lhs, rhs + out), (rhs, lhs + out), (out, lhs + rhs)):
        if len(set(term)) != len(term) or not set(term) <= set(others):
            raise ValueError(f"einsum_f32({subscripts!r}): every index of a term must appear in one of the other "
                             "two, and once per term")
    return lhs, rhs, out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _einsum_f32(subscripts, dtype, a_dtype, b_dtype, a, b):
    return jnp.einsum(subscripts, a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def _einsum_f32_fwd(subscripts, dtype, a_dtype, b_dtype, a, b):
    a_c, b_c = a.astype(dtype), b.astype(dtype)
    return jnp.einsum(subscripts, a_c, b_c, preferred_element_type=jnp.float32), (a_c, b_c)


def _einsum_f32_bwd(subscripts, dtype, a_dtype, b_dtype, residuals, g):
    a_c, b_c = residuals
    lhs, rhs, out = _terms(subscripts)
    g_c = g.astype(dtype)
    da = jnp.einsum(f"{out},{rhs}->{lhs}", g_c, b_c, preferred_element_type=jnp.float32)
    db = jnp.einsum(f"{lhs},{out}->{rhs}", a_c, g_c, preferred_element_type=jnp.float32)
    return da.astype(a_dtype), db.astype(b_dtype)


_einsum_f32.defvjp(_einsum_f32_fwd, _einsum_f32_bwd)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, dtype=None) -> jax.Array:
    """Grouped-query attention without repeating k/v.

    Args:
      q: `[B, T, H, D]`; k: `[B, KVH, D, S]` and v: `[B, KVH, S, D]` (the cache's layouts), H a multiple of
        KVH.
      mask: `[B, T, S] bool`, whether query t may attend to key s.
      dtype: the products' operand dtype (`einsum_f32`).
    Returns:
      `[B, T, H, D] float32`; scores and softmax in float32.
    """
    b, t, h, d = q.shape
    kvh, g = k.shape[1], h // k.shape[1]
    # The G query heads of a kv head and the T positions as one axis M = G * T: both products are plain
    # [M, D] @ [D, S] and [M, S] @ [S, D] matrix products per (row, kv head), in dot_general's own output layout
    # (see `einsum_f32`), and a decode step (T = 1) is the same program shape as a prompt. XLA:CPU runs these on
    # its fast dot kernels (a unit query axis of its own made the decode score product a generic batched dot, ~3x).
    q = q.reshape(b, t, kvh, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kvh, g * t, d)
    scores = einsum_f32("bkmd,bkds->bkms", q, k, dtype).reshape(b, kvh, g, t, -1) * (d ** -0.5)
    scores = jnp.where(mask[:, None, None], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).reshape(b, kvh, g * t, -1)
    out = einsum_f32("bkms,bksd->bkmd", probs, v, dtype)  # [B, KVH, G * T, D]
    return out.reshape(b, kvh, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def attend_fused(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, dtype,
                 implementation: str = "cudnn") -> jax.Array:
    """`attend` as one fused cuDNN flash-attention kernel (`jax.nn.dot_product_attention`), NVIDIA GPUs only
    (`implementation="xla"` runs JAX's unfused reference on any backend: the tests' check of this wiring).

    The `[B, KVH, G·T, S]` scores and probabilities never reach device memory, which is what bounds `attend` at long
    sequences on a GPU. Products take `dtype` operands (bfloat16 or float16: cuDNN has no float32 kernel) with
    float32 accumulation and a float32 softmax, as `attend`; the output is rounded to `dtype` once, then widened.
    The mask enters as an additive bias (`jax.nn.dot_product_attention` turns a boolean mask into one).

    Every query may also attend to its own slot (T = S here). That changes no real token's output: a real query's own
    slot is already visible, and no real query sees a padding key. What it removes is the fully masked row: the
    padding query of a left-padded prompt. Such a row's log-sum-exp is the mask's huge negative bias. For the same
    cuDNN kernel under PyTorch's SDPA, pytorch/pytorch#196678 reports a NaN in dQ on H100/H200 whenever a row's
    log-sum-exp is below ~-88.7 and T % 128 == 64: the padded half of the last key tile is scored 0 rather than
    masked, so exp(0 - lse) overflows.

    Measured on one H100 (`experiments/attention_check.py`, BENCHMARKS.md "GPU"): forward+backward 2.17x `attend`'s
    at 4 x 2048 tokens, 1.42x at 8 x 512 and 1.33x at 16 x 192, gradient cosine 0.9998 to it. At 16 x 192
    (192 % 128 == 64) with 48-token left padding, the kernel's gradient is NaN without the self-slot rule (twice on
    the H100, once on an H200) and finite with it. The trainer offers this path as `model.attention: cudnn`.

    Args:
      q: `[B, T, H, D]`; k, v: `[B, T, KVH, D]`, H a multiple of KVH.
      mask: `[B, T, T] bool`, whether query t may attend to key s.
    Returns:
      `[B, T, H, D] float32`.
    """
    t = q.shape[1]
    mask = mask | jnp.eye(t, dtype=jnp.bool_)[None]  # no fully masked row (see above)
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation=implementation)
    return out.astype(jnp.float32)


ATTENTION = ("einsum", "cudnn")  # `CausalLM.attention`'s choices


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, param_dtype, dtype, rngs: nnx.Rngs):
        e, h, kvh, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        kw = dict(param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.q_proj = Dense((e,), (h, d), ("embed",), ("heads", "head_dim"), use_bias=cfg.attention_bias, **kw)
        self.k_proj = Dense((e,), (kvh, d), ("embed",), ("kv_heads", "head_dim"), use_bias=cfg.attention_bias, **kw)
        self.v_proj = Dense((e,), (kvh, d), ("embed",), ("kv_heads", "head_dim"), use_bias=cfg.attention_bias, **kw)
        self.o_proj = Dense((h, d), (e,), ("heads", "head_dim"), ("embed",), use_bias=cfg.attention_out_bias, **kw)
        self.dtype = dtype
        if cfg.qk_norm:
            norm_kw = dict(param_dtype=param_dtype, axis_name="head_dim")
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, **norm_kw)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, **norm_kw)
        else:
            self.q_norm = self.k_norm = None

    def __call__(self, x, rope, mask, kv=None, layer=0, index=None, attention="einsum"):
        """x `[B, T, E]`, rope `rope_angles(...)`, mask `[B, T, S] bool`. Without `kv`, S = T and the keys are
        this call's; with `kv = (k_all, v_all)` (`KVCache.k`, `.v`), this call's keys are written into layer `layer`
        at slot `index` and attention runs over all S slots. `attention="cudnn"` runs the cache-less path, and a
        prefill into a cache of exactly T slots, through `attend_fused`. Returns `(y [B, T, E], kv)`."""
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        # A cache of exactly T slots is a prefill (index 0, the sampler's): its keys are this call's, as without one.
        fused = attention == "cudnn" and (kv is None or kv[0].shape[-1] == x.shape[1])
        k_t, v_t = k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)  # [B, KVH, D, T], [B, KVH, T, D]
        if kv is not None:
            k_all, v_all = kv
            kv = (_write(k_all, k_t, (layer, 0, 0, 0, index)), _write(v_all, v_t, (layer, 0, 0, index, 0)))
            if not fused:  # attend over every slot, as stored
                k_t, v_t = (from_storage(c[layer], self.dtype) for c in kv)
        out = attend_fused(q, k, v, mask, self.dtype) if fused else attend(q, k_t, v_t, mask, self.dtype)
        return self.o_proj(out), kv


def _write(cache: jax.Array, new: jax.Array, start: tuple) -> jax.Array:
    """`cache` (`KVCache` storage) with `new[None]` written at `start`, in place."""
    return lax.dynamic_update_slice(cache, as_storage(new[None], cache.dtype), start)


class MLP(nnx.Module):
    """SwiGLU: `down(silu(gate(x)) * up(x))`."""

    def __init__(self, cfg: ModelConfig, *, param_dtype, dtype, rngs: nnx.Rngs):
        e, m = cfg.hidden_size, cfg.intermediate_size
        kw = dict(use_bias=cfg.mlp_bias, param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.gate_proj = Dense((e,), (m,), ("embed",), ("mlp",), **kw)
        self.up_proj = Dense((e,), (m,), ("embed",), ("mlp",), **kw)
        self.down_proj = Dense((m,), (e,), ("mlp",), ("embed",), **kw)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, param_dtype, dtype, rngs: nnx.Rngs):
        kw = dict(param_dtype=param_dtype, dtype=dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.self_attn = Attention(cfg, **kw, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.mlp = MLP(cfg, **kw, rngs=rngs)

    def __call__(self, x, rope, mask, kv=None, layer=0, index=None, attention="einsum"):
        h, kv = self.self_attn(self.input_layernorm(x), rope, mask, kv, layer, index, attention)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), kv


class CausalLM(nnx.Module):
    """Decoder-only causal LM.

    Args:
      config: the architecture.
      param_dtype: dtype of the parameters.
      dtype: the compute dtype (defaults to `param_dtype`): the operands' dtype in every matrix product, each
        accumulated in float32 (`einsum_f32`), and the KV cache's. Activations between the products (the residual
        stream, norms, RoPE, softmax, SiLU) and the logits are float32 whatever it is: the products hold the FLOPs
        and the weight and cache bytes, and XLA:CPU runs bfloat16 elementwise ops ~3.4x slower than float32 ones
        (it widens them op by op; measured on SiLU(x) * y at the MLP's shape: 4.1 vs 1.2 ms).
      rngs: initialisation keys (`from_pretrained` overwrites every parameter).
      remat: rematerialise each layer's activations in the backward pass (`nnx.remat`), trading compute for
        memory on long training sequences; the gradients are the same.
      attention: how a call without a cache (the learner's forward and backward) attends: `"einsum"`, the
        products of `attend` on any backend; or `"cudnn"`, one fused flash-attention kernel (`attend_fused`:
        NVIDIA GPUs, a bfloat16 or float16 compute dtype). So does the sampler's prefill, a cached call whose cache
        has exactly its T slots, where the fused kernel also saves the `[B, heads, T, T]` float32 scores; decode
        steps always use `attend`.
    """

    def __init__(self, config: ModelConfig, *, param_dtype=jnp.float32, dtype=None, rngs: nnx.Rngs,
                 remat: bool = False, attention: str = "einsum"):
        self.config = config
        self.param_dtype = param_dtype
        self.dtype = dtype or param_dtype
        self.remat = remat
        if attention not in ATTENTION:
            raise ValueError(f"attention={attention!r} must be one of {ATTENTION}")
        if attention == "cudnn" and jnp.dtype(self.dtype) not in (jnp.bfloat16, jnp.float16):
            raise ValueError(f"attention='cudnn' needs a bfloat16 or float16 compute dtype, got "
                             f"{jnp.dtype(self.dtype)}")
        self.attention = attention
        kw = dict(param_dtype=param_dtype, dtype=self.dtype)
        e, v = config.hidden_size, config.vocab_size
        self.embed_tokens = _param(jax.nn.initializers.normal(_INIT_STD)(rngs.params(), (v, e), param_dtype),
                                   ("vocab", "embed"))
        self.layers = nnx.List([DecoderLayer(config, **kw, rngs=rngs) for _ in range(config.num_layers)])
        self.norm = RMSNorm(e, config.rms_norm_eps, param_dtype=param_dtype)
        self.lm_head = None if config.tie_word_embeddings else Dense(
            (e,), (v,), ("embed",), ("vocab",), use_bias=False, **kw, rngs=rngs)

    def init_cache(self, batch_size: int, max_length: int, dtype=None) -> KVCache:
        """An empty `KVCache` with `max_length` slots per row (dtype defaults to the compute dtype)."""
        c = self.config
        return KVCache.init(c.num_layers, batch_size, max_length, c.num_kv_heads, c.head_dim, dtype or self.dtype)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 positions: jax.Array | None = None, *, cache: KVCache | None = None, logits_to_keep: int = 0,
                 logits_at: jax.Array | None = None):
        """Logits for `input_ids [B, T] int32`.

        Args:
          attention_mask: `[B, T]`, 1 for real tokens and 0 for padding (batches are left-padded); all ones
            when None. Or, without a cache, `[B, T, T] bool`: whether query t may attend to key s, causality
            included, the caller's (e.g. packed sequences: `sfpo_jax.train.packing`); `positions` are then required.
          positions: `[B, T] int32` RoPE positions; by default `cumsum(mask) - 1` (clipped at 0), counted on
            from `cache.num_tokens` in cached mode.
          cache: when given, the T tokens are appended to it at slots `[cache.index, cache.index + T)` and attend
            to every earlier real slot; see `KVCache`.
          logits_to_keep: as in transformers: N > 0 computes the logits of the last N positions only (the final
            norm and the LM head skip the others); 0 keeps all T. A learner scoring a T'-token completion needs the
            last T' + 1: the LM head is the largest product of the model, and a prompt's positions are wasted in it.
          logits_at: `[B, K] int32`, the positions whose logits to compute, in any order and possibly repeated (a
            packed row's predicting positions); the final norm and the LM head see those K positions only.
        Returns:
          `logits [B, T, V] float32` (`[B, min(N, T), V]` with `logits_to_keep=N`, `[B, K, V]` with `logits_at`),
          or `(logits, new_cache)` when `cache` is given.
        """
        b, t = input_ids.shape
        if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be an int >= 0, got {logits_to_keep!r}")
        if logits_to_keep and logits_at is not None:
            raise ValueError("give logits_to_keep or logits_at, not both")
        if attention_mask is not None and attention_mask.ndim == 3:
            attn_mask = self._check_full_mask(attention_mask, positions, cache, (b, t))
            kv = index = max_position = None
        else:
            mask = jnp.ones((b, t), jnp.bool_) if attention_mask is None else attention_mask.astype(jnp.bool_)
            positions, max_position, attn_mask, kv, index, kv_mask = _padding_mask(mask, positions, cache)

        rope = rope_angles(positions, rope_inv_freq(self.config), max_position)
        # Rematerialisation only pays in a backward pass; the cached (sampling) path has none, and nnx.remat cannot
        # run inside the sampler's decode loop (it would mutate the params from another trace level).
        call = nnx.remat(_call_layer, static_argnums=(5, 7)) if self.remat and cache is None else _call_layer
        # The table's rows as a product operand sees them (in the compute dtype), so that the float32 masters and the
        # sampler's cast copy (`cast_product_operands`) embed alike.
        x = self.embed_tokens[...][input_ids].astype(self.dtype).astype(jnp.float32)
        for i, layer in enumerate(self.layers):
            x, kv = call(layer, x, rope, attn_mask, kv, i, index, self.attention)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        elif logits_at is not None:
            x = jnp.take_along_axis(x, logits_at[..., None].astype(jnp.int32), axis=1)  # [B, K, E]
        x = self.norm(x)
        if self.lm_head is None and x.shape[1] == 1:
            # Decode step: with the [V, E] table as the left operand XLA:CPU streams it about 1.7× faster than as a
            # transposed right operand; the [V, B] result is small to transpose.
            logits = einsum_f32("ve,bte->vbt", self.embed_tokens[...], x, self.dtype).transpose(1, 2, 0)
        elif self.lm_head is None:
            logits = einsum_f32("bte,ve->btv", x, self.embed_tokens[...], self.dtype)
        else:
            logits = einsum_f32("bte,ev->btv", x, self.lm_head.kernel[...], self.dtype)
        if cache is None:
            return logits
        new_cache = KVCache(k=kv[0], v=kv[1], mask=kv_mask, num_tokens=cache.num_tokens + mask.sum(-1, jnp.int32),
                            index=cache.index + t)
        return logits, new_cache

    @staticmethod
    def _check_full_mask(attention_mask, positions, cache, shape) -> jax.Array:
        """A caller's `[B, T, T]` attention mask, checked: cache-less, with explicit positions."""
        if cache is not None:
            raise ValueError("a [B, T, T] attention_mask is for a call without a cache")
        if positions is None:
            raise ValueError("a [B, T, T] attention_mask needs explicit positions [B, T]")
        if attention_mask.shape != (*shape, shape[1]) or positions.shape != shape:
            raise ValueError(f"attention_mask {attention_mask.shape} and positions {positions.shape} must be "
                             f"{(*shape, shape[1])} and {shape} for input_ids {shape}")
        return attention_mask.astype(jnp.bool_)


def _padding_mask(mask: jax.Array, positions: jax.Array | None, cache: KVCache | None):
    """What `CausalLM.__call__` attends by from a `[B, T]` padding mask: `(positions, max_position, attn_mask,
    kv, index, kv_mask)`, the positions counted over real tokens unless given, the attention causal over real keys
    (this call's `[B, T, T]`, or `[B, T, S]` over the cache's slots with this call's written in)."""
    t = mask.shape[1]
    offset = 0 if cache is None else cache.num_tokens[:, None]
    max_position = None  # unknown for caller-given positions
    if positions is None:
        positions = jnp.maximum(offset + jnp.cumsum(mask, axis=-1, dtype=jnp.int32) - 1, 0)
        max_position = t if cache is None else cache.max_length  # a row has at most that many real tokens
    query_slot = jnp.arange(t)[:, None]  # [T, 1]
    if cache is None:
        attn_mask = (jnp.arange(t)[None, :] <= query_slot)[None] & mask[:, None, :]  # [B, T, T]
        return positions, max_position, attn_mask, None, None, None
    if t > cache.max_length:
        raise ValueError(f"{t} new tokens do not fit a cache of max_length={cache.max_length}")
    kv_mask = lax.dynamic_update_slice(cache.mask, mask, (0, cache.index))
    visible = jnp.arange(cache.max_length)[None, :] <= cache.index + query_slot  # [T, S]
    attn_mask = visible[None] & kv_mask[:, None, :]
    return positions, max_position, attn_mask, (cache.k, cache.v), cache.index, kv_mask


# The parameters that are matrix-product operands (`einsum_f32`); the others (biases, norm scales) are added or
# multiplied in float32.
_PRODUCT_OPERANDS = ("kernel", "embed_tokens")


def cast_product_operands(state: nnx.State, dtype) -> nnx.State:
    """`state` (of a `CausalLM`) with its product operands, the Dense kernels and the embedding table, in `dtype`
    and every other leaf as it is: a model computing in `dtype` gives the same numbers from either state, and the
    cast one reads half the weight bytes per forward in bfloat16 (what the sampler passes its programs).
    """
    dtype = jnp.dtype(dtype)
    return jax.tree_util.tree_map_with_path(lambda p, x: x.astype(dtype) if _to_cast(p, x, dtype) else x, state)


def needs_product_cast(state: nnx.State, dtype) -> bool:
    """Whether `cast_product_operands(state, dtype)` would change any leaf: from the paths and dtypes alone, nothing
    traced or computed (~0.1 ms on the bench model)."""
    dtype = jnp.dtype(dtype)
    return any(_to_cast(p, x, dtype) for p, x in jax.tree_util.tree_flatten_with_path(state)[0])


def _to_cast(path, x, dtype: jnp.dtype) -> bool:
    """Whether the leaf `x` at `path` is a float product operand not yet in `dtype`."""
    names = [getattr(k, "key", None) for k in path]
    operand = any(n in _PRODUCT_OPERANDS for n in names[-2:]) and jnp.issubdtype(x.dtype, jnp.floating)
    return operand and x.dtype != dtype


def _call_layer(layer, x, rope, mask, kv, i, index, attention):
    return layer(x, rope, mask, kv, i, index, attention)
