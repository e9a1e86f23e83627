"""A larger, paired held-out evaluation of a comparison's policies than the runs' own: the initial policy and each
algorithm's last checkpoint, ``--samples`` completions of every eval problem at the runs' eval settings, all with
the same key, with per-problem correct counts and each algorithm's gain over the initial policy (a bootstrap 95%
interval over problems, the problems resampled with replacement).

    python experiments/eval_checkpoints.py runs/smollm2-math-cpu --samples 8 \\
        --out experiments/results/smollm2-math-cpu/eval_checkpoints.json

``COMPARE_DIR`` is a ``compare.py`` output folder whose runs kept their checkpoints (``run.checkpoint_every`` > 0).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from sfpo_jax.train.checkpointer import Checkpointer
from sfpo_jax.train.config import load_config
from sfpo_jax.train.policy import load_policy, task_from_config
from sfpo_jax.train.step import make_rl_step

ALGOS = ("grpo", "sfpo")
EVAL_KEY = 12345
RESAMPLES = 10_000


def correct_counts(rl_step, params, task, tokenizer, cfg, samples: int, key) -> tuple[np.ndarray, float]:
    """``[problems] int`` correct samples per eval problem, and the mean reward, at the run's eval settings."""
    problems = task.eval_problems()[: cfg.eval.max_problems]
    ids = [tokenizer.encode(task.render(p), add_special_tokens=False) for p in problems]
    sampling = cfg.eval.sampling(cfg.rollout.max_new_tokens, (tokenizer.eos_token_id,))
    sampling = dataclasses.replace(sampling, num_samples=samples)
    rollout = rl_step.sampler.generate(ids, sampling, key, params=params, chunk_size=16)
    rewards = task.reward(rollout.texts(tokenizer), [p.answer for p in problems for _ in range(samples)])
    return (rewards.reshape(len(problems), samples) >= 1).sum(1), float(rewards.mean())


def gain_ci95(base: np.ndarray, trained: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean per-problem difference ``trained - base`` (paired by problem)."""
    diff = trained - base
    means = diff[rng.integers(0, len(diff), (RESAMPLES, len(diff)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("compare_dir", type=Path)
    p.add_argument("--samples", type=int, default=8, help="completions per eval problem")
    p.add_argument("--seed", type=int, default=0, help="which seed's runs")
    p.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    args = p.parse_args(argv)
    runs = {algo: args.compare_dir / algo / f"seed{args.seed}" for algo in ALGOS}
    missing = [str(r) for r in runs.values() if not (r / "checkpoints").is_dir()]
    if missing:
        p.error(f"no checkpoints in {', '.join(missing)}")
    out: dict = {"samples": args.samples, "policies": {}}
    key = jax.random.key(EVAL_KEY)
    bar = tqdm(total=len(ALGOS) + 1, desc="policies evaluated")
    for algo, run in runs.items():
        cfg = load_config(run / "config.yaml")
        task = task_from_config(cfg)
        model, tokenizer = load_policy(cfg, task)
        rl_step, state = make_rl_step(model, tokenizer, task.reward, cfg.optimizer(), cfg.rollout, cfg.loss,
                                      lora=cfg.lora())
        with Checkpointer(run / "checkpoints", keep=1) as ckpt:
            step = ckpt.latest_step()
            trained, _ = ckpt.restore(step, target=state)
        # The initial policy once, from the first run's setup (both runs start from the same one).
        policy = rl_step.learner.policy_params  # with LoRA the base merged with the adapters
        policies = {"initial": (0, policy(state))} if not out["policies"] else {}
        policies[algo] = (step, policy(trained))
        for name, (step, params) in policies.items():
            start = time.perf_counter()
            counts, reward = correct_counts(rl_step, params, task, tokenizer, cfg, args.samples, key)
            out["policies"][name] = {"step": step, "accuracy": float(counts.mean() / args.samples),
                                     "reward": reward, "correct_per_problem": counts.tolist()}
            bar.write(f"{name} (step {step}): accuracy {counts.mean() / args.samples:.3f}, reward {reward:.3f} "
                      f"({time.perf_counter() - start:.0f} s)")
            bar.update()
    bar.close()
    base = np.asarray(out["policies"]["initial"]["correct_per_problem"]) / args.samples
    rng = np.random.default_rng(0)
    for algo in ALGOS:
        entry = out["policies"][algo]
        trained = np.asarray(entry["correct_per_problem"]) / args.samples
        entry["gain"] = float((trained - base).mean())
        entry["gain_ci95_over_problems"] = gain_ci95(base, trained, rng)
        low, high = entry["gain_ci95_over_problems"]
        print(f"{algo} - initial: {entry['gain']:+.3f} accuracy (95% over problems {low:+.3f} to {high:+.3f})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    from sfpo_jax.host import configure_malloc

    configure_malloc()  # malloc keeps freed memory (SFPO_RETAIN_MEMORY=0: off); SFPO_HUGE_PAGES=1: huge pages
    raise SystemExit(main())
