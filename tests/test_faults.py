"""Faults the trainer must survive without silent damage: non-finite calls inside an SFPO cycle, the entropy switch
through the whole loop, resume after it fired, changed configs, corrupt checkpoints and run folders that a fresh
run would overwrite; and metrics that do not depend on how a mini-batch is split into micro-batches."""

from __future__ import annotations

import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sfpo_jax.models import from_pretrained
from sfpo_jax.optim import SFPOState, calls_per_batch
from sfpo_jax.tasks import ArithmeticTask
from sfpo_jax.train import ResumeError, deterministic, learner, load_config, train
from tests.test_train import overrides


def sfpo_state(opt_state) -> SFPOState:
    (state,) = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, SFPOState))
                if isinstance(s, SFPOState)]
    return state


# ------------------------------------------------------------------------------------- non-finite calls


def test_a_skipped_call_keeps_the_sfpo_cycle_in_step():
    """K=3, M=2, a NaN gradient at call 2: the batch still gets its 8 calls, call 2 moves nothing, the reposition
    lands on call 5 and the next batch starts a fresh cycle at its own slow point."""
    cfg = load_config(None, ["rollout.prompts_per_step=8", "rollout.num_minibatches=2", "sfpo.num_fast_steps=3",
                             "optim.learning_rate=0.1", "optim.max_grad_norm=null"])
    tx = cfg.optimizer()
    params = {"w": jnp.arange(3.0)}
    state = tx.init(params)
    assert calls_per_batch(state) == 8
    trajectory = [params]
    for call in range(8):
        g = {"w": jnp.full(3, jnp.nan)} if call == 2 else {"w": params["w"] - 5.0}
        updates, state = tx.update(g, state, params, entropy=1.0)
        params = optax.apply_updates(params, updates)
        trajectory.append(params)
    np.testing.assert_array_equal(trajectory[3]["w"], trajectory[2]["w"])  # the skipped call
    s = sfpo_state(state)
    assert int(s.count) == 0 and int(s.num_batches) == 1 and calls_per_batch(state) == 8
    # The reposition happened on the last fast call (5): θ̃ = θ_s + 0.8 (θ_5' − θ_s), where θ_5' = θ_5 + u_5.
    assert np.all(np.isfinite(trajectory[-1]["w"]))
    # The next batch stores its own slow point at its first call.
    updates, state = tx.update({"w": params["w"] - 5.0}, state, params, entropy=1.0)
    np.testing.assert_array_equal(sfpo_state(state).slow_params["w"], params["w"])


class PoisonedGroup(ArithmeticTask):
    """Arithmetic whose last prompt's rewards are NaN at the ``bad``-th scoring call: one mini-batch non-finite."""

    def __init__(self, bad: int, **kwargs):
        super().__init__(**kwargs)
        self.bad, self.calls = bad, 0

    def reward(self, completions, answers):
        self.calls += 1
        r = np.array(super().reward(completions, answers), np.float32)
        if self.calls == self.bad:
            r[-4:] = np.nan  # the last group (group_size=4) sits in the last of the 2 mini-batches
        return r


def test_a_poisoned_minibatch_keeps_every_batch_whole(policy_dir, tmp_path):
    cfg = load_config(None, [*overrides(policy_dir, tmp_path), "run.steps=3", "eval.every=0",
                             "run.checkpoint_every=0", "run.max_nonfinite_in_a_row=2"])
    result = train(cfg, task=PoisonedGroup(bad=2, num_train=64, num_eval=4))
    rows = result.history
    assert [r["optimizer_calls"] for r in rows] == [6, 6, 6]  # (K=2 + 1) x M=2 for every batch
    assert [r["nonfinite_total"] for r in rows] == [0, 3, 3]  # mini-batch 1 of each of the 3 epochs of step 2
    assert all(r["sfpo_active"] for r in rows)
    assert int(sfpo_state(result.opt_state).count) == 0
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(nnx.state(result.model, nnx.Param)))


# ------------------------------------------------------------------------------------------ entropy switch


def test_entropy_switch_fires_through_train_and_resume_after_it_is_exact(policy_dir, tmp_path):
    # A window of 2 and a threshold every z-score passes: the switch fires at the end of step 2.
    switch = ["sfpo.entropy_window=2", "sfpo.entropy_threshold=-1e9", "eval.every=0"]
    full = train(load_config(None, [*overrides(policy_dir, tmp_path / "full"), *switch, "run.steps=4"])).history
    assert [r["sfpo_active"] for r in full] == [True, True, False, False]
    assert [r["optimizer_calls"] for r in full] == [6, 6, 2, 2]
    part = [*overrides(policy_dir, tmp_path / "part"), *switch]
    train(load_config(None, [*part, "run.steps=3"]))  # stops after the switch; more steps are a resumable change
    resumed = train(load_config(None, [*part, "run.steps=4"]), resume=True).history
    assert [deterministic(r) for r in resumed] == [deterministic(r) for r in full]


# ------------------------------------------------------------------------------------------------- resume


