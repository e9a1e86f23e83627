"""Meshes, logical-axis rules, and sharded model loading on the 8 forced CPU devices of conftest.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from sfpo_jax.models import CausalLM, KVCache, ModelConfig, from_pretrained
from sfpo_jax.parallel import (
    DEFAULT_RULES,
    initialize_distributed,
    logical_sharding,
    make_mesh,
    num_shards,
    param_shardings,
    shard_model,
)


def test_make_mesh_sizes_and_errors():
    assert len(jax.devices()) == 8
    mesh = make_mesh(fsdp=2, tensor=2)
    assert mesh.axis_names == ("data", "fsdp", "tensor") and dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(make_mesh(data=1, fsdp=-1).shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert dict(make_mesh(data=2, tensor=2, fsdp=2, devices=jax.devices()).shape)["tensor"] == 2
    with pytest.raises(ValueError, match="data=-1"):
        make_mesh(tensor=3)
    with pytest.raises(ValueError, match="tensor=0"):
        make_mesh(tensor=0)
    with pytest.raises(ValueError, match="only one mesh axis"):
        make_mesh(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="4 devices, have 8"):
        make_mesh(data=2, fsdp=2, tensor=1)


def test_logical_sharding_drops_unusable_mesh_axes():
    mesh = make_mesh(data=2, fsdp=1, tensor=4)
    assert logical_sharding(mesh, ("embed", "mlp")).spec == P(None, "tensor")  # fsdp has size 1
    assert logical_sharding(mesh, ("batch", "seq")).spec == P("data", None)
    # kv_heads = 2 is not divisible by tensor = 4: replicated rather than an error.
    assert logical_sharding(mesh, ("embed", "kv_heads", "head_dim"), shape=(32, 2, 8)).spec == P(None, None, None)
    assert logical_sharding(mesh, ("embed", "heads", "head_dim"), shape=(32, 4, 8)).spec == P(None, "tensor", None)
    # A mesh axis is used at most once per array.
    assert logical_sharding(mesh, ("vocab", "mlp")).spec == P("tensor", None)
    mesh = make_mesh(data=2, fsdp=4, tensor=1)
    assert logical_sharding(mesh, ("batch", "cache_seq")).spec == P(("data", "fsdp"), None)
    assert logical_sharding(mesh, ("batch",), shape=(6,)).spec == P("data")  # 6 % 8 != 0, 6 % 2 == 0
    assert [num_shards(logical_sharding(mesh, ("batch", "cache_seq")), d) for d in (0, 1)] == [8, 1]
    assert num_shards(logical_sharding(mesh, ("batch",), shape=(6,))) == 2
    assert logical_sharding(mesh, ("embed", None), rules={**DEFAULT_RULES, "embed": None}).spec == P(None, None)
    with pytest.raises(ValueError, match="'embedding'"):
        logical_sharding(mesh, ("embedding",))


def test_every_parameter_has_logical_axes():
    config = ModelConfig("qwen3", vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                         num_kv_heads=1, head_dim=8, qk_norm=True)
    model = nnx.eval_shape(lambda: CausalLM(config, rngs=nnx.Rngs(0)))
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = var.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == len(var.shape), path
        assert all(name in DEFAULT_RULES for name in axes), (path, axes)


@nnx.jit
def _forward(model, ids, mask):
    return model(ids, attention_mask=mask)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    pytest.importorskip("torch", reason="checkpoints are written with PyTorch transformers")
    from tests.hf_checkpoints import make_checkpoint

    # kv_heads = 2 < tensor = 4 exercises replication of a non-divisible axis; sharded files are read per file.
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"), "qwen2", max_shard_size="20KB", tokenizer=False)


def _spec(model, *path):
    node = model
    for p in path:
        node = node[p] if isinstance(p, int) else getattr(node, p)
    return node.get_value().sharding.spec


@pytest.mark.parametrize(("axes", "expected"), [
    # FSDP: parameters split along embed; activations along batch.
    (dict(data=1, fsdp=8), {("embed_tokens",): P(None, "fsdp"),
                            ("layers", 0, "self_attn", "q_proj", "kernel"): P("fsdp", None, None),
                            ("layers", 0, "mlp", "down_proj", "kernel"): P(None, "fsdp"),
                            ("layers", 0, "self_attn", "q_proj", "bias"): P(None, None)}),
    # Tensor parallel: heads / mlp / vocab split; kv heads (2) do not divide tensor=4 and stay replicated.
    (dict(data=2, tensor=4), {("embed_tokens",): P("tensor", None),
                              ("layers", 1, "self_attn", "q_proj", "kernel"): P(None, "tensor", None),
                              ("layers", 1, "self_attn", "k_proj", "kernel"): P(None, None, None),
                              ("layers", 1, "self_attn", "o_proj", "kernel"): P("tensor", None, None),
                              ("layers", 1, "mlp", "gate_proj", "kernel"): P(None, "tensor"),
                              ("lm_head", "kernel"): P(None, "tensor")}),
    (dict(data=2, fsdp=2, tensor=2), {("layers", 0, "self_attn", "k_proj", "kernel"): P("fsdp", "tensor", None),
                                      ("layers", 0, "mlp", "up_proj", "kernel"): P("fsdp", "tensor")}),
], ids=["fsdp8", "data2-tensor4", "data2-fsdp2-tensor2"])
def test_sharded_load_matches_single_device(checkpoint, axes, expected):
    rng = np.random.default_rng(0)
    mask = jnp.asarray(np.tril(np.ones((8, 8), np.int32))[:, ::-1])  # 8 rows, left-padded, 1..8 real tokens
    ids = jnp.asarray(rng.integers(1, 128, (8, 8)), jnp.int32) * mask
    reference = np.asarray(_forward(from_pretrained(checkpoint, dtype=jnp.float32), ids, mask))

    mesh = make_mesh(**axes)
    model = from_pretrained(checkpoint, dtype=jnp.float32, mesh=mesh)
    for path, spec in expected.items():
        assert _spec(model, *path) == spec, path
    for leaf in jax.tree.leaves(nnx.state(model)):
        assert leaf.sharding.mesh == mesh
    batch = logical_sharding(mesh, ("batch", "seq"))
    logits = _forward(model, jax.device_put(ids, batch), jax.device_put(mask, batch))
    real = np.asarray(mask).astype(bool)
    np.testing.assert_allclose(np.asarray(logits)[real], reference[real], atol=1e-5, rtol=1e-5)


def test_shard_model_in_place_and_sharded_cache_decoding():
    config = ModelConfig("llama", vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=4)
    model = CausalLM(config, rngs=nnx.Rngs(0))
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 64, (4, 5)), jnp.int32)

    @nnx.jit
    def decode(model, ids, cache):
        logits, cache = model(ids[:, :3], cache=cache)
        step, cache = model(ids[:, 3:4], cache=cache)
        return jnp.concatenate([logits, step], axis=1)

    reference = decode(model, ids, model.init_cache(4, 6))
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    shardings = param_shardings(model, mesh)
    shard_model(model, mesh)
    assert _spec(model, "layers", 0, "self_attn", "q_proj", "kernel") == P("fsdp", "tensor", None)
    assert nnx.state(model)["embed_tokens"].get_value().sharding == shardings["embed_tokens"].get_value()

    cache = model.init_cache(4, 6)
    cache_sharding = jax.tree.map(lambda x, names: logical_sharding(mesh, names, shape=x.shape), cache,
                                  KVCache.logical_axes())
    cache = jax.device_put(cache, cache_sharding)
    assert cache.k.sharding.spec == P(None, ("data", "fsdp"), "tensor", None, None)
    np.testing.assert_allclose(np.asarray(decode(model, ids, cache)), np.asarray(reference), atol=1e-5, rtol=1e-5)


def test_initialize_distributed_is_a_no_op_on_one_process(monkeypatch):
    for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(var, raising=False)
    assert initialize_distributed() is False
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert initialize_distributed() is False
    assert jax.process_count() == 1
