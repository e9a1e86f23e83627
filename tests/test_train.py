"""The RL loop end to end on a tiny random policy: calls per batch, metrics, evaluation, checkpoints,
resume after a real kill, non-finite handling, and sharded steps matching one device."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from safetensors.numpy import load_file

from sfpo_jax.models import from_pretrained, load_tokenizer
from sfpo_jax.optim import calls_per_batch, sfpo
from sfpo_jax.parallel import logical_sharding, make_mesh
from sfpo_jax.sampling import Sampler, SamplingConfig
from sfpo_jax.tasks import ArithmeticTask
from sfpo_jax.train import (
    Checkpointer,
    NonFiniteError,
    ResumeError,
    deterministic,
    learner,
    load_config,
    make_learner,
    read_metrics,
    rollouts,
    train,
)
from sfpo_jax.train.checks import prompts_within
from sfpo_jax.train.config import ConfigError
from sfpo_jax.train.evaluation import eval_sets_of, evaluate
from sfpo_jax.train.policy import load_policy
from sfpo_jax.train.rollouts import TrainingPrompts

ROOT = Path(__file__).resolve().parents[1]


def overrides(policy_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"model.path={policy_dir}", "task.name=arithmetic", "task.kwargs={num_train: 64, num_eval: 4}",
        "rollout.prompts_per_step=4", "rollout.group_size=4", "rollout.max_new_tokens=6",
        "rollout.num_minibatches=2", "optim.learning_rate=3e-3", "sfpo.num_fast_steps=2", "eval.every=2",
        "eval.num_samples=2", "run.checkpoint_every=1", "run.progress=false", "mesh.data=1", f"run.out={out}",
        *extra,
    ]


def test_data_order_covers_each_epoch_once_and_is_a_function_of_the_cursor():
    data = TrainingPrompts([[i] for i in range(10)], [str(i) for i in range(10)], seed=3)
    a = np.concatenate([data.indices(4 * s, 4) for s in range(5)])  # 20 draws = 2 epochs
    assert sorted(a[:10]) == list(range(10)) and sorted(a[10:]) == list(range(10))
    np.testing.assert_array_equal(data.indices(12, 4), a[12:16])
    np.testing.assert_array_equal(data.indices(7, 6), a[7:13])  # any cursor, any count: a step may consume more
    assert not np.array_equal(TrainingPrompts(data.ids, data.answers, seed=4).indices(0, 4), a[:4])
    with pytest.raises(ValueError, match="3 prompts but 2 answers"):
        TrainingPrompts([[1], [2], [3]], ["1", "2"], seed=0)


def test_overlong_training_prompts_are_dropped():
    problems = ["ab", "abcd", "abc", "abcdef"]
    prompts = [list(p) for p in problems]
    assert prompts_within(problems, prompts, 3) == (["ab", "abc"], [list("ab"), list("abc")], 2)
    assert prompts_within(problems, prompts, 6) == (problems, prompts, 0)
    with pytest.raises(ValueError, match="max_prompt_length=1"):
        prompts_within(problems, prompts, 1)


@pytest.mark.parametrize(("algo", "calls"), [("sfpo", (2 + 1) * 2), ("grpo", 2), ("grpo-epochs", (2 + 1) * 2)])
def test_loop_runs_and_logs(policy_dir, tmp_path, algo, calls):
    cfg = load_config(None, [*overrides(policy_dir, tmp_path), f"algo={algo}", "run.steps=2"])
    result = train(cfg)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and rows == result.history
    assert [r["rollouts"] for r in rows] == [16, 32]
    assert all(r["optimizer_calls"] == calls for r in rows)
    assert all(r["sfpo_active"] == (algo != "grpo") for r in rows)  # grpo-epochs: SFPO's schedule, α = 1
    for key in ("reward/mean", "accuracy", "zero_variance_groups", "entropy", "train/grad_norm",
                "train/clip_frac", "train/approx_kl", "time/sample", "time/update", "time/total"):
        assert key in rows[-1], key
    eval_key = f"eval/{ArithmeticTask(num_train=64, num_eval=4).name}/accuracy"
    assert eval_key in rows[1] and not any(k.startswith("eval/") for k in rows[0])
    assert Checkpointer(tmp_path / "checkpoints").latest_step() == 2
    assert (tmp_path / "config.yaml").is_file()
    # The params moved, and a run that is not resumed refuses to overwrite the checkpoints.
    with pytest.raises(ResumeError, match="--resume"):
        train(cfg)


def test_loop_samples_in_generation_batches_with_one_program(policy_dir, tmp_path, monkeypatch):
    samplers, calls = [], []

    class Recording(Sampler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            samplers.append(self)

        def generate(self, prompts, *args, **kwargs):
            calls.append((len(prompts), kwargs.get("chunk_size")))
            return super().generate(prompts, *args, **kwargs)

    monkeypatch.setattr(rollouts, "Sampler", Recording)
    cfg = load_config(None, [*overrides(policy_dir, tmp_path), "rollout.generation_batch_size=2", "run.steps=1",
                             "eval.every=0", "run.checkpoint_every=0"])
    rows = train(cfg).history
    assert calls == [(4, 2)]  # prompts_per_step=4 in chunks of 2
    assert rows[0]["rollouts"] == 4 * 4 and np.isfinite(rows[0]["train/loss"])
    (sampler,) = samplers
    assert sampler.num_traces == 2 and len(sampler._programs) == 1  # one (prefill, decode) pair for both chunks
    with pytest.raises(ConfigError, match=r"rollout\.generation_batch_size=0 must be >= 1"):
        load_config(None, ["rollout.generation_batch_size=0"])


KILL_AFTER_SAVE = """
import os, runpy, signal, sys
from sfpo_jax.train import run_dir

