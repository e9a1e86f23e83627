"""The experiment scripts: compare.py end to end on a tiny random policy, ablate.py's variants and summary,
bench_sampler.py's profile breakdown and host profile, precision_check.py and attention_check.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from sfpo_jax.train import load_config, read_metrics

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import ablate  # noqa: E402
import attention_check  # noqa: E402
import bench_gpu  # noqa: E402
import bench_sampler  # noqa: E402
import compare  # noqa: E402
import eval_checkpoints  # noqa: E402
import precision_check  # noqa: E402
import study  # noqa: E402

ARITH_TINY = ROOT / "experiments" / "configs" / "arith-tiny.yaml"


def test_each_seed_of_a_comparison_seeds_its_own_warm_up(monkeypatch, tmp_path):
    """With the warm-up policy, seed s trains its own warm-up (model.warmup.seed=s), each prepared once before the
    parallel runs; --shared-warmup and a checkpoint policy keep one."""
    cfg = load_config(str(ARITH_TINY))
    assert cfg.model.path == "warmup"
    args = compare.argparse.Namespace(shared_warmup=False)
    assert compare.warmup_seed(cfg, 3, args) == ["model.warmup.seed=3"]
    assert compare.warmup_seed(cfg, 3, compare.argparse.Namespace(shared_warmup=True)) == []
    assert compare.warmup_seed(load_config(str(ARITH_TINY), ["model.path=/x"]), 3, args) == []
    prepared = []
    monkeypatch.setattr("sfpo_jax.train.policy.prepare_policy", lambda c: prepared.append(c.model.warmup))
    jobs = {tmp_path / a / f"seed{s}": ["--algo", a, "--seed", str(s), f"model.warmup.seed={s}"]
            for s in (0, 1) for a in ("grpo", "sfpo")}
    monkeypatch.setattr(compare, "finished_steps", lambda d: cfg.run.steps)  # every run already finished
    compare.run_all(jobs, cfg, config=str(ARITH_TINY), out=tmp_path)
    assert sorted(w["seed"] for w in prepared) == [0, 1]


def test_compare_runs_both_algorithms_and_writes_the_summary(policy_dir, tmp_path, capsys):
    out = tmp_path / "cmp"
    tiny = [f"model.path={policy_dir}", "task.kwargs={num_train: 64, num_eval: 8}", "rollout.prompts_per_step=4",
            "rollout.group_size=4", "rollout.max_new_tokens=4", "run.steps=2", "eval.every=1", "eval.num_samples=2",
            "run.checkpoint_every=2"]
    assert compare.main(["--config", str(ARITH_TINY), "--seeds", "0", "--out", str(out), *tiny]) == 0
    summary = json.loads((out / "summary.json").read_text())
    for key in ("grpo_best_accuracy", "grpo_rollouts_to_best", "sfpo_rollouts_to_target", "rollouts_ratio",
                "wallclock_ratio"):
        assert key in summary, key
    for algo, calls in (("grpo", 2), ("sfpo", 8)):  # arith-tiny: 2 mini-batches, K = 3
        rows = read_metrics(out / algo / "seed0" / "metrics.jsonl")
        assert [r["step"] for r in rows] == [1, 2] and all(r["optimizer_calls"] == calls for r in rows)
    assert (out / "accuracy_vs_rollouts.png").stat().st_size > 0 and (out / "summary.md").is_file()
    assert "GRPO" in capsys.readouterr().out
    # A finished comparison is reused, not rerun: the metrics stay byte-identical.
    before = (out / "sfpo" / "seed0" / "metrics.jsonl").read_bytes()
    assert compare.main(["--config", str(ARITH_TINY), "--seeds", "0", "--out", str(out), *tiny]) == 0
    assert (out / "sfpo" / "seed0" / "metrics.jsonl").read_bytes() == before

    # eval_checkpoints.py: the initial policy and both last checkpoints on the same eval problems, paired.
    assert eval_checkpoints.main([str(out), "--samples", "3", "--out", str(tmp_path / "eval.json")]) == 0
    evals = json.loads((tmp_path / "eval.json").read_text())["policies"]
    assert list(evals) == ["initial", "grpo", "sfpo"] and [e["step"] for e in evals.values()] == [0, 2, 2]
    base = evals["initial"]["correct_per_problem"]
    assert len(base) == 8 and all(0 <= c <= 3 for c in base)
    for algo in ("grpo", "sfpo"):
        e = evals[algo]
        assert e["accuracy"] == pytest.approx(sum(e["correct_per_problem"]) / 24)
        assert e["gain"] == pytest.approx(e["accuracy"] - evals["initial"]["accuracy"])
        low, high = e["gain_ci95_over_problems"]
        assert low <= e["gain"] <= high


def test_study_sweeps_picks_rates_on_training_reward_and_reuses_runs(policy_dir, tmp_path, capsys, monkeypatch):
    """The study's stages but the ablation (ablate.py has its own tests) on a tiny policy: the sweep's training
    reward picks the rates, the paper and tuned stages keep the sweep's runs, the compute-matched stage runs GRPO with
    K+1 epochs against the paper stage's SFPO, the batch stage doubles the batch."""
    out = tmp_path / "study"
    tiny = [f"model.path={policy_dir}", "task.kwargs={num_train: 64, num_eval: 8}", "rollout.prompts_per_step=4",
            "rollout.group_size=2", "rollout.num_minibatches=1", "rollout.max_new_tokens=3", "run.steps=2",
            "eval.every=1", "eval.num_samples=1", "run.checkpoint_every=0"]
    launched = []
    real_launch = study.compare.launch
    monkeypatch.setattr(study.compare, "launch", lambda cmd, *a: launched.append(cmd) or real_launch(cmd, *a))
    common = ["--config", str(ARITH_TINY), "--out", str(out), "--lrs", "1e-4", "1e-3", "--sweep-seeds", "0",
              "--seeds", "0"]
    assert study.main([*common, "--stages", "paper", "tuned", "epochs", "batch", "--workers", "2", *tiny]) == 0
    result = json.loads((out / "study.json").read_text())
    rewards, best = result["sweep"]["train_reward"], result["sweep"]["best_rate"]
    for algo in ("grpo", "sfpo"):
        assert best[algo] == float(max(rewards[algo], key=lambda lr: rewards[algo][lr]))  # ties: the lower rate
        assert result["tuned"]["summary"]["rates"][algo] == best[algo]
    assert result["sweep"]["protocol_rate"] == result["paper"]["rate"] == best["grpo"]
    # The sweep's 2 rates x 2 algorithms, the compute-matched GRPO (its SFPO is the paper stage's), the batch stage's 2.
    assert len(launched) == 4 + 1 + 2
    assert "grpo-epochs" in launched[4] and result["epochs"]["summary"]["baseline"] == "grpo-epochs"
    assert all("rollout.prompts_per_step=8" in cmd for cmd in launched[5:])
    for stage in ("paper", "tuned", "epochs", "batch2x"):
        assert (out / stage / "grpo" / "seed0" / "metrics.jsonl").is_file()
    assert (out / "lr_sweep.png").stat().st_size > 0
    assert "Learning-rate sweep" in (out / "study.md").read_text() and "best rate" in capsys.readouterr().out

    # The ablation stage hands ablate.py the paper's grid, the seeds and every override (its runs: ablate's tests).
    def fake_ablate(argv):
        args = study.ablate.parse_args(argv)
        assert (args.ks, args.alphas, args.seeds) == ([1, 3, 5, 7], [0.2, 0.5, 0.8, 1.0], [0, 1])
        assert args.overrides == [*tiny, f"optim.learning_rate={best['grpo']}"]
        (out / "ablate").mkdir(exist_ok=True)
        (out / "ablate" / "ablation.json").write_text("{}")
        (out / "ablate" / "ablation.md").write_text("| variant |")
        return 0

    monkeypatch.setattr(study.ablate, "main", fake_ablate)
    assert study.main([*common, "--stages", "ablate", "--ablation-seeds", "0", "1", "--workers", "2", *tiny]) == 0
    assert "Ablations at the protocol rate" in (out / "study.md").read_text()
    for name, algo in (("grpo", "grpo"), ("K3-a0.8", "sfpo"), ("no-entropy-switch", "sfpo")):  # equal settings
        swept = out / "sweep" / f"lr{best['grpo']:g}" / algo / "seed0" / "metrics.jsonl"
        assert (out / "ablate" / name / "seed0" / "metrics.jsonl").read_bytes() == swept.read_bytes()


