"""W1 — sampling throughput (../shared/bench/README.md): new tokens/s of `sfpo_jax.sampling.Sampler` against
transformers `generate` and google-tunix's `Sampler`, all in the same run on the same weights.

The bench model (Qwen2 architecture, every matrix ~ N(0, 0.05²), hidden 512, inter 1408, 8 layers, 8 heads,
2 kv heads, vocab 32000, tied, float32) is written once with PyTorch transformers `save_pretrained` into
`--model-dir` and loaded by each peer from those files. Workload: 16 prompts × 64 random ids, 128 new tokens,
temperature 1, no top-k/top-p, no early stop (no EOS). Figures: median over `--repeats` timed calls after one
warm-up call each, the sides interleaved repeat by repeat (so that load from other processes hits all alike),
plus our prefill / per-decode-step split.

    python experiments/bench_sampler.py [--repeats 5] [--peers transformers,tunix] [--dtypes float32,bfloat16]
                                        [--profile /tmp/trace] [--breakdown] [--host-profile]
                                        [--prefill-memory | --shared-prefill]

Every side runs in every one of `--dtypes` (ours: float32 master weights computing in that dtype, as the trainer
samples; the peers: the whole model in it), and the headline ratio is each side at its fastest precision.

`--prefill-memory` prints, instead of W1, the compiled prefill's temporary memory for a long generation (8 prompts
of 1024 tokens, 8192 new tokens, a small model): the sampler's prefill into a prompt-length cache, extended
afterwards, against prefilling straight into the full-length cache.

`--shared-prefill` times, instead of W1, our `generate` of prompts sampled several times each (W2's 2 prompts × 8
samples, and longer prompts) two ways on one sampler, interleaved: each prompt prefilled once and its cache copied to
its samples (what `num_samples` does), and every prompt repeated, each row prefilled (what the sampler did before).

`--host-profile` runs our `generate` (in the last of `--dtypes`) `--repeats` more times under `cProfile` and prints
the Python functions with the most cumulative time: where a call's time goes outside the compiled programs (the
host-side fixed cost of a call, and the waits on the device, which show as the functions that block).

`--breakdown` profiles one decode call and prints where the step goes: the time of every executed XLA op, summed by
the source operation it came from (the HLO `op_name`) and output shape. The profiler adds a fixed cost per op, so
the shares are what to read, not the absolute times.

tunix is optional (not a dependency of this project): it is skipped with a note when not importable.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

BATCH, PROMPT_LEN, NEW_TOKENS = 16, 64, 128
ARCH = dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
            num_key_value_heads=2, tie_word_embeddings=True, rope_theta=10000.0, rms_norm_eps=1e-6,
            max_position_embeddings=2048)


def make_checkpoint(path: Path) -> Path:
    """Writes the bench model with transformers (once; reused when `path/config.json` exists)."""
    if (path / "config.json").exists():
        return path
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**ARCH, dtype="float32"))
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.05)
    model.save_pretrained(path)
    return path


def make_ours(path: Path, prompts: np.ndarray, dtype: str = "float32"):
    """Our `Sampler` on the bench checkpoint, float32 masters computing in `dtype` (as the trainer samples);
    returns `run(seed)` and the sampler (for the prefill/decode split)."""
    import jax
    import jax.numpy as jnp

    from sfpo_jax.models import from_pretrained
    from sfpo_jax.sampling import Sampler, SamplingConfig

    model = from_pretrained(path, dtype=jnp.float32, compute_dtype=jnp.dtype(dtype))
    sampler = Sampler(model, prompt_buckets=(PROMPT_LEN,))
    config = SamplingConfig(max_new_tokens=NEW_TOKENS, temperature=1.0)
    lists = prompts.tolist()

    def run(i):
        rollout = sampler.generate(lists, config, jax.random.key(i))
        assert rollout.mask.all()  # no early stop: every row generated NEW_TOKENS tokens

    return run, sampler


def program_args(sampler, prompts: np.ndarray, new_tokens: int = NEW_TOKENS):
    """`(prog, prefill_args, decode_args)`: `sampler`'s one compiled program pair and the arguments that
    `generate(prompts, new_tokens at temperature 1, no early stop)` passes each (recorded from one such call), so
    that they can be timed or lowered apart. `sampler` holds exactly that pair already."""
    import jax

    from sfpo_jax.sampling import SamplingConfig

    ((shape, prog),) = sampler._programs.items()
    args = {}

    def recording(name, fn):
        def call(*a):
            args[name] = a
            return fn(*a)
        return call

    sampler._programs[shape] = prog._replace(prefill=recording("prefill", prog.prefill),
                                             decode=recording("decode", prog.decode))
    try:
        sampler.generate(prompts.tolist(), SamplingConfig(max_new_tokens=new_tokens), jax.random.key(0))
    finally:
        sampler._programs[shape] = prog
    return prog, args["prefill"], args["decode"]


def split_ours(sampler, prompts: np.ndarray, repeats: int) -> dict:
    """Where our time goes: the compiled prefill and decode programs timed apart, on the inputs `generate` feeds
    them (the first 63 prompt columns, then the last column and 128 decode steps)."""
    import jax

    prog, prefill_args, decode_args = program_args(sampler, prompts)
    prefill_t, decode_t = [], []
    for i in range(repeats):
        t0 = time.perf_counter()
        bank = jax.block_until_ready(prog.prefill(*prefill_args))
        t1 = time.perf_counter()
        jax.block_until_ready(prog.decode(decode_args[0], bank, *decode_args[2:-1], jax.random.key(i)))
        decode_t.append(time.perf_counter() - t1)
        prefill_t.append(t1 - t0)
    return dict(prefill_s=statistics.median(prefill_t), decode_step_ms=1e3 * statistics.median(decode_t) / NEW_TOKENS)


def decode_breakdown(sampler, prompts: np.ndarray, trace_dir: str, new_tokens: int = NEW_TOKENS,
                     top: int = 14) -> list[tuple[float, float, str]]:
    """`(ms per step, ops per step, "shape source-op")` rows, largest first, from a `jax.profiler` trace of one
    decode call joined with the compiled program's HLO (fusion name → output shape and `op_name`).

    `sampler` has generated once from `prompts [B, P]` (all of one length, its prompt bucket) with `new_tokens` new
    tokens and no early stop, so it holds exactly that one program pair."""
    import collections
    import gzip
    import re

    import jax

    prog, _, decode_args = program_args(sampler, prompts, new_tokens)
    hlo = prog.decode.lower(*decode_args).compile().as_text()
    source = {}
    for name, shape, op in re.findall(r'^\s*%([\w.\-]+) = (\S+) \w[\w-]*\(.*?op_name="([^"]*)"', hlo, re.M):
        parts = op.split("/")  # an einsum's products are named after its spec: "…/bkgd,bkds->bkgs/dot_general"
        source[name] = f"{shape} {parts[-2] if parts[-1] == 'dot_general' and '->' in parts[-2] else parts[-1]}"
    jax.block_until_ready(decode_args)
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        jax.block_until_ready(prog.decode(*decode_args))
    (trace,) = Path(trace_dir).rglob("*.trace.json.gz")
    total, count = collections.Counter(), collections.Counter()
    for event in json.load(gzip.open(trace))["traceEvents"]:
        name = event.get("name", "")
        if event.get("ph") == "X" and name in source:  # executed HLO ops only (not runtime or Python frames)
            row = re.sub(r"\.\d+\b", "", source[name])
            total[row] += event["dur"] / 1e3 / new_tokens
            count[row] += 1
    return [(ms, count[row] / new_tokens, row) for row, ms in total.most_common(top)]


def host_profile(run, calls: int, top: int = 25) -> str:
    """The `top` functions by cumulative time over `calls` calls of `run(seed)` under `cProfile`, as pstats prints
    them (cProfile's own overhead inflates Python-heavy functions: read the shares, not the absolute times)."""
    import cProfile
    import io
    import pstats

    profile = cProfile.Profile()
    for i in range(calls):
        profile.runcall(run, 1000 + i)
    out = io.StringIO()
    pstats.Stats(profile, stream=out).strip_dirs().sort_stats("cumulative").print_stats(top)
    return out.getvalue()


def prefill_memory(batch: int = 8, prompt_len: int = 1024, new_tokens: int = 8192) -> dict[str, float]:
    """GB of temporaries (`compiled.memory_analysis()`) of the sampler's prefill program against a prefill straight
    into a cache of all `prompt_len + new_tokens` slots, on a small random model (2 layers, hidden 256, 8 heads)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from sfpo_jax.models import CausalLM, ModelConfig
    from sfpo_jax.sampling import Sampler

    config = ModelConfig("qwen2", vocab_size=1000, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=8,
                         num_kv_heads=2, head_dim=32, attention_bias=True, max_position_embeddings=16384)
    model = CausalLM(config, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    slots = prompt_len + new_tokens
    ids, mask = jnp.ones((batch, prompt_len - 1), jnp.int32), jnp.ones((batch, prompt_len - 1), bool)

    def full_length(state, ids, mask):
        m = nnx.merge(graphdef, state)
        return m(ids, attention_mask=mask, cache=m.init_cache(batch, slots))[1]

    from sfpo_jax.sampling.sampler import _Shape

    sampler = Sampler(model, prompt_buckets=(prompt_len,))
    # The program pair `generate` would build; only its prefill is compiled here, which the decode spec does not enter.
    prog = sampler._program(_Shape(slots=batch, n_out=batch, bank_rows=batch, prompt_length=prompt_len,
                                   cache_length=slots, spec=None, refills=0, direct=True))
    gb = lambda f: f.lower(state, ids, mask).compile().memory_analysis().temp_size_in_bytes / 1e9
    return {"sampler_prefill_gb": gb(prog.prefill), "full_length_prefill_gb": gb(jax.jit(full_length))}


# (prompt length, prompts, samples per prompt, new tokens): W2's rollout, then longer prompts.
SHARED_PREFILL_SHAPES = ((64, 2, 8, 128), (256, 4, 4, 64), (512, 2, 8, 128))


def shared_prefill(model, shapes=SHARED_PREFILL_SHAPES, repeats: int = 7) -> list[dict]:
    """Seconds per `generate` of `model` (medians of `repeats` interleaved calls, after one warm-up each) of random
    prompts sampled several times each, for each `(prompt length, prompts, samples, new tokens)` of `shapes`, two
    ways on the same sampler: `shared_s`, one call with `num_samples` (each prompt prefilled once, its cache copied
    to its samples), and `per_row_s`, every prompt repeated with one sample each (every row prefilled, as the
    sampler did before). Both give the same rollout."""
    import jax

    from sfpo_jax.sampling import Sampler, SamplingConfig

    out = []
    for prompt_len, num_prompts, num_samples, new_tokens in shapes:
        rng = np.random.default_rng(0)
        prompts = rng.integers(0, model.config.vocab_size, (num_prompts, prompt_len)).tolist()
        sampler = Sampler(model, prompt_buckets=(prompt_len,))
        repeated = [p for p in prompts for _ in range(num_samples)]
        calls = {"shared": (prompts, SamplingConfig(max_new_tokens=new_tokens, num_samples=num_samples)),
                 "per_row": (repeated, SamplingConfig(max_new_tokens=new_tokens))}
        times = {name: [] for name in calls}
        for i in range(repeats + 1):
            for name, (batch, config) in calls.items():
                start = time.perf_counter()
                sampler.generate(batch, config, jax.random.key(i))
                if i:  # call 0 is the warm-up
                    times[name].append(time.perf_counter() - start)
        out.append(dict(prompt_len=prompt_len, prompts=num_prompts, samples=num_samples, new_tokens=new_tokens,
                        **{f"{name}_s": statistics.median(t) for name, t in times.items()}))
    return out


def make_transformers(path: Path, prompts: np.ndarray, dtype: str = "float32"):
    """transformers `generate` in a worker process (see `torch_peer.py`: PyTorch slows down beside JAX), the model
    in `dtype`; the returned `run` waits for the worker and returns the seconds the call took there."""
    from torch_peer import TorchPeer

    peer = TorchPeer(path, dtype)
    return lambda i: peer.time("generate", prompts, i, NEW_TOKENS)


class _IdTokenizer:
    """tunix's sampler takes strings: prompts are space-separated ids, no BOS."""

    def encode(self, text, **kwargs):
        return [int(t) for t in text.split()]

    def decode(self, ids, **kwargs):
        return " ".join(map(str, ids))

    def bos_id(self):
        return None

    def eos_id(self):
        return -1  # never generated: no early stop

    def pad_id(self):
        return 0


def make_tunix(path: Path, prompts: np.ndarray, dtype: str = "float32"):
    """tunix's `Sampler` with its params (and so its compute and KV cache) in `dtype`."""
    import jax.numpy as jnp
    from tunix.generate import sampler as tunix_sampler
    from tunix.models.qwen2 import model as tunix_model
    from tunix.models.qwen2 import params as tunix_params

    config = tunix_model.ModelConfig(
        num_layers=ARCH["num_hidden_layers"], vocab_size=ARCH["vocab_size"], embed_dim=ARCH["hidden_size"],
        hidden_dim=ARCH["intermediate_size"], num_heads=ARCH["num_attention_heads"],
        head_dim=ARCH["hidden_size"] // ARCH["num_attention_heads"], num_kv_heads=ARCH["num_key_value_heads"],
        rope_theta=int(ARCH["rope_theta"]), norm_eps=ARCH["rms_norm_eps"], use_tied_embedding=True)
    model = tunix_params.create_model_from_safe_tensors(str(path), config, dtype=jnp.dtype(dtype))
    cache = tunix_sampler.CacheConfig(cache_size=PROMPT_LEN + NEW_TOKENS, num_layers=config.num_layers,
                                      num_kv_heads=config.num_kv_heads, head_dim=config.head_dim)
    sampler = tunix_sampler.Sampler(model, _IdTokenizer(), cache)
    texts = [" ".join(map(str, p)) for p in prompts.tolist()]

    def run(i):
        # top_p=1.0 selects tunix's sampling mode, which then skips the sort (plain `jax.random.categorical`).
        out = sampler(texts, max_generation_steps=NEW_TOKENS, max_prompt_length=PROMPT_LEN, temperature=1.0,
                      top_p=1.0, eos_tokens=[-1], seed=i)
        assert len(out.text) == BATCH

    return run


def fastest(speeds: dict[str, float]) -> dict[str, str]:
    """`{side: name}`, each side's fastest entry of `speeds` (higher is faster), keyed `"<side> <precision>"`: the
    side at its fastest precision, what the benchmarks' headline ratios compare."""
    best = {}
    for name, speed in speeds.items():
        side = name.split()[0]
        if side not in best or speed > speeds[best[side]]:
            best[side] = name
    return best


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for pkg in ("jax", "flax", "torch", "transformers", "google-tunix"):
        try:
            out.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            pass
    return ", ".join(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--peers", default="transformers,tunix", help="comma-separated; empty for ours only")
    parser.add_argument("--dtypes", default="float32,bfloat16",
                        help="compute dtypes, each side in each (ours: float32 masters computing in it)")
    parser.add_argument("--model-dir", type=Path,
                        default=Path(os.environ.get("SFPO_BENCH_DIR", tempfile.gettempdir())) / "sfpo_bench_qwen2")
    parser.add_argument("--profile", default=None, help="write a jax.profiler trace of one of our calls here")
    parser.add_argument("--breakdown", action="store_true", help="print where our decode step goes (profiled)")
    parser.add_argument("--host-profile", action="store_true",
                        help="print where our generate call's host time goes (cProfile)")
    parser.add_argument("--prefill-memory", action="store_true",
                        help="instead of W1, the prefill's temporary memory for a long generation")
    parser.add_argument("--shared-prefill", action="store_true",
                        help="instead of W1, generate with samples sharing their prompt's prefill vs prefilling every "
                             "row (ours only, in the last of --dtypes)")
    args = parser.parse_args()
    if args.prefill_memory:
        print(json.dumps(prefill_memory()))
        return

    path = make_checkpoint(args.model_dir)
    dtypes = args.dtypes.split(",")
    if args.shared_prefill:
        print(f"{os.cpu_count()} cores, {dtypes[-1]}, median of {args.repeats} interleaved calls; "
              f"load average {os.getloadavg()[0]:.1f} before")
        import jax.numpy as jnp

        from sfpo_jax.models import from_pretrained

        model = from_pretrained(path, dtype=jnp.float32, compute_dtype=jnp.dtype(dtypes[-1]))
        for row in shared_prefill(model, repeats=args.repeats):
            print(f"  {row['prompts']} prompts of {row['prompt_len']} tokens × {row['samples']} samples, "
                  f"{row['new_tokens']} new tokens: shared prefill {row['shared_s']:.3f} s, every row prefilled "
                  f"{row['per_row_s']:.3f} s ({row['per_row_s'] / row['shared_s']:.2f}×)")
        print(f"load average {os.getloadavg()[0]:.1f} after")
        return
    prompts = np.random.default_rng(0).integers(0, ARCH["vocab_size"], (BATCH, PROMPT_LEN)).astype(np.int32)
    new_tokens = BATCH * NEW_TOKENS
    load_before = os.getloadavg()
    runs, skipped, samplers = {}, {}, {}
    for dtype in dtypes:
        runs[f"ours {dtype}"], samplers[dtype] = make_ours(path, prompts, dtype)
    makers = {"transformers": make_transformers, "tunix": make_tunix}
    for peer in filter(None, args.peers.split(",")):
        for dtype in dtypes:
            try:
                runs[f"{peer} {dtype}"] = makers[peer](path, prompts, dtype)
            except ImportError as e:
                skipped[peer] = f"not importable: {e}"

    times = {name: [] for name in runs}
    for run in runs.values():
        run(0)  # warm-up: compilation, allocator, caches
    for i in range(1, args.repeats + 1):
        for name, run in runs.items():  # interleaved, so that load from other processes hits every side alike
            start = time.perf_counter()
            inner = run(i)  # the PyTorch worker reports its own time (no pipe or process overhead)
            times[name].append(inner if inner is not None else time.perf_counter() - start)
    splits = {dtype: split_ours(sampler, prompts, args.repeats) for dtype, sampler in samplers.items()}
    if args.profile:
        import jax

        with jax.profiler.trace(args.profile):
            runs[f"ours {dtypes[-1]}"](args.repeats + 1)

    print(f"W1: {BATCH} prompts × {PROMPT_LEN} ids, {NEW_TOKENS} new tokens, temperature 1, no early stop; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; {versions()}; median of "
          f"{args.repeats} interleaved repeats; load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} "
          f"after")
    rate = {name: new_tokens / statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        print(f"  {name:22s} {rate[name]:8.1f} new tokens/s  (median {statistics.median(t):.3f} s)")
    best = fastest(rate)
    for side, name in best.items():
        if side != "ours":
            print(f"  ours at its best ({best['ours']}) / {side} at its best ({name}) = "
                  f"{rate[best['ours']] / rate[name]:.2f}×")
    for name, why in skipped.items():
        print(f"  {name:22s} skipped ({why})")
    for dtype, split in splits.items():
        print(f"  ours {dtype}: prefill {1e3 * split['prefill_s']:.1f} ms, "
              f"decode {split['decode_step_ms']:.2f} ms/step")
    sampler = samplers[dtypes[-1]]
    if args.breakdown:
        rows = decode_breakdown(sampler, prompts, tempfile.mkdtemp(prefix="sfpo_w1_trace_"))
        profiled = sum(ms for ms, _, _ in rows)
        print(f"  decode step under the profiler, top {len(rows)} (output shape, source op), "
              f"{profiled:.2f} ms/step in these:")
        for ms, n, row in rows:
            print(f"    {ms:6.3f} ms/step {100 * ms / profiled:5.1f}%  {n:4.1f} ops/step  {row}")
    if args.host_profile:
        print(f"  ours {dtypes[-1]}: {args.repeats} generate calls under cProfile, by cumulative time:")
        print(host_profile(runs[f"ours {dtypes[-1]}"], args.repeats))
    print(json.dumps(dict(times=times, tokens_per_s=rate, best=best, split=splits, skipped=skipped)))


if __name__ == "__main__":
    from sfpo_jax.host import configure_malloc

    configure_malloc()  # malloc keeps freed memory (SFPO_RETAIN_MEMORY=0: off); SFPO_HUGE_PAGES=1: huge pages
    main()
