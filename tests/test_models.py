"""CausalLM against PyTorch transformers: logits parity, cached decoding, checkpoint round trips and errors."""

import functools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sfpo_jax.models import (
    CausalLM,
    KVCache,
    ModelConfig,
    from_pretrained,
    load_tokenizer,
    read_config,
    rope_inv_freq,
    save_pretrained,
)

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


# Each architecture with a different set of optional pieces: Qwen2 q/k/v biases and an untied head; Qwen3 q/k
# norms, head_dim != hidden / heads and tied embeddings; Llama 3 rope scaling, o_proj and MLP biases.
ARCHS = {
    "qwen2": {},
    "qwen3": dict(tie_word_embeddings=True),
    "llama": dict(attention_bias=True, mlp_bias=True),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {arch: make_checkpoint(tmp_path_factory.mktemp(arch), arch, **kw) for arch, kw in ARCHS.items()}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_logits_match_transformers_on_left_padded_batch(checkpoints, arch):
    path = checkpoints[arch]
    ids, mask = ragged_batch()
    real = mask.astype(bool)
    ref = torch_logits(path, ids, mask)

    model = from_pretrained(path, dtype=jnp.float32)
    assert (model.lm_head is None) == ARCHS[arch].get("tie_word_embeddings", False)
    ours = np.asarray(forward(model, jnp.asarray(ids), jnp.asarray(mask)))
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    assert np.abs(ours - ref)[real].max() <= 1e-4
    assert np.all(np.isfinite(ours))  # fully-masked padding queries must not produce NaN

    # bfloat16 params and compute: no further from the float32 reference than PyTorch's own bf16 model
    # (measured: ours 0.004-0.006, PyTorch 0.006-0.008 on logits of std ~0.3), and float32 logits.
    ref_bf16 = torch_logits(path, ids, mask, dtype="bfloat16")
    model = from_pretrained(path, dtype=jnp.bfloat16)
    assert model.embed_tokens.dtype == jnp.bfloat16
    ours = np.asarray(forward(model, jnp.asarray(ids), jnp.asarray(mask)))
    assert ours.dtype == np.float32
    torch_err = np.abs(ref_bf16 - ref)[real].max()
    assert np.abs(ours - ref)[real].max() <= max(1.5 * torch_err, 1e-3) <= 0.02


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])  # an untied LM head, and the tied one
def test_logits_to_keep_gives_the_last_positions_of_the_full_forward(checkpoints, arch):
    ids, mask = ragged_batch(seed=3, lengths=(7, 5, 6))
    model = from_pretrained(checkpoints[arch], dtype=jnp.float32)
    graphdef, state = nnx.split(model)
    full = np.asarray(forward(model, jnp.asarray(ids), jnp.asarray(mask)))

    @functools.partial(jax.jit, static_argnums=(3,))
    def kept(state, ids, mask, n):
        return nnx.merge(graphdef, state)(ids, attention_mask=mask, logits_to_keep=n)

    for n in (1, 3, ids.shape[1], ids.shape[1] + 2):  # 1: the tied head's one-position (decode) product
        ours = np.asarray(kept(state, jnp.asarray(ids), jnp.asarray(mask), n))
        assert ours.shape == (3, min(n, ids.shape[1]), VOCAB)
        np.testing.assert_allclose(ours, full[:, -n:], atol=2e-5, rtol=1e-5)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="logits_to_keep"):
            model(jnp.asarray(ids), logits_to_keep=bad)


def test_llama3_rope_frequencies_match_transformers():
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    hf = transformers.LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_parameters=rope,
                                  max_position_embeddings=131072)
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](hf)
    ours = rope_inv_freq(ModelConfig.from_hf(hf))
    assert ours.shape == (64,)
    np.testing.assert_allclose(ours, expected.numpy(), rtol=1e-6)
    # The scaling really changes the low frequencies.
    assert not np.allclose(ours, rope_inv_freq(ModelConfig.from_hf(transformers.LlamaConfig(
        hidden_size=4096, num_attention_heads=32, rope_parameters={"rope_type": "default", "rope_theta": 5e5}))))


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


