"""Cross-run analysis: learning-efficiency summaries (GRPO vs SFPO) with bootstrap intervals over seeds, and
their plots (curves with bands, ablation heatmaps, learning-rate sweeps)."""

from sfpo_jax.analysis.summary import (
    curves_figure,
    lr_sweep_figure,
    metric_label,
    plot_ablation,
    plot_curves,
    plot_lr_sweep,
    render_lr_sweep,
    render_markdown,
    summarize,
    sweep_stats,
)

__all__ = [
    "curves_figure",
    "lr_sweep_figure",
    "metric_label",
    "plot_ablation",
    "plot_curves",
    "plot_lr_sweep",
    "render_lr_sweep",
    "render_markdown",
    "summarize",
    "sweep_stats",
]
