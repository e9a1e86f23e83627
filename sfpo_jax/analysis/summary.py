"""Learning efficiency of SFPO against GRPO from the runs' ``metrics.jsonl`` rows: the paper's rollouts and
wall-clock ratios with bootstrap confidence intervals over seeds, accuracies with their spread, plots.

Definitions (what ``experiments/compare.py`` reports):

- A run's *curve* is its eval rows (rows carrying the eval accuracy key, by default the first
  ``eval/<set>/accuracy`` key found: ``eval/average/accuracy`` when a run evaluates several sets), each with
  ``step``, ``rollouts`` (cumulative completions sampled) and the training wall-clock ``time/total`` (cumulative
  seconds of sampling, scoring and updates, *excluding* evaluation, as :class:`sfpo_jax.train.metrics.PhaseTimer`
  counts it; the paper's wall-clock is training time). An eval before training (``eval.before_train``) is the
  point at step 0, rollouts 0 and 0 s, so curves start there.
- An algorithm's *mean curve* averages accuracy, rollouts and seconds over its seeds at the eval steps that
  every seed has. The paper reads the target off single runs; with several seeds we use the mean curve, which
  is less noisy than any one run's maximum.
- *Target*: the maximum of GRPO's mean curve, ``grpo_best_accuracy`` (from GRPO's runs alone);
  ``grpo_rollouts_to_best`` and ``grpo_seconds_to_best`` are taken at the first eval point where it is attained.
- ``sfpo_rollouts_to_target`` / ``sfpo_seconds_to_target``: at the first eval point where SFPO's mean curve is
  ≥ the target; null if it never is. Both "attained" and "≥" hold up to 1e-9, so that equal accuracies averaged
  in a different order count as equal. ``rollouts_ratio = grpo_rollouts_to_best / sfpo_rollouts_to_target``
  (the paper's "× fewer rollouts"), ``wallclock_ratio`` likewise with seconds; null when SFPO never reaches the
  target (or reaches it at zero rollouts or seconds, e.g. an eval before training).
- *Bootstrap over seeds* (``rollouts_ratio_ci95``, ``wallclock_ratio_ci95``, ``bootstrap``): each of
  ``resamples`` (default 10,000) resamples draws, independently per algorithm, as many seeds as the algorithm
  has, uniformly with replacement; recomputes both mean curves (on the eval steps common to *all* of that
  algorithm's seeds, so every resample shares the point estimate's grid), the target from the resampled GRPO
  curve, and the two ratios exactly as above, except that a resample in which SFPO never reaches the target
  counts as ratio 0 (SFPO needs "infinitely" many rollouts: the ratio's limit, and the bottom of the ordering,
  so a percentile interval stays meaningful). ``bootstrap["sfpo_reaches_target_fraction"]`` is the fraction of
  resamples in which it does. Resamples where a ratio is undefined (SFPO reaches the target at zero rollouts or
  seconds, or seconds are unknown) are left out, their fraction in ``bootstrap["undefined_fraction"]``. The
  interval is the percentile one: the 2.5th and 97.5th percentiles (numpy's linear interpolation) of the
  resampled ratios. The draws come from ``numpy.random.default_rng(bootstrap_seed)``, so reports are
  reproducible. With one seed in either algorithm there is nothing to resample and the intervals are null. The
  point estimate stays null when SFPO's mean curve never reaches the target, while the interval may still exist
  (its low end 0 when at least 2.5% of the resamples never reach it).
- Per seed, the same efficiencies with that seed's own GRPO and SFPO curves; the medians are over the seeds
  where SFPO reached its target, with the count of such seeds alongside.
- Accuracies per algorithm: *final* is each seed's last eval point, *best* each seed's maximum; mean, sample
  standard deviation (ddof=1; null for one seed), a percentile bootstrap 95% interval of the mean over seeds
  (resampling the per-seed values, null for one seed) and the per-seed values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "Curve",
    "CurveBand",
    "curve_band",
    "curves_figure",
    "eval_curve",
    "find_eval_key",
    "lr_sweep_figure",
    "mean_curve",
    "metric_label",
    "plot_ablation",
    "plot_curves",
    "plot_lr_sweep",
    "render_lr_sweep",
    "render_markdown",
    "summarize",
    "sweep_stats",
]

Rows = Sequence[Mapping[str, Any]]
Runs = Mapping[str, Mapping[Any, Rows]]  # algorithm → seed → metrics rows
SweepRuns = Mapping[tuple[str, float], Mapping[Any, Rows]]  # (algorithm, learning rate) → seed → metrics rows
_TOL = 1e-9
RESAMPLES = 10_000
LEVEL = 0.95


class Curve(NamedTuple):
    """One eval curve; every field is a float64 array of shape ``[num_evals]`` (``seconds`` NaN where unknown)."""

    step: np.ndarray
    rollouts: np.ndarray
    seconds: np.ndarray
    accuracy: np.ndarray


class CurveBand(NamedTuple):
    """A seed-mean curve and the pointwise bootstrap interval of its accuracy (``low``, ``high``: ``[num_evals]``,
    equal to the mean for a single seed)."""

    mean: Curve
    low: np.ndarray
    high: np.ndarray


def find_eval_key(runs: Mapping[Any, Mapping[Any, Rows]]) -> str:
    """The first ``eval/<set>/accuracy`` key in row order over all runs."""
    for seeds in runs.values():
        for rows in seeds.values():
            for row in rows:
                for k in row:
                    if k.startswith("eval/") and k.endswith("/accuracy"):
                        return k
    raise ValueError("no eval/<set>/accuracy key in any metrics row")


def metric_label(key: str) -> str:
    """A readable axis label for an eval key: ``eval/<set>/accuracy`` → ``held-out accuracy (<set>)``,
    ``eval/average/accuracy`` → ``held-out accuracy (mean over eval sets)``, ``eval/<set>/reward`` →
    ``held-out mean reward (<set>)``; any other key as it is."""
    parts = key.split("/")
    if len(parts) >= 3 and parts[0] == "eval":
        name, metric = "/".join(parts[1:-1]), parts[-1]
        what = {"accuracy": "held-out accuracy", "reward": "held-out mean reward"}.get(metric)
        if what is not None:
            return f"{what} ({'mean over eval sets' if name == 'average' else name})"
    return key


def eval_curve(rows: Rows, key: str, time_key: str = "time/total") -> Curve:
    """The eval points of one run (rows with a non-null ``key``), sorted by step. The eval before training
    (step 0) counts 0 training seconds when its row lacks ``time_key``."""
    points = []
    for row in rows:
        if row.get(key) is None:
            continue
        if "step" not in row or "rollouts" not in row:
            raise ValueError(f"eval row {dict(row)!r} lacks 'step' or 'rollouts'")
        seconds = row.get(time_key, 0.0 if row["step"] == 0 else None)
        points.append((row["step"], row["rollouts"], math.nan if seconds is None else seconds, row[key]))
    if not points:
        raise ValueError(f"a run has no eval rows with {key!r}")
    return Curve(*np.asarray(sorted(points), np.float64).T)


class _Stack(NamedTuple):
    """Seeds' curves on their common eval steps: ``step [T]``, the rest ``[num_seeds, T]``."""

    step: np.ndarray
    rollouts: np.ndarray
    seconds: np.ndarray
    accuracy: np.ndarray


