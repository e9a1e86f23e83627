"""GRPO vs SFPO under the same seeds and rollout budget, with the paper's learning-efficiency figures.

    python experiments/compare.py --config experiments/configs/arith-tiny.yaml --seeds 0 1 2 3 4 --out runs/compare

Runs ``train.py`` for both algorithms and every seed (in parallel processes when cores allow; finished runs
are reused, interrupted ones resumed), then writes ``OUT/summary.json``, ``OUT/summary.md`` and PNG plots of
accuracy against rollouts and against wall-clock (seed-mean curves with bootstrap 95% bands), and prints the summary
table (rollouts and wall-clock ratios with bootstrap 95% intervals over seeds; see ``sfpo_jax.analysis.summary``)
and the paths of everything it wrote.
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

from sfpo_jax.analysis.summary import RESAMPLES, plot_curves, render_markdown, summarize
from sfpo_jax.train.config import ConfigError, load_config
from sfpo_jax.train.metrics import read_metrics

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


def launch(cmd: list[str], log: Path, threads: int, compile_cache: Path) -> int:
    """Runs one training process with its output in ``log``; XLA's CPU thread pool sized to its core share.

    The runs of a comparison compile the same programs: JAX's persistent compilation cache lets every run after
    the first load them from ``compile_cache`` instead of compiling them again."""
    env = dict(os.environ)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(compile_cache))
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_cpu_multi_thread_eigen={threads > 1}").strip()
    env.setdefault("OMP_NUM_THREADS", str(threads))
    with open(log, "a") as f:
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode


def command_line(argv: list[str] | None) -> str:
    """The command as run (script name and arguments), for the summaries."""
    return " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])


def run_all(jobs: dict[Path, list[str]], cfg, *, config: str, out: Path, workers: int | None = None,
            desc: str = "runs") -> float:
    """Runs ``train.py --config config --out DIR ARGS`` for every ``DIR: ARGS`` in ``jobs``, ``workers`` at a time
    (default: one per core), with one progress bar over all their ``cfg.run.steps`` steps. Finished runs are kept,
    interrupted ones resumed; compiled programs are shared through ``out/.jax_cache``. Returns the wall-clock
    seconds; raises naming the log of the first run that failed."""
    out.mkdir(parents=True, exist_ok=True)
    # Each warm-up policy is trained once, here, so that parallel runs do not race to build the same cache.
    from sfpo_jax.train.policy import prepare_policy

    for overrides in sorted({tuple(a for a in extra if "=" in a and not a.startswith("-")) for extra in jobs.values()}):
        prepare_policy(load_config(config, list(overrides)) if overrides else cfg)
    steps, compile_cache = cfg.run.steps, out / ".jax_cache"
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    threads = max(1, (os.cpu_count() or 1) // workers)

    def job(item):
        d, extra = item
        if finished_steps(d) >= steps:
            return
        d.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, str(HERE / "train.py"), "--config", config, "--out", str(d), *extra,
               "run.progress=false"]
        if (d / "checkpoints").exists():
            cmd.append("--resume")
        rc = launch(cmd, d / "train.log", threads, compile_cache)
        if rc != 0:
            raise RuntimeError(f"run {d} failed (exit {rc}); see {d / 'train.log'}")

    started = time.perf_counter()
    total = steps * len(jobs)
    with ThreadPoolExecutor(workers) as pool, tqdm(total=total, desc=f"{len(jobs)} {desc}", unit="step") as bar:
        futures = [pool.submit(job, item) for item in jobs.items()]
        while not all(f.done() for f in futures):
            time.sleep(1.0)
            done = sum(min(finished_steps(d), steps) for d in jobs)
            bar.update(done - bar.n)
        bar.update(total - bar.n)
        for f in futures:
            f.result()  # re-raises the first failure with its log path
    return time.perf_counter() - started


def report(out: Path, seeds, *, resamples: int = RESAMPLES, **extra) -> tuple[dict, str, list[Path]]:
    """Reads both algorithms' runs of `seeds` under `out`, draws their curves, and writes `out/summary.json` (the
    summary with `extra`'s keys added) and `out/summary.md`; returns (summary, its markdown table, the plots)."""
    runs = {a: {s: read_metrics(run_dir(out, a, s) / "metrics.jsonl") for s in seeds} for a in ALGOS}
    plots = plot_curves(runs, out, resamples=min(resamples, 2_000))
    summary = {**summarize(runs, resamples=resamples), **extra}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    table = render_markdown(summary)
    (out / "summary.md").write_text(table + "\n")
    return summary, table, plots


def warmup_seed(cfg, seed: int, args) -> list[str]:
    """The override that makes run seed ``seed`` train (and cache) its own warm-up policy, when the policy is the
    warm-up and ``--shared-warmup`` is not given."""
    if cfg.model.path != "warmup" or args.shared_warmup:
        return []
    return [f"model.warmup.seed={seed}"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--out", default="runs/compare")
    p.add_argument("--workers", type=int, default=None, help="parallel runs (default: one per core)")
    p.add_argument("--algos", nargs="+", choices=ALGOS, default=list(ALGOS))
    p.add_argument("--resamples", type=int, default=RESAMPLES,
                   help="bootstrap resamples of the 95%% intervals (0: none)")
    p.add_argument("--shared-warmup", action="store_true",
                   help="one warm-up policy for every seed (default with model.path=warmup: seed s also seeds its "
                        "warm-up, so that the intervals over seeds cover the warm-up's variation too)")
    p.add_argument("overrides", nargs="*", help="section.field=value applied to every run")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    jobs = {run_dir(out, a, s): ["--algo", a, "--seed", str(s), *args.overrides, *warmup_seed(cfg, s, args)]
            for s in args.seeds for a in args.algos}
    elapsed = run_all(jobs, cfg, config=args.config, out=out, workers=args.workers)

    if set(args.algos) != set(ALGOS):  # the summary compares the two; one algorithm alone gets its curves
        runs = {a: {s: read_metrics(run_dir(out, a, s) / "metrics.jsonl") for s in args.seeds} for a in args.algos}
        plots = plot_curves(runs, out, resamples=min(args.resamples, 2_000))
        print(f"plots: {', '.join(str(p) for p in plots)}  (no summary: it needs both --algos)")
        return 0
    _, table, plots = report(out, args.seeds, resamples=args.resamples, command=command_line(argv),
                             elapsed_seconds=elapsed)
    print(table)
    print(f"plots: {', '.join(str(p) for p in plots)}\nsummary: {out / 'summary.md'}, {out / 'summary.json'}  "
          f"({elapsed / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    from sfpo_jax.host import configure_malloc

    configure_malloc()  # malloc keeps freed memory (SFPO_RETAIN_MEMORY=0: off); SFPO_HUGE_PAGES=1: huge pages
    sys.exit(main())
