"""Architecture hyper-parameters of the supported decoder-only LMs, read from a Hugging Face config."""

from __future__ import annotations

import dataclasses
from typing import Any

# HF `model_type` → our architecture family. The families differ only in which optional pieces are present
# (q/k/v biases, q/k RMSNorm, rope scaling), all of which are read from the HF config itself.
SUPPORTED_ARCHITECTURES = ("qwen2", "qwen3", "llama")
_HF_CLASSES = {"qwen2": "Qwen2", "qwen3": "Qwen3", "llama": "Llama"}  # + "Config" / "ForCausalLM"


def _hashable(x: Any) -> Any:
    if isinstance(x, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in x.items()))
    if isinstance(x, list):
        return tuple(_hashable(v) for v in x)
    return x


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a Qwen2 / Qwen2.5 / Qwen3 / Llama-3 decoder.

    `rope_scaling` is None or the HF rope dict (e.g. `{"rope_type": "llama3", "factor": 8.0, ...}`);
    only the `llama3` type (and none) is supported. `attention_bias` puts biases on q/k/v, `attention_out_bias`
    on the output projection (Llama and Qwen3 tie both to HF's `attention_bias`; Qwen2 has q/k/v biases only).
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    attention_out_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"architecture={self.architecture!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"rope_scaling rope_type={rope_type!r} is not supported; supported: default, llama3")
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))

    # The config is static metadata of the module graph, which jit hashes; the rope dict must not break that.
    def __hash__(self):
        return hash(tuple(_hashable(getattr(self, f.name)) for f in dataclasses.fields(self)))

    @property
    def num_query_groups(self) -> int:
        """Query heads per key/value head (GQA group size)."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf(cls, hf_config) -> ModelConfig:
        """Reads a `transformers.PretrainedConfig` (e.g. from `AutoConfig.from_pretrained(path)`).

        Raises ValueError naming the `model_type` when it is not a supported architecture, or when the checkpoint
        uses a feature we do not implement (sliding-window attention, an unsupported rope type).
        """
        arch = getattr(hf_config, "model_type", None)
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture model_type={arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if getattr(hf_config, "use_sliding_window", False) or "sliding_attention" in (
                getattr(hf_config, "layer_types", None) or ()):
            raise ValueError(f"{arch}: sliding-window attention (use_sliding_window / layer_types) is not supported")
        # transformers 5 keeps theta and scaling together in `rope_parameters`; older configs have both apart.
        rope = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})
        theta = float(rope.pop("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if getattr(hf_config, "mlp_bias", False) and arch != "llama":
            raise ValueError(f"mlp_bias=True is not supported for {arch}")
        attn_bias = bool(getattr(hf_config, "attention_bias", False))
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
        return cls(
            architecture=arch,
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size,
            num_layers=hf_config.num_hidden_layers,
            num_heads=hf_config.num_attention_heads,
            num_kv_heads=hf_config.num_key_value_heads or hf_config.num_attention_heads,
            head_dim=head_dim,
            rope_theta=theta,
            rope_scaling=None if rope_type == "default" else {**rope, "rope_type": rope_type},
            rms_norm_eps=float(hf_config.rms_norm_eps),
            tie_word_embeddings=bool(hf_config.tie_word_embeddings),
            attention_bias=True if arch == "qwen2" else attn_bias,
            attention_out_bias=False if arch == "qwen2" else attn_bias,
            mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
            qk_norm=arch == "qwen3",
            max_position_embeddings=hf_config.max_position_embeddings,
            bos_token_id=getattr(hf_config, "bos_token_id", None),
            eos_token_id=getattr(hf_config, "eos_token_id", None),
            pad_token_id=getattr(hf_config, "pad_token_id", None),
        )

    def to_hf(self, **overrides):
        """The equivalent `transformers` config (Qwen2Config / Qwen3Config / LlamaConfig); `overrides` are extra
        config attributes (e.g. `dtype="bfloat16"`)."""
        import transformers

        rope = {"rope_theta": self.rope_theta, "rope_type": "default", **(self.rope_scaling or {})}
        kwargs = dict(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            rope_parameters=rope,
            rms_norm_eps=self.rms_norm_eps,
            tie_word_embeddings=self.tie_word_embeddings,
            max_position_embeddings=self.max_position_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            pad_token_id=self.pad_token_id,
            head_dim=self.head_dim,
            architectures=[f"{_HF_CLASSES[self.architecture]}ForCausalLM"],
        )
        if self.architecture == "qwen2":
            if self.attention_out_bias or not self.attention_bias:
                raise ValueError("qwen2 checkpoints have q/k/v biases and no output bias; got attention_bias="
                                 f"{self.attention_bias}, attention_out_bias={self.attention_out_bias}")
        elif self.attention_bias != self.attention_out_bias:
            raise ValueError(f"{self.architecture} ties q/k/v/o biases; got attention_bias={self.attention_bias}, "
                             f"attention_out_bias={self.attention_out_bias}")
        else:
            kwargs.update(attention_bias=self.attention_bias)
        if self.architecture == "llama":
            kwargs.update(mlp_bias=self.mlp_bias)
        elif self.mlp_bias:
            raise ValueError(f"mlp_bias=True is not supported for {self.architecture}")
        return getattr(transformers, f"{_HF_CLASSES[self.architecture]}Config")(**{**kwargs, **overrides})
