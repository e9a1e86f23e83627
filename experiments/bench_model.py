"""Model forward and forward+backward throughput: our jitted CausalLM against PyTorch transformers.

The bench model of ../shared/bench/README.md (Qwen2 architecture: hidden 512, intermediate 1408, 8 layers, 8 heads,
2 key-value heads, vocab 32000, tied embeddings, rope θ 10000, RMSNorm ε 1e-6, every matrix ~ N(0, 0.05²),
float32; ~39M parameters) is written once into `--model-dir` by `bench_sampler.make_checkpoint` (PyTorch
`save_pretrained`; the same files as the other benchmarks) and loaded by both sides from there. For each
batch × length shape, each repeat times, interleaved: our forward (logits), PyTorch's
forward (`inference_mode`), our forward+backward (next-token cross entropy, gradients of every parameter) and
PyTorch's (PyTorch in a worker process, see `torch_peer.py`). Inputs are random ids with no padding. Reported:
median tokens/s per side and the ratio ours / PyTorch.

  python experiments/bench_model.py --shapes 4x128 8x256 4x512 --repeats 5
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


def _cross_entropy(logits, ids):
    logp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1).mean()


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
    parser.add_argument("--model-dir", type=Path,
                        default=Path(os.environ.get("SFPO_BENCH_DIR", tempfile.gettempdir())) / "sfpo_bench_qwen2")
    args = parser.parse_args()

    import torch
    import transformers
    from torch_peer import TorchPeer

    path = make_checkpoint(args.model_dir)
    graphdef, state = nnx.split(from_pretrained(path, dtype=jnp.float32))
    # PyTorch runs in a worker process: beside an initialised JAX backend it slows down severalfold.
    peer = TorchPeer(path)

    n_params = sum(x.size for x in jax.tree.leaves(state))
    print(f"machine: {platform.machine()} {os.cpu_count()} cpus; jax {jax.__version__} ({jax.devices()[0].platform}),"
          f" torch {torch.__version__} ({peer.threads} threads, own process), transformers {transformers.__version__};"
          f" {n_params / 1e6:.1f}M params, float32; load average {os.getloadavg()[0]:.1f}")

    print("| batch × length | pass | ours tokens/s | PyTorch tokens/s | ours / PyTorch |")
    print("| --- | --- | --- | --- | --- |")
    rng = np.random.default_rng(0)
    for shape in args.shapes:
        batch, length = (int(x) for x in shape.split("x"))
        ids_np = rng.integers(0, ARCH["vocab_size"], (batch, length)).astype(np.int32)
        ids = jnp.asarray(ids_np)
        runs = {
            ("forward", "ours"): lambda ids=ids: _timed(lambda: _jax_forward(graphdef, state, ids).block_until_ready()),
            ("forward", "torch"): lambda ids=ids_np: peer.time("forward", ids),
            ("forward+backward", "ours"): lambda ids=ids: _timed(
                lambda: jax.block_until_ready(_jax_grad(graphdef, state, ids))),
            ("forward+backward", "torch"): lambda ids=ids_np: peer.time("grad", ids),
        }
        times = {key: [] for key in runs}
        for i in range(args.warmup + args.repeats):
            for key, fn in runs.items():  # interleaved, so that load from other processes hits both sides alike
                t = fn()
                if i >= args.warmup:
                    times[key].append(t)
        for kind in ("forward", "forward+backward"):
            ours = batch * length / statistics.median(times[kind, "ours"])
            theirs = batch * length / statistics.median(times[kind, "torch"])
            print(f"| {batch} × {length} | {kind} | {ours:,.0f} | {theirs:,.0f} | {ours / theirs:.2f} |", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    peer.close()


if __name__ == "__main__":
    main()