def test_resume_refuses_a_changed_config_and_writes_nothing(policy_dir, tmp_path):
    base = [*overrides(policy_dir, tmp_path), "run.steps=1", "eval.every=0"]
    train(load_config(None, base))
    stored = (tmp_path / "config.yaml").read_text()
    for change, field in (("run.seed=1", "run.seed"), ("algo=grpo", "algo"), ("sfpo.alpha=0.5", "sfpo.alpha")):
        with pytest.raises(ResumeError, match=rf"\['{field}'\]"):
            train(load_config(None, [*base, change]), resume=True)
    assert (tmp_path / "config.yaml").read_text() == stored


def test_failed_resume_does_not_rewrite_the_config(policy_dir, tmp_path):
    base = [*overrides(policy_dir, tmp_path), "run.steps=1", "eval.every=0"]
    train(load_config(None, base))
    stored = (tmp_path / "config.yaml").read_text()
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("not json\n" + metrics.read_text())
    with pytest.raises(ValueError, match="not a JSON object"):
        train(load_config(None, [*base[:-2], "run.steps=2", "eval.every=0"]), resume=True)
    assert (tmp_path / "config.yaml").read_text() == stored


def test_fresh_run_refuses_a_folder_with_metrics_but_no_checkpoints(policy_dir, tmp_path):
    cfg = load_config(None, [*overrides(policy_dir, tmp_path), "run.steps=1", "eval.every=0", "run.checkpoint_every=0"])
    train(cfg)
    before = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(ResumeError, match=r"metrics\.jsonl.*--resume"):
        train(cfg)
    assert (tmp_path / "metrics.jsonl").read_text() == before


def test_resume_skips_a_corrupt_latest_checkpoint_and_a_half_written_one(policy_dir, tmp_path):
    base = [*overrides(policy_dir, tmp_path / "run"), "eval.every=0"]
    full = train(load_config(None, [*overrides(policy_dir, tmp_path / "full"), "eval.every=0",
                                    "run.steps=3"])).history
    train(load_config(None, [*base, "run.steps=2"]))
    ckpt = tmp_path / "run" / "checkpoints"
    # Step 2's array data truncated (a disk that filled up), and a save killed mid-write left a temporary folder.
    data = [f for f in (ckpt / "2").rglob("*") if f.is_file() and f.stat().st_size > 1000 and "d" in f.parts]
    for f in data:
        f.write_bytes(f.read_bytes()[:100])
    shutil.copytree(ckpt / "1", ckpt / "3.orbax-checkpoint-tmp")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = train(load_config(None, [*base, "run.steps=3"]), resume=True).history
    messages = " ".join(str(w.message) for w in caught)
    assert "checkpoint step 2" in messages and "from step 1" in messages, messages
    assert [deterministic(r) for r in resumed] == [deterministic(r) for r in full]


# ------------------------------------------------------------------------------------------------- metrics


def test_every_logged_learner_metric_is_invariant_to_the_micro_batch_split(policy_dir):
    model = from_pretrained(policy_dir, dtype=jnp.float32)
    graphdef, params = nnx.split(model)
    rng = np.random.default_rng(0)
    n, p, t = 8, 5, 6
    lengths = rng.integers(1, t + 1, n)  # unequal completion lengths: micro-batches hold different token counts
    completion = np.arange(t)[None] < lengths[:, None]
    tokens = rng.integers(3, 20, (n, p + t)).astype(np.int32)
    batch = learner.Batch(tokens, np.concatenate([np.ones((n, p), bool), completion], 1), completion,
                          np.where(completion, rng.normal(-2.0, 0.3, (n, t)), 0).astype(np.float32),
                          rng.normal(size=n).astype(np.float32),
                          np.where(completion, rng.normal(-2.0, 0.3, (n, t)), 0).astype(np.float32),
                          np.zeros((n, 0), np.float32))
    cfg = load_config(None, ["rollout.prompts_per_step=2", "rollout.num_minibatches=1", "loss.kl_coef=0.1"])
    tx = cfg.optimizer()
    out = {}
    for num_micro in (1, 2, 4):
        update = learner.make_update_fn(graphdef, tx, cfg.loss, num_micro)
        p_copy = jax.tree.map(jnp.copy, params)
        _, _, metrics = update(p_copy, tx.init(p_copy), batch)
        out[num_micro] = jax.device_get(metrics)
    assert {"loss", "pg_loss", "kl", "entropy", "clip_frac", "ratio_min", "ratio_max", "grad_norm"} <= set(out[1])
    for num_micro in (2, 4):
        for k, v in out[1].items():
            np.testing.assert_allclose(out[num_micro][k], v, rtol=2e-5, atol=1e-6, err_msg=f"{k}, {num_micro}")


class SlowGrading(ArithmeticTask):
    """Arithmetic whose grader reports two items cut off by its deadline on every call."""

    def reward_metrics(self):
        return {"timed_out": 2.0}


def test_the_reward_functions_own_counts_are_logged(policy_dir, tmp_path):
    cfg = load_config(None, [*overrides(policy_dir, tmp_path), "run.steps=1", "eval.every=0", "run.checkpoint_every=0"])
    (row,) = train(cfg, task=SlowGrading(num_train=64, num_eval=4)).history
    assert row["reward/timed_out"] == 2.0
