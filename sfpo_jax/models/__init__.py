"""Flax NNX decoder LMs (Qwen2 / Qwen2.5, Qwen3, Llama 3) and checkpoint I/O: Hugging Face folders and GGUF files."""

from sfpo_jax.models.cache import KVCache
from sfpo_jax.models.checkpoint import from_pretrained, load_tokenizer, read_config, save_pretrained
from sfpo_jax.models.config import SUPPORTED_ARCHITECTURES, ModelConfig
from sfpo_jax.models.gguf import SUPPORTED_GGUF_ARCHITECTURES, load_gguf, read_gguf_config, smollm2_path
from sfpo_jax.models.transformer import CausalLM, cast_product_operands, needs_product_cast, rope_inv_freq

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "SUPPORTED_GGUF_ARCHITECTURES",
    "CausalLM",
    "KVCache",
    "ModelConfig",
    "cast_product_operands",
    "from_pretrained",
    "load_gguf",
    "load_tokenizer",
    "needs_product_cast",
    "read_config",
    "read_gguf_config",
    "rope_inv_freq",
    "save_pretrained",
    "smollm2_path",
]