def _stack(curves: Sequence[Curve]) -> _Stack:
    steps = sorted(set.intersection(*(set(c.step.tolist()) for c in curves)))
    if not steps:
        raise ValueError("the seeds' runs share no eval step")
    at = [np.searchsorted(c.step, steps) for c in curves]
    field = lambda f: np.stack([c[f][i] for c, i in zip(curves, at, strict=True)])
    return _Stack(np.asarray(steps, np.float64), field(1), field(2), field(3))


def mean_curve(curves: Sequence[Curve]) -> Curve:
    """The seed-mean curve over the eval steps that every curve has."""
    s = _stack(curves)
    return Curve(s.step, s.rollouts.mean(0), s.seconds.mean(0), s.accuracy.mean(0))


def _weights(rng: np.random.Generator, n: int, resamples: int) -> np.ndarray:
    """``[resamples, n]`` weights of a bootstrap over ``n`` seeds: how often each is drawn, over ``n``."""
    return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples) / n


def _interval(values: np.ndarray, level: float = LEVEL) -> list[float] | None:
    values = values[~np.isnan(values)]
    if not values.size:
        return None
    tail = 100 * (1 - level) / 2
    return [float(x) for x in np.percentile(values, [tail, 100 - tail])]


def curve_band(
    curves: Sequence[Curve], *, resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL
) -> CurveBand:
    """The seed-mean curve with a pointwise percentile bootstrap interval of its accuracy (seeds resampled with
    replacement, on the eval steps common to all of them)."""
    s = _stack(curves)
    mean = Curve(s.step, s.rollouts.mean(0), s.seconds.mean(0), s.accuracy.mean(0))
    if len(curves) < 2 or resamples <= 0:
        return CurveBand(mean, mean.accuracy.copy(), mean.accuracy.copy())
    acc = _weights(np.random.default_rng(seed), len(curves), resamples) @ s.accuracy
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(acc, [tail, 100 - tail], axis=0)
    return CurveBand(mean, low, high)


