"""GRPO vs SFPO under the same seeds and rollout budget, with the paper's learning-efficiency figures.

    python experiments/compare.py --config experiments/configs/arith-tiny.yaml --seeds 0 1 2 3 4 --out runs/compare

Runs ``train.py`` for both algorithms and every seed (in parallel processes when cores allow; finished runs
are reused, interrupted ones resumed), then writes ``OUT/summary.json``, ``OUT/summary.md`` and PNG plots of
accuracy against rollouts and against wall-clock, and prints the summary table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm.auto import tqdm

from sfpo_jax.train.config import ConfigError, load_config
from sfpo_jax.train.metrics import read_metrics
from sfpo_jax.train.summary import plot_curves, render_markdown, summarize

HERE = Path(__file__).resolve().parent
ALGOS = ("grpo", "sfpo")


def run_dir(out: Path, algo: str, seed: int) -> Path:
    return out / algo / f"seed{seed}"


def finished_steps(path: Path) -> int:
    try:
        rows = read_metrics(path / "metrics.jsonl")
    except FileNotFoundError:
        return 0
    return max((r["step"] for r in rows), default=0)


def launch(cmd: list[str], log: Path, threads: int) -> int:
    """Runs one training process with its output in ``log``; XLA's CPU thread pool sized to its core share."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_cpu_multi_thread_eigen={threads > 1}").strip()
    env.setdefault("OMP_NUM_THREADS", str(threads))
    with open(log, "a") as f:
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--out", default="runs/compare")
    p.add_argument("--workers", type=int, default=None, help="parallel runs (default: one per core)")
    p.add_argument("--algos", nargs="+", choices=ALGOS, default=list(ALGOS))
    p.add_argument("overrides", nargs="*", help="section.field=value applied to every run")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # The warm-up policy is trained once, here, so that parallel runs do not race to build the same cache.
    from sfpo_jax.train.policy import prepare_policy

    prepare_policy(cfg)

    workers = max(1, min(args.workers or os.cpu_count() or 1, len(args.seeds) * len(args.algos)))
    threads = max(1, (os.cpu_count() or 1) // workers)
    jobs = [(a, s) for s in args.seeds for a in args.algos]
    total = cfg.run.steps * len(jobs)

    def job(algo_seed):
        algo, seed = algo_seed
        d = run_dir(out, algo, seed)
        if finished_steps(d) >= cfg.run.steps:
            return 0
        d.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, str(HERE / "train.py"), "--config", args.config, "--algo", algo, "--seed", str(seed),
               "--out", str(d), *args.overrides, "run.progress=false"]
        if (d / "checkpoints").exists():
            cmd.append("--resume")
        rc = launch(cmd, d / "train.log", threads)
        if rc != 0:
            raise RuntimeError(f"{algo} seed {seed} failed (exit {rc}); see {d / 'train.log'}")
        return rc

    started = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool, tqdm(total=total, desc=f"{len(jobs)} runs", unit="step") as bar:
        futures = [pool.submit(job, j) for j in jobs]
        while not all(f.done() for f in futures):
            time.sleep(1.0)
            bar.n = sum(min(finished_steps(run_dir(out, a, s)), cfg.run.steps) for a, s in jobs)
            bar.refresh()
        bar.n = total
        for f in futures:
            f.result()  # re-raises the first failure with its log path
    elapsed = time.perf_counter() - started

    runs = {a: {s: read_metrics(run_dir(out, a, s) / "metrics.jsonl") for s in args.seeds} for a in args.algos}
    summary = summarize(runs)
    summary["command"] = " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])
    summary["elapsed_seconds"] = elapsed
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    table = render_markdown(summary)
    (out / "summary.md").write_text(table + "\n")
    plots = plot_curves(runs, out)
    print(table)
    print(f"\nplots: {', '.join(str(p) for p in plots)}\nsummary: {out / 'summary.json'}  ({elapsed / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
