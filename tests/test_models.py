"""CausalLM against PyTorch transformers: logits parity, cached decoding, checkpoint round trips and errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sfpo_jax.models import CausalLM, KVCache, ModelConfig, from_pretrained

torch = pytest.importorskip("torch", reason="PyTorch transformers is the parity reference")
from tests.hf_checkpoints import make_checkpoint, torch_logits  # noqa: E402

VOCAB = 128


def ragged_batch(seed=0, lengths=(7, 4, 1), vocab=VOCAB):
    """Left-padded ids and mask: row b has lengths[b] real tokens at the right end (pad id 0)."""
    rng = np.random.default_rng(seed)
    t = max(lengths)
    mask = np.array([[0] * (t - n) + [1] * n for n in lengths], np.int32)
    ids = np.where(mask == 1, rng.integers(1, vocab, size=mask.shape), 0).astype(np.int32)
    return ids, mask


@pytest.fixture(scope="module")
def qwen2_path(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"), "qwen2")


@nnx.jit
def forward(model, ids, mask):
    return model(ids, attention_mask=mask)


def test_qwen2_logits_match_transformers_on_left_padded_batch(qwen2_path):
    ids, mask = ragged_batch()
    model = from_pretrained(qwen2_path, dtype=jnp.float32)
    ours = np.asarray(forward(model, jnp.asarray(ids), jnp.asarray(mask)))
    ref = torch_logits(qwen2_path, ids, mask)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    real = mask.astype(bool)
    assert np.abs(ours - ref)[real].max() <= 1e-4
    assert np.all(np.isfinite(ours))  # fully-masked padding queries must not produce NaN


@functools.partial(jax.jit, static_argnums=(4,))
def _prefill_then_decode(graphdef, state, ids, mask, prompt_len):
    """Prefill ids[:, :prompt_len] in one call, then feed the rest token by token through the cache."""
    model = nnx.merge(graphdef, state)
    cache = model.init_cache(ids.shape[0], ids.shape[1] + 2)
    logits, cache = model(ids[:, :prompt_len], attention_mask=mask[:, :prompt_len], cache=cache)
    steps = [logits]
    for t in range(prompt_len, ids.shape[1]):
        logits, cache = model(ids[:, t:t + 1], cache=cache)
        steps.append(logits)
    return jnp.concatenate(steps, axis=1), cache


def test_cached_prefill_and_decode_match_full_forward(qwen2_path):
    ids, mask = ragged_batch(seed=1, lengths=(6, 3, 5))
    # The prompt is the first 3 columns (left-padded); the remaining columns are real continuation tokens.
    mask[:, 3:] = 1
    ids = np.where(mask == 1, np.maximum(ids, 1), 0).astype(np.int32)
    model = from_pretrained(qwen2_path, dtype=jnp.float32)
    full = np.asarray(forward(model, jnp.asarray(ids), jnp.asarray(mask)))
    cached, cache = _prefill_then_decode(*nnx.split(model), jnp.asarray(ids), jnp.asarray(mask), 3)
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(cached)[real], full[real], atol=1e-5, rtol=1e-5)
    assert int(cache.index) == ids.shape[1]
    np.testing.assert_array_equal(np.asarray(cache.num_tokens), mask.sum(-1))
    np.testing.assert_array_equal(np.asarray(cache.mask)[:, : ids.shape[1]], real)
    assert not np.asarray(cache.mask)[:, ids.shape[1]:].any()


def test_kv_cache_logical_axes_cover_every_field():
    config = ModelConfig("qwen2", vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2,
                         num_kv_heads=1, head_dim=4, attention_bias=True)
    model = CausalLM(config, rngs=nnx.Rngs(0))
    cache = model.init_cache(3, 5)
    assert cache.k.shape == (2, 3, 5, 1, 4) and cache.k.dtype == jnp.float32
    for field, names in zip(cache, KVCache.logical_axes(), strict=True):
        assert field.ndim == len(names)
    # The cache is a prefix of its axes tree, so tree.map hands each field its tuple of names.
    ranks = jax.tree.map(lambda x, names: x.ndim - len(names), cache, KVCache.logical_axes())
    assert jax.tree.leaves(ranks) == [0] * 5