save = run_dir.RunDir.save

def save_then_die(self, step, *args, **kwargs):  # a kill at a fixed point: right after step KILL's checkpoint
    save(self, step, *args, **kwargs)
    if step == int(os.environ["KILL_AFTER_STEP"]):
        os.kill(os.getpid(), signal.SIGKILL)

run_dir.RunDir.save = save_then_die
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("filtering", [False, True], ids=["plain", "filter_groups"])
def test_killed_run_resumes_to_the_same_params_and_metrics(policy_dir, tmp_path, filtering):
    """SIGKILL right after step 2's checkpoint, then --resume: the same metrics and params as an uninterrupted run;
    with group filtering, steps consume different numbers of prompts, so the checkpointed cursor is what keeps the
    data order exact."""
    steps = 4
    cli = [str(ROOT / "experiments" / "train.py"), "--algo", "sfpo", "--steps", str(steps)]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    (tmp_path / "kill.py").write_text(KILL_AFTER_SAVE)
    (tmp_path / "digits_task.py").write_text(DIGITS_TASK)

    def run(out, *extra, kill_after=None):
        cmd = [sys.executable, *([str(tmp_path / "kill.py")] if kill_after else []), *cli, "--out", str(out), *extra,
               *overrides(policy_dir, out)[:-1], *(FILTERING if filtering else [])]
        return subprocess.run(cmd, env={**env, "KILL_AFTER_STEP": str(kill_after)}, capture_output=True, timeout=600)

    assert run(tmp_path / "full", "--export", str(tmp_path / "full" / "export")).returncode == 0
    killed = run(tmp_path / "killed", kill_after=2)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    assert [r["step"] for r in read_metrics(tmp_path / "killed" / "metrics.jsonl")] == [1, 2]
    resumed = run(tmp_path / "killed", "--resume", "--export", str(tmp_path / "killed" / "export"))
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]

    full, resumed = (read_metrics(tmp_path / d / "metrics.jsonl") for d in ("full", "killed"))
    assert [deterministic(r) for r in resumed] == [deterministic(r) for r in full]
    assert len(full) == steps
    if filtering:  # some step sampled more than one round, so the cursor is not steps x prompts_per_step
        assert max(r["rollout/generation_rounds"] for r in full) > 1
        assert full[-1]["rollouts"] == 4 * sum(r["rollout/prompts_sampled"] for r in full) > steps * 4 * 4
    a, b = (load_file(tmp_path / d / "export" / "model.safetensors") for d in ("full", "killed"))
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_non_finite_updates_are_skipped_then_stop_the_run(policy_dir, tmp_path, monkeypatch):
    from tests.test_faults import poison_advantages

    cfg = load_config(None, [*overrides(policy_dir, tmp_path), "run.steps=4", "eval.every=0",
                             "run.max_nonfinite_in_a_row=4"])
    task = ArithmeticTask(num_train=64, num_eval=4)
    poison_advantages(monkeypatch, slice(None), at=lambda call: call >= 3)  # every batch from step 3 on
    # The poisoned batch still gets its whole SFPO cycle of (2 + 1) * 2 calls, every one skipped.
    with pytest.raises(NonFiniteError, match=r"step 3: 6 optimizer calls in a row.*the last checkpoint, step 2, "
                                             "is intact"):
        train(cfg, task=task)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and rows[-1]["nonfinite_total"] == 0
    ckpt = Checkpointer(tmp_path / "checkpoints")
    assert ckpt.all_steps() == [1, 2]
    # The last good checkpoint is whole: the run resumes from it (and fails again on the same poisoned batch).
    poison_advantages(monkeypatch, slice(None), at=lambda call: True)
    with pytest.raises(NonFiniteError, match="step 3"):
        train(cfg, resume=True, task=task)
    # With no checkpoint yet, the error says so instead of pointing at one.
    with pytest.raises(NonFiniteError, match="no checkpoint was saved yet"):
        train(load_config(None, [*overrides(policy_dir, tmp_path / "none"), "run.steps=1", "eval.every=0",
                                 "run.checkpoint_every=0", "run.max_nonfinite_in_a_row=1"]), task=task)


