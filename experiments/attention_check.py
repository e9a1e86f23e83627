"""The learner's two attention paths on one device: `CausalLM(attention="einsum")` against `attention="cudnn"`
(cuDNN flash attention, NVIDIA GPUs), bf16 compute from float32 masters, on the bench model and a left-padded
batch. Prints whether each path's gradient is finite, the loss's relative difference, the gradient's relative L2
difference and cosine (einsum as the reference), and the seconds per forward and forward+backward of each path at
each shape (median of `--repeats`).

    python experiments/attention_check.py [--shapes 16x192 8x512 4x2048] [--repeats 5] [--out attention.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from bench_gpu import STANDARD, build_model, timed_calls
from flax import nnx

from sfpo_jax.rl import grpo


def nll(state, graphdef, ids, mask):
    """Mean next-token negative log-likelihood over real tokens (float32)."""
    logits = nnx.merge(graphdef, state)(ids, attention_mask=mask)
    m = mask[:, 1:] & mask[:, :-1]
    logp, _ = grpo.token_logprobs_and_entropy(logits[:, :-1], ids[:, 1:], m)  # the library's log-probs, 0 off m
    return -jnp.sum(logp) / jnp.sum(m)


def batch(rows: int, length: int, seed: int = 0):
    """Random ids; every other row left-padded by a quarter of its length (the learner's prompt padding)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, STANDARD.arch["vocab_size"], (rows, length))
    mask = np.ones_like(ids, bool)
    mask[::2, :length // 4] = False
    return jnp.asarray(ids, jnp.int32), jnp.asarray(mask)


def median_ms(fn, args: tuple, repeats: int) -> float:
    """Median milliseconds of `fn(*args)` to a ready result (`bench_gpu.timed_calls`, one untimed call first)."""
    return 1e3 * statistics.median(timed_calls(lambda: jax.block_until_ready(fn(*args)), repeats, warmup=1))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["16x192", "8x512", "4x2048"], help="rows x length")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    paths = {a: nnx.split(build_model(STANDARD, "bfloat16", attention=a)) for a in ("einsum", "cudnn")}
    forward = jax.jit(nll, static_argnums=1)
    grad = jax.jit(jax.value_and_grad(nll), static_argnums=1)
    result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "shapes": {}}
    for shape in args.shapes:
        rows, length = (int(x) for x in shape.split("x"))
        ids, mask = batch(rows, length)
        (loss_e, g_e), (loss_c, g_c) = (grad(state, graphdef, ids, mask) for graphdef, state in paths.values())
        a, b = (jnp.concatenate([x.ravel() for x in jax.tree.leaves(g)]) for g in (g_e, g_c))
        row = dict(einsum_grad_finite=bool(jnp.isfinite(a).all()), cudnn_grad_finite=bool(jnp.isfinite(b).all()),
                   loss_rel_diff=float(abs(loss_c - loss_e) / abs(loss_e)),
                   grad_rel_l2_diff=float(jnp.linalg.norm(b - a) / jnp.linalg.norm(a)),
                   grad_cosine=float(a @ b / (jnp.linalg.norm(a) * jnp.linalg.norm(b))))
        for name, (graphdef, state) in paths.items():
            row[f"{name}_forward_ms"] = median_ms(forward, (state, graphdef, ids, mask), args.repeats)
            row[f"{name}_forward_backward_ms"] = median_ms(grad, (state, graphdef, ids, mask), args.repeats)
        result["shapes"][shape] = row
        print(shape, " ".join(f"{k}={v:.4g}" for k, v in row.items()), flush=True)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    from sfpo_jax.host import configure_malloc

    configure_malloc()  # malloc keeps freed memory (SFPO_RETAIN_MEMORY=0: off); SFPO_HUGE_PAGES=1: huge pages
    main()
