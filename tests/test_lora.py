"""LoRA as a split of the training state, against a dense reference: a fresh adapter is the base model, the
learner's gradient w.r.t. A and B is the chain rule through the dense weight, the rollout after a step is the merged
policy's, only the targeted kernels change, a LoRA run resumes exactly, and the trained state is adapter-sized."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from safetensors.numpy import load_file

from sfpo_jax.models import CausalLM, ModelConfig, from_pretrained, load_tokenizer
from sfpo_jax.sampling import Sampler, SamplingConfig
from sfpo_jax.tasks import ArithmeticTask
from sfpo_jax.train import deterministic, learner, load_config, make_learner, make_rl_step, read_metrics
from sfpo_jax.train.config import ConfigError
from sfpo_jax.train.lora import LoRA

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def flat(state) -> dict[tuple, np.ndarray]:
    return {path: np.asarray(v[...]) for path, v in nnx.to_flat_state(state)}


def random_b(adapters, seed: int = 1):
    """``adapters`` with a random (non-zero) B, so that the adapted policy differs from the base."""
    keys = iter(jax.random.split(jax.random.key(seed), 64))
    return nnx.from_flat_state([
        (p, v.replace(0.05 * jax.random.normal(next(keys), v.shape)) if p[-1] == "lora_b" else v)
        for p, v in nnx.to_flat_state(adapters)])


def dense_delta(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``A @ B`` as a dense ``[in, out]`` matrix product, reshaped to the kernel's ``[*in, *out]``."""
    return (a.reshape(-1, a.shape[-1]) @ b.reshape(b.shape[0], -1)).reshape(*a.shape[:-1], *b.shape[1:])


def test_lora_config_is_checked_where_it_is_built():
    assert load_config(None, []).lora() is None  # lora_rank 0: full fine-tuning
    lora = load_config(None, ["model.lora_rank=8", "model.lora_alpha=32", "run.seed=3"]).lora()
    assert (lora.rank, lora.scale, lora.targets, lora.seed, lora.dtype) == (8, 4.0, TARGETS, 3, "float32")
    bad = {"model.lora_rank=-1": r"model\.lora_rank=-1 must be >= 0", "model.lora_alpha=0": r"model\.lora_alpha=0",
           "model.lora_targets=[qproj]": r"model\.lora_targets=\['qproj'\].*unknown: \['qproj'\]",
           "model.lora_targets=[q_proj, q_proj]": r"model\.lora_targets.*distinct"}
    for override, message in bad.items():
        with pytest.raises(ConfigError, match=message):
            load_config(None, ["model.lora_rank=4", override])


def test_adapters_have_the_kernels_layout_and_a_zero_b_lora_is_the_base_model(policy_dir):
    model = from_pretrained(policy_dir, dtype=jnp.float32)
    graphdef, base = nnx.split(model)
    lora = LoRA(rank=4, alpha=8.0)
    adapters = lora.init(model)
    a = flat(adapters)
    kernels = flat(base)
    assert len(a) == 2 * len(TARGETS) * model.config.num_layers
    for path in a:
        kernel = kernels[(*path[:-1], "kernel")]
        if path[-1] == "lora_b":
            assert not a[path].any() and a[path].shape[0] == 4
        else:  # [*in, r]: o_proj's kernel is [heads, head_dim, embed], its A [heads, head_dim, r]
            n_in = 2 if path[-2] == "o_proj" else 1
            assert a[path].shape == (*kernel.shape[:n_in], 4) and a[path].std() > 0
    merged = lora.merge(base, adapters)
    assert jax.tree.structure(merged) == jax.tree.structure(base)
    for x, y in zip(jax.tree.leaves(base), jax.tree.leaves(merged), strict=True):
        np.testing.assert_array_equal(x, y)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 7)), jnp.int32)
    np.testing.assert_array_equal(nnx.merge(graphdef, merged)(tokens), model(tokens))
    with pytest.raises(ValueError, match=r"\['lm_head'\] name no kernel"):  # tied embeddings: no lm_head
        LoRA(rank=4, alpha=8.0, targets=("q_proj", "lm_head")).init(model)