@pytest.mark.parametrize("mesh", [["mesh.data=8"], ["mesh.data=2", "mesh.fsdp=4"]], ids=["data", "fsdp"])
def test_sharded_step_matches_one_device(policy_dir, tmp_path, mesh):
    assert jax.device_count() == 8
    common = [*overrides(policy_dir, tmp_path), "run.steps=1", "eval.every=0", "run.checkpoint_every=0",
              "rollout.prompts_per_step=8", "rollout.num_minibatches=2"]
    one = train(load_config(None, [*common, "run.out=" + str(tmp_path / "one")]))
    many = train(load_config(None, [*common, "run.out=" + str(tmp_path / "many"), "mesh.data=-1", *mesh]))
    assert deterministic(one.history[0])["reward/mean"] == deterministic(many.history[0])["reward/mean"]
    a, b = nnx.state(one.model, nnx.Param), nnx.state(many.model, nnx.Param)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert len(y.sharding.device_set) > 1 or x.size < 8
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5, rtol=0)


def test_micro_batches_are_strided_and_invert():
    x = np.arange(12 * 2).reshape(12, 2)
    micro = learner.to_micro_batches(x, 3)
    assert micro.shape == (3, 4, 2)
    np.testing.assert_array_equal(micro[1][:, 0], x[1::3, 0])  # rows 1, 4, 7, 10
    np.testing.assert_array_equal(learner.from_micro_batches(micro), x)
    with pytest.raises(ValueError, match="12 rows do not split into 5"):
        learner.to_micro_batches(x, 5)


def test_micro_batched_update_stays_data_parallel(policy_dir):
    """With 8 data-parallel devices and 4 micro-batches, the compiled update gathers no batch rows: every device
    works on its own rows of each micro-batch and only the gradients are reduced (all-reduce)."""
    mesh = make_mesh(data=8)
    graphdef, params = nnx.split(from_pretrained(policy_dir, dtype=jnp.float32, mesh=mesh))
    cfg = load_config(None, ["rollout.prompts_per_step=8", "rollout.num_minibatches=1"])
    tx = cfg.optimizer()
    n, p, t = 64, 8, 8
    batch = learner.Batch(np.ones((n, p + t), np.int32), np.ones((n, p + t), bool), np.ones((n, t), bool),
                          np.zeros((n, t), np.float32), np.zeros(n, np.float32), *[np.zeros((n, 0), np.float32)] * 2)
    batch = jax.device_put(batch, logical_sharding(mesh, ("batch",)))
    update = learner.make_update_fn(graphdef, tx, cfg.loss, num_micro=4)
    hlo = update.lower(params, tx.init(params), batch).compile().as_text()
    assert "all-reduce" in hlo and "all-gather" not in hlo and "all-to-all" not in hlo