def test_compare_rejects_a_bad_override(tmp_path, capsys):
    assert compare.main(["--config", str(ARITH_TINY), "--out", str(tmp_path), "sfpo.alpha=2"]) == 2
    assert "sfpo.alpha" in capsys.readouterr().err


def test_ablation_variants_are_valid_configs_with_the_right_transform():
    named = ablate.variants([1, 7], [0.2, 1.0], 0.8)
    assert list(named) == ["grpo", "K1-a0.2", "K1-a1", "K7-a0.2", "K7-a1", "no-slow-correction", "entropy-switch",
                           "no-entropy-switch"]
    cfgs = {name: load_config(ARITH_TINY, extra) for name, extra in named.items()}
    assert cfgs["grpo"].algo == "grpo"
    assert (cfgs["K7-a0.2"].sfpo.num_fast_steps, cfgs["K7-a0.2"].sfpo.alpha) == (7, 0.2)
    assert cfgs["no-slow-correction"].sfpo.slow_correction is False
    assert cfgs["no-entropy-switch"].sfpo.entropy_window is None
    assert (cfgs["entropy-switch"].sfpo.entropy_window, cfgs["entropy-switch"].sfpo.entropy_threshold) == (30, 1.0)


def test_ablation_summary_of_a_variant():
    def rows(accs, switch_at=None):
        return [{"step": 5 * (i + 1), "rollouts": 640 * (i + 1), "time/total": float(i), "eval/x/accuracy": a,
                 "sfpo_active": switch_at is None or 5 * (i + 1) < switch_at} for i, a in enumerate(accs)]

    r = ablate.summarize_variant({0: rows([0.1, 0.3, 0.2]), 1: rows([0.1, 0.1, 0.4], switch_at=10)},
                                 "eval/x/accuracy", target=0.2)
    assert r["best"] == pytest.approx(0.3) and r["final"] == pytest.approx(0.3)
    assert r["rollouts_to_target"] == 1280 and r["switched_to_grpo_at_step"] == {"0": None, "1": 10}
    grpo_rows = [{**row, "sfpo_active": False} for row in rows([0.1, 0.2])]
    assert ablate.switch_step(grpo_rows) is None
    assert ablate.summarize_variant({0: rows([0.1, 0.1])}, "eval/x/accuracy", target=0.5)["rollouts_to_target"] is None



