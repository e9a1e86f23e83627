"""Faults the trainer must survive without silent damage: non-finite calls inside an SFPO cycle, the entropy switch
through the whole loop, resume after it fired, changed configs, corrupt checkpoints and run folders that a fresh
run would overwrite; and metrics that do not depend on how a mini-batch is split into micro-batches."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sfpo_jax.models import ModelConfig, from_pretrained
from sfpo_jax.optim import SFPOState, calls_per_batch
from sfpo_jax.tasks import ArithmeticTask
from sfpo_jax.train import (
    Checkpointer,
    Preempted,
    ResumeError,
    RunDir,
    deterministic,
    learner,
    load_config,
    read_metrics,
    train,
)
from sfpo_jax.train.checks import RewardError, check_prompts_fit, checked_rewards, sets_within
from sfpo_jax.train.cli import run_main
from sfpo_jax.train.preemption import on_signals
from tests.test_train import ROOT, overrides


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


def poison_advantages(monkeypatch, rows, at) -> None:
    """The learner batch of every scoring call ``c`` (counted from 1) with ``at(c)`` gets NaN advantages in ``rows``:
    non-finite updates from inside the step (a non-finite *reward* is refused before it gets there)."""
    make_batch, calls = learner.make_batch, [0]

    def poisoned(rollout, advantages):
        calls[0] += 1
        if at(calls[0]):
            advantages = np.array(advantages)
            advantages[rows] = np.nan
        return make_batch(rollout, advantages)

    monkeypatch.setattr(learner, "make_batch", poisoned)


def test_a_poisoned_minibatch_keeps_every_batch_whole(policy_dir, tmp_path, monkeypatch):
    cfg = load_config(None, [*overrides(policy_dir, tmp_path), "run.steps=3", "eval.every=0",
                             "run.checkpoint_every=0", "run.max_nonfinite_in_a_row=2"])
    # At step 2 the last group (group_size=4), which sits in the last of the 2 mini-batches.
    poison_advantages(monkeypatch, slice(-4, None), at=lambda call: call == 2)
    result = train(cfg, task=ArithmeticTask(num_train=64, num_eval=4))
    rows = result.history
    assert [r["optimizer_calls"] for r in rows] == [6, 6, 6]  # (K=2 + 1) x M=2 for every batch
    assert [r["nonfinite_total"] for r in rows] == [0, 3, 3]  # mini-batch 1 of each of the 3 epochs of step 2
    assert all(r["sfpo_active"] for r in rows)
    assert int(sfpo_state(result.opt_state).count) == 0
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(nnx.state(result.model, nnx.Param)))


class NaNReward(ArithmeticTask):
    """Arithmetic whose reward is NaN for two completions of every batch."""

    def reward(self, completions, answers):
        r = np.array(super().reward(completions, answers), np.float32)
        r[[3, 5]] = np.nan
        return r


def test_a_non_finite_reward_stops_the_run_naming_the_reward_and_rows(policy_dir, tmp_path):
    cfg = load_config(None, [*overrides(policy_dir, tmp_path), "run.steps=2", "eval.every=0"])
    with pytest.raises(RewardError, match=r"NaNReward\.reward returned 2 non-finite reward\(s\) of 16 \(row: value "
                                          r"3: nan, 5: nan"):
        train(cfg, task=NaNReward(num_train=64, num_eval=4))
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


@pytest.mark.parametrize("returned", [136, 120])
def test_a_reward_of_the_wrong_shape_is_refused_naming_the_function(returned):
    def reward(completions, answers):
        return np.zeros(returned)

    with pytest.raises(RewardError, match=rf"reward function .*reward returned shape \({returned},\) for 128 "
                                          r"completions; it must return one reward per completion, shape \(128,\)"):
        checked_rewards(reward, ["x"] * 128, ["1"] * 128)
    with pytest.raises(RewardError, match="is not an array of numbers"):
        checked_rewards(lambda c, a: ["good"] * len(c), ["x"] * 2, ["1"] * 2)


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


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum-norm"])
def test_every_logged_learner_metric_is_invariant_to_the_micro_batch_split(policy_dir, agg):
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
    cfg = load_config(None, ["rollout.prompts_per_step=2", "rollout.num_minibatches=1", "loss.kl_coef=0.1",
                             f"loss.agg={agg}"])
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


# ---------------------------------------------------------------------------------------------- run folder


def test_a_second_run_on_a_locked_folder_is_refused_at_once_naming_the_holder(tmp_path):
    cfg = load_config(None, [f"run.out={tmp_path}"])
    with RunDir(cfg, resume=False):
        # A save of the first run in flight: the second must not open (and clean) the checkpoints.
        (tmp_path / "checkpoints" / "1.orbax-checkpoint-tmp").mkdir(parents=True)
        holder = f"pid {os.getpid()} on {socket.gethostname()}"
        for resume in (False, True):
            with pytest.raises(ResumeError, match=f"is in use by another run \\({holder}\\)"):
                RunDir(cfg, resume=resume)
        assert (tmp_path / "checkpoints" / "1.orbax-checkpoint-tmp").exists()
    RunDir(cfg, resume=True).close()  # released with the first run


def test_a_folder_without_checkpoint_or_metric_rows_counts_as_fresh(tmp_path):
    """What a run that failed before its first step leaves: config.yaml and an empty metrics.jsonl."""
    load_config(None, [f"run.out={tmp_path}"])
    (tmp_path / "config.yaml").write_text("algo: grpo\n")
    (tmp_path / "metrics.jsonl").write_text("")
    fixed = load_config(None, [f"run.out={tmp_path}", "sfpo.alpha=0.5"])
    for resume in (False, True):  # neither a fresh run nor a resume with the fixed config is refused
        RunDir(fixed, resume=resume).close()


def test_resuming_metrics_without_a_checkpoint_keeps_the_rows_and_says_so(tmp_path):
    cfg = load_config(None, [f"run.out={tmp_path}"])
    rows = '{"step": 1, "reward/mean": 0.5}\n{"step": 2, "reward/mean": 0.6}\n'
    (tmp_path / "metrics.jsonl").write_text(rows)
    with pytest.raises(ResumeError, match="already holds a run"):
        RunDir(cfg, resume=False)
    with pytest.warns(UserWarning, match=r"2 metric rows but no checkpoint.*step 0.*metrics\.jsonl\.no-checkpoint"):
        run = RunDir(cfg, resume=True)
    run.close()
    assert (tmp_path / "metrics.jsonl.no-checkpoint").read_text() == rows


def test_a_checkpoint_that_cannot_fit_the_disk_fails_before_writing(tmp_path, monkeypatch):
    state = {"w": jnp.ones(1000)}
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state, {"step": 1})
        usage = shutil.disk_usage(tmp_path)
        monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1000))
        with pytest.raises(OSError, match=r"No space left on device: a checkpoint needs about 1\.0 MiB") as err:
            ckpt.save(2, state, {"step": 2})
        assert err.value.errno == errno.ENOSPC
        assert ckpt.all_steps() == [1] and sorted(p.name for p in tmp_path.iterdir()) == ["1"]


# ---------------------------------------------------------------------------------------------- signals


def test_the_first_signal_sets_the_flag_and_the_second_stops_at_once():
    with on_signals() as flag:
        assert flag.agreed() is None
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: no KeyboardInterrupt, the flag
        assert flag.agreed() == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # pressed again: the default behaviour
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert "SIGTERM after step 3" in str(Preempted(signal.SIGTERM, 3, Path("runs/x")))


def test_sigterm_saves_at_the_step_boundary_and_resume_is_exact(policy_dir, tmp_path):
    """A real SIGTERM once the first step's metrics row is written, with no checkpoint due for 100 steps."""
    steps = 4
    cli = [sys.executable, str(ROOT / "experiments" / "train.py"), "--algo", "sfpo"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}

    def command(out, *extra):
        return [*cli, "--out", str(out), *overrides(policy_dir, out)[:-1], "eval.every=0", "run.checkpoint_every=100",
                *extra]

    full = subprocess.run(command(tmp_path / "full", f"run.steps={steps}"), env=env, capture_output=True, timeout=600)
    assert full.returncode == 0, full.stderr.decode()[-2000:]
    stopped = tmp_path / "stopped"
    proc = subprocess.Popen(command(stopped, "run.steps=100"), env=env, stderr=subprocess.PIPE)
    while not ((stopped / "metrics.jsonl").exists() and (stopped / "metrics.jsonl").read_text().strip()):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 128 + signal.SIGTERM, stderr.decode()[-2000:]
    (at,) = Checkpointer(stopped / "checkpoints").all_steps()
    assert f"stopped by SIGTERM after step {at}: checkpoint saved in {stopped}" in stderr.decode()
    assert at < steps and [r["step"] for r in read_metrics(stopped / "metrics.jsonl")] == list(range(1, at + 1))
    resumed = subprocess.run(command(stopped, f"run.steps={steps}", "--resume"), env=env, capture_output=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    a, b = (read_metrics(tmp_path / d / "metrics.jsonl") for d in ("full", "stopped"))
    assert len(a) == steps and [deterministic(r) for r in b] == [deterministic(r) for r in a]


# ----------------------------------------------------------------------------------- errors the user can fix


def test_user_errors_are_one_line_and_exit_2_with_the_traceback_on_request(tmp_path, monkeypatch, capsys):
    def failing(e):
        def main():
            raise e
        return main

    disk = OSError(errno.ENOSPC, "No space left on device: a checkpoint needs about 3.0 MiB", "/runs/x")
    for e, line in ((ResumeError("cannot resume runs/x: ..."), "error: cannot resume runs/x: ..."),
                    (ValueError("bad\nsecond line"), "error: ValueError: bad"),
                    (disk, "error: the disk is full: No space left on device: a checkpoint needs about 3.0 MiB "
                           "(/runs/x); free space and run again with --resume")):
        assert run_main(failing(e)) == 2
        err = capsys.readouterr().err
        assert err.startswith(line) and err.count("\n") == 1 and "SFPO_TRACEBACK=1" in err
    assert run_main(failing(Preempted(signal.SIGINT, 2, tmp_path))) == 128 + signal.SIGINT
    assert "stopped by SIGINT after step 2" in capsys.readouterr().err
    assert run_main(failing(KeyboardInterrupt())) == 128 + signal.SIGINT
    assert capsys.readouterr().err.startswith("interrupted: the current step was not saved")
    with pytest.raises(RuntimeError):  # not the user's to fix: the traceback
        run_main(failing(RuntimeError("a bug")))
    monkeypatch.setenv("SFPO_TRACEBACK", "1")
    with pytest.raises(ResumeError):
        run_main(failing(ResumeError("x")))


def test_the_cli_refuses_a_locked_folder_in_one_line(tmp_path):
    """Through experiments/train.py, orbax opened: no shutdown noise after the refusal."""
    cfg = load_config(None, [f"run.out={tmp_path}"])
    with RunDir(cfg, resume=False):
        out = subprocess.run([sys.executable, str(ROOT / "experiments" / "train.py"), "--out", str(tmp_path),
                              "--resume"], env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True,
                             timeout=300)
    assert out.returncode == 2
    assert out.stderr.decode().strip().splitlines() == [
        f"error: {tmp_path} is in use by another run (pid {os.getpid()} on {socket.gethostname()}): wait for it to "
        "end, or use another --out  [SFPO_TRACEBACK=1 shows the traceback]"]


# ------------------------------------------------------------------------------------------- setup checks


class FakeTokenizer:
    def __init__(self, n, eos=2, pad=0):
        self.n, self.eos_token_id, self.pad_token_id = n, eos, pad

    def __len__(self):
        return self.n


def test_prompts_are_checked_against_the_model_at_setup():
    model = ModelConfig(architecture="qwen2", vocab_size=100, hidden_size=8, intermediate_size=8, num_layers=1,
                        num_heads=1, num_kv_heads=1, head_dim=8, max_position_embeddings=16)
    ok = {"train": [[1, 2, 3]], "math500": [[4] * 10]}
    check_prompts_fit(ok, FakeTokenizer(100), model, max_new_tokens=6)
    with pytest.raises(ValueError, match=r"tokenizer \(120 tokens\) gives ids beyond the model's vocabulary \(100\): "
                                         r"math500 prompt 1 holds id 105"):
        check_prompts_fit({**ok, "math500": [[4], [105]]}, FakeTokenizer(120), model, max_new_tokens=6)
    with pytest.raises(ValueError, match=r"eos_token_id=100 is beyond the model's vocabulary \(100\)"):
        check_prompts_fit(ok, FakeTokenizer(101, eos=100), model, max_new_tokens=6)
    sets, prompts, dropped = sets_within({"a": ["xx", "xxxx"], "b": ["x"]}, lambda ps: [[1] * len(p) for p in ps], 3)
    assert (sets, prompts, dropped) == ({"a": ["xx"], "b": ["x"]}, {"a": [[1, 1]], "b": [[1]]}, {"a": 1, "b": 0})
    with pytest.raises(ValueError, match=r"evaluation set .a.: no problem fits rollout\.max_prompt_length=1"):
        sets_within({"a": ["xx"]}, lambda ps: [[1] * len(p) for p in ps], 1)
    with pytest.raises(ValueError, match=r"longest prompt \(10 tokens\) plus rollout.max_new_tokens=7 does not fit "
                                         r"the model's max_position_embeddings=16"):
        check_prompts_fit(ok, FakeTokenizer(100), model, max_new_tokens=7)


class Ragged(SlowGrading):
    """Arithmetic whose problems with odd answers start with "0+": prompts of 6 and 8 tokens."""

    def render(self, problem):
        return ("0+" if int(problem.answer) % 2 else "") + super().render(problem)


def test_prompts_over_the_limit_are_counted_printed_logged_and_eval_is_filtered_alike(policy_dir, tmp_path,
                                                                                      capfd):
    task = Ragged(num_train=64, num_eval=8)
    odd = lambda ps: sum(int(p.answer) % 2 for p in ps)
    cfg = load_config(None, [*overrides(policy_dir, tmp_path), "run.steps=1", "eval.every=1", "run.checkpoint_every=0",
                             "rollout.max_prompt_length=6"])
    (row,) = train(cfg, task=task).history
    assert row["data/train_prompts_dropped"] == odd(task.train_problems()) > 0
    assert row["data/eval_prompts_dropped"] == odd(task.eval_problems())
    said = capfd.readouterr().err
    assert f"rollout.max_prompt_length=6 drops {odd(task.train_problems())} of 64 training prompts" in said
    assert f"and evaluation prompts: {task.name} {odd(task.eval_problems())}" in said