def test_a_learner_refuses_an_optimizer_with_another_minibatch_count(policy_dir):
    """M has one source: `sfpo(3, 0.8)` (M = 1) beside `rollout.num_minibatches=4` would silently give each batch 4
    calls that reposition after the 3rd, not 16 calls in 4 epochs; building the learner names both values."""
    model = from_pretrained(policy_dir, dtype=jnp.float32)
    cfg = load_config(None, ["rollout.prompts_per_step=4", "rollout.group_size=2", "rollout.num_minibatches=4"])
    tx = optax.chain(optax.adamw(1e-3), sfpo(num_fast_steps=3, alpha=0.8))
    with pytest.raises(ValueError, match=r"num_minibatches=1 but rollout.num_minibatches=4"):
        make_learner(model, tx, cfg.rollout, cfg.loss)
    learner_, state = make_learner(model, cfg.optimizer(), cfg.rollout, cfg.loss)  # the config's own optimizer
    assert learner_.num_minibatches == 4 and calls_per_batch(state.opt_state) == 16


def test_the_learner_reads_the_device_once_per_batch(policy_dir, monkeypatch):
    """All (K+1)·M optimizer calls are queued before the host waits: one `device_get` for the step's metrics,
    after the last call (none per call), with the metrics of every call."""
    model = from_pretrained(policy_dir, dtype=jnp.float32)
    cfg = load_config(None, ["rollout.prompts_per_step=4", "rollout.group_size=2", "rollout.num_minibatches=2",
                             "sfpo.num_fast_steps=3"])
    learner_, state = make_learner(model, cfg.optimizer(), cfg.rollout, cfg.loss)
    n, p, t = 8, 4, 4
    rng = np.random.default_rng(0)
    batch = learner.Batch(rng.integers(1, 10, (n, p + t)).astype(np.int32), np.ones((n, p + t), bool),
                          np.ones((n, t), bool), np.full((n, t), -2.0, np.float32),
                          rng.normal(size=n).astype(np.float32), *[np.zeros((n, 0), np.float32)] * 2)
    fetches, device_get = [], jax.device_get
    monkeypatch.setattr(jax, "device_get", lambda x: fetches.append(x) or device_get(x))
    state, metrics = learner_(state, batch)
    assert len(fetches) == 1 and len(fetches[0][0]) == 8 == metrics["optimizer_calls"]
    assert metrics["sfpo_active"] and np.isfinite(metrics["train/loss"]) and metrics["train/grad_norm"] > 0


def test_a_batch_that_does_not_split_over_the_mesh_is_refused_before_sampling(policy_dir, tmp_path, monkeypatch):
    """6 rows over 8 data shards: `train` stops at setup with the sizes to change, before any rollout is sampled
    (it used to fail inside jax's device_put after a step's sampling)."""
    monkeypatch.setattr(Sampler, "generate", lambda *a, **k: pytest.fail("sampled before the check"))
    cfg = load_config(None, overrides(policy_dir, tmp_path, "rollout.prompts_per_step=3", "rollout.group_size=2",
                                      "rollout.num_minibatches=1", "mesh.data=8"))
    with pytest.raises(ValueError, match=r"6 rows .* does not split over the mesh's 8 batch shards"):
        train(cfg)


def test_completion_logits_are_the_full_forwards_at_the_predicting_positions(policy_dir):
    """``learner.completion_logits`` runs the LM head on the last T + 1 positions only; its logits are the full
    forward's at positions [P - 1, P + T - 1), the ones that predict the T completion tokens (left padding included)."""
    model = from_pretrained(policy_dir, dtype=jnp.float32)
    rng = np.random.default_rng(0)
    n, p, t = 4, 5, 3
    tokens = jnp.asarray(rng.integers(3, 20, (n, p + t)), jnp.int32)
    mask = jnp.ones((n, p + t), bool).at[::2, :2].set(False)  # left-padded prompts
    full = model(tokens, attention_mask=mask)
    np.testing.assert_allclose(learner.completion_logits(model, tokens, mask, t), full[:, p - 1 : p + t - 1],
                               rtol=1e-5, atol=1e-5)
    logp, _ = learner.completion_logprobs(model, tokens, mask, jnp.ones((n, t), bool))
    want = jnp.take_along_axis(jax.nn.log_softmax(full[:, p - 1 : p + t - 1]), tokens[:, p:, None], -1)[..., 0]
    np.testing.assert_allclose(logp, want, rtol=1e-5, atol=1e-5)


