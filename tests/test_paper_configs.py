"""The paper configs (experiments/configs/, one per model): their settings are the official run scripts', and each
one runs end to end as a user runs it, ``experiments/train.py --config <paper config> ... --export DIR``, with the
model, the data and the lengths replaced by tiny ones on the command line, and, for a 2-core CPU, the batch (8 prompts
instead of 256) and the mesh (one device instead of all 8 forced CPU devices, which made the update 6x slower).

The settings and where they come from: docs/fidelity.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from sfpo_jax.data import PROMPTS, SPECS, load
from sfpo_jax.train.config import load_config
from sfpo_jax.train.policy import task_from_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "experiments" / "configs"
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "datasets"

# stem: (hub id, architecture, max prompt / response length, alpha, micro-batch size) as in the official
# train-scripts/*_sfpo.sh (micro-batch: the official loss unit, see the configs' comments).
PAPER = {
    "qwen2.5-math-1.5b": ("Qwen/Qwen2.5-Math-1.5B", "qwen2", 1536, 2560, 0.8, 32),
    "qwen2.5-math-7b": ("Qwen/Qwen2.5-Math-7B", "qwen2", 1536, 2560, 0.8, 32),
    "deepseek-r1-distill-qwen-1.5b": ("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "qwen2", 2048, 6144, 0.8, 8),
    "deepseek-r1-distill-qwen-7b": ("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "qwen2", 2048, 6144, 0.8, 8),
    "qwen3-4b-base": ("Qwen/Qwen3-4B-Base", "qwen3", 2048, 6144, 0.9, 8),
}
TRAIN = ["dapo_math_17k", "math"]
EVAL = ["math500", "aimo_amc", "aime24", "matharena_aime25", "minerva_math", "olympiadbench"]


CPU_CONFIGS = {"arith-tiny", "column-addition", "smollm2-math-cpu"}  # the CPU settings (README, BENCHMARKS W4-W6)


def test_the_paper_configs_are_these():
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml") if p.stem not in CPU_CONFIGS) == sorted(PAPER)
    for name in CPU_CONFIGS:  # and the CPU ones exist and are valid configs
        assert load_config(CONFIGS / f"{name}.yaml").run.steps > 0


@pytest.mark.parametrize("stem", sorted(PAPER))
def test_paper_config_has_the_official_settings(stem):
    hub, _, prompt_len, response_len, alpha, micro = PAPER[stem]
    cfg = load_config(CONFIGS / f"{stem}.yaml")
    m = cfg.model
    assert (cfg.algo, m.path, m.param_dtype, m.compute_dtype, m.remat) == ("sfpo", hub, "float32", "bfloat16", True)
    t = cfg.task.kwargs
    assert (cfg.task.name, t["train"], t["train_mix"], t["eval"]) == ("math", TRAIN, "concat", EVAL)
    assert (t["reward"], t["prompt"], t["tokenizer"]) == ("paper", "sfpo", hub)
    repos = [SPECS[name].repo_id for name in (*TRAIN, "aimo_amc", "matharena_aime25")]
    assert repos == ["haizhongzheng/DAPO-Math-17K-cleaned", "xDAN2099/lighteval-MATH", "AI-MO/aimo-validation-amc",
                     "MathArena/aime_2025"]
    s = cfg.sfpo
    assert (s.num_fast_steps, s.alpha, s.entropy_window, s.entropy_threshold, s.slow_correction) == (
        3, alpha, 30, 1.0, True)
    o = cfg.optim
    assert (o.learning_rate, o.b1, o.b2, o.weight_decay, o.max_grad_norm) == (1e-6, 0.9, 0.999, 0.01, 1.0)
    r = cfg.rollout
    assert (r.prompts_per_step, r.group_size, r.num_minibatches) == (256, 8, 4)
    assert (r.max_prompt_length, r.max_new_tokens, r.temperature, r.top_p, r.top_k) == (
        prompt_len, response_len, 1.0, 1.0, 0)
    assert (r.micro_batch_size, r.recompute_old_logprobs) == (micro, True)
    L = cfg.loss
    assert (L.clip_low, L.clip_high, L.dual_clip, L.agg) == (0.2, 0.2, None, "micro-batch-token-mean")
    assert (L.entropy_coef, L.kl_coef, L.scale_adv_by_std) == (0.001, 0.0, True)
    e = cfg.eval
    assert (e.every, e.num_samples, e.temperature, e.top_p, e.max_problems, e.before_train) == (
        5, 4, 1.0, 0.7, None, True)
    assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor) == (1, -1, 1)
    assert (cfg.run.steps, cfg.run.out) == (400, f"runs/{stem}")
    assert load_config(CONFIGS / f"{stem}.yaml", ["algo=grpo"]).algo == "grpo"  # the baseline: --algo grpo


def test_paper_task_on_the_fixtures():
    """The paper configs' task (the same in all of them): DAPO-Math-17k then MATH train, six evaluation sets, the
    official prompt and the 1 / 0.1 / 0 reward."""
    kwargs = [{**load_config(CONFIGS / f"{stem}.yaml").task.kwargs, "tokenizer": None} for stem in PAPER]
    assert all(k == kwargs[0] for k in kwargs)
    overrides = [f"task.kwargs.data_dir={FIXTURES}", "task.kwargs.tokenizer=null"]
    task = task_from_config(load_config(CONFIGS / "qwen2.5-math-1.5b.yaml", overrides))
    expected = [a for name in TRAIN for a in load(name, data_dir=FIXTURES)["answer"]]
    assert [p.answer for p in task.train_problems()] == expected
    sets = task.eval_sets()
    assert list(sets) == EVAL and all(sets.values())
    problem = sets["aimo_amc"][0]
    assert task.render(problem) == PROMPTS["sfpo"].replace("{problem}", problem.prompt)
    rewards = task.reward([f"so \\boxed{{{problem.answer}}}", "\\boxed{-1}", "no box"], [problem.answer] * 3)
    np.testing.assert_allclose(rewards, [1.0, 0.1, 0.0])


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    """A tiny random Qwen2 and Qwen3 checkpoint, each with a byte-level tokenizer and a ChatML chat template."""
    pytest.importorskip("torch")
    from tests.hf_checkpoints import make_checkpoint

    root = tmp_path_factory.mktemp("paper-ckpt")
    return {arch: make_checkpoint(root, arch, max_position_embeddings=1024) for arch in ("qwen2", "qwen3")}


# Two configs cover both loss units (32 and 8 sequences), both architectures and the largest sampler chunk; the
# others differ from them only in numbers that the overrides replace (~20 s each on a 2-core CPU).
_SLOW = pytest.mark.slow
E2E = [pytest.param(stem, marks=() if stem in ("qwen2.5-math-1.5b", "qwen3-4b-base") else _SLOW) for stem in PAPER]


@pytest.mark.parametrize("stem", E2E)
def test_paper_config_runs_end_to_end(stem, tiny_checkpoints, tmp_path):
    """``experiments/train.py --config <paper config>`` with the model, data and lengths replaced: two steps, an
    evaluation before the first one, and the trained policy exported with float32 weights."""
    sys.path.insert(0, str(ROOT / "experiments"))
    import train as train_script

    ckpt, out, export = tiny_checkpoints[PAPER[stem][1]], tmp_path / "run", tmp_path / "export"
    argv = ["--config", str(CONFIGS / f"{stem}.yaml"), "--steps", "2", "--out", str(out), "--export", str(export),
            f"model.path={ckpt}", f"task.kwargs.tokenizer={ckpt}", f"task.kwargs.data_dir={FIXTURES}",
            "rollout.max_prompt_length=512", "rollout.max_new_tokens=4",  # the official prompt is ~400 characters
            "rollout.prompts_per_step=8", "mesh.fsdp=1"]
    assert train_script.main(argv) == 0

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 0 and "eval/average/accuracy" in rows[0]
    assert all(f"eval/{name}/accuracy" in rows[0] for name in EVAL)
    train_rows = [r for r in rows if r["step"] > 0 and "reward/mean" in r]
    assert [r["step"] for r in train_rows] == [1, 2]
    assert all(r["optimizer_calls"] == 16 for r in train_rows)  # K + 1 = 4 epochs of M = 4 mini-batches
    assert rows[-1]["step"] == 2 and "eval/average/accuracy" in rows[-1]  # and the final evaluation

    from safetensors.numpy import load_file

    weights = {k: v for f in sorted(export.glob("*.safetensors")) for k, v in load_file(f).items()}
    assert weights and all(v.dtype == np.float32 for v in weights.values())
    hf_config = json.loads((export / "config.json").read_text())
    assert hf_config.get("dtype", hf_config.get("torch_dtype")) == "float32"
    assert (export / "tokenizer.json").is_file()
