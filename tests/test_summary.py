"""Learning-efficiency summary on synthetic metric rows with hand-computed expectations (the bootstrap intervals
included), and the plots, checked through their matplotlib objects."""

import itertools
import json

import numpy as np
import pytest

from sfpo_jax.analysis.summary import (
    curve_band,
    curves_figure,
    eval_curve,
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

KEY = "eval/test/accuracy"


def make_rows(accuracies, *, seconds_per_step=2.0, rollouts_per_step=16, every=5, extra=None, before=None):
    """One row per step as the loop writes them; the eval rows (every ``every`` steps) carry the accuracies;
    ``before``: the accuracy of an eval before training (``eval.before_train``), a step-0 row."""
    rows = [] if before is None else [{"step": 0, "rollouts": 0, KEY: before, "time/total": 0.0}]
    for step in range(1, every * len(accuracies) + 1):
        row = {
            "step": step,
            "rollouts": rollouts_per_step * step,
            "time/total": seconds_per_step * step,
            "reward/mean": 0.1,
        }
        if step % every == 0:
            row[KEY] = accuracies[step // every - 1]
            row |= extra or {}
        rows.append(row)
    return rows


@pytest.fixture
def runs():
    # GRPO mean curve [0.2, 0.5, 0.5, 0.4]: best 0.5, first at step 10 (tie with step 15).
    # SFPO mean curve [0.5, 0.525, 0.5, 0.65]: reaches 0.5 at step 5 (a tie with the target).
    return {
        "grpo": {
            0: make_rows([0.2, 0.4, 0.5, 0.5], seconds_per_step=2.0),
            1: make_rows([0.2, 0.6, 0.5, 0.3], seconds_per_step=3.0),
        },
        "sfpo": {
            0: make_rows([0.45, 0.55, 0.6, 0.6], seconds_per_step=4.0),
            1: make_rows([0.55, 0.5, 0.4, 0.7], seconds_per_step=6.0),
        },
    }


def test_summary_hand_computed(runs):
    s = summarize(runs)
    assert s["eval_key"] == KEY
    assert s["grpo_best_accuracy"] == pytest.approx(0.5)
    assert s["grpo_step_to_best"] == 10
    assert s["grpo_rollouts_to_best"] == 160  # 16 rollouts per step
    assert s["grpo_seconds_to_best"] == pytest.approx(25.0)  # mean of 2 and 3 s/step, × 10 steps
    assert s["sfpo_step_to_target"] == 5
    assert s["sfpo_rollouts_to_target"] == 80
    assert s["sfpo_seconds_to_target"] == pytest.approx(25.0)  # mean of 4 and 6 s/step, × 5 steps
    assert s["rollouts_ratio"] == pytest.approx(2.0)
    assert s["wallclock_ratio"] == pytest.approx(1.0)

    grpo, sfpo = s["accuracy"]["grpo"], s["accuracy"]["sfpo"]
    assert grpo["final"]["per_seed"] == {"0": 0.5, "1": 0.3}
    assert grpo["final"]["mean"] == pytest.approx(0.4) and grpo["final"]["std"] == pytest.approx(np.sqrt(0.02))
    assert grpo["best"]["per_seed"] == {"0": 0.5, "1": 0.6} and grpo["best"]["mean"] == pytest.approx(0.55)
    assert sfpo["final"]["mean"] == pytest.approx(0.65) and sfpo["best"]["std"] == pytest.approx(np.sqrt(0.005))
    assert grpo["mean_curve_best"] == pytest.approx(0.5) and grpo["mean_curve_final"] == pytest.approx(0.4)
    assert sfpo["mean_curve_best"] == pytest.approx(0.65)

    # Seed 0: GRPO best 0.5 first at step 15 (240 rollouts, 30 s); SFPO ≥ 0.5 first at step 10 (160, 40 s).
    # Seed 1: GRPO best 0.6 at step 10 (160, 30 s); SFPO ≥ 0.6 first at step 20 (320, 120 s).
    p0, p1 = s["per_seed"]["0"], s["per_seed"]["1"]
    assert (p0["grpo_rollouts_to_best"], p0["sfpo_rollouts_to_target"]) == (240, 160)
    assert (p0["rollouts_ratio"], p0["wallclock_ratio"]) == pytest.approx((1.5, 0.75))
    assert (p1["grpo_step_to_best"], p1["sfpo_step_to_target"]) == (10, 20)
    assert (p1["rollouts_ratio"], p1["wallclock_ratio"]) == pytest.approx((0.5, 0.25))
    med = s["per_seed_median"]
    assert med["rollouts_ratio"] == pytest.approx(1.0) and med["wallclock_ratio"] == pytest.approx(0.5)
    assert (med["seeds_reaching_target"], med["seeds_paired"]) == (2, 2)

    assert json.loads(json.dumps(s, allow_nan=False)) == s  # JSON-serialisable as is
    md = render_markdown(s)
    assert "**2.00×**" in md and "**1.00×**" in md and "| SFPO reaches it | 5 | 80 | 25.0 |" in md
    assert "0.550 ± 0.071 [0.500, 0.600]" in md  # GRPO best accuracy over seeds, with its bootstrap interval
    assert "held-out accuracy (test)" in md


def test_bootstrap_intervals_hand_computed(runs):
    # Each arm has two seeds, so a resample's mean curve is one of three (seeds {0,0}, {0,1}, {1,1}, with
    # probabilities 1/4, 1/2, 1/4), nine pairs in all. Rollouts ratios (rows GRPO, columns SFPO):
    #   GRPO {0,0}: target 0.5 at 240 rollouts -> SFPO 160 / 80 / 80 -> 1.5 / 3.0 / 3.0
    #   GRPO {0,1}: target 0.5 at 160          -> SFPO 160 / 80 / 80 -> 1.0 / 2.0 / 2.0
    #   GRPO {1,1}: target 0.6 at 160          -> SFPO 240 / 320 / 320 -> 0.67 / 0.5 / 0.5
    # The extremes 0.5 and 3.0 each have probability 3/16 > 2.5%, so the percentile interval is [0.5, 3.0].
    # Wall-clock (GRPO 30/25/30 s to its best; SFPO 4/5/6 s a step): extremes 0.25 (1/16) and 1.2 (1/8).
    s = summarize(runs)
    assert s["rollouts_ratio_ci95"] == pytest.approx([0.5, 3.0])
    assert s["wallclock_ratio_ci95"] == pytest.approx([0.25, 1.2])
    assert s["bootstrap"] == {
        "resamples": 10_000,
        "rng_seed": 0,
        "level": 0.95,
        "method": "percentile",
        "sfpo_reaches_target_fraction": 1.0,
        "undefined_fraction": {"rollouts_ratio": 0.0, "wallclock_ratio": 0.0},
    }
    assert s["accuracy"]["grpo"]["best"]["ci95"] == pytest.approx([0.5, 0.6])  # per-seed bests 0.5 and 0.6
    assert s["accuracy"]["sfpo"]["final"]["ci95"] == pytest.approx([0.6, 0.7])
    assert (
        "| 95% CI, bootstrap over seeds (10,000 resamples; SFPO reaches the target in 100% of them) | | "
        "[0.50×, 3.00×] | [0.25×, 1.20×] |" in render_markdown(s)
    )

    # The same extremes from the point estimate of every resampled set of seeds: the vectorised bootstrap
    # computes what summarize computes.
    ratios = {"rollouts_ratio": [], "wallclock_ratio": []}
    for g, f in itertools.product(itertools.combinations_with_replacement((0, 1), 2), repeat=2):
        pick = lambda algo, seeds: {i: runs[algo][seed] for i, seed in enumerate(seeds)}
        point = summarize({"grpo": pick("grpo", g), "sfpo": pick("sfpo", f)}, resamples=0)
        for k, v in ratios.items():
            v.append(point[k])
    for k, v in ratios.items():
        assert s[f"{k}_ci95"] == pytest.approx([min(v), max(v)])

    again = summarize(runs)
    assert again["rollouts_ratio_ci95"] == s["rollouts_ratio_ci95"]  # a fixed RNG seed: reproducible
    other = summarize(runs, resamples=200, bootstrap_seed=1)
    assert other["bootstrap"]["resamples"] == 200 and other["bootstrap"]["rng_seed"] == 1
    none = summarize(runs, resamples=0)
    assert none["rollouts_ratio_ci95"] is None and none["accuracy"]["grpo"]["best"]["ci95"] is None
    assert none["rollouts_ratio"] == s["rollouts_ratio"]


def test_identical_seeds_give_zero_width_intervals():
    grpo, sfpo = make_rows([0.2, 0.4, 0.5, 0.45]), make_rows([0.3, 0.5, 0.55, 0.6], seconds_per_step=4.0)
    s = summarize({"grpo": dict.fromkeys(range(5), grpo), "sfpo": dict.fromkeys(range(3), sfpo)})
    assert s["rollouts_ratio"] == pytest.approx(1.5) and s["wallclock_ratio"] == pytest.approx(0.75)
    assert s["rollouts_ratio_ci95"] == pytest.approx([1.5, 1.5])
    assert s["wallclock_ratio_ci95"] == pytest.approx([0.75, 0.75])
    assert s["bootstrap"]["sfpo_reaches_target_fraction"] == 1.0
    assert s["accuracy"]["sfpo"]["best"]["ci95"] == pytest.approx([0.6, 0.6])
    assert s["accuracy"]["grpo"]["final"]["std"] == pytest.approx(0.0)


def test_bootstrap_when_sfpo_reaches_the_target_in_some_resamples(runs):
    # SFPO flat at 0.5 reaches GRPO's resampled target 0.5 (3/4 of the resamples) but never 0.6 (GRPO {1,1}, 1/4):
    # those count as ratio 0, so the interval starts at 0 and the fraction reaching is about 3/4.
    runs["sfpo"] = {0: make_rows([0.5] * 4), 1: make_rows([0.5] * 4)}
    s = summarize(runs)
    assert s["rollouts_ratio"] == pytest.approx(2.0)  # target 0.5 at 160 rollouts, reached at 80
    assert s["rollouts_ratio_ci95"] == pytest.approx([0.0, 3.0])  # 3.0: GRPO {0,0} reaches 0.5 at 240
    assert s["bootstrap"]["sfpo_reaches_target_fraction"] == pytest.approx(0.75, abs=0.02)
    assert "SFPO reaches the target in 75% of them" in render_markdown(s)


def test_sfpo_never_reaches_target(runs):
    runs["sfpo"] = {0: make_rows([0.1, 0.2, 0.3, 0.49]), 1: make_rows([0.1, 0.2, 0.3, 0.4])}
    s = summarize(runs)
    for k in (
        "sfpo_step_to_target",
        "sfpo_rollouts_to_target",
        "sfpo_seconds_to_target",
        "rollouts_ratio",
        "wallclock_ratio",
    ):
        assert k in s and s[k] is None
    assert s["grpo_best_accuracy"] == pytest.approx(0.5)
    assert s["per_seed"]["0"]["rollouts_ratio"] is None
    assert s["per_seed_median"] == {
        "rollouts_ratio": None,
        "wallclock_ratio": None,
        "seeds_reaching_target": 0,
        "seeds_paired": 2,
    }
    assert s["rollouts_ratio_ci95"] == [0.0, 0.0] and s["wallclock_ratio_ci95"] == [0.0, 0.0]  # never: ratio 0
    assert s["bootstrap"]["sfpo_reaches_target_fraction"] == 0.0
    json.dumps(s, allow_nan=False)
    md = render_markdown(s)
    assert "| SFPO reaches it | never | — | — |" in md and "**—**" in md and "[0.00×, 0.00×]" in md


def test_single_seed_and_missing_time():
    rows = make_rows([0.3, 0.3, 0.2])
    for r in rows:
        del r["time/total"]
    s = summarize({"grpo": {7: rows}, "sfpo": {7: make_rows([0.1, 0.35, 0.3])}})
    assert s["grpo_step_to_best"] == 5  # the first of the tied maxima
    assert s["sfpo_step_to_target"] == 10 and s["rollouts_ratio"] == pytest.approx(80 / 160)
    assert s["grpo_seconds_to_best"] is None and s["wallclock_ratio"] is None
    assert s["accuracy"]["grpo"]["final"] == {
        "mean": pytest.approx(0.2),
        "std": None,
        "ci95": None,
        "per_seed": {"7": 0.2},
    }
    assert s["per_seed"]["7"]["rollouts_ratio"] == s["rollouts_ratio"]
    assert s["rollouts_ratio_ci95"] is None and s["wallclock_ratio_ci95"] is None  # one seed: nothing to resample
    assert s["bootstrap"]["sfpo_reaches_target_fraction"] is None
    md = render_markdown(s)
    assert "| final accuracy: mean ± std over seeds [95% CI of the mean] | 0.200 ± — |" in md and "| | — | — |" in md


def test_eval_key_choice_and_common_steps():
    extra = {"eval/other/accuracy": 0.9}
    grpo = make_rows([0.1, 0.4], extra=extra)
    sfpo_a = make_rows([0.2, 0.3, 0.9], extra=extra)  # one eval step (15) the other seed lacks
    sfpo_b = make_rows([0.6, 0.5], extra=extra)
    s = summarize({"grpo": {0: grpo}, "sfpo": {0: sfpo_a, 1: sfpo_b}})
    assert s["eval_key"] == KEY  # the first eval accuracy key in row order
    reordered = [{"eval/other/accuracy": r["eval/other/accuracy"], **r} if KEY in r else r for r in grpo]
    assert summarize({"grpo": {0: reordered}, "sfpo": {0: sfpo_a}})["eval_key"] == "eval/other/accuracy"
    assert s["accuracy"]["sfpo"]["mean_curve_best"] == pytest.approx(0.4)  # over steps 5 and 10 only
    assert s["sfpo_step_to_target"] == 5 and s["rollouts_ratio"] == pytest.approx(2.0)
    assert summarize({"grpo": {0: grpo}, "sfpo": {0: sfpo_a}}, key="eval/other/accuracy")["sfpo_step_to_target"] == 5
    with pytest.raises(ValueError, match="no eval rows with 'eval/x/accuracy'"):
        summarize({"grpo": {0: grpo}, "sfpo": {0: sfpo_a}}, key="eval/x/accuracy")
    with pytest.raises(ValueError, match="runs needs at least one seed for 'sfpo'"):
        summarize({"grpo": {0: grpo}})
    np.testing.assert_array_equal(eval_curve(sfpo_a, KEY).rollouts, [80, 160, 240])


def test_metric_label():
    assert metric_label("eval/arithmetic-n2-d2-+-/accuracy") == "held-out accuracy (arithmetic-n2-d2-+-)"
    assert metric_label("eval/average/accuracy") == "held-out accuracy (mean over eval sets)"
    assert metric_label("eval/aime24/reward") == "held-out mean reward (aime24)"
    assert metric_label("eval/dapo/math/accuracy") == "held-out accuracy (dapo/math)"
    assert metric_label("reward/mean") == "reward/mean"


def test_eval_before_training_starts_the_curves_at_zero(runs):
    for seeds in runs.values():
        for seed, rows in seeds.items():
            seeds[seed] = make_rows(
                [r[KEY] for r in rows if KEY in r], seconds_per_step=rows[0]["time/total"], before=0.1
            )
    del runs["sfpo"][1][0]["time/total"]  # a step-0 row without the time key: 0 training seconds by definition
    curve = eval_curve(runs["sfpo"][1], KEY)
    assert (curve.step[0], curve.rollouts[0], curve.seconds[0], curve.accuracy[0]) == (0, 0, 0, 0.1)
    s = summarize(runs)  # the step-0 point changes no target and no ratio
    assert (s["grpo_step_to_best"], s["sfpo_step_to_target"], s["rollouts_ratio"]) == (10, 5, pytest.approx(2.0))
    assert s["rollouts_ratio_ci95"] == pytest.approx([0.5, 3.0])
    for x in ("rollouts", "seconds"):
        ax = curves_figure(runs, x).axes[0]
        assert all(line.get_xdata()[0] == 0 for line in ax.get_lines() if len(line.get_xdata()) > 2)
        assert ax.get_xlim()[0] == 0
    # GRPO's best before training: SFPO "reaches" it at zero rollouts too, so there is no ratio.
    flat = {a: {0: make_rows([0.05, 0.05], before=0.1), 1: make_rows([0.05, 0.05], before=0.1)} for a in runs}
    s = summarize(flat)
    assert s["grpo_rollouts_to_best"] == 0 and s["sfpo_rollouts_to_target"] == 0 and s["rollouts_ratio"] is None
    assert s["rollouts_ratio_ci95"] is None and s["bootstrap"]["undefined_fraction"]["rollouts_ratio"] == 1.0
    json.dumps(s, allow_nan=False)


def test_curves_figure_labels_legend_and_bands(runs):
    fig = curves_figure(runs, "rollouts")
    (ax,) = fig.axes
    assert ax.get_ylabel() == "held-out accuracy (test)"
    assert ax.get_xlabel() == "rollouts (completions sampled)"
    assert ax.get_title() == "held-out accuracy (test) vs rollouts"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "GRPO seeds",
        "GRPO 95% CI (bootstrap)",
        "GRPO mean of 2 seeds",
        "SFPO seeds",
        "SFPO 95% CI (bootstrap)",
        "SFPO mean of 2 seeds",
        "GRPO best mean = 0.500",
    ]
    lines = {line.get_label(): line for line in ax.get_lines()}
    np.testing.assert_allclose(lines["SFPO mean of 2 seeds"].get_ydata(), [0.5, 0.525, 0.5, 0.65])
    np.testing.assert_allclose(lines["GRPO seeds"].get_xdata(), [80, 160, 240, 320])
    assert len(ax.get_lines()) == 2 * 3 + 1  # two seed lines and a mean per algorithm, the target
    bands = [c for c in ax.collections if c.get_label().endswith("95% CI (bootstrap)")]
    assert len(bands) == 2
    # Two seeds: a resample's mean at a step is seed 0's, the mean or seed 1's; the band spans the seeds.
    band = curve_band([eval_curve(r, KEY) for r in runs["sfpo"].values()])
    np.testing.assert_allclose(band.low, [0.45, 0.5, 0.4, 0.6])
    np.testing.assert_allclose(band.high, [0.55, 0.55, 0.6, 0.7])
    same = curve_band([eval_curve(runs["sfpo"][0], KEY)] * 4)
    np.testing.assert_allclose(same.low, same.high)
    np.testing.assert_allclose(same.low, [0.45, 0.55, 0.6, 0.6])

    wall = curves_figure(runs, "seconds", time_key="time/total").axes[0]
    assert wall.get_xlabel() == "training wall-clock, s (time/total, eval excluded)"
    assert wall.get_ylabel() == "held-out accuracy (test)"
    one = curves_figure({"sfpo": {0: runs["sfpo"][0]}}, "rollouts").axes[0]  # one seed: no band, no target
    assert [t.get_text() for t in one.get_legend().get_texts()] == ["SFPO seeds", "SFPO mean of 1 seeds"]
    with pytest.raises(ValueError, match="x must be one of"):
        curves_figure(runs, "steps")


def sweep_runs():
    """A learning-rate sweep: (algorithm, lr) → seed → rows; GRPO at 1e-3 diverged before its first eval."""
    acc = {1e-5: [0.2, 0.3], 1e-4: [0.4, 0.5], 1e-3: [0.3, 0.1]}
    runs = {}
    for i, algo in enumerate(("grpo", "sfpo")):
        for lr, (best, final) in acc.items():
            runs[(algo, lr)] = {
                seed: make_rows([best + 0.1 * i + 0.02 * seed, final + 0.1 * i + 0.02 * seed]) for seed in (0, 1, 2)
            }
    runs[("grpo", 1e-3)][2] = [{"step": 1, "rollouts": 16, "reward/mean": 0.0}]
    return runs


def test_lr_sweep_stats_and_figure(tmp_path):
    runs = sweep_runs()
    stats = sweep_stats(runs)
    assert stats["eval_key"] == KEY and stats["eval_label"] == "held-out accuracy (test)"
    cells = {(c["algo"], c["value"]): c for c in stats["cells"]}
    assert list(cells) == [(a, lr) for a in ("grpo", "sfpo") for lr in (1e-5, 1e-4, 1e-3)]
    c = cells[("sfpo", 1e-4)]  # evals 0.5 then 0.6, + 0.02 per seed
    assert c["best"]["per_seed"] == pytest.approx({"0": 0.6, "1": 0.62, "2": 0.64})
    assert c["best"]["mean"] == pytest.approx(0.62) and c["best"]["std"] == pytest.approx(0.02)
    lo, hi = c["best"]["ci95"]
    assert 0.6 <= lo < 0.62 < hi <= 0.64
    c = cells[("grpo", 1e-3)]  # evals 0.3 then 0.1: the best is the first, the final the last
    assert c["best"]["mean"] == pytest.approx(0.31) and c["final"]["mean"] == pytest.approx(0.11)
    assert cells[("grpo", 1e-3)]["no_eval_seeds"] == ["2"] and len(cells[("grpo", 1e-3)]["best"]["per_seed"]) == 2
    json.dumps(stats, allow_nan=False)
    md = render_lr_sweep(stats)
    assert "| GRPO | 0.001 | 2 (+1 without evals) | 0.310 ± 0.014 [0.300, 0.320] |" in md

    fig = lr_sweep_figure(runs)
    best, final = fig.axes
    assert best.get_ylabel() == "held-out accuracy (test)" and best.get_xlabel() == "learning rate"
    assert best.get_xscale() == "log" and best.get_title() == "best (max over evals) accuracy"
    assert final.get_title() == "final (last eval) accuracy"
    assert [t.get_text() for t in best.get_legend().get_texts()] == [
        "GRPO seeds",
        "GRPO mean [95% CI]",
        "SFPO seeds",
        "SFPO mean [95% CI]",
    ]
    seeds = {line.get_label(): line for line in best.get_lines()}
    assert len(seeds["GRPO seeds"].get_xdata()) == 8  # 3 + 3 + 2 seeds with evals
    np.testing.assert_allclose(seeds["SFPO seeds"].get_ydata()[:3], [0.4, 0.42, 0.44])  # lr 1e-5, seeds 0-2
    path = plot_lr_sweep(runs, tmp_path / "sweep" / "lr.png", metrics=("best",), xlabel="lr", logx=False)
    assert path.stat().st_size > 10_000
    with pytest.raises(ValueError, match="metrics must be among"):
        lr_sweep_figure(runs, metrics=("median",))


def test_plots_are_valid_images(runs, tmp_path):
    import matplotlib.image

    paths = plot_curves(runs, tmp_path / "plots")
    assert [p.name for p in paths] == ["accuracy_vs_rollouts.png", "accuracy_vs_wallclock.png"]
    ablation = plot_ablation(
        {(k, a): (None if (k, a) == (7, 1.0) else 0.1 * k + a) for k in (1, 3, 7) for a in (0.2, 0.5, 1.0)},
        tmp_path / "ablation.png",
        title="best accuracy",
    )
    for path in [*paths, ablation]:
        assert path.stat().st_size > 10_000
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 300
        assert image[..., :3].std() > 0.05  # something was drawn
    with pytest.raises(ValueError, match="values is empty"):
        plot_ablation({}, tmp_path / "x.png")
