"""Learning-efficiency summary on synthetic metric rows with hand-computed expectations, and the plots."""

import json

import numpy as np
import pytest

from sfpo_jax.analysis.summary import eval_curve, plot_ablation, plot_curves, render_markdown, summarize

KEY = "eval/test/accuracy"


def make_rows(accuracies, *, seconds_per_step=2.0, rollouts_per_step=16, every=5, extra=None):
    """One row per step as the loop writes them; the eval rows (every ``every`` steps) carry the accuracies."""
    rows = []
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
    assert "0.550 ± 0.071" in md  # GRPO best accuracy over seeds


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
    json.dumps(s, allow_nan=False)
    md = render_markdown(s)
    assert "| SFPO reaches it | never | — | — |" in md and "**—**" in md


def test_single_seed_and_missing_time():
    rows = make_rows([0.3, 0.3, 0.2])
    for r in rows:
        del r["time/total"]
    s = summarize({"grpo": {7: rows}, "sfpo": {7: make_rows([0.1, 0.35, 0.3])}})
    assert s["grpo_step_to_best"] == 5  # the first of the tied maxima
    assert s["sfpo_step_to_target"] == 10 and s["rollouts_ratio"] == pytest.approx(80 / 160)
    assert s["grpo_seconds_to_best"] is None and s["wallclock_ratio"] is None
    assert s["accuracy"]["grpo"]["final"] == {"mean": pytest.approx(0.2), "std": None, "per_seed": {"7": 0.2}}
    assert s["per_seed"]["7"]["rollouts_ratio"] == s["rollouts_ratio"]
    assert "± —" in render_markdown(s)


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