def test_bench_sampler_breakdown_attributes_decode_time_to_source_ops(tmp_path):
    import jax
    import numpy as np
    from flax import nnx

    from sfpo_jax.models import CausalLM, ModelConfig
    from sfpo_jax.sampling import Sampler, SamplingConfig

    vocab = 300
    config = ModelConfig("qwen2", vocab_size=vocab, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=8, attention_bias=True, tie_word_embeddings=True,
                         max_position_embeddings=64)
    sampler = Sampler(CausalLM(config, rngs=nnx.Rngs(0)), prompt_buckets=(6,))
    prompts = np.random.default_rng(0).integers(1, vocab, (8, 6)).astype(np.int32)
    sampler.generate(prompts.tolist(), SamplingConfig(max_new_tokens=4), jax.random.key(0))
    rows = bench_sampler.decode_breakdown(sampler, prompts, str(tmp_path / "trace"), new_tokens=4, top=50)
    assert rows and all(ms >= 0 and n > 0 for ms, n, _ in rows)
    assert [ms for ms, _, _ in rows] == sorted((ms for ms, _, _ in rows), reverse=True)
    labels = [label for _, _, label in rows]
    # Each layer's projections and the tied LM head (table-first: [vocab, batch]) are named by shape and source.
    # Products are named by their einsum spec (`Dense` writes its own, `abc,cd->abd` for [B, 1, E] @ [E, M]).
    assert "f32[8,48]{1,0} abc,cd->abd" in labels  # gate and up, 2 per layer
    assert dict((label, n) for _, n, label in rows)["f32[8,48]{1,0} abc,cd->abd"] == 4
    assert any(label.startswith(f"f32[{vocab},8]") for label in labels)


def test_bench_sampler_host_profile_shows_where_generate_calls_go():
    import jax
    from flax import nnx

    from sfpo_jax.models import CausalLM, ModelConfig
    from sfpo_jax.sampling import Sampler, SamplingConfig

    config = ModelConfig("qwen2", vocab_size=64, hidden_size=16, intermediate_size=24, num_layers=1, num_heads=2,
                         num_kv_heads=1, head_dim=8, attention_bias=True, max_position_embeddings=32)
    sampler = Sampler(CausalLM(config, rngs=nnx.Rngs(0)), prompt_buckets=(4,))
    seeds = []

    def run(seed):
        seeds.append(seed)
        sampler.generate([[1, 2, 3, 4]], SamplingConfig(max_new_tokens=2), jax.random.key(seed))

    text = bench_sampler.host_profile(run, calls=3, top=10)
    assert seeds == [1000, 1001, 1002]
    assert "cumulative" in text and "ncalls" in text
    assert "sampler.py" in text and "(generate)" in text  # the library's own frames, by cumulative time