def test_merge_is_the_dense_low_rank_update(policy_dir):
    model = from_pretrained(policy_dir, dtype=jnp.float32)
    base = nnx.state(model)
    lora = LoRA(rank=4, alpha=8.0, targets=("q_proj", "o_proj", "down_proj"))
    adapters = random_b(lora.init(model))
    a, merged, kernels = flat(adapters), flat(lora.merge(base, adapters)), flat(base)
    for path, w in kernels.items():
        module = path[:-1]
        if path[-1] == "kernel" and (*module, "lora_a") in a:
            expected = w + lora.scale * dense_delta(a[(*module, "lora_a")], a[(*module, "lora_b")])
            np.testing.assert_allclose(merged[path], expected, rtol=1e-6, atol=1e-7, err_msg=str(path))
        else:  # not adapted (k_proj, the biases, the norms, the embedding): the base's own values
            np.testing.assert_array_equal(merged[path], w, err_msg=str(path))


def synthetic_batch(model, graphdef, params, n: int = 8, p: int = 5, t: int = 6) -> learner.Batch:
    """A batch whose old log-probs are the policy's own (ratio 1: no clipping, every token has a gradient)."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, model.config.vocab_size, (n, p + t)).astype(np.int32)
    mask = np.ones((n, p + t), bool)
    completion = np.ones((n, t), bool)
    completion[::2, -2:] = False
    old = learner.make_logprob_fn(graphdef, None)(params, tokens, mask, completion)
    return learner.Batch(tokens, mask, completion, np.asarray(old), rng.normal(size=n).astype(np.float32),
                         *[np.zeros((n, 0), np.float32)] * 2)


def test_lora_gradient_is_the_chain_rule_through_the_dense_weight(policy_dir):
    """One learner update with SGD at lr 1 moves the params by minus their gradient: the LoRA update's moves of A and
    B are ``s · G Bᵀ`` and ``s · Aᵀ G``, with G the dense update's gradient w.r.t. the merged kernel (the same loss,
    two micro-batches)."""
    model = from_pretrained(policy_dir, dtype=jnp.float32)
    graphdef, base = nnx.split(model)
    lora = LoRA(rank=3, alpha=6.0)
    adapters = random_b(lora.init(model))  # B != 0, so that dL/dA is not zero
    merged = lora.merge(base, adapters)
    batch = synthetic_batch(model, graphdef, merged)
    loss = load_config(None, ["loss.entropy_coef=0.01"]).loss
    tx = optax.with_extra_args_support(optax.sgd(1.0))
    dense_update = learner.make_update_fn(graphdef, tx, loss, num_micro=2)
    lora_update = learner.make_update_fn(graphdef, tx, loss, num_micro=2, merge=lora.merge)

    copy = lambda tree: jax.tree.map(jnp.copy, tree)  # the updates donate their params
    new_dense, _, dense_metrics = dense_update(copy(merged), tx.init(merged), batch)
    new_adapters, _, lora_metrics = lora_update(copy(adapters), tx.init(adapters), batch, frozen=base)
    np.testing.assert_allclose(lora_metrics["loss"], dense_metrics["loss"], rtol=1e-6)
    grad_w = {k: flat(merged)[k] - v for k, v in flat(new_dense).items()}
    a, moved = flat(adapters), flat(new_adapters)
    checked = 0
    for path in a:
        if path[-1] != "lora_a":
            continue
        module = path[:-1]
        A, B = a[path], a[(*module, "lora_b")]
        G = grad_w[(*module, "kernel")]
        n_in = A.ndim - 1
        G2 = G.reshape(int(np.prod(G.shape[:n_in])), -1)
        grad_a = lora.scale * (G2 @ B.reshape(B.shape[0], -1).T).reshape(A.shape)
        grad_b = lora.scale * (A.reshape(-1, A.shape[-1]).T @ G2).reshape(B.shape)
        scale = np.abs(grad_a).max() + np.abs(grad_b).max()
        assert scale > 0
        np.testing.assert_allclose(A - moved[path], grad_a, atol=1e-4 * scale, rtol=1e-3, err_msg=str(path))
        np.testing.assert_allclose(B - moved[(*module, "lora_b")], grad_b, atol=1e-4 * scale, rtol=1e-3,
                                   err_msg=str(path))
        checked += 1
    assert checked == len(TARGETS) * model.config.num_layers
    # The base was an argument, not a donated one: still alive, still the checkpoint's.
    for x, y in zip(jax.tree.leaves(base), jax.tree.leaves(nnx.state(from_pretrained(policy_dir, dtype=jnp.float32))),
                    strict=True):
        np.testing.assert_array_equal(x, y)


def test_a_lora_step_samples_the_merged_policy_with_an_adapter_sized_state(policy_dir):
    """After one step the rollout differs from the base model's and is the merged model's; the state, its optimizer
    state (SFPO's slow copy included) are adapter-sized; the base is the KL reference, not a copy."""
    tok = load_tokenizer(policy_dir)
    cfg = load_config(None, ["rollout.prompts_per_step=4", "rollout.group_size=4", "rollout.max_new_tokens=6",
                             "rollout.num_minibatches=2", "optim.learning_rate=3e-2", "sfpo.num_fast_steps=1",
                             "loss.kl_coef=0.01", "model.lora_rank=4", "model.lora_alpha=8"])
    model = from_pretrained(policy_dir, dtype=jnp.float32)
    task = ArithmeticTask(num_train=8, num_eval=1)
    prompts = [tok.encode(task.render(p), add_special_tokens=False) for p in task.train_problems()[:4]]
    answers = [p.answer for p in task.train_problems()[:4]]
    rl_step, state = make_rl_step(model, tok, task.reward, cfg.optimizer(), cfg.rollout, cfg.loss, lora=cfg.lora())
    assert rl_step.learner.ref_params is rl_step.learner.frozen  # the base, no copy
    num_params = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
    adapter_size, model_size = num_params(state.params), num_params(nnx.state(model))
    assert {p[-1] for p in flat(state.params)} == {"lora_a", "lora_b"} and adapter_size < model_size
    # Adam's two moments and SFPO's slow copy, all of the adapters' size (and the counters, the entropy window).
    assert 3 * adapter_size <= num_params(state.opt_state) < 3 * adapter_size + 64

    state, metrics = rl_step(state, prompts, answers, jax.random.key(0))
    assert np.isfinite(metrics["train/loss"]) and metrics["train/kl"] >= 0
    assert any(flat(state.params)[p].any() for p in flat(state.params) if p[-1] == "lora_b")

    scfg = SamplingConfig(max_new_tokens=6, temperature=1.0, num_samples=2, eos_token_ids=(tok.eos_token_id,))
    policy = rl_step.learner.policy_params(state)
    trained = rl_step.sampler.generate(prompts, scfg, jax.random.key(1), params=policy)
    base = rl_step.sampler.generate(prompts, scfg, jax.random.key(1), params=rl_step.learner.frozen)
    merged_model = from_pretrained(policy_dir, dtype=jnp.float32)
    nnx.update(merged_model, jax.tree.map(np.asarray, policy))
    merged = Sampler(merged_model, pad_token_id=tok.pad_token_id).generate(prompts, scfg, jax.random.key(1))
    np.testing.assert_array_equal(trained.tokens, merged.tokens)
    np.testing.assert_allclose(trained.logprobs, merged.logprobs, atol=1e-5, rtol=0)
    assert np.abs(trained.logprobs - base.logprobs)[trained.mask & base.mask].max() > 1e-3


def test_a_learner_with_lora_refuses_a_target_the_model_lacks(policy_dir):
    model = from_pretrained(policy_dir, dtype=jnp.float32)
    cfg = load_config(None, ["rollout.prompts_per_step=4", "rollout.group_size=2", "model.lora_rank=2",
                             "model.lora_targets=[lm_head]"])
    with pytest.raises(ValueError, match=r"lora_targets=\['lm_head'\]"):
        make_learner(model, cfg.optimizer(), cfg.rollout, cfg.loss, lora=cfg.lora())


def lora_argv(policy_dir, out, *extra) -> list[str]:
    return ["--algo", "sfpo", "--out", str(out), f"model.path={policy_dir}", "task.name=arithmetic",
            "task.kwargs={num_train: 64, num_eval: 4}", "rollout.prompts_per_step=4", "rollout.group_size=4",
            "rollout.max_new_tokens=6", "rollout.num_minibatches=2", "optim.learning_rate=3e-2",
            "sfpo.num_fast_steps=1", "eval.every=0", "run.checkpoint_every=1",
            "run.progress=false", "mesh.data=1", "model.lora_rank=4", "model.lora_alpha=8", *extra]


def test_a_lora_run_resumes_exactly_and_exports_the_merged_weights(policy_dir, tmp_path):
    """``experiments/train.py --export`` of a LoRA run: two steps in one go, and one step then ``--resume`` for the
    second, log the same metrics and export the same merged weights; only the targeted kernels moved."""
    sys.path.insert(0, str(ROOT / "experiments"))
    import train as train_script

    full, split = tmp_path / "full", tmp_path / "split"
    assert train_script.main([*lora_argv(policy_dir, full), "--steps", "2", "--export", str(full / "export")]) == 0
    assert train_script.main([*lora_argv(policy_dir, split), "--steps", "1"]) == 0
    assert train_script.main([*lora_argv(policy_dir, split), "--steps", "2", "--resume",
                              "--export", str(split / "export")]) == 0
    rows = [read_metrics(d / "metrics.jsonl") for d in (full, split)]
    assert [r["step"] for r in rows[1]] == [1, 2]
    assert [deterministic(r) for r in rows[0]] == [deterministic(r) for r in rows[1]]
    a, b = (load_file(d / "export" / "model.safetensors") for d in (full, split))
    base = load_file(policy_dir / "model.safetensors")
    assert a.keys() == b.keys() == base.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
        targeted = any(f"{t}.weight" in name for t in TARGETS)
        assert targeted != np.array_equal(a[name], base[name]), name  # the adapted kernels moved, nothing else


def test_lora_state_is_adapter_sized_at_a_paper_shape():
    """Qwen2.5-Math-1.5B's shapes (abstract: no memory): the optimizer state with SFPO's slow copy, LoRA r=16 on every
    projection against full fine-tuning."""
    cfg = ModelConfig(architecture="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                      num_layers=28, num_heads=12, num_kv_heads=2, head_dim=128, tie_word_embeddings=True,
                      attention_bias=True)
    model = nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0)))
    tx = load_config(None, []).optimizer()
    nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
    params = nnx.state(model)
    adapters = jax.eval_shape(lambda: LoRA(rank=16, alpha=32.0).init(model))
    full, lora = (nbytes(p) + nbytes(jax.eval_shape(tx.init, p)) for p in (params, adapters))
    assert 1.5e9 < nbytes(params) / 4 < 1.6e9  # 1.54B params
    assert nbytes(adapters) / 4 == 28 * 16 * (2 * (1536 + 1536) + 2 * (1536 + 256) + 3 * (1536 + 8960))
    assert lora < 0.02 * full, (lora, full)