def test_prefill_into_a_prompt_length_cache_then_extend_equals_prefill_into_the_full_cache(qwen2_path):
    ids, mask = ragged_batch(seed=2, lengths=(5, 2, 4))
    model = from_pretrained(qwen2_path, dtype=jnp.float32)
    graphdef, state = nnx.split(model)

    @jax.jit
    def prefill(state, ids, mask, last):
        m = nnx.merge(graphdef, state)
        direct = m(ids, attention_mask=mask, cache=m.init_cache(ids.shape[0], ids.shape[1] + 4))[1]
        extended = m(ids, attention_mask=mask, cache=m.init_cache(*ids.shape))[1].extend(ids.shape[1] + 4)
        # The next step's logits read the whole cache, unwritten slots included.
        return [m(last, cache=c)[0] for c in (direct, extended)], direct, extended

    (logits_direct, logits_extended), direct, extended = prefill(state, jnp.asarray(ids), jnp.asarray(mask),
                                                                 jnp.ones((ids.shape[0], 1), jnp.int32))
    assert jax.tree.map(jnp.shape, direct) == jax.tree.map(jnp.shape, extended)
    for field in ("mask", "num_tokens", "index"):
        np.testing.assert_array_equal(getattr(direct, field), getattr(extended, field))
    # Keys and values agree on real slots (a padding query sees no key, so its softmax is uniform over however many
    # slots there are: padding slots differ, and stay masked out).
    real = np.asarray(direct.mask)[None, :, None, :]  # [1, B, 1, S]
    np.testing.assert_allclose(np.where(real[..., None, :], direct.k, 0), np.where(real[..., None, :], extended.k, 0),
                               atol=1e-6)
    np.testing.assert_allclose(np.where(real[..., None], direct.v, 0), np.where(real[..., None], extended.v, 0),
                               atol=1e-6)
    np.testing.assert_allclose(logits_direct, logits_extended, atol=1e-5)
    with pytest.raises(ValueError, match="cannot shrink"):
        extended.extend(ids.shape[1])


def test_kv_cache_logical_axes_cover_every_field():
    config = ModelConfig("qwen2", vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2,
                         num_kv_heads=1, head_dim=4, attention_bias=True)
    model = CausalLM(config, rngs=nnx.Rngs(0))
    cache = model.init_cache(3, 5)
    # Keys transposed (head_dim before slots), values not.
    assert cache.k.shape == (2, 3, 1, 4, 5) and cache.v.shape == (2, 3, 1, 5, 4) and cache.k.dtype == jnp.float32
    assert cache.max_length == 5
    for field, names in zip(cache, KVCache.logical_axes(), strict=True):
        assert field.ndim == len(names)
    # The cache is a prefix of its axes tree, so tree.map hands each field its tuple of names.
    ranks = jax.tree.map(lambda x, names: x.ndim - len(names), cache, KVCache.logical_axes())
    assert jax.tree.leaves(ranks) == [0] * 5


def test_save_pretrained_round_trips_through_transformers(checkpoints, tmp_path):
    ids, mask = ragged_batch(seed=2)
    real = mask.astype(bool)
    for arch in ("qwen2", "qwen3"):
        model = from_pretrained(checkpoints[arch], dtype=jnp.float32)
        out = tmp_path / arch
        tokenizer = load_tokenizer(checkpoints[arch])
        save_pretrained(model, out, tokenizer=tokenizer)
        assert read_config(out) == model.config
        assert load_tokenizer(out).chat_template == tokenizer.chat_template
        np.testing.assert_array_equal(torch_logits(out, ids, mask)[real],
                                      torch_logits(checkpoints[arch], ids, mask)[real])
    # bfloat16 params are written as bfloat16 and reload bit-identically.
    model = from_pretrained(checkpoints["llama"], dtype=jnp.bfloat16)
    save_pretrained(model, tmp_path / "bf16", max_shard_bytes=20_000)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert (tmp_path / "bf16" / "model.safetensors.index.json").is_file()
    again = from_pretrained(tmp_path / "bf16", dtype=jnp.bfloat16)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model), nnx.state(again))


def test_sharded_checkpoint_loads_like_single_file(checkpoints, tmp_path):
    sharded = make_checkpoint(tmp_path, "qwen2", max_shard_size="20KB", tokenizer=False)
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 1
    single = from_pretrained(checkpoints["qwen2"], dtype=jnp.float32)
    model = from_pretrained(sharded, dtype=jnp.float32)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(single), nnx.state(model))


def _rewrite_weights(path, edit):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


LAYER0_Q = "model.layers.0.self_attn.q_proj.weight"


def _drop(t):
    del t[LAYER0_Q]


def _extra(t):
    t["model.layers.0.self_attn.extra.weight"] = np.zeros(3, np.float32)


