"""Learning efficiency of SFPO against GRPO from the runs' ``metrics.jsonl`` rows: the paper's rollouts and
wall-clock ratios, accuracies with their spread over seeds, plots.

Definitions (what ``experiments/compare.py`` reports):

- A run's *curve* is its eval rows (rows carrying the eval accuracy key, by default the first
  ``eval/<set>/accuracy`` key found), each with ``step``, ``rollouts`` (cumulative completions sampled) and
  the training wall-clock ``time/total`` (cumulative seconds of sampling, scoring and updates, *excluding*
  evaluation, as :class:`sfpo_jax.train.metrics.PhaseTimer` counts it; the paper's wall-clock is training time).
- An algorithm's *mean curve* averages accuracy, rollouts and seconds over its seeds at the eval steps that
  every seed has. The paper reads the target off single runs; with several seeds we use the mean curve, which
  is less noisy than any one run's maximum.
- *Target*: the maximum of GRPO's mean curve, ``grpo_best_accuracy``; ``grpo_rollouts_to_best`` and
  ``grpo_seconds_to_best`` are taken at the first eval point where it is attained.
- ``sfpo_rollouts_to_target`` / ``sfpo_seconds_to_target``: at the first eval point where SFPO's mean curve is
  ≥ the target (up to 1e-9, so that equal accuracies averaged in a different order count as equal); null if it
  never is. ``rollouts_ratio = grpo_rollouts_to_best / sfpo_rollouts_to_target`` (the paper's "× fewer
  rollouts"), ``wallclock_ratio`` likewise with seconds; null when SFPO never reaches the target (or reaches it
  at zero rollouts or seconds, e.g. an eval before training).
- Per seed, the same with that seed's own GRPO and SFPO curves; the medians are over the seeds where SFPO
  reached its target, with the count of such seeds alongside.
- Accuracies per algorithm: *final* is each seed's last eval point, *best* each seed's maximum; mean, sample
  standard deviation (ddof=1; null for one seed) and the per-seed values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

__all__ = ["Curve", "eval_curve", "plot_ablation", "plot_curves", "render_markdown", "summarize"]

Rows = Sequence[Mapping[str, Any]]
Runs = Mapping[str, Mapping[Any, Rows]]  # algorithm → seed → metrics rows
_TOL = 1e-9


class Curve(NamedTuple):
    """One eval curve; every field is a float64 array of shape ``[num_evals]`` (``seconds`` NaN where unknown)."""

    step: np.ndarray
    rollouts: np.ndarray
    seconds: np.ndarray
    accuracy: np.ndarray


def find_eval_key(runs: Runs) -> str:
    """The first ``eval/<set>/accuracy`` key in row order over all runs."""
    for seeds in runs.values():
        for rows in seeds.values():
            for row in rows:
                for k in row:
                    if k.startswith("eval/") and k.endswith("/accuracy"):
                        return k
    raise ValueError("no eval/<set>/accuracy key in any metrics row")


def eval_curve(rows: Rows, key: str, time_key: str = "time/total") -> Curve:
    """The eval points of one run (rows with a non-null ``key``), sorted by step."""
    points = []
    for row in rows:
        if row.get(key) is None:
            continue
        if "step" not in row or "rollouts" not in row:
            raise ValueError(f"eval row {dict(row)!r} lacks 'step' or 'rollouts'")
        seconds = row.get(time_key)
        points.append((row["step"], row["rollouts"], math.nan if seconds is None else seconds, row[key]))
    if not points:
        raise ValueError(f"a run has no eval rows with {key!r}")
    return Curve(*np.asarray(sorted(points), np.float64).T)


def mean_curve(curves: Sequence[Curve]) -> Curve:
    """The seed-mean curve over the eval steps that every curve has."""
    steps = sorted(set.intersection(*(set(c.step.tolist()) for c in curves)))
    if not steps:
        raise ValueError("the seeds' runs share no eval step")
    at = [np.searchsorted(c.step, steps) for c in curves]
    mean = lambda field: np.mean([c[field][i] for c, i in zip(curves, at, strict=True)], axis=0)
    return Curve(np.asarray(steps, np.float64), mean(1), mean(2), mean(3))


def _first_at_least(curve: Curve, target: float) -> int | None:
    hits = np.flatnonzero(curve.accuracy >= target - _TOL)
    return int(hits[0]) if hits.size else None


def _num(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else a / b


def _efficiency(grpo: Curve, sfpo: Curve) -> dict[str, Any]:
    """Target from ``grpo`` (its max, first attained) and where ``sfpo`` first reaches it."""
    best = int(np.argmax(grpo.accuracy))  # argmax returns the first of tied maxima
    target = float(grpo.accuracy[best])
    out: dict[str, Any] = {
        "grpo_best_accuracy": target,
        "grpo_step_to_best": int(grpo.step[best]),
        "grpo_rollouts_to_best": _num(grpo.rollouts[best]),
        "grpo_seconds_to_best": _num(grpo.seconds[best]),
        "sfpo_step_to_target": None,
        "sfpo_rollouts_to_target": None,
        "sfpo_seconds_to_target": None,
    }
    hit = _first_at_least(sfpo, target)
    if hit is not None:
        out |= {
            "sfpo_step_to_target": int(sfpo.step[hit]),
            "sfpo_rollouts_to_target": _num(sfpo.rollouts[hit]),
            "sfpo_seconds_to_target": _num(sfpo.seconds[hit]),
        }
    out["rollouts_ratio"] = _ratio(out["grpo_rollouts_to_best"], out["sfpo_rollouts_to_target"])
    out["wallclock_ratio"] = _ratio(out["grpo_seconds_to_best"], out["sfpo_seconds_to_target"])
    return out


def _stats(per_seed: Mapping[str, float]) -> dict[str, Any]:
    values = np.asarray(list(per_seed.values()), np.float64)
    return {
        "mean": float(values.mean()),
        "std": float(values.std(ddof=1)) if values.size > 1 else None,
        "per_seed": dict(per_seed),
    }


def _median(values: Sequence[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.median(values)) if values else None


def summarize(runs: Runs, *, key: str | None = None, time_key: str = "time/total") -> dict[str, Any]:
    """The learning-efficiency summary of GRPO vs SFPO (definitions in the module docstring).

    Args:
      runs: ``{"grpo": {seed: rows}, "sfpo": {seed: rows}, ...}``, rows as :func:`read_metrics` returns them.
        Algorithms besides the two get accuracy statistics only.
      key: the eval accuracy key; None picks the first ``eval/<set>/accuracy`` key found.
      time_key: the cumulative training seconds.

    Returns:
      A JSON-serialisable dict with at least ``grpo_best_accuracy``, ``grpo_rollouts_to_best``,
      ``sfpo_rollouts_to_target``, ``rollouts_ratio`` and ``wallclock_ratio`` (the last three null when SFPO
      never reaches the target), the same for seconds and steps, ``accuracy`` (per algorithm: ``final`` and
      ``best`` with mean/std/per_seed, and the mean curve's ``mean_curve_best``/``mean_curve_final``),
      ``per_seed`` efficiencies and their ``per_seed_median``.
    """
    for algo in ("grpo", "sfpo"):
        if not runs.get(algo):
            raise ValueError(f"runs needs at least one seed for {algo!r}, got algorithms {sorted(runs)}")
    key = key or find_eval_key(runs)
    curves = {a: {str(s): eval_curve(rows, key, time_key) for s, rows in seeds.items()} for a, seeds in runs.items()}
    means = {a: mean_curve(list(c.values())) for a, c in curves.items()}
    summary: dict[str, Any] = {"eval_key": key, "time_key": time_key}
    summary |= _efficiency(means["grpo"], means["sfpo"])
    summary["seeds"] = {a: list(c) for a, c in curves.items()}
    summary["accuracy"] = {
        a: {
            "final": _stats({s: float(c.accuracy[-1]) for s, c in cs.items()}),
            "best": _stats({s: float(c.accuracy.max()) for s, c in cs.items()}),
            "mean_curve_best": float(means[a].accuracy.max()),
            "mean_curve_final": float(means[a].accuracy[-1]),
        }
        for a, cs in curves.items()
    }
    paired = [s for s in curves["grpo"] if s in curves["sfpo"]]
    per_seed = {s: _efficiency(curves["grpo"][s], curves["sfpo"][s]) for s in paired}
    summary["per_seed"] = per_seed
    summary["per_seed_median"] = {
        "rollouts_ratio": _median([e["rollouts_ratio"] for e in per_seed.values()]),
        "wallclock_ratio": _median([e["wallclock_ratio"] for e in per_seed.values()]),
        "seeds_reaching_target": sum(e["sfpo_step_to_target"] is not None for e in per_seed.values()),
        "seeds_paired": len(paired),
    }
    return summary


def _fmt(x: float | None, spec: str = ".3f", suffix: str = "") -> str:
    return "—" if x is None else f"{x:{spec}}{suffix}"


def render_markdown(summary: Mapping[str, Any]) -> str:
    """A compact Markdown report of :func:`summarize`'s output: accuracies, then efficiency."""
    acc = summary["accuracy"]
    algos = list(acc)
    cell = lambda s: f"{s['mean']:.3f} ± {_fmt(s['std'])}"
    lines = [
        f"Eval: `{summary['eval_key']}`; wall-clock: `{summary['time_key']}` (training time, eval excluded).",
        "",
        "| | " + " | ".join(a.upper() for a in algos) + " |",
        "|---|" + "---|" * len(algos),
        "| seeds | " + " | ".join(str(len(summary["seeds"][a])) for a in algos) + " |",
        "| best accuracy (mean ± std over seeds) | " + " | ".join(cell(acc[a]["best"]) for a in algos) + " |",
        "| final accuracy (mean ± std over seeds) | " + " | ".join(cell(acc[a]["final"]) for a in algos) + " |",
        "| best of the seed-mean curve | " + " | ".join(f"{acc[a]['mean_curve_best']:.3f}" for a in algos) + " |",
        "",
        "| efficiency (seed-mean curves) | step | rollouts | seconds |",
        "|---|---|---|---|",
        f"| GRPO reaches its best, {summary['grpo_best_accuracy']:.3f} | {summary['grpo_step_to_best']} | "
        f"{_fmt(summary['grpo_rollouts_to_best'], '.0f')} | {_fmt(summary['grpo_seconds_to_best'], '.1f')} |",
    ]
    if summary["sfpo_step_to_target"] is None:
        lines.append("| SFPO reaches it | never | — | — |")
    else:
        lines.append(
            f"| SFPO reaches it | {summary['sfpo_step_to_target']} | {_fmt(summary['sfpo_rollouts_to_target'], '.0f')}"
            f" | {_fmt(summary['sfpo_seconds_to_target'], '.1f')} |"
        )
    med = summary["per_seed_median"]
    lines += [
        f"| **ratio (GRPO / SFPO)** | | **{_fmt(summary['rollouts_ratio'], '.2f', '×')}** | "
        f"**{_fmt(summary['wallclock_ratio'], '.2f', '×')}** |",
        f"| per-seed median ratio ({med['seeds_reaching_target']}/{med['seeds_paired']} seeds reach their "
        f"target) | | {_fmt(med['rollouts_ratio'], '.2f', '×')} | {_fmt(med['wallclock_ratio'], '.2f', '×')} |",
    ]
    return "\n".join(lines) + "\n"


def plot_curves(runs: Runs, out_dir: str | Path, *, key: str | None = None, time_key: str = "time/total") -> list[Path]:
    """Writes ``accuracy_vs_rollouts.png`` and ``accuracy_vs_wallclock.png`` into ``out_dir``: every algorithm,
    each seed as a thin line and the seed-mean curve thick, with GRPO's best mean accuracy (the target) dashed.

    Figures are drawn with matplotlib's object API (no pyplot, no global backend change), rendered by Agg.
    """
    from matplotlib.figure import Figure

    key = key or find_eval_key(runs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    curves = {a: [eval_curve(rows, key, time_key) for rows in seeds.values()] for a, seeds in runs.items()}
    target = float(mean_curve(curves["grpo"]).accuracy.max()) if curves.get("grpo") else None
    paths = []
    for field, xlabel, name in (
        ("rollouts", "rollouts (completions sampled)", "accuracy_vs_rollouts.png"),
        ("seconds", f"training wall-clock, s ({time_key}, eval excluded)", "accuracy_vs_wallclock.png"),
    ):
        fig = Figure(figsize=(6.4, 4.2), dpi=120, layout="constrained")
        ax = fig.add_subplot()
        for i, (algo, cs) in enumerate(curves.items()):
            color = f"C{i}"
            for c in cs:
                ax.plot(getattr(c, field), c.accuracy, color=color, lw=0.8, alpha=0.35)
            m = mean_curve(cs)
            ax.plot(getattr(m, field), m.accuracy, color=color, lw=2.4, label=f"{algo.upper()} (mean of {len(cs)})")
        if target is not None:
            ax.axhline(target, color="0.3", ls="--", lw=1.0, label=f"GRPO best mean = {target:.3f}")
        ax.set(xlabel=xlabel, ylabel=key, title=f"{key} vs {field}")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize="small")
        path = out_dir / name
        fig.savefig(path)
        paths.append(path)
    return paths


def plot_ablation(
    values: Mapping[tuple[Any, Any], float | None],
    path: str | Path,
    *,
    row_label: str = "K (fast steps)",
    col_label: str = "alpha",
    title: str = "",
    fmt: str = ".3f",
) -> Path:
    """Heatmap of a grid ablation, e.g. ``{(K, alpha): best accuracy}``, written as a PNG at ``path``.

    Rows and columns are the sorted distinct first and second key components; missing or null cells (e.g. a
    diverged run) are blank and marked n/a. Each cell is annotated with its value."""
    from matplotlib.figure import Figure

    if not values:
        raise ValueError("values is empty")
    rows = sorted({r for r, _ in values})
    cols = sorted({c for _, c in values})
    grid = np.full((len(rows), len(cols)), np.nan)
    for (r, c), v in values.items():
        grid[rows.index(r), cols.index(c)] = np.nan if v is None else v
    fig = Figure(figsize=(1.2 * len(cols) + 2.2, 0.8 * len(rows) + 1.6), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", aspect="auto")
    fig.colorbar(image, ax=ax)
    finite = grid[np.isfinite(grid)]
    middle = (finite.min() + finite.max()) / 2 if finite.size else 0.0
    for (i, j), v in np.ndenumerate(grid):
        label, color = (f"{v:{fmt}}", "black" if v > middle else "white") if np.isfinite(v) else ("n/a", "0.4")
        ax.text(j, i, label, ha="center", va="center", color=color)
    ax.set(
        xticks=range(len(cols)),
        xticklabels=[str(c) for c in cols],
        xlabel=col_label,
        yticks=range(len(rows)),
        yticklabels=[str(r) for r in rows],
        ylabel=row_label,
        title=title,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
