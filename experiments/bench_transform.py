"""W3: the SFPO transform's overhead per optimizer call, against plain AdamW and optax.lookahead.

The bench model's parameters (Qwen2 shapes: hidden 512, intermediate 1408, 8 layers, 8 heads, 2 key-value heads,
head_dim 64, vocab 32000, tied embeddings, q/k/v biases; ~39M float32 values drawn from N(0, 0.05²)) as a plain
pytree. Each optimizer runs one jitted ``update`` + ``apply_updates`` per call with params and optimizer state
donated, on a fixed gradient pytree. Each repeat times one whole SFPO cycle (K+1 calls: the call that stores the
slow point, the plain fast calls, the reposition, the slow correction) call by call, and the same number of calls
of each peer; the optimizers are interleaved, and the report gives medians per call index, their mean over the
cycle, the ratio to adamw, and the optimizer-state bytes. Each call's process CPU time is reported beside its wall
time: on a shared machine the wall time also counts the time spent waiting for a core.

  python experiments/bench_transform.py --repeats 20 --warmup 3
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from bench_sampler import ARCH  # the one bench model, shared by the benchmarks

from sfpo_jax.optim import sfpo

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, VOCAB = (ARCH[k] for k in (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "vocab_size"))
HEAD_DIM = HIDDEN // HEADS


def bench_param_shapes() -> dict:
    """Shapes of the bench model's parameters, nested like a Qwen2 checkpoint."""
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    layer = {
        "self_attn": {
            "q_proj": {"kernel": (HIDDEN, q), "bias": (q,)},
            "k_proj": {"kernel": (HIDDEN, kv), "bias": (kv,)},
            "v_proj": {"kernel": (HIDDEN, kv), "bias": (kv,)},
            "o_proj": {"kernel": (q, HIDDEN)},
        },
        "mlp": {
            "gate_proj": {"kernel": (HIDDEN, INTER)},
            "up_proj": {"kernel": (HIDDEN, INTER)},
            "down_proj": {"kernel": (INTER, HIDDEN)},
        },
        "input_layernorm": {"scale": (HIDDEN,)},
        "post_attention_layernorm": {"scale": (HIDDEN,)},
    }
    return {
        "embed_tokens": {"embedding": (VOCAB, HIDDEN)},
        "layers": {str(i): layer for i in range(LAYERS)},
        "norm": {"scale": (HIDDEN,)},
    }


def random_tree(key: jax.Array, shapes: dict, scale: float = 0.05) -> dict:
    """A float32 pytree with the given leaf shapes, every value ~ N(0, scale²)."""
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(
        treedef, [scale * jax.random.normal(k, s, jnp.float32) for k, s in zip(keys, leaves, strict=True)]
    )


