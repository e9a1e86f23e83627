"""When does SFPO beat GRPO? The full CPU study on one config: a learning-rate sweep of both algorithms, the
paper's protocol, each algorithm at its own best rate, the batch doubled, and the paper's ablations.

    python experiments/study.py --config experiments/configs/column-addition.yaml --out runs/study

Stages (``--stages``, in this order; every stage keeps finished runs, so an interrupted study continues):

- ``sweep``: both algorithms at every ``--lrs`` value, ``--sweep-seeds`` each (``OUT/sweep/lr<lr>/<algo>/seed<s>``),
  with ``sweep.md``, ``lr_sweep.png`` and each cell's training reward.
- ``paper``: the paper's protocol, identical settings for both algorithms at the *protocol rate*: GRPO's rate with
  the highest seed-mean training reward over the last ``--reward-window`` steps of the sweep (chosen on training
  reward, as the paper's standard GRPO setting is; nothing is chosen on the eval split), ``--seeds`` each, through
  ``compare.py`` (``OUT/paper``: summary with bootstrap intervals and plots). The sweep's runs at that rate are reused.
- ``tuned``: each algorithm at its own best rate by the same rule, ``--seeds`` each (``OUT/tuned``): is SFPO's gain
  more than a larger effective step?
- ``epochs``: the compute-matched baseline: GRPO with K+1 epochs over each batch (``algo=grpo-epochs``, as many
  optimizer calls per batch as SFPO makes) against SFPO, both at the protocol rate (``OUT/epochs``; SFPO's runs are
  the paper stage's): is SFPO's gain more than its extra optimizer steps? (The paper's GRPO takes M calls per
  batch, its SFPO (K+1)·M.)
- ``batch``: the paper's protocol with twice the prompts per step (``OUT/batch2x``): is the batch noise-limited?
- ``ablate``: ``ablate.py`` at the protocol rate, ``--ablation-seeds`` each (``OUT/ablate``): K x alpha, without the
  slow correction, the entropy switch on and off.

Writes ``OUT/study.json`` and ``OUT/study.md`` (every table) and prints the latter.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path

import ablate
import compare
import numpy as np
from compare import command_line, run_all, run_dir

from sfpo_jax.analysis.summary import (
    plot_lr_sweep,
    render_lr_sweep,
    render_markdown,
    sweep_stats,
)
from sfpo_jax.train.config import ConfigError, load_config
from sfpo_jax.train.metrics import read_metrics

STAGES = ("sweep", "paper", "tuned", "epochs", "batch", "ablate")
ALGOS = compare.ALGOS
KS, ALPHAS = (1, 3, 5, 7), (0.2, 0.5, 0.8, 1.0)  # the paper's ablation grid (Section 5)


def lr_name(lr: float) -> str:
    return f"lr{lr:g}"


def train_reward(rows: list[dict], window: int) -> float:
    """Mean training reward (``reward/mean``) over the run's last ``window`` steps."""
    rewards = [r["reward/mean"] for r in rows if "reward/mean" in r]
    return float(np.mean(rewards[-window:]))


def reuse(src: Path, dst: Path) -> None:
    """Copies a finished run's metrics, config and log (not its checkpoints) so that a later stage keeps it."""
    if (src / "metrics.jsonl").exists() and not (dst / "metrics.jsonl").exists():
        dst.mkdir(parents=True, exist_ok=True)
        for name in ("metrics.jsonl", "config.yaml", "train.log"):
            if (src / name).exists():
                shutil.copy2(src / name, dst / name)


