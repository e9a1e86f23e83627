"""Cross-run analysis: learning-efficiency summaries (GRPO vs SFPO) and their plots."""

from sfpo_jax.analysis.summary import plot_ablation, plot_curves, render_markdown, summarize

__all__ = ["plot_ablation", "plot_curves", "render_markdown", "summarize"]