def _first_at_least(curve: Curve, target: float) -> int | None:
    hits = np.flatnonzero(curve.accuracy >= target - _TOL)
    return int(hits[0]) if hits.size else None


def _num(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else a / b


def _efficiency(grpo: Curve, sfpo: Curve) -> dict[str, Any]:
    """Target from ``grpo`` (its max, first attained) and where ``sfpo`` first reaches it."""
    target = float(grpo.accuracy.max())
    best = _first_at_least(grpo, target)
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


def _first_index(hits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of a boolean ``[B, T]``: whether any is true, and the index of the first true one (0 if none)."""
    return hits.any(axis=1), hits.argmax(axis=1)


def _bootstrap_efficiency(
    grpo: Sequence[Curve], sfpo: Sequence[Curve], *, resamples: int, seed: int, level: float = LEVEL
) -> dict[str, Any]:
    """The bootstrap intervals of the two ratios (the module docstring defines them)."""
    info: dict[str, Any] = {"resamples": resamples, "rng_seed": seed, "level": level, "method": "percentile"}
    if min(len(grpo), len(sfpo)) < 2 or resamples <= 0:
        info |= {"sfpo_reaches_target_fraction": None, "undefined_fraction": None}
        return {"rollouts_ratio_ci95": None, "wallclock_ratio_ci95": None, "bootstrap": info}
    rng = np.random.default_rng(seed)
    g, s = _stack(grpo), _stack(sfpo)
    wg, ws = _weights(rng, len(grpo), resamples), _weights(rng, len(sfpo), resamples)
    rows = np.arange(resamples)
    g_acc = wg @ g.accuracy
    target = g_acc.max(axis=1, keepdims=True)
    _, g_best = _first_index(g_acc >= target - _TOL)
    reached, s_first = _first_index(ws @ s.accuracy >= target - _TOL)
    out: dict[str, Any] = {}
    undefined = {}
    for name, field in (("rollouts_ratio", "rollouts"), ("wallclock_ratio", "seconds")):
        to_best = (wg @ getattr(g, field))[rows, g_best]
        to_target = np.where(reached, (ws @ getattr(s, field))[rows, s_first], np.inf)
        ratio = np.full(resamples, np.nan)
        ok = np.isfinite(to_best) & (to_target > 0)  # NaN compares False
        ratio[ok] = to_best[ok] / to_target[ok]  # never reached: x / inf = 0
        undefined[name] = float(np.isnan(ratio).mean())
        out[f"{name}_ci95"] = _interval(ratio, level)
    info |= {"sfpo_reaches_target_fraction": float(reached.mean()), "undefined_fraction": undefined}
    return out | {"bootstrap": info}


def _stats(per_seed: Mapping[str, float], rng: np.random.Generator | None = None, resamples: int = 0) -> dict:
    values = np.asarray(list(per_seed.values()), np.float64)
    ci = None
    if values.size > 1 and rng is not None and resamples > 0:
        ci = _interval(_weights(rng, values.size, resamples) @ values)
    return {
        "mean": float(values.mean()),
        "std": float(values.std(ddof=1)) if values.size > 1 else None,
        "ci95": ci,
        "per_seed": dict(per_seed),
    }


def _median(values: Sequence[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.median(values)) if values else None


def summarize(
    runs: Runs,
    *,
    key: str | None = None,
    time_key: str = "time/total",
    resamples: int = RESAMPLES,
    bootstrap_seed: int = 0,
) -> dict[str, Any]:
    """The learning-efficiency summary of GRPO vs SFPO (definitions in the module docstring).

    Args:
      runs: ``{"grpo": {seed: rows}, "sfpo": {seed: rows}, ...}``, rows as :func:`read_metrics` returns them.
        Algorithms besides the two get accuracy statistics only.
      key: the eval accuracy key; None picks the first ``eval/<set>/accuracy`` key found.
      time_key: the cumulative training seconds.
      resamples: bootstrap resamples for the confidence intervals (0: no intervals, all null).
      bootstrap_seed: seeds the bootstrap's ``numpy.random.default_rng``.

    Returns:
      A JSON-serialisable dict with at least ``grpo_best_accuracy``, ``grpo_rollouts_to_best``,
      ``sfpo_rollouts_to_target``, ``rollouts_ratio`` and ``wallclock_ratio`` (the last three null when SFPO
      never reaches the target), ``rollouts_ratio_ci95`` and ``wallclock_ratio_ci95`` (``[low, high]`` or null)
      with the bootstrap's settings and ``sfpo_reaches_target_fraction`` in ``bootstrap``, the same for seconds
      and steps, ``accuracy`` (per algorithm: ``final`` and ``best`` with mean/std/ci95/per_seed, and the mean
      curve's ``mean_curve_best``/``mean_curve_final``), ``per_seed`` efficiencies and their
      ``per_seed_median``.
    """
    for algo in ("grpo", "sfpo"):
        if not runs.get(algo):
            raise ValueError(f"runs needs at least one seed for {algo!r}, got algorithms {sorted(runs)}")
    key = key or find_eval_key(runs)
    curves = {a: {str(s): eval_curve(rows, key, time_key) for s, rows in seeds.items()} for a, seeds in runs.items()}
    means = {a: mean_curve(list(c.values())) for a, c in curves.items()}
    summary: dict[str, Any] = {"eval_key": key, "eval_label": metric_label(key), "time_key": time_key}
    summary |= _efficiency(means["grpo"], means["sfpo"])
    boot = _bootstrap_efficiency(
        list(curves["grpo"].values()), list(curves["sfpo"].values()), resamples=resamples, seed=bootstrap_seed
    )
    summary["rollouts_ratio_ci95"] = boot["rollouts_ratio_ci95"]
    summary["wallclock_ratio_ci95"] = boot["wallclock_ratio_ci95"]
    summary["bootstrap"] = boot["bootstrap"]
    summary["seeds"] = {a: list(c) for a, c in curves.items()}
    rng = np.random.default_rng([bootstrap_seed, 1])  # a stream apart from the ratios'
    summary["accuracy"] = {
        a: {
            "final": _stats({s: float(c.accuracy[-1]) for s, c in cs.items()}, rng, resamples),
            "best": _stats({s: float(c.accuracy.max()) for s, c in cs.items()}, rng, resamples),
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


def _fmt_ci(ci: Sequence[float] | None, spec: str = ".3f", suffix: str = "") -> str:
    return "—" if ci is None else f"[{ci[0]:{spec}}{suffix}, {ci[1]:{spec}}{suffix}]"


def render_markdown(summary: Mapping[str, Any]) -> str:
    """A compact Markdown report of :func:`summarize`'s output: accuracies, then efficiency with its intervals."""
    acc = summary["accuracy"]
    algos = list(acc)
    cell = lambda s: f"{s['mean']:.3f} ± {_fmt(s['std'])}" + (f" {_fmt_ci(s['ci95'])}" if s.get("ci95") else "")
    label = summary.get("eval_label") or metric_label(summary["eval_key"])
    lines = [
        f"Eval: {label} (`{summary['eval_key']}`); wall-clock: `{summary['time_key']}` (training time, eval excluded).",
        "",
        "| | " + " | ".join(a.upper() for a in algos) + " |",
        "|---|" + "---|" * len(algos),
        "| seeds | " + " | ".join(str(len(summary["seeds"][a])) for a in algos) + " |",
        "| best accuracy: mean ± std over seeds [95% CI of the mean] | "
        + " | ".join(cell(acc[a]["best"]) for a in algos)
        + " |",
        "| final accuracy: mean ± std over seeds [95% CI of the mean] | "
        + " | ".join(cell(acc[a]["final"]) for a in algos)
        + " |",
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
    boot = summary.get("bootstrap") or {}
    reach = boot.get("sfpo_reaches_target_fraction")
    reach = "" if reach is None else f"; SFPO reaches the target in {100 * reach:.0f}% of them"
    lines += [
        f"| **ratio (GRPO / SFPO)** | | **{_fmt(summary['rollouts_ratio'], '.2f', '×')}** | "
        f"**{_fmt(summary['wallclock_ratio'], '.2f', '×')}** |",
        f"| 95% CI, bootstrap over seeds ({boot.get('resamples', 0):,} resamples{reach}) | | "
        f"{_fmt_ci(summary.get('rollouts_ratio_ci95'), '.2f', '×')} | "
        f"{_fmt_ci(summary.get('wallclock_ratio_ci95'), '.2f', '×')} |",
        f"| per-seed median ratio ({med['seeds_reaching_target']}/{med['seeds_paired']} seeds reach their "
        f"target) | | {_fmt(med['rollouts_ratio'], '.2f', '×')} | {_fmt(med['wallclock_ratio'], '.2f', '×')} |",
        "",
        "Intervals: percentile bootstrap, seeds resampled with replacement independently per algorithm; a resample "
        "in which SFPO never reaches GRPO's best counts as ratio 0; — with a single seed.",
    ]
    return "\n".join(lines) + "\n"


_X_AXES = {
    "rollouts": ("rollouts (completions sampled)", "accuracy_vs_rollouts.png"),
    "seconds": ("training wall-clock, s ({time_key}, eval excluded)", "accuracy_vs_wallclock.png"),
}


def curves_figure(
    runs: Runs,
    x: str = "rollouts",
    *,
    key: str | None = None,
    time_key: str = "time/total",
    resamples: int = 2_000,
    seed: int = 0,
) -> Figure:
    """Accuracy against ``x`` (``"rollouts"`` or ``"seconds"``) for every algorithm: each seed as a thin line
    (one legend entry per algorithm, "GRPO seeds"), the seed-mean curve thick with its pointwise 95% bootstrap
    band over seeds shaded, and GRPO's best mean accuracy (the target) dashed. The y-axis is
    :func:`metric_label` of the eval key. A matplotlib ``Figure`` (object API: no pyplot, no backend change)."""
    from matplotlib.figure import Figure

    if x not in _X_AXES:
        raise ValueError(f"x must be one of {sorted(_X_AXES)}, got {x!r}")
    key = key or find_eval_key(runs)
    curves = {a: [eval_curve(rows, key, time_key) for rows in seeds.values()] for a, seeds in runs.items()}
    target = float(mean_curve(curves["grpo"]).accuracy.max()) if curves.get("grpo") else None
    fig = Figure(figsize=(8.6, 4.2), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    for i, (algo, cs) in enumerate(curves.items()):
        color, name = f"C{i}", algo.upper()
        for j, c in enumerate(cs):
            ax.plot(
                getattr(c, x), c.accuracy, color=color, lw=0.8, alpha=0.35, label=f"{name} seeds" if j == 0 else None
            )
        band = curve_band(cs, resamples=resamples, seed=seed + i)
        xs = getattr(band.mean, x)
        if len(cs) > 1:
            ax.fill_between(xs, band.low, band.high, color=color, alpha=0.2, lw=0, label=f"{name} 95% CI (bootstrap)")
        ax.plot(xs, band.mean.accuracy, color=color, lw=2.4, label=f"{name} mean of {len(cs)} seeds")
    if target is not None:
        ax.axhline(target, color="0.3", ls="--", lw=1.0, label=f"GRPO best mean = {target:.3f}")
    ylabel = metric_label(key)
    ax.set(xlabel=_X_AXES[x][0].format(time_key=time_key), ylabel=ylabel)
    ax.set_title(f"{ylabel} vs {'rollouts' if x == 'rollouts' else 'training wall-clock'}", fontsize="medium")
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")  # outside: the curves stay visible
    return fig


def plot_curves(
    runs: Runs,
    out_dir: str | Path,
    *,
    key: str | None = None,
    time_key: str = "time/total",
    resamples: int = 2_000,
    seed: int = 0,
) -> list[Path]:
    """Writes ``accuracy_vs_rollouts.png`` and ``accuracy_vs_wallclock.png`` (:func:`curves_figure`) into
    ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for x, (_, name) in _X_AXES.items():
        fig = curves_figure(runs, x, key=key, time_key=time_key, resamples=resamples, seed=seed)
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


def sweep_stats(
    runs: SweepRuns,
    *,
    key: str | None = None,
    time_key: str = "time/total",
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> dict[str, Any]:
    """Best and final accuracy of every cell of a sweep, e.g. a learning-rate sweep of both algorithms.

    Args:
      runs: ``{(algorithm, value): {seed: rows}}``; the value is the swept hyperparameter (a number).
      key: the eval accuracy key; None picks the first ``eval/<set>/accuracy`` key found.
      resamples, seed: the bootstrap of each cell's ``ci95`` (as in :func:`summarize`).

    Returns:
      ``{"eval_key", "eval_label", "cells": [...]}``, one cell per key, algorithms in first-seen order and values
      ascending: ``{"algo", "value", "best", "final", "no_eval_seeds"}`` where ``best``/``final`` are
      mean/std/ci95/per_seed over the seeds' maxima / last eval points (null when no seed has an eval row), and
      ``no_eval_seeds`` the seeds left out because their runs have no eval row (e.g. diverged before the first
      eval). A run that stopped early keeps its last eval as its final accuracy.
    """
    key = key or find_eval_key(runs)
    rng = np.random.default_rng([seed, 2])
    algos = list(dict.fromkeys(a for a, _ in runs))
    cells = []
    for algo in algos:
        for value in sorted(v for a, v in runs if a == algo):
            curves, missing = {}, []
            for s, rows in runs[(algo, value)].items():
                if any(r.get(key) is not None for r in rows):
                    curves[str(s)] = eval_curve(rows, key, time_key)
                else:
                    missing.append(str(s))
            stats = lambda f, cs=curves: _stats({s: f(c) for s, c in cs.items()}, rng, resamples) if cs else None
            cells.append(
                {
                    "algo": algo,
                    "value": float(value),
                    "best": stats(lambda c: float(c.accuracy.max())),
                    "final": stats(lambda c: float(c.accuracy[-1])),
                    "no_eval_seeds": missing,
                }
            )
    return {"eval_key": key, "eval_label": metric_label(key), "cells": cells}


def render_lr_sweep(stats: Mapping[str, Any], *, value_label: str = "learning rate") -> str:
    """A Markdown table of :func:`sweep_stats`' output."""
    cell = lambda s: (
        "—" if s is None else f"{s['mean']:.3f} ± {_fmt(s['std'])}" + (f" {_fmt_ci(s['ci95'])}" if s["ci95"] else "")
    )
    lines = [
        f"Eval: {stats['eval_label']} (`{stats['eval_key']}`); mean ± std over seeds [95% bootstrap CI of the mean].",
        "",
        f"| algorithm | {value_label} | seeds | best accuracy | final accuracy |",
        "|---|---|---|---|---|",
    ]
    for c in stats["cells"]:
        n = len((c["best"] or {"per_seed": {}})["per_seed"])
        seeds = f"{n}" + (f" (+{len(c['no_eval_seeds'])} without evals)" if c["no_eval_seeds"] else "")
        lines.append(f"| {c['algo'].upper()} | {c['value']:g} | {seeds} | {cell(c['best'])} | {cell(c['final'])} |")
    return "\n".join(lines) + "\n"


_SWEEP_METRICS = {"best": "best (max over evals)", "final": "final (last eval)"}


def lr_sweep_figure(
    runs: SweepRuns,
    *,
    key: str | None = None,
    metrics: Sequence[str] = ("best", "final"),
    xlabel: str = "learning rate",
    logx: bool = True,
    resamples: int = 2_000,
    seed: int = 0,
) -> Figure:
    """Accuracy against the swept value (default: learning rate, log axis), one panel per metric (``"best"``,
    ``"final"``): per algorithm the seed mean with its 95% bootstrap interval as error bars, joined by a line,
    and every seed's value as a hollow point (one legend entry per algorithm, "GRPO seeds"). ``runs`` as for
    :func:`sweep_stats`."""
    from matplotlib.figure import Figure

    for m in metrics:
        if m not in _SWEEP_METRICS:
            raise ValueError(f"metrics must be among {sorted(_SWEEP_METRICS)}, got {m!r}")
    stats = sweep_stats(runs, key=key, resamples=resamples, seed=seed)
    algos = list(dict.fromkeys(c["algo"] for c in stats["cells"]))
    fig = Figure(figsize=(4.6 * len(metrics) + 0.6, 4.0), dpi=120, layout="constrained")
    axes = fig.subplots(1, len(metrics), sharey=True, squeeze=False)[0]
    for ax, metric in zip(axes, metrics, strict=True):
        handles = []  # in drawing order (matplotlib would list the error bars after every line)
        for i, algo in enumerate(algos):
            color, name = f"C{i}", algo.upper()
            cells = [c for c in stats["cells"] if c["algo"] == algo and c[metric] is not None]
            if not cells:
                continue
            xs = np.asarray([c["value"] for c in cells])
            means = np.asarray([c[metric]["mean"] for c in cells])
            cis = np.asarray([c[metric]["ci95"] or [c[metric]["mean"]] * 2 for c in cells])
            px = [c["value"] for c in cells for _ in c[metric]["per_seed"]]
            py = [v for c in cells for v in c[metric]["per_seed"].values()]
            handles += ax.plot(
                px, py, ls="none", marker="o", ms=4, mfc="none", color=color, alpha=0.6, label=f"{name} seeds"
            )
            bars = ax.errorbar(
                xs,
                means,
                yerr=np.abs(cis.T - means),
                color=color,
                marker="s",
                ms=5,
                lw=1.8,
                capsize=3,
                label=f"{name} mean [95% CI]",
            )
            handles.append(bars)
        if logx and all(c["value"] > 0 for c in stats["cells"]):
            ax.set_xscale("log")
        ax.set(xlabel=xlabel, title=f"{_SWEEP_METRICS[metric]} accuracy")
        ax.grid(alpha=0.3)
        if ax is axes[0]:
            ax.legend(handles=handles, fontsize="small")
    axes[0].set_ylabel(stats["eval_label"])
    return fig


def plot_lr_sweep(runs: SweepRuns, path: str | Path, **kwargs: Any) -> Path:
    """Writes :func:`lr_sweep_figure` (same keyword arguments) as a PNG at ``path``; returns it."""
    fig = lr_sweep_figure(runs, **kwargs)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