def test_model_remat_config_gives_the_same_update(policy_dir):
    """``model.remat=true`` loads the policy with rematerialised layers, and one optimizer call then moves the
    params exactly as without it (within float32 reassociation)."""
    task = ArithmeticTask(num_train=64, num_eval=4)
    rng = np.random.default_rng(0)
    n, p, t = 8, 6, 4
    batch = learner.Batch(rng.integers(3, 20, (n, p + t)).astype(np.int32), np.ones((n, p + t), bool),
                          np.ones((n, t), bool), np.full((n, t), -1.0, np.float32),
                          rng.normal(size=n).astype(np.float32), *[np.zeros((n, 0), np.float32)] * 2)
    moved = []
    for remat in (False, True):
        cfg = load_config(None, [f"model.path={policy_dir}", f"model.remat={str(remat).lower()}",
                                 "rollout.prompts_per_step=2", "rollout.num_minibatches=1", "optim.learning_rate=1e-2"])
        model, _ = load_policy(cfg, task)
        assert model.remat is remat
        graphdef, params = nnx.split(model)
        tx = cfg.optimizer()
        params, _, metrics = learner.make_update_fn(graphdef, tx, cfg.loss, num_micro=1)(params, tx.init(params), batch)
        assert np.isfinite(metrics["loss"])
        moved.append(params)
    for a, b in zip(jax.tree.leaves(moved[0]), jax.tree.leaves(moved[1]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)


def test_model_attention_config_builds_the_cudnn_learner_only_on_a_gpu(policy_dir, monkeypatch):
    """``model.attention=cudnn`` is refused on a backend without cuDNN, before the policy is even located (a warm-up
    policy would otherwise be trained first); on a GPU it builds the model with that learner attention."""
    import sfpo_jax.train.policy as policy

    cfg = load_config(None, [f"model.path={policy_dir}", "model.compute_dtype=bfloat16", "model.attention=cudnn"])
    monkeypatch.setattr(policy, "policy_path", lambda *a: pytest.fail("located the policy before the check"))
    with pytest.raises(ValueError, match="needs an NVIDIA GPU; JAX's backend here is 'cpu'"):
        load_policy(cfg, ArithmeticTask(num_train=8, num_eval=1))
    monkeypatch.undo()
    monkeypatch.setattr(policy.jax, "default_backend", lambda: "gpu")
    model, _ = load_policy(cfg, ArithmeticTask(num_train=8, num_eval=1))
    assert model.attention == "cudnn" and model.dtype == jnp.bfloat16


@pytest.mark.parametrize("sharded", [False, True], ids=["one-device", "data-parallel"])
def test_recomputed_old_logprobs_match_the_sampler(policy_dir, sharded):
    """The learner's forward pass at θ_s gives back the sampler's log-probs on a real rollout (float32)."""
    mesh = make_mesh(data=8) if sharded else None
    model = from_pretrained(policy_dir, dtype=jnp.float32, mesh=mesh)
    tok = load_tokenizer(policy_dir)
    task = ArithmeticTask(num_train=8, num_eval=1)
    prompts = [tok.encode(task.render(p), add_special_tokens=False) for p in task.train_problems()[:4]]
    prompts = [p[i:] for i, p in enumerate(prompts)]  # several lengths, so the left padding is exercised
    scfg = SamplingConfig(max_new_tokens=8, temperature=1.0, num_samples=4, eos_token_ids=(tok.eos_token_id,))
    rollout = Sampler(model, mesh=mesh, pad_token_id=tok.pad_token_id).generate(prompts, scfg, jax.random.key(0))
    batch = learner.make_batch(rollout, np.zeros(16, np.float32))
    if sharded:
        batch = jax.device_put(batch, logical_sharding(mesh, ("batch",)))
    graphdef, params = nnx.split(model)
    logprob_fn = learner.make_logprob_fn(graphdef, micro_batch_size=8)  # 2 micro-batches of 8 rows
    logp = logprob_fn(params, batch.tokens, batch.attention_mask, batch.completion_mask)

    assert logp.shape == rollout.logprobs.shape and logp.dtype == jnp.float32
    if sharded:
        assert len(logp.sharding.device_set) == 8 and not logp.sharding.is_fully_replicated
    logp, mask = np.asarray(logp), rollout.mask
    assert mask.sum() > 16 and np.all(logp[~mask] == 0)
    np.testing.assert_allclose(logp[mask], rollout.logprobs[mask], atol=1e-4, rtol=0)
    assert float(learner.masked_mean_abs_diff(logp, rollout.logprobs, mask)) < 1e-4
    with pytest.raises(ValueError, match="micro_batch_size=5 must divide the batch size 16"):
        learner.make_logprob_fn(graphdef, 5)(params, batch.tokens, batch.attention_mask, batch.completion_mask)


def test_gspo_and_rollout_correction_run_end_to_end(policy_dir, tmp_path):
    """GSPO's sequence ratio and the truncated importance weights of the rollout mismatch in a real run: float32
    sampling and learning agree, so every weight is ~1 and none is capped."""
    cfg = load_config(None, [*overrides(policy_dir, tmp_path), "run.steps=1", "eval.every=0",
                             "loss.importance_sampling_level=sequence", "loss.agg=seq-mean-token-mean",
                             "rollout.recompute_old_logprobs=true", "loss.rollout_correction=token",
                             "loss.rollout_correction_cap=1.5"])
    (row,) = train(cfg).history
    assert abs(row["rollout_correction/weight_mean"] - 1.0) < 1e-3 and row["rollout_correction/capped_frac"] == 0
    assert np.isfinite(row["train/loss"]) and row["train/grad_norm"] > 0


def test_rollout_correction_weights_are_truncated_ratios():
    rng = np.random.default_rng(0)
    old, sampler = rng.normal(-2, 0.5, (4, 6)).astype(np.float32), rng.normal(-2, 0.5, (4, 6)).astype(np.float32)
    mask = rng.random((4, 6)) < 0.7
    w, m = learner.rollout_correction_weights(old, sampler, mask, 1.5)
    expect = np.where(mask, np.minimum(np.exp(old.astype(np.float64) - sampler), 1.5), 0.0)
    np.testing.assert_allclose(np.asarray(w), expect, rtol=1e-6)
    np.testing.assert_allclose(float(m["rollout_correction/weight_mean"]), expect[mask].mean(), rtol=1e-6)
    np.testing.assert_allclose(float(m["rollout_correction/capped_frac"]), (expect[mask] >= 1.5).mean())
    with pytest.raises(ConfigError, match=r"needs rollout\.recompute_old_logprobs=true"):
        load_config(None, ["loss.rollout_correction=token"])


def test_kl_to_the_initial_policy_with_recomputed_old_logprobs(policy_dir, tmp_path):
    # GRPO with one mini-batch: one optimizer call per step, so step 1's row is the call at the initial params.
    cfg = load_config(None, [*overrides(policy_dir, tmp_path), "algo=grpo", "rollout.num_minibatches=1",
                             "rollout.micro_batch_size=8", "rollout.recompute_old_logprobs=true",
                             "loss.kl_coef=0.05", "run.steps=2", "eval.every=0", "run.checkpoint_every=0"])
    rows = train(cfg).history
    assert all(r["optimizer_calls"] == 1 for r in rows)
    kl = [r["train/kl"] for r in rows]
    assert abs(kl[0]) < 1e-6, kl  # the policy is the reference
    assert kl[1] > 1e-6, kl  # k3 >= 0, and the policy has moved away from it
    # The old log-probs are the learner's own at θ_s: the ratio of the step's (only) call is exactly 1 ...
    assert all(abs(r["train/ratio_min"] - 1) < 1e-5 and abs(r["train/ratio_max"] - 1) < 1e-5 for r in rows)
    # ... and they agree with the sampler's (float32), which the loop reports.
    assert all(r["logprobs/sampler_abs_diff"] < 1e-4 for r in rows)
    assert all(r["time/logprobs"] > 0 for r in rows)


class TwoEvalSets(ArithmeticTask):
    """Arithmetic whose eval problems form two named sets, counting its reward calls."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.graded = []

    def eval_sets(self):
        problems = self.eval_problems()
        return {"first": problems[:3], "rest": problems[3:]}

    def reward(self, completions, answers):
        self.graded.append(len(completions))
        return super().reward(completions, answers)


def test_evaluation_reports_each_eval_set_and_generates_in_chunks(policy_dir, monkeypatch):
    task = TwoEvalSets(num_train=8, num_eval=5)
    assert [len(v) for v in eval_sets_of(task, None).values()] == [3, 2]
    assert [len(v) for v in eval_sets_of(task, 1).values()] == [1, 1]
    model, tok = from_pretrained(policy_dir, dtype=jnp.float32), load_tokenizer(policy_dir)
    sampler = Sampler(model, pad_token_id=tok.pad_token_id)
    generated = []
    generate = sampler.generate
    monkeypatch.setattr(sampler, "generate", lambda prompts, *a, **k: generated.append(len(prompts)) or
                        generate(prompts, *a, **k))
    scfg = SamplingConfig(max_new_tokens=4, num_samples=3, top_p=0.7, eos_token_ids=(tok.eos_token_id,))

    def encode(problems):
        return [tok.encode(task.render(p), add_special_tokens=False) for p in problems]

    out = evaluate(sampler, nnx.state(model), eval_sets_of(task, None), encode, task.reward, tok, scfg, 2,
                   jax.random.key(0))
    assert generated == [2, 2, 1]  # chunk_size problems per call, whatever the eval sets' sizes
    assert task.graded == [2 * 3, 2 * 3, 1 * 3]
    assert list(out) == ["eval/average/accuracy", "eval/average/reward", "eval/first/accuracy",
                         "eval/first/reward", "eval/rest/accuracy", "eval/rest/reward"]
    assert out["eval/average/accuracy"] == pytest.approx((out["eval/first/accuracy"] + out["eval/rest/accuracy"]) / 2)
    assert all(0.0 <= v <= 1.0 for v in out.values())


DIGITS_TASK = """
import numpy as np
from sfpo_jax.tasks import ArithmeticTask

class Digits(ArithmeticTask):
    # A reward that varies from the first step on with a random policy: the fraction of digits.
    def reward(self, completions, answers):
        return np.asarray([sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions], np.float32)

def make(**kwargs):
    return Digits(**kwargs)

class FirstDigit(ArithmeticTask):
    # A 0 / 1 reward for which about a quarter of the groups of 4 have no signal with a random policy.
    def reward(self, completions, answers):
        return np.asarray([float(c[:1].isdigit()) for c in completions], np.float32)

def make_first_digit(**kwargs):
    return FirstDigit(**kwargs)
"""

FILTERING = ["task.import_factory=digits_task:make_first_digit", "rollout.filter_groups=true",
             "rollout.max_generation_rounds=3"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(policy_dir, tmp_path):
    """Two JAX processes (2 CPU devices each, gloo collectives, started as on a cluster from JAX_COORDINATOR_ADDRESS)
    each sample and score their share of every step, filter groups (the kept rows redistributed between them),
    checkpoint collectively and resume, and log exactly the metrics of one uninterrupted process with 4 devices."""
    (tmp_path / "digits_task.py").write_text(DIGITS_TASK)
    cli = [sys.executable, str(ROOT / "experiments" / "train.py"), "--algo", "sfpo",
           *overrides(policy_dir, tmp_path)[:-1], "mesh.data=-1",
           "eval.every=1",
           "task.kwargs={num_train: 64, num_eval: 4}", "eval.num_samples=4", "rollout.recompute_old_logprobs=true",
           *FILTERING]
    # Every host's share of a sampler call is 8 rows (2 prompts x 4 samples), the sampler's batch padding, so the
    # global batches, and with them the random draws, are those of the one-process run.
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}

    def run(out, processes, *flags):
        extra = {"XLA_FLAGS": f"--xla_force_host_platform_device_count={4 // processes}"}
        if processes > 1:
            extra |= {"JAX_COORDINATOR_ADDRESS": f"localhost:{free_port()}", "JAX_NUM_PROCESSES": str(processes)}
        procs = [subprocess.Popen([*cli, "--out", str(out), *flags], env={**env, **extra, "JAX_PROCESS_ID": str(i)},
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for i in range(processes)]
        for proc in procs:
            _, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, err.decode()[-3000:]
        return [deterministic(row) for row in read_metrics(out / "metrics.jsonl")]

    one = run(tmp_path / "one", 1, "--steps", "2")
    run(tmp_path / "two", 2, "--steps", "1")
    two = run(tmp_path / "two", 2, "--steps", "2", "--resume")
    assert [r["step"] for r in one] == [1, 2] and one[0]["reward/std"] > 0
    # Groups were dropped and rounds resampled, so kept rows moved between the processes.
    assert max(r["rollout/generation_rounds"] for r in one) > 1 and min(r["zero_variance_groups"] for r in one) > 0
    assert all("eval/arithmetic-n3-d1-+-*/accuracy" in r for r in one)  # every step: a 1-step run evaluates too
    for a, b in zip(one, two, strict=True):
        assert a.keys() == b.keys()
        assert {k: a[k] for k in a if a[k] != b[k]} == {}, {k: (a[k], b[k]) for k in a if a[k] != b[k]}