def test_bench_fastest_picks_each_side_at_its_fastest_precision():
    speeds = {"ours float32": 1.0, "ours bfloat16": 2.0, "tunix float32": 3.0, "tunix bfloat16": 2.5}
    assert bench_sampler.fastest(speeds) == {"ours": "ours bfloat16", "tunix": "tunix float32"}
    assert bench_sampler.fastest({"ours float32": 1.0}) == {"ours": "ours float32"}


def test_bench_sampler_shared_prefill_times_both_ways():
    from flax import nnx

    from sfpo_jax.models import CausalLM, ModelConfig

    config = ModelConfig("qwen2", vocab_size=64, hidden_size=16, intermediate_size=24, num_layers=1, num_heads=2,
                         num_kv_heads=1, head_dim=8, attention_bias=True, max_position_embeddings=32)
    (row,) = bench_sampler.shared_prefill(CausalLM(config, rngs=nnx.Rngs(0)), shapes=((6, 2, 4, 3),), repeats=2)
    assert row["prompt_len"] == 6 and row["prompts"] == 2 and row["samples"] == 4 and row["new_tokens"] == 3
    assert row["shared_s"] > 0 and row["per_row_s"] > 0


def test_bench_sampler_prefill_memory_compares_the_two_prefills():
    gb = bench_sampler.prefill_memory(batch=2, prompt_len=64, new_tokens=512)
    # The sampler's prefill attends over its 63 prompt columns, the full-length one over all 576 slots.
    assert 0 < gb["sampler_prefill_gb"] < gb["full_length_prefill_gb"] / 2


def test_precision_check_compares_bf16_compute_with_float32(tmp_path, capsys):
    """The bf16-vs-float32 report on a small random checkpoint: every figure present and in range, the JSON
    written; bf16 really differs from float32 (nonzero log-prob differences) and stays close (gradient cosine
    > 0.99: measured 0.999 on the bench model and SmolLM2, see BENCHMARKS)."""
    from tests.hf_checkpoints import make_checkpoint

    path = make_checkpoint(tmp_path, "qwen2", tokenizer=False, std=0.5)
    out = tmp_path / "precision.json"
    result = precision_check.main(["--model", str(path), "--prompts", "4", "--new-tokens", "8", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert result["rows"] == 4 and result["new_tokens"] == 8
    assert 0 <= result["greedy_rows_identical"] <= 1 and 0 <= result["greedy_mean_identical_prefix"] <= 8
    assert 0 < result["learner_logprob_absdiff_mean"] <= result["learner_logprob_absdiff_max"] < 1
    assert 0 < result["sampled_logprob_absdiff_max"] < 1
    assert 0 <= result["loss_rel_diff"] < 0.05
    assert 0 < result["grad_rel_l2_diff"] < 0.2 and result["grad_cosine"] > 0.99
    assert "grad_cosine" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        precision_check.main(["--model", str(path), "--new-tokens", "0"])


def test_attention_check_compares_the_two_attention_paths(tmp_path, monkeypatch):
    """attention_check.py on the tiny model, with JAX's unfused reference in place of the cuDNN kernel (no GPU here):
    both gradients finite, the fused path's loss and gradient within bf16 rounding of the einsum path's, timings."""
    from sfpo_jax.models import transformer

    kernel = transformer.attend_fused
    monkeypatch.setattr(transformer, "attend_fused",
                        lambda q, k, v, mask, dtype: kernel(q, k, v, mask, dtype, implementation="xla"))
    monkeypatch.setattr(attention_check, "STANDARD", bench_gpu.TINY)
    out = tmp_path / "attention.json"
    result = attention_check.main(["--shapes", "2x32", "--repeats", "3", "--out", str(out)])
    row = json.loads(out.read_text())["shapes"]["2x32"]
    assert row == result["shapes"]["2x32"]
    assert row["einsum_grad_finite"] and row["cudnn_grad_finite"]
    assert row["loss_rel_diff"] < 1e-3 and row["grad_rel_l2_diff"] < 0.03 and row["grad_cosine"] > 0.999
    assert all(row[f"{path}_{p}_ms"] > 0 for path in ("einsum", "cudnn") for p in ("forward", "forward_backward"))