def test_a_sharded_lora_update_matches_one_device(policy_dir):
    """On an 8-device mesh (data 2 x fsdp 4) the adapters are laid out by their kernels' logical axes, and a learner
    call moves them as on one device."""
    from sfpo_jax.parallel import logical_sharding, make_mesh

    cfg = load_config(None, ["rollout.prompts_per_step=8", "rollout.group_size=2", "rollout.num_minibatches=2",
                             "optim.learning_rate=3e-2", "sfpo.num_fast_steps=1", "model.lora_rank=4"])
    results = []
    for mesh in (None, make_mesh(data=2, fsdp=4)):
        model = from_pretrained(policy_dir, dtype=jnp.float32, mesh=mesh)
        learner_, state = make_learner(model, cfg.optimizer(), cfg.rollout, cfg.loss, mesh=mesh, lora=cfg.lora())
        graphdef, base = nnx.split(model)
        batch = synthetic_batch(model, graphdef, base, n=16)
        if mesh is not None:
            a = state.params["layers"][0]["mlp"]["up_proj"]["lora_a"]  # [embed, r]: embed over fsdp
            assert not a.sharding.is_fully_replicated and len(a.sharding.device_set) == 8
            batch = jax.device_put(batch, logical_sharding(mesh, ("batch",)))
        state, _ = learner_(state, batch)
        results.append(flat(state.params))
    for path in results[0]:
        np.testing.assert_allclose(results[1][path], results[0][path], atol=1e-5, rtol=0, err_msg=str(path))
    assert any(results[0][p].any() for p in results[0] if p[-1] == "lora_b")


