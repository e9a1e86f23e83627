"""Model forward and forward+backward throughput: our jitted CausalLM against PyTorch transformers.

The bench model of ../shared/bench/README.md (Qwen2 architecture: hidden 512, intermediate 1408, 8 layers, 8 heads,
2 key-value heads, vocab 32000, tied embeddings, rope θ 10000, RMSNorm ε 1e-6, every matrix ~ N(0, 0.05²),
float32; ~39M parameters) is written once into `--model-dir` by `bench_sampler.make_checkpoint` (PyTorch
`save_pretrained`; the same files as the other benchmarks) and loaded by both sides from there. For each
batch × length shape, each repeat times, interleaved: our forward (logits), PyTorch's forward (`inference_mode`), our
forward+backward (next-token cross entropy from the library's `grpo.token_logprobs_and_entropy`, gradients of every
parameter) and PyTorch's (PyTorch in a worker process, see `torch_peer.py`). Inputs are random ids with no padding.
Reported: median tokens/s per side in each of `--dtypes` (ours: float32 masters computing in it; PyTorch: the whole
model in it, its fastest CPU mode in bfloat16) and the ratio of each side at its fastest. `--attention einsum,cudnn`
also times ours with the learner's attention as one cuDNN flash-attention kernel (`CausalLM(attention="cudnn")`:
NVIDIA GPUs, bfloat16 compute only) as a variant of our side.

  python experiments/bench_model.py --shapes 4x128 8x256 4x512 --repeats 5 [--dtypes float32,bfloat16]
                                    [--attention einsum,cudnn]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from bench_sampler import ARCH, make_checkpoint  # the one bench model, shared by the benchmarks
from flax import nnx

from sfpo_jax.models import from_pretrained
from sfpo_jax.rl import grpo


def _cross_entropy(logits, ids):
    # The library's log-probs (what the learner differentiates), not a hand-rolled log-softmax.
    logp, _ = grpo.token_logprobs_and_entropy(logits[:, :-1], ids[:, 1:], jnp.ones(ids[:, 1:].shape, bool))
    return -logp.mean()


@jax.jit
def _jax_forward(graphdef, state, ids):
    return nnx.merge(graphdef, state)(ids)


@jax.jit
def _jax_grad(graphdef, state, ids):
    return jax.value_and_grad(lambda s: _cross_entropy(nnx.merge(graphdef, s)(ids), ids))(state)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["4x128", "8x256", "4x512"], help="batch x length")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--dtypes", default="float32,bfloat16", help="compute dtypes, each side in each")
    parser.add_argument("--attention", default="einsum",
                        help="our learner attention paths (CausalLM's `attention`; cudnn: NVIDIA GPUs, bfloat16 only)")
    parser.add_argument("--model-dir", type=Path,
                        default=Path(os.environ.get("SFPO_BENCH_DIR", tempfile.gettempdir())) / "sfpo_bench_qwen2")
    args = parser.parse_args()

    import torch
    import transformers
    from torch_peer import TorchPeer

    dtypes, attentions = args.dtypes.split(","), args.attention.split(",")
    if "cudnn" in attentions and "bfloat16" not in dtypes:
        parser.error("--attention cudnn needs bfloat16 in --dtypes (cuDNN's flash attention has no float32 kernel)")
    path = make_checkpoint(args.model_dir)
    # Ours: float32 master weights computing in each dtype (what the trainer differentiates), in each attention path
    # that the dtype has; a variant is named by its dtype, and by its attention path too when that is not einsum.
    models = {dt if a == "einsum" else f"{dt} {a}": nnx.split(from_pretrained(
        path, dtype=jnp.float32, compute_dtype=jnp.dtype(dt), attention=a))
        for dt in dtypes for a in attentions if a == "einsum" or dt == "bfloat16"}
    # PyTorch runs in a worker process per dtype: beside an initialised JAX backend it slows down severalfold.
    peers = {dt: TorchPeer(path, dt) for dt in dtypes}

    n_params = sum(x.size for x in jax.tree.leaves(next(iter(models.values()))[1]))
    peer = peers[dtypes[0]]
    print(f"machine: {platform.machine()} {os.cpu_count()} cpus; jax {jax.__version__} ({jax.devices()[0].platform}),"
          f" torch {torch.__version__} ({peer.device}, {peer.threads} threads, own process), transformers "
          f"{transformers.__version__}; {n_params / 1e6:.1f}M params; dtypes {dtypes} (ours: float32 masters "
          f"computing in it; PyTorch: the model in it); load average {os.getloadavg()[0]:.1f}")

    sides = [("ours", variant) for variant in models] + [("torch", dt) for dt in dtypes]
    print("| batch × length | pass | " + " | ".join(f"{side} {dt}" for side, dt in sides)
          + " | ours best / PyTorch best |")
    print("| --- | --- | " + " | ".join("---" for _ in sides) + " | --- |")
    rng = np.random.default_rng(0)
    for shape in args.shapes:
        batch, length = (int(x) for x in shape.split("x"))
        ids_np = rng.integers(0, ARCH["vocab_size"], (batch, length)).astype(np.int32)
        ids = jnp.asarray(ids_np)
        runs = {}
        for variant, (graphdef, state) in models.items():
            runs["forward", "ours", variant] = lambda g=graphdef, s=state, ids=ids: _timed(
                lambda: _jax_forward(g, s, ids).block_until_ready())
            runs["forward+backward", "ours", variant] = lambda g=graphdef, s=state, ids=ids: _timed(
                lambda: jax.block_until_ready(_jax_grad(g, s, ids)))
        for dt in dtypes:
            runs["forward", "torch", dt] = lambda p=peers[dt], ids=ids_np: p.time("forward", ids)
            runs["forward+backward", "torch", dt] = lambda p=peers[dt], ids=ids_np: p.time("grad", ids)
        times = {key: [] for key in runs}
        for i in range(args.warmup + args.repeats):
            for key, fn in runs.items():  # interleaved, so that load from other processes hits every side alike
                t = fn()
                if i >= args.warmup:
                    times[key].append(t)
        for kind in ("forward", "forward+backward"):
            rate = {(side, dt): batch * length / statistics.median(times[kind, side, dt]) for side, dt in sides}
            best = {side: max(r for (s_, _), r in rate.items() if s_ == side) for side in ("ours", "torch")}
            cells = " | ".join(f"{rate[k]:,.0f}" for k in sides)
            print(f"| {batch} × {length} | {kind} | {cells} | {best['ours'] / best['torch']:.2f} |", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    for peer in peers.values():
        peer.close()


if __name__ == "__main__":
    from sfpo_jax.host import configure_malloc

    configure_malloc()  # malloc keeps freed memory (SFPO_RETAIN_MEMORY=0: off); SFPO_HUGE_PAGES=1: huge pages
    main()
