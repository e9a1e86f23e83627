"""Test-wide setup: 8 forced CPU devices so that sharding is exercised on any machine, and the tiny policy that the
trainer and experiment tests share.

XLA reads the flag when the backend starts, so it must be set before anything imports jax (the fixture imports
the library inside its body for that reason).
"""

import os
from pathlib import Path

import pytest

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def policy_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen2 policy with the character tokenizer, as a Hugging Face folder."""
    from flax import nnx

    from sfpo_jax.models import CausalLM, ModelConfig, save_pretrained
    from sfpo_jax.tasks import char_tokenizer

    path = tmp_path_factory.mktemp("policy")
    tok = char_tokenizer()
    cfg = ModelConfig(architecture="qwen2", vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, tie_word_embeddings=True, attention_bias=True)
    save_pretrained(CausalLM(cfg, rngs=nnx.Rngs(0)), path, tokenizer=tok)
    return path