def test_the_base_is_loaded_in_the_compute_dtype_and_the_adapters_are_float32_masters(policy_dir):
    from sfpo_jax.train.policy import load_policy

    cfg = load_config(None, [f"model.path={policy_dir}", "model.compute_dtype=bfloat16", "model.lora_rank=4",
                             "rollout.prompts_per_step=4", "rollout.group_size=2", "rollout.num_minibatches=1",
                             "sfpo.num_fast_steps=1"])
    model, _ = load_policy(cfg, ArithmeticTask(num_train=8, num_eval=1))
    assert {x.dtype for x in jax.tree.leaves(nnx.state(model))} == {jnp.dtype(jnp.bfloat16)}
    learner_, state = make_learner(model, cfg.optimizer(), cfg.rollout, cfg.loss, lora=cfg.lora())
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}  # model.param_dtype
    assert learner_.frozen is not None and all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(learner_.frozen))
    state, metrics = learner_(state, synthetic_batch(model, *nnx.split(model)))
    assert np.isfinite(metrics["train/loss"]) and metrics["train/grad_norm"] > 0
    policy = learner_.policy_params(state)  # what the sampler takes: no cast left to do
    assert {x.dtype for x in jax.tree.leaves(policy)} == {jnp.dtype(jnp.bfloat16)}
