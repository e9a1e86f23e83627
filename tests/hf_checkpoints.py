"""Tiny random Hugging Face checkpoints (Qwen2, Qwen3, Llama) written with PyTorch transformers, for tests.

    from tests.hf_checkpoints import make_checkpoint
    path = make_checkpoint(tmp_path, arch="qwen3", num_hidden_layers=1)

The folder holds `config.json`, `model.safetensors` (float32 unless `dtype=` says otherwise) and a one-token-per-
character byte-level tokenizer (printable ASCII; `<|endoftext|>` = 0 = pad, `<|im_start|>` = 1, `<|im_end|>` = 2 =
eos) with a ChatML chat template.
Callers must `pytest.importorskip("torch")` first.
"""

from __future__ import annotations

import string
from pathlib import Path

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Small enough for fast tests, but exercising GQA (4 query heads per 2 kv heads), biases and untied heads.
_BASE = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False,
             bos_token_id=0, eos_token_id=2, pad_token_id=0)
_ARCH_DEFAULTS = {
    "qwen2": dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    # Qwen3's head_dim is independent of hidden / heads; 16 != 32 / 4 exercises that.
    "qwen3": dict(head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    # head_dim 16 puts one RoPE frequency in llama3's smoothed band (wavelength between 16 and 64).
    "llama": dict(head_dim=16, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 64}),
}


def hf_config(arch: str = "qwen2", **overrides):
    """The `transformers` config of a tiny model of `arch` ("qwen2" | "qwen3" | "llama")."""
    import transformers

    cls = {"qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config,
           "llama": transformers.LlamaConfig}[arch]
    return cls(**{**_BASE, **_ARCH_DEFAULTS[arch], **overrides})


def make_tokenizer():
    """A byte-level BPE tokenizer without merges (one token per character: printable ASCII, tab, newline) and
    ChatML specials at ids 0-3, with a chat template; 101 tokens.

    Byte-level like Qwen's and Llama 3's real tokenizers, so that transformers' per-model tokenizer classes
    (which `AutoTokenizer` picks from `config.json`) keep its behaviour."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # GPT-2's byte → unicode table, restricted to ASCII: printable bytes map to themselves, the rest to 256 + byte.
    chars = [c if 33 <= ord(c) <= 126 else chr(256 + ord(c)) for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *chars])}
    tok = Tokenizer(models.BPE(vocab, [], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<unk>",
        additional_special_tokens=["<|im_start|>"], chat_template=CHAT_TEMPLATE,
    )


def make_checkpoint(tmp_path, arch: str = "qwen2", *, seed: int = 0, std: float = 0.2, dtype: str = "float32",
                    tokenizer: bool = True, max_shard_size: str | None = None, **overrides) -> Path:
    """Writes a random `arch` checkpoint to `tmp_path / arch` and returns the folder.

    Weights ~ N(0, std²) (biases and norm scales too, so that every tensor matters for parity); `overrides` are
    HF config fields (e.g. `tie_word_embeddings=True`, `num_hidden_layers=1`); `max_shard_size` (e.g. "20KB")
    writes a sharded checkpoint with an index.
    """
    import torch
    import transformers

    config = hf_config(arch, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    model = model.to(getattr(torch, dtype))
    path = Path(tmp_path) / arch
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kwargs)
    if tokenizer:
        make_tokenizer().save_pretrained(path)
    return path


def torch_logits(path, input_ids, attention_mask, dtype: str = "float32", **kwargs):
    """Logits `[B, T, V] float32 numpy` of the transformers model at `path` with positions `cumsum(mask) - 1`
    (transformers does not derive positions from the mask by itself); `kwargs` go to `from_pretrained` (e.g.
    `gguf_file=`)."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), **kwargs)
    return torch_model_logits(model, input_ids, attention_mask)


def torch_model_logits(model, input_ids, attention_mask):
    """`torch_logits` for an already loaded transformers model."""
    import numpy as np
    import torch

    model.eval()
    ids = torch.tensor(np.asarray(input_ids), dtype=torch.long)
    mask = torch.tensor(np.asarray(attention_mask), dtype=torch.long)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    return out.float().numpy()