def sweep(args, cfg, out: Path) -> dict:
    jobs = {run_dir(out / "sweep" / lr_name(lr), a, s): ["--algo", a, "--seed", str(s), *args.overrides,
                                                         f"optim.learning_rate={lr}"]
            for lr in args.lrs for s in args.sweep_seeds for a in ALGOS}
    run_all(jobs, cfg, config=args.config, out=out / "sweep", workers=args.workers, desc="sweep runs")
    runs = {(a, lr): {s: read_metrics(run_dir(out / "sweep" / lr_name(lr), a, s) / "metrics.jsonl")
                      for s in args.sweep_seeds} for a in ALGOS for lr in args.lrs}
    stats = sweep_stats(runs)
    rewards = {a: {lr: float(np.mean([train_reward(rows, args.reward_window) for rows in runs[a, lr].values()]))
                   for lr in args.lrs} for a in ALGOS}
    best = {a: max(args.lrs, key=lambda lr, a=a: rewards[a][lr]) for a in ALGOS}  # ties: the lower rate
    plot_lr_sweep(runs, out / "lr_sweep.png")
    table = render_lr_sweep(stats) + "\n" + "\n".join(
        [f"Training reward, seed mean over the last {args.reward_window} steps (what picks the rates):", "",
         "| algorithm | " + " | ".join(f"{lr:g}" for lr in args.lrs) + " | best rate |",
         "|---|" + "---|" * (len(args.lrs) + 1)]
        + [f"| {a.upper()} | " + " | ".join(f"{rewards[a][lr]:.3f}" for lr in args.lrs) + f" | {best[a]:g} |"
           for a in ALGOS])
    (out / "sweep.md").write_text(table + "\n")
    return {"stats": stats, "train_reward": rewards, "best_rate": best, "protocol_rate": best["grpo"],
            "table": table}


def paper(args, out: Path, lr: float, name: str, extra: list[str]) -> dict:
    """compare.py at rate ``lr`` (reusing the sweep's runs at that rate when the settings are the sweep's)."""
    if not extra:
        for a in ALGOS:
            for s in args.sweep_seeds:
                reuse(run_dir(out / "sweep" / lr_name(lr), a, s), run_dir(out / name, a, s))
    # One warm-up for every run of the study, as its sweep uses: the stages reuse one another's runs.
    argv = ["--config", args.config, "--seeds", *map(str, args.seeds), "--out", str(out / name), "--shared-warmup",
            *(["--workers", str(args.workers)] if args.workers else []),
            *args.overrides, *extra, f"optim.learning_rate={lr}"]
    if compare.main(argv) != 0:
        raise RuntimeError(f"compare.py {' '.join(argv)} failed")
    summary = json.loads((out / name / "summary.json").read_text())
    return {"rate": lr, "summary": summary, "table": render_markdown(summary)}


def tuned(args, cfg, out: Path, best: dict, protocol_rate: float) -> dict:
    for a in ALGOS:
        for s in args.seeds:  # the sweep's runs at that rate, and the paper stage's at the protocol rate
            reuse(run_dir(out / "sweep" / lr_name(best[a]), a, s), run_dir(out / "tuned", a, s))
            if best[a] == protocol_rate:
                reuse(run_dir(out / "paper", a, s), run_dir(out / "tuned", a, s))
    jobs = {run_dir(out / "tuned", a, s): ["--algo", a, "--seed", str(s), *args.overrides,
                                           f"optim.learning_rate={best[a]}"]
            for s in args.seeds for a in ALGOS}
    run_all(jobs, cfg, config=args.config, out=out / "tuned", workers=args.workers, desc="tuned runs")
    summary, table, _ = compare.report(out / "tuned", args.seeds, rates=best)
    return {"rates": best, "summary": summary, "table": table}


def epochs(args, cfg, out: Path, protocol_rate: float) -> dict:
    """GRPO with K+1 epochs per batch (the summary's ``grpo`` side) against SFPO, both at the protocol rate."""
    rate = [*args.overrides, f"optim.learning_rate={protocol_rate}"]
    for s in args.seeds:
        reuse(run_dir(out / "paper", "sfpo", s), run_dir(out / "epochs", "sfpo", s))
    jobs = {run_dir(out / "epochs", a, s): ["--algo", "grpo-epochs" if a == "grpo" else a, "--seed", str(s), *rate]
            for s in args.seeds for a in ALGOS}
    run_all(jobs, cfg, config=args.config, out=out / "epochs", workers=args.workers, desc="compute-matched runs")
    summary, table, _ = compare.report(out / "epochs", args.seeds, baseline="grpo-epochs", rate=protocol_rate)
    return {"rate": protocol_rate, "summary": summary, "table": table}


