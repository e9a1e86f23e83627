"""The paper's SFPO ablations on one config: K × alpha, without the slow correction, and the entropy switch off.

    python experiments/ablate.py --config experiments/configs/arith-tiny.yaml --seeds 0 1 --out runs/ablate

Runs GRPO (the baseline) and SFPO variants under the same seeds and rollout budget, through ``train.py`` as
``compare.py`` does (parallel processes, finished runs kept, interrupted ones resumed), then writes
``OUT/ablation.json``, ``OUT/ablation.md`` and heatmaps of the best and final eval accuracy over K × alpha.

Variants (the paper, Section 5): ``K{k}-a{alpha}`` for K in --ks and alpha in --alphas; ``no-slow-correction``
(θ_{s+1} = θ̃: the batch ends at the repositioned point); ``entropy-switch`` (the paper's W=30, τ=1.0) and
``no-entropy-switch`` (SFPO never hands over to GRPO). The last three use K=3, alpha=--alpha; the grid keeps the
config's switch setting.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from compare import command_line, run_all

from sfpo_jax.analysis.summary import eval_curve, find_eval_key, mean_curve, plot_ablation
from sfpo_jax.train.config import ConfigError, load_config
from sfpo_jax.train.metrics import read_metrics


def variants(ks, alphas, alpha) -> dict[str, list[str]]:
    """Variant name → the overrides that make it."""
    out = {"grpo": ["algo=grpo"]}
    for k in ks:
        for a in alphas:
            out[f"K{k}-a{a:g}"] = ["algo=sfpo", f"sfpo.num_fast_steps={k}", f"sfpo.alpha={a}"]
    out["no-slow-correction"] = ["algo=sfpo", "sfpo.num_fast_steps=3", f"sfpo.alpha={alpha}",
                                 "sfpo.slow_correction=false"]
    out["entropy-switch"] = ["algo=sfpo", "sfpo.num_fast_steps=3", f"sfpo.alpha={alpha}",
                             "sfpo.entropy_window=30", "sfpo.entropy_threshold=1.0"]
    out["no-entropy-switch"] = ["algo=sfpo", "sfpo.num_fast_steps=3", f"sfpo.alpha={alpha}",
                                "sfpo.entropy_window=null"]
    return out


def summarize_variant(runs: dict[int, list[dict]], key: str, target: float | None) -> dict:
    """Best and final accuracy of the seed-mean curve, and the rollouts at which it first reaches ``target``."""
    curves = [eval_curve(rows, key) for rows in runs.values()]
    mean = mean_curve(curves)
    hits = np.flatnonzero(mean.accuracy >= target - 1e-9) if target is not None else np.array([], int)
    return {
        "best": float(mean.accuracy.max()),
        "final": float(mean.accuracy[-1]),
        "final_per_seed": {str(s): float(c.accuracy[-1]) for s, c in zip(runs, curves, strict=True)},
        "rollouts_to_target": float(mean.rollouts[hits[0]]) if hits.size else None,
        "switched_to_grpo_at_step": {str(s): switch_step(rows) for s, rows in runs.items()},
    }


def switch_step(rows: list[dict]) -> int | None:
    """The first step at which an SFPO run had handed over to GRPO (None: never, or not an SFPO run)."""
    if not rows or not rows[0].get("sfpo_active"):
        return None
    return next((r["step"] for r in rows if r.get("sfpo_active") is False), None)


def render(results: dict[str, dict], target: float, key: str) -> str:
    lines = [f"Eval: `{key}`; target = GRPO's best seed-mean accuracy, {target:.3f}.", "",
             "| variant | best | final | rollouts to target | × fewer rollouts than GRPO |", "|---|---|---|---|---|"]
    grpo_rollouts = results["grpo"]["rollouts_to_target"]
    for name, r in results.items():
        to = r["rollouts_to_target"]
        ratio = f"{grpo_rollouts / to:.2f}×" if to else "—"
        lines.append(f"| {name} | {r['best']:.3f} | {r['final']:.3f} | {'never' if to is None else f'{to:.0f}'} "
                     f"| {ratio} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--ks", type=int, nargs="+", default=[1, 3, 5, 7])
    p.add_argument("--alphas", type=float, nargs="+", default=[0.2, 0.5, 0.8, 1.0])
    p.add_argument("--alpha", type=float, default=0.8, help="alpha of the no-slow-correction / no-switch variants")
    p.add_argument("--out", default="runs/ablate")
    p.add_argument("--workers", type=int, default=None, help="parallel runs (default: one per core)")
    p.add_argument("overrides", nargs="*", help="section.field=value applied to every run")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    named = variants(args.ks, args.alphas, args.alpha)
    try:
        cfg = load_config(args.config, args.overrides)
        for extra in named.values():
            load_config(args.config, [*args.overrides, *extra])  # every variant is valid before anything runs
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    jobs = {out / name / f"seed{s}": ["--seed", str(s), *args.overrides, *extra]
            for name, extra in named.items() for s in args.seeds}
    elapsed = run_all(jobs, cfg, config=args.config, out=out, workers=args.workers, desc="ablation runs")

    runs = {name: {s: read_metrics(out / name / f"seed{s}" / "metrics.jsonl") for s in args.seeds} for name in named}
    key = find_eval_key(runs)
    target = float(mean_curve([eval_curve(rows, key) for rows in runs["grpo"].values()]).accuracy.max())
    results = {name: summarize_variant(r, key, target) for name, r in runs.items()}
    report = {"eval_key": key, "target": target, "seeds": args.seeds, "elapsed_seconds": elapsed,
              "command": command_line(argv),
              "variants": results}
    (out / "ablation.json").write_text(json.dumps(report, indent=2))
    table = render(results, target, key)
    (out / "ablation.md").write_text(table + "\n")
    grid = {(k, a): results[f"K{k}-a{a:g}"] for k in args.ks for a in args.alphas}
    plots = [plot_ablation({c: r[field] for c, r in grid.items()}, out / f"ablation_{field}.png",
                           title=f"SFPO {field} eval accuracy (GRPO best {target:.3f})")
             for field in ("best", "final")]
    print(table)
    print(f"\nplots: {', '.join(map(str, plots))}\nreport: {out / 'ablation.json'}  ({elapsed / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    from sfpo_jax.host import configure_malloc

    configure_malloc()  # malloc keeps freed memory (SFPO_RETAIN_MEMORY=0: off); SFPO_HUGE_PAGES=1: huge pages
    sys.exit(main())
