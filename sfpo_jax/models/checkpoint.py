"""Hugging Face checkpoint folders ↔ `CausalLM`: safetensors load / save, tensor by tensor, sharding-aware."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sfpo_jax.models.config import SUPPORTED_ARCHITECTURES, ModelConfig
from sfpo_jax.models.transformer import CausalLM

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Projections whose output is split into (heads, head_dim) on our side; every other kernel has one output axis.
_HEAD_OUTPUT_KERNELS = ("q_proj", "k_proj", "v_proj")


class TensorSpec(NamedTuple):
    """One HF tensor and where it lives in the NNX state.

    `kernel_out_dims` is None for tensors stored alike on both sides up to a reshape (embeddings, norms, biases);
    for a linear layer it is how many trailing axes of our kernel `[*in, *out]` are outputs: HF stores the
    transpose `[prod(out), prod(in)]`.
    """

    hf_name: str
    path: tuple
    hf_shape: tuple[int, ...]
    kernel_out_dims: int | None


def tensor_specs(state: nnx.State) -> list[TensorSpec]:
    """The name mapping for a model's (abstract) state. Our module tree mirrors HF's (`layers[i].self_attn.
    q_proj.kernel` ↔ `model.layers.{i}.self_attn.q_proj.weight`), so the table follows from the state, which
    follows from the config: optional biases, q/k norms and an untied head appear exactly when configured."""
    specs = []
    for path, var in nnx.to_flat_state(state):
        *module, leaf = (str(p) for p in path)
        shape = tuple(var.shape)
        if path == ("embed_tokens",):
            specs.append(TensorSpec("model.embed_tokens.weight", path, shape, None))
            continue
        prefix = "lm_head" if module == ["lm_head"] else ".".join(["model", *module])
        if leaf == "kernel":
            n_out = 2 if module[-1] in _HEAD_OUTPUT_KERNELS else 1
            hf_shape = (math.prod(shape[-n_out:]), math.prod(shape[:-n_out]))
            specs.append(TensorSpec(f"{prefix}.weight", path, hf_shape, n_out))
        else:  # RMSNorm scale or bias
            hf_name = f"{prefix}.weight" if leaf == "scale" else f"{prefix}.bias"
            specs.append(TensorSpec(hf_name, path, (math.prod(shape),), None))
    return specs


def _to_nnx(spec: TensorSpec, array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return array.T.reshape(shape) if spec.kernel_out_dims else array.reshape(shape)


def _to_hf(spec: TensorSpec, array: np.ndarray) -> np.ndarray:
    if spec.kernel_out_dims:
        n_out = spec.kernel_out_dims
        array = array.reshape(math.prod(array.shape[:-n_out]), math.prod(array.shape[-n_out:])).T
    return np.ascontiguousarray(array.reshape(spec.hf_shape))


# Tensors that HF checkpoints may carry and transformers itself ignores.
def _ignorable(name: str, config: ModelConfig) -> bool:
    return name.endswith("rotary_emb.inv_freq") or (config.tie_word_embeddings and name == "lm_head.weight")


def read_config(path: str | Path) -> ModelConfig:
    """The `ModelConfig` of a checkpoint folder, through `transformers.AutoConfig`, or of a `.gguf` file (from its
    metadata, see `sfpo_jax.models.gguf`)."""
    import transformers

    path = Path(path)
    if path.suffix.lower() == ".gguf":
        from sfpo_jax.models.gguf import read_gguf_config

        return read_gguf_config(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: not a Hugging Face checkpoint folder")
    # Check the architecture ourselves first, so that an unknown one fails with our message, not AutoConfig's.
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{config_file}: unsupported architecture model_type={model_type!r}; supported: "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    return ModelConfig.from_hf(transformers.AutoConfig.from_pretrained(path))


def _weight_map(path: Path) -> dict[str, Path]:
    """HF tensor name → the safetensors file holding it."""
    from safetensors import SafetensorError, safe_open

    if (path / INDEX_FILE).is_file():
        index = json.loads((path / INDEX_FILE).read_text())
        weight_map = {name: path / file for name, file in index["weight_map"].items()}
        for file in sorted(set(weight_map.values())):
            if not file.is_file():
                raise FileNotFoundError(f"{file} (listed in {path / INDEX_FILE}) not found")
    elif (path / SINGLE_FILE).is_file():
        weight_map = None
    else:
        raise FileNotFoundError(f"{path} has neither {SINGLE_FILE} nor {INDEX_FILE}")
    files = sorted(set(weight_map.values())) if weight_map else [path / SINGLE_FILE]
    found = {}
    for file in files:
        try:
            with safe_open(file, framework="numpy") as f:
                found.update(dict.fromkeys(f.keys(), file))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{file}: not a readable safetensors file (truncated or corrupt?): {e}") from e
    if weight_map is not None:
        for name, file in weight_map.items():
            if found.get(name) != file:
                raise ValueError(f"tensor {name!r}: {INDEX_FILE} puts it in {file.name}, which does not hold it")
    return found


def from_pretrained(path: str | Path, *, dtype=jnp.bfloat16, mesh: jax.sharding.Mesh | None = None,
                    rules: Mapping | None = None, compute_dtype=None, remat: bool = False,
                    attention: str = "einsum") -> CausalLM:
    """Loads a local Hugging Face checkpoint folder, or a Llama / Qwen2 / Qwen3 `.gguf` file (dequantized to `dtype`,
    see `sfpo_jax.models.gguf.load_gguf`), into a `CausalLM`.

    The model is built abstractly (`nnx.eval_shape`), then every tensor is read, converted to `dtype` and put on
    its device(s) one at a time: with `mesh`, directly with its target sharding from the logical axes and
    `rules` (default `sfpo_jax.parallel.DEFAULT_RULES`), so host memory holds one tensor at a time.

    Args:
      path: folder with `config.json` and `model.safetensors` or `model-0000i-of-0000n.safetensors` + index.
      dtype: parameter dtype. compute_dtype: defaults to `dtype`. remat, attention: see `CausalLM`.
    Raises:
      FileNotFoundError: a missing config / weight file. ValueError: an unsupported architecture, an unreadable
      (e.g. truncated) safetensors file, and any missing, unexpected or wrongly shaped tensor (named).
    """
    from safetensors import SafetensorError, safe_open

    from sfpo_jax.parallel import param_shardings

    path = Path(path)
    if path.suffix.lower() == ".gguf":
        from sfpo_jax.models.gguf import load_gguf

        return load_gguf(path, dtype=dtype, mesh=mesh, rules=rules, compute_dtype=compute_dtype, remat=remat,
                         attention=attention)
    config = read_config(path)
    abstract = nnx.eval_shape(
        lambda: CausalLM(config, param_dtype=dtype, dtype=compute_dtype, rngs=nnx.Rngs(0), remat=remat,
                         attention=attention))
    graphdef, state = nnx.split(abstract)
    shardings = None if mesh is None else nnx.to_flat_state(param_shardings(state, mesh, rules))
    specs = tensor_specs(state)

    available = _weight_map(path)
    missing = [s.hf_name for s in specs if s.hf_name not in available]
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {len(missing)} tensor(s) the {config.architecture} model needs: "
                         f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    expected = {s.hf_name for s in specs}
    unexpected = sorted(n for n in available if n not in expected and not _ignorable(n, config))
    if unexpected:
        raise ValueError(f"{path}: checkpoint has {len(unexpected)} tensor(s) the {config.architecture} model does "
                         f"not use: {', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}")

    flat = dict(nnx.to_flat_state(state))
    placement = dict(shardings) if shardings is not None else {}
    np_dtype = np.dtype(dtype)
    for file in sorted({available[s.hf_name] for s in specs}):
        try:
            with safe_open(file, framework="numpy") as f:
                for spec in (s for s in specs if available[s.hf_name] == file):
                    array = f.get_tensor(spec.hf_name)
                    if tuple(array.shape) != spec.hf_shape:
                        raise ValueError(f"tensor {spec.hf_name!r} in {file.name} has shape {tuple(array.shape)}, "
                                         f"expected {spec.hf_shape} from config.json")
                    var = flat[spec.path]
                    array = _to_nnx(spec, array, tuple(var.shape)).astype(np_dtype)
                    target = placement[spec.path].get_value() if spec.path in placement else None
                    var.set_value(jax.device_put(array, target))
        except SafetensorError as e:
            raise ValueError(f"{file}: cannot read tensor data (truncated or corrupt?): {e}") from e
    return nnx.merge(graphdef, state)


def save_pretrained(model: CausalLM, path: str | Path, *, tokenizer=None, max_shard_bytes: int = 5 * 2**30) -> None:
    """Writes `model` as a Hugging Face checkpoint folder (`config.json` + safetensors, in the params' dtype)
    that `transformers.AutoModelForCausalLM.from_pretrained` loads, plus `tokenizer`'s files when given (so that
    the folder can be served as is). Tensors are gathered to host one at a time;
    above `max_shard_bytes` the weights are split into `model-0000i-of-0000n.safetensors` with an index. With
    several processes, every process must call it (the gathers are collective) and process 0 writes."""
    from jax.experimental import multihost_utils
    from safetensors.numpy import save_file

    path = Path(path)
    state = nnx.state(model, nnx.Param)
    specs = tensor_specs(state)
    flat = dict(nnx.to_flat_state(state))

    def host(spec):
        value = flat[spec.path].get_value()
        if not value.is_fully_addressable:
            value = multihost_utils.process_allgather(value, tiled=True)
        return _to_hf(spec, np.asarray(jax.device_get(value)))

    sizes = [math.prod(s.hf_shape) * flat[s.path].get_value().dtype.itemsize for s in specs]
    shards, current, current_bytes = [], [], 0
    for spec, size in zip(specs, sizes, strict=True):
        if current and current_bytes + size > max_shard_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(spec)
        current_bytes += size
    shards.append(current)

    write = jax.process_index() == 0
    if write:
        path.mkdir(parents=True, exist_ok=True)
        model.config.to_hf(dtype=np.dtype(model.param_dtype).name).save_pretrained(path)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
    names = [SINGLE_FILE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards, strict=True):
        tensors = {spec.hf_name: host(spec) for spec in shard}  # one shard on host at a time
        if write:
            save_file(tensors, str(path / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
    if write and len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
        (path / INDEX_FILE).write_text(json.dumps(index, indent=2))


def load_tokenizer(path: str | Path):
    """The checkpoint's `transformers.AutoTokenizer` (fast when available), with its chat template; for a `.gguf`
    file, the one its metadata describes (`sfpo_jax.models.gguf.load_gguf_tokenizer`)."""
    import transformers

    if Path(path).suffix.lower() == ".gguf":
        from sfpo_jax.models.gguf import load_gguf_tokenizer

        return load_gguf_tokenizer(path)
    return transformers.AutoTokenizer.from_pretrained(Path(path))