def settings(config: str, overrides: list[str]) -> dict:
    """A run's settings, less where it writes: equal settings train identically (runs are deterministic)."""
    cfg = load_config(config, overrides)
    return dataclasses.asdict(dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, out="")))


def ablation(args, out: Path, lr: float) -> dict:
    # Variants with the sweep's settings at this rate (GRPO, and SFPO as configured) keep the sweep's runs.
    rate = [*args.overrides, f"optim.learning_rate={lr}"]
    for name, extra in ablate.variants(KS, ALPHAS, 0.8).items():
        for a in ALGOS:
            if settings(args.config, [*rate, *extra]) == settings(args.config, [*rate, f"algo={a}"]):
                for s in args.ablation_seeds:
                    reuse(run_dir(out / "sweep" / lr_name(lr), a, s), out / "ablate" / name / f"seed{s}")
    argv = ["--config", args.config, "--ks", *map(str, KS), "--alphas", *map(str, ALPHAS),
            "--seeds", *map(str, args.ablation_seeds), "--out", str(out / "ablate"),
            *(["--workers", str(args.workers)] if args.workers else []), *args.overrides,
            f"optim.learning_rate={lr}"]
    if ablate.main(argv) != 0:
        raise RuntimeError(f"ablate.py {' '.join(argv)} failed")
    report = json.loads((out / "ablate" / "ablation.json").read_text())
    return {"rate": lr, "report": report, "table": (out / "ablate" / "ablation.md").read_text()}


def render(results: dict, args) -> str:
    parts = [f"# SFPO vs GRPO: the study on `{args.config}`", ""]
    titles = {"sweep": "Learning-rate sweep", "paper": "The paper's protocol (both at GRPO's best rate)",
              "tuned": "Tuned baseline (each at its own best rate)",
              "epochs": "Compute-matched baseline (GRPO with K+1 epochs per batch vs SFPO)",
              "batch": "The paper's protocol, batch doubled",
              "ablate": "Ablations at the protocol rate"}
    for stage, result in results.items():
        if stage in titles:
            rate = result.get("rate") or result.get("rates")
            parts += [f"## {titles[stage]}" + (f" (rate {rate})" if rate else ""), "", result["table"], ""]
    return "\n".join(parts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--out", default="runs/study")
    p.add_argument("--lrs", type=float, nargs="+", default=[3e-5, 1e-4, 3e-4, 1e-3])
    p.add_argument("--sweep-seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--ablation-seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--reward-window", type=int, default=10, help="steps of training reward that pick the rates")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    p.add_argument("--workers", type=int, default=None, help="parallel runs (default: one per core)")
    p.add_argument("overrides", nargs="*", help="section.field=value applied to every run")
    args = p.parse_args(argv)
    args.lrs = sorted(args.lrs)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    results: dict = {"command": command_line(argv)}
    results["sweep"] = sweep(args, cfg, out)  # always: the later stages need its rates (finished runs are kept)
    rate = results["sweep"]["protocol_rate"]
    if "paper" in args.stages:
        results["paper"] = paper(args, out, rate, "paper", [])
    if "tuned" in args.stages:
        results["tuned"] = tuned(args, cfg, out, results["sweep"]["best_rate"], rate)
    if "epochs" in args.stages:
        results["epochs"] = epochs(args, cfg, out, rate)
    if "batch" in args.stages:
        doubled = f"rollout.prompts_per_step={2 * cfg.rollout.prompts_per_step}"
        results["batch"] = paper(args, out, rate, "batch2x", [doubled])
    if "ablate" in args.stages:
        results["ablate"] = ablation(args, out, rate)
    (out / "study.json").write_text(json.dumps(results, indent=2, default=str))
    report = render(results, args)
    (out / "study.md").write_text(report)
    print(report)
    print(f"study: {out / 'study.md'}, {out / 'study.json'}")
    return 0


if __name__ == "__main__":
    from sfpo_jax.host import configure_malloc

    configure_malloc()  # malloc keeps freed memory (SFPO_RETAIN_MEMORY=0: off); SFPO_HUGE_PAGES=1: huge pages
    sys.exit(main())
