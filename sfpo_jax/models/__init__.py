"""Flax NNX decoder LMs (Qwen2 / Qwen2.5, Qwen3, Llama 3) and Hugging Face checkpoint I/O."""

from sfpo_jax.models.cache import KVCache
from sfpo_jax.models.checkpoint import from_pretrained, load_tokenizer, read_config, save_pretrained
from sfpo_jax.models.config import SUPPORTED_ARCHITECTURES, ModelConfig
from sfpo_jax.models.transformer import CausalLM, rope_inv_freq

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "CausalLM",
    "KVCache",
    "ModelConfig",
    "from_pretrained",
    "load_tokenizer",
    "read_config",
    "rope_inv_freq",
    "save_pretrained",
]