def _reshape(t):
    t[LAYER0_Q] = t[LAYER0_Q][:, :-1].copy()


def _truncate(path):
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])


def _unknown_arch(path):
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))


@pytest.mark.parametrize(("corrupt", "error", "match"), [
    (lambda p: (p / "config.json").unlink(), FileNotFoundError, "config.json"),
    (lambda p: (p / "model.safetensors").unlink(), FileNotFoundError, "model.safetensors"),
    (_truncate, ValueError, "model.safetensors.*truncated"),
    (lambda p: _rewrite_weights(p, _drop), ValueError, f"lacks 1 tensor.*{LAYER0_Q}"),
    (lambda p: _rewrite_weights(p, _extra), ValueError, "does not use.*self_attn.extra.weight"),
    (lambda p: _rewrite_weights(p, _reshape), ValueError, rf"{LAYER0_Q}.*shape \(32, 31\).*expected \(32, 32\)"),
    (_unknown_arch, ValueError, "model_type='gpt2'.*supported: qwen2, qwen3, llama"),
], ids=["no-config", "no-weights", "truncated", "missing-tensor", "unexpected-tensor", "wrong-shape", "unknown-arch"])
def test_loader_errors_name_the_problem(checkpoints, tmp_path, corrupt, error, match):
    path = shutil.copytree(checkpoints["qwen2"], tmp_path / "ckpt")
    corrupt(path)
    with pytest.raises(error, match=match):
        from_pretrained(path, dtype=jnp.float32)


def test_missing_shard_file_is_named(tmp_path):
    path = make_checkpoint(tmp_path, "qwen2", max_shard_size="20KB", tokenizer=False)
    victim = sorted(path.glob("model-*-of-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        from_pretrained(path)


def test_config_round_trip_and_unsupported_features(checkpoints):
    import transformers

    for arch, path in checkpoints.items():
        config = read_config(path)
        assert config.architecture == arch
        assert ModelConfig.from_hf(config.to_hf()) == config
        hash(config)  # static module metadata: must be hashable even with a rope_scaling dict
    assert read_config(checkpoints["qwen3"]).qk_norm and read_config(checkpoints["qwen3"]).head_dim == 16
    with pytest.raises(ValueError, match=r"model_type='mistral'.*supported"):
        ModelConfig.from_hf(transformers.MistralConfig())
    with pytest.raises(ValueError, match="rope_type='yarn'"):
        ModelConfig.from_hf(transformers.Qwen2Config(rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                                                      "rope_theta": 1e4}))
    with pytest.raises(ValueError, match="num_kv_heads=3"):
        ModelConfig("qwen2", 16, 8, 16, 1, num_heads=4, num_kv_heads=3, head_dim=2)


def test_tokenizer_has_chat_template(checkpoints):
    tok = load_tokenizer(checkpoints["qwen2"])
    text = tok.apply_chat_template([{"role": "user", "content": "1+1?"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text)["input_ids"]
    assert max(ids) < VOCAB and tok.decode(ids) == text


def test_remat_gives_identical_gradients(checkpoints):
    ids, mask = ragged_batch(seed=3)

    def grads(remat):
        model = from_pretrained(checkpoints["qwen3"], dtype=jnp.float32, remat=remat)

        def loss(model):
            logp = jax.nn.log_softmax(model(ids[:, :-1], attention_mask=mask[:, :-1]))
            return -(jnp.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0] * mask[:, 1:]).sum()

        return nnx.jit(nnx.grad(loss))(model)

    plain, remat = grads(False), grads(True)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), plain, remat)
    assert any(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(plain))


def test_from_pretrained_passes_the_attention_path(checkpoints):
    """`from_pretrained(attention=...)` builds the model with that learner attention (the trainer's `model.attention`)
    and keeps `CausalLM`'s checks: cuDNN's kernel has no float32 form."""
    model = from_pretrained(checkpoints["qwen2"], dtype=jnp.float32, compute_dtype=jnp.bfloat16, attention="cudnn")
    assert model.attention == "cudnn"
    assert from_pretrained(checkpoints["qwen2"], dtype=jnp.float32).attention == "einsum"
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        from_pretrained(checkpoints["qwen2"], dtype=jnp.float32, attention="cudnn")
    with pytest.raises(ValueError, match="must be one of"):
        from_pretrained(checkpoints["qwen2"], dtype=jnp.float32, attention="flash")