def tree_bytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def make_step(tx):
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20, help="timed cycles per optimizer (medians reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed cycles per optimizer before timing")
    parser.add_argument("--num-fast-steps", type=int, default=3)
    parser.add_argument("--alpha", type=float, default=0.8)
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown report to this file")
    args = parser.parse_args()

    cycle = args.num_fast_steps + 1  # calls per timed block: one full SFPO cycle (M = 1), every branch once
    shapes = bench_param_shapes()
    params0 = random_tree(jax.random.key(0), shapes)
    grads = random_tree(jax.random.key(1), shapes, scale=1e-3)
    num_params = sum(x.size for x in jax.tree.leaves(params0))

    adamw = optax.adamw(args.lr, b1=0.9, b2=0.999, weight_decay=0.01)
    sfpo_name = f"chain(adamw, sfpo({args.num_fast_steps}, {args.alpha}))"
    cases = {
        "adamw": (adamw, lambda p: p),
        sfpo_name: (optax.chain(adamw, sfpo(args.num_fast_steps, args.alpha)), lambda p: p),
        # Fast and slow params are distinct buffers: both are donated.
        "lookahead(adamw, sync_period=4, slow_step_size=0.5)": (
            optax.lookahead(adamw, sync_period=4, slow_step_size=0.5),
            lambda p: optax.LookaheadParams(fast=p, slow=jax.tree.map(jnp.copy, p)),
        ),
    }
    load_before = f"{os.getloadavg()[0]:.1f}"
    runs = {}
    for name, (tx, wrap) in cases.items():
        params = wrap(jax.tree.map(jnp.copy, params0))
        state = tx.init(params)
        runs[name] = {
            "step": make_step(tx),
            "params": params,
            "state": state,
            "state_bytes": tree_bytes(state),
            "param_bytes": tree_bytes(params),
            "times": [],  # [repeat][call index] wall seconds
            "cpu_times": [],  # [repeat][call index] CPU seconds of this process (all its threads)
        }

    def run_cycle(r) -> tuple[list[float], list[float]]:
        """One full cycle, each call timed to completion: wall and process CPU seconds."""
        params, state, times, cpu_times = r["params"], r["state"], [], []
        for _ in range(cycle):
            t0, c0 = time.perf_counter(), time.process_time()
            params, state = r["step"](params, state, grads)
            jax.block_until_ready((params, state))
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
        r["params"], r["state"] = params, state
        return times, cpu_times

    for _ in range(args.warmup):
        for r in runs.values():
            run_cycle(r)
    for _ in range(args.repeats):
        for r in runs.values():
            run_cycle(r)  # untimed: refills the caches the other optimizers evicted, so no one pays a cold start
            wall, cpu = run_cycle(r)
            r["times"].append(wall)
            r["cpu_times"].append(cpu)

    base = runs["adamw"]
    per_call = {name: 1e3 * np.median(np.array(r["times"]), axis=0) for name, r in runs.items()}
    # CPU time excludes the time this process waits for a core, so it is the steadier figure on a busy machine
    # (memory-bandwidth contention still shows in it).
    cpu_per_call = {name: 1e3 * np.median(np.array(r["cpu_times"]), axis=0) for name, r in runs.items()}
    lines = [
        f"W3 on {platform.machine()} ({os.cpu_count()} cores), jax {jax.__version__}, optax {optax.__version__}: "
        f"{num_params / 1e6:.1f}M float32 params ({base['param_bytes'] / 2**20:.0f} MiB); jitted update + "
        f"apply_updates with params and state donated; {args.repeats} timed cycles of {cycle} calls per optimizer "
        f"after {args.warmup} warm-up cycles, interleaved; medians per call index.",
        "",
        "| optimizer | wall ms per call, by call index | wall ms / call (cycle mean) | × adamw "
        "| CPU ms per call, by call index | CPU ms / call (cycle mean) | × adamw | opt-state MiB "
        "| params + state, × params |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in runs.items():
        mean, cpu_mean = per_call[name].mean(), cpu_per_call[name].mean()
        total = (r["param_bytes"] + r["state_bytes"]) / base["param_bytes"]
        lines.append(
            f"| `{name}` | {' / '.join(f'{t:.1f}' for t in per_call[name])} | {mean:.1f} | "
            f"{mean / per_call['adamw'].mean():.3f} | {' / '.join(f'{t:.1f}' for t in cpu_per_call[name])} | "
            f"{cpu_mean:.1f} | {cpu_mean / cpu_per_call['adamw'].mean():.3f} | "
            f"{r['state_bytes'] / 2**20:.1f} | {total:.2f} |"
        )
    paired = np.array(runs[sfpo_name]["times"]).sum(1) / np.array(base["times"]).sum(1)
    cpu_paired = np.array(runs[sfpo_name]["cpu_times"]).sum(1) / np.array(base["cpu_times"]).sum(1)
    lines += [
        "",
        f"sfpo / adamw, paired per cycle: wall median {np.median(paired):.3f} "
        f"(quartiles {np.quantile(paired, 0.25):.3f}–{np.quantile(paired, 0.75):.3f}), CPU median "
        f"{np.median(cpu_paired):.3f} (quartiles {np.quantile(cpu_paired, 0.25):.3f}–"
        f"{np.quantile(cpu_paired, 0.75):.3f}); load average before/after {load_before} / "
        f"{os.getloadavg()[0]:.1f}; "
        f"state beyond adamw's: {(runs[sfpo_name]['state_bytes'] - base['state_bytes']) / base['param_bytes']:.4f} "
        "× params.",
    ]
    report = "\n".join(lines)
    print(report)
    if args.out is not None:
        args.out.write_text(report + "\n")


if __name__ == "__main__":
    from sfpo_jax.host import configure_malloc

    configure_malloc()  # malloc keeps freed memory (SFPO_RETAIN_MEMORY=0: off); SFPO_HUGE_PAGES=1: huge pages
    main()
