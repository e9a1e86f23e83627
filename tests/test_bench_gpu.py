"""experiments/bench_gpu.py: the `--tiny` run end to end on CPU (every figure, positive, floors unknown off the
peak table), the device table, and the floors' arithmetic at the standard sizes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import bench_gpu  # noqa: E402

TINY_FIGURES = {
    "w1/new_tokens_per_s", "w1/decode_step_ms", "w1/first_token_ms",
    *(f"w2/{a}_{f}" for a in ("grpo", "sfpo") for f in ("step_s", "sample_s", "update_call_ms")),
    "w3/adamw_call_ms", "w3/sfpo_call_ms", "w3/sfpo_over_adamw",
    *(f"model/{p}_{r}x{t}_ms" for p in ("forward", "forward_backward") for r, t in bench_gpu.TINY.shapes),
    *(f"w7/{side}_{f}" for side in ("slots", "static") for f in ("new_tokens_per_s", "real_row_steps")),
    "w7/slots_over_static",
}
KNOWN_FLOORS = {"w7/slots_real_row_steps", "w7/static_real_row_steps"}  # 1: every decode row-step a real token


def test_tiny_run_on_cpu_writes_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    # Toy programs: XLA's CPU backend optimisation is not worth its compile time here (halves the test's time).
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
                        " --xla_llvm_disable_expensive_passes=true").strip()
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "bench_gpu.py"), "--tiny", "--repeats", "3",
                           "--out", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())

    assert result["machine"]["platform"] == "cpu" and result["machine"]["jax"] and result["machine"]["date"]
    assert result["complete"] is True
    assert result["machine"]["load_average"] >= 0 and result["machine"]["load_average_after"] >= 0
    assert "--tiny" in result["command"] and result["settings"]["compute_dtype"] == "bfloat16"
    assert result["peaks"] == {"hbm_gbps": "unknown", "peak_tflops": "unknown",
                               "source": f"{result['machine']['device_kind']!r} not in the table"}
    assert set(result["figures"]) == TINY_FIGURES
    for name, f in result["figures"].items():
        assert math.isfinite(f["value"]) and f["value"] > 0, name
        # (a decode-step sample is a difference of two timed calls: on a loaded machine one may come out ≤ 0)
        assert len(f["samples"]) == 3 and all(math.isfinite(x) for x in f["samples"]), name
        if name in KNOWN_FLOORS:
            assert f["floor"] == 1.0 and 0 < f["fraction_of_floor"] <= 1, name
        else:
            assert f["floor"] == "unknown" and f["fraction_of_floor"] == "unknown", name
    assert result["figures"]["w2/sfpo_step_s"]["floor_basis"].startswith("generate floor + 4 update-call")
    assert all(t > 0 for t in result["elapsed_s"].values())
    # The printed table: one row per figure, and where the JSON went.
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| w") or line.startswith("| model/")]
    assert len(rows) == len(TINY_FIGURES) and f"wrote {out}" in proc.stdout


def test_a_run_cut_short_keeps_the_workloads_it_finished(tmp_path, monkeypatch):
    """The JSON is rewritten after each workload: a failure in W2 leaves W1's figures, marked incomplete."""
    out = tmp_path / "bench.json"

    def fail(*args, **kwargs):
        raise RuntimeError("W2 broke")

    monkeypatch.setattr(bench_gpu, "run_w2", fail)
    with pytest.raises(RuntimeError, match="W2 broke"):
        bench_gpu.main(["--tiny", "--repeats", "3", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["complete"] is False and set(result["elapsed_s"]) == {"w1"}
    assert set(result["figures"]) == {"w1/new_tokens_per_s", "w1/decode_step_ms", "w1/first_token_ms"}
    assert result["settings"]["workloads"]["w3"]["state_bytes"] == {}


def test_a_subset_of_workloads(tmp_path):
    out = tmp_path / "bench.json"
    result = bench_gpu.main(["--tiny", "--repeats", "3", "--workloads", "w3", "--out", str(out)])
    assert result["complete"] is True and set(result["elapsed_s"]) == {"w3", "total"}
    assert {name.split("/")[0] for name in result["figures"]} == {"w3"}
    with pytest.raises(SystemExit):
        bench_gpu.main(["--tiny", "--workloads", "w3,w9"])
    with pytest.raises(SystemExit):  # cuDNN's flash attention has no float32 kernel
        bench_gpu.main(["--tiny", "--attention", "cudnn", "--dtype", "float32"])


@pytest.mark.parametrize(("kind", "platform", "dtype", "expected"), [
    ("NVIDIA H100 80GB HBM3", "gpu", "bfloat16", (3350.0, 989.0)),
    ("NVIDIA H100 PCIe", "gpu", "bfloat16", (2000.0, 756.0)),
    ("NVIDIA H200", "gpu", "bfloat16", (4800.0, 989.0)),
    ("NVIDIA H200", "gpu", "float32", (4800.0, 494.5)),
    ("NVIDIA A100-SXM4-80GB", "gpu", "bfloat16", (2039.0, 312.0)),
    ("NVIDIA A100-SXM4-40GB", "gpu", "bfloat16", (1555.0, 312.0)),
    ("NVIDIA A100 80GB PCIe", "gpu", "bfloat16", (1935.0, 312.0)),
    ("NVIDIA L4", "gpu", "bfloat16", (300.0, 121.0)),
    ("NVIDIA L40S", "gpu", "bfloat16", (864.0, 362.0)),
    ("NVIDIA A10", "gpu", "bfloat16", (600.0, 125.0)),
    ("NVIDIA A10G", "gpu", "bfloat16", (None, None)),  # not the A10: unknown rather than wrong
    ("cpu", "cpu", "bfloat16", (None, None)),
    ("TPU v5 lite", "tpu", "bfloat16", (None, None)),
])
def test_peak_table(kind, platform, dtype, expected):
    peaks = bench_gpu.lookup_peaks(kind, platform, dtype)
    assert (peaks.hbm_gbps, peaks.peak_tflops) == expected


def test_overrides_replace_the_table():
    peaks = bench_gpu.lookup_peaks("cpu", "cpu", "float32", hbm_gbps=25.0, peak_tflops=0.4)
    assert (peaks.hbm_gbps, peaks.peak_tflops) == (25.0, 0.4) and "override" in peaks.source
    peaks = bench_gpu.lookup_peaks("NVIDIA H100 80GB HBM3", "gpu", "bfloat16", peak_tflops=500.0)
    assert (peaks.hbm_gbps, peaks.peak_tflops) == (3350.0, 500.0)


def test_floors_of_the_standard_workloads_on_an_h100():
    """The floors' arithmetic on the bench model (built abstractly) with made-up timings."""
    import jax.numpy as jnp
    from flax import nnx

    from sfpo_jax.models import CausalLM, ModelConfig

    sizes = bench_gpu.STANDARD
    cfg = ModelConfig("qwen2", attention_bias=True, **sizes.arch)
    model = nnx.eval_shape(lambda: CausalLM(cfg, param_dtype=jnp.float32, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    cost = bench_gpu.Cost(model, "bfloat16")
    assert 38e6 < cost.params < 40e6 and 0.99 < cost.matmul / cost.params <= 1  # the README's ~39M, tied
    peaks = bench_gpu.lookup_peaks("NVIDIA H100 80GB HBM3", "gpu", "bfloat16")
    raw = {
        "w1": {"full": [0.30, 0.31, 0.29], "one": [0.01] * 3},
        "w2": {a: [dict(step=1.0, calls=c, sample=0.3, score=0.01, update=0.05 * c)] * 3
               for a, c in (("grpo", 1), ("sfpo", 4))},
        "w3": {"adamw": {"cycles": [[1e-3] * 4] * 3}, "sfpo": {"cycles": [[1.1e-3] * 4] * 3}},
        "model": {f"{r}x{t}": {"forward": [0.01] * 3, "forward_backward": [0.03] * 3} for r, t in sizes.shapes},
    }
    figs = bench_gpu.figures(raw, cost, sizes, peaks)
    for name, f in figs.items():
        assert f["floor"] > 0 and 0 < f["fraction_of_floor"] < 2, name
    # A bf16 decode step at batch 16 reads the 78 MB of params plus ~8 MB of cache: ~26 µs at 3.35 TB/s.
    kv = 2 * 16 * (64 + 64) * 8 * 2 * 64 * 2  # rows · mean length · layers · (k, v) · kv heads · head dim · bytes
    assert figs["w1/decode_step_ms"]["floor"] == pytest.approx(1e3 * (2 * cost.params + kv) / 3.35e12, rel=0.01)
    assert figs["w1/new_tokens_per_s"]["value"] == pytest.approx(16 * 128 / 0.30)
    # A forward+backward of 16 × 192 tokens: 6 · 38.9M · 3072 + attention ≈ 0.73 TFLOP → ~0.74 ms at 989 TFLOP/s.
    assert 0.7 < figs["model/forward_backward_16x192_ms"]["floor"] < 0.8
    assert figs["w3/sfpo_over_adamw"]["floor"] == pytest.approx(1 + 2 / 28)
    assert figs["w2/sfpo_step_s"]["floor"] > figs["w2/grpo_step_s"]["floor"] > figs["w2/grpo_sample_s"]["floor"]
