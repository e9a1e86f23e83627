"""Math grading: equivalence classes, safety against hostile completions, time bounds, threads, reward shaping."""

import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from sfpo_jax.rewards import (
    MathGrader,
    combine_rewards,
    format_reward,
    last_boxed,
    math_reward,
    paper_reward,
)
from sfpo_jax.rewards.math import DEADLINE, EMPTY, NO_ANSWER, OK, TIMEOUT, TOO_LONG

HOSTILE_TIMEOUT = 1.0


@pytest.fixture(scope="module")
def grader():
    # Generous deadline: legitimate symbolic comparisons must not flake on a loaded 2-core machine.
    with MathGrader(num_workers=2, timeout=20.0) as g:
        yield g.start()


@pytest.fixture(scope="module")
def hostile_grader():
    with MathGrader(num_workers=2, timeout=HOSTILE_TIMEOUT) as g:
        yield g.start()


# (gold answer, boxed prediction): equivalent pairs across the answer types of MATH-style benchmarks.
EQUIVALENT = [
    ("42", "42"),
    ("-7", "-7"),
    ("1,000", "1000"),
    ("3.14", "3.14"),
    ("0.5", r"\frac12"),
    ("0.5", r"\frac{1}{2}"),
    (r"\frac{3}{4}", "0.75"),
    (r"\dfrac{3}{4}", r"\tfrac{3}{4}"),
    ("1/2", r"\frac{1}{2}"),
    (r"\frac{\sqrt{2}}{2}", r"\frac{1}{\sqrt{2}}"),
    ("2", r"\sqrt{4}"),
    (r"x^2+2x+1", r"(x+1)^2"),
    (r"\{1,2,3\}", r"\{3,1,2\}"),
    ("[1,2)", "[1, 2)"),
    (r"(-\infty, 3]", r"(-\infty,3]"),
    ("10", r"10 \text{ cm}"),
    (r"90^\circ", "90"),
    (r"\text{(B)}", "B"),
    (r"2\pi", r"2 \pi"),
]
# Pairs that must not be equivalent.
DIFFERENT = [
    ("42", "43"),
    ("0.5", r"\frac{1}{3}"),
    ("[1,2)", "(1,2)"),
    (r"\{1,2\}", r"\{1,2,3\}"),
    (r"\frac{\sqrt{2}}{2}", r"\sqrt{2}"),
    (r"x^2+1", r"(x+1)^2"),
    ("7", "-7"),
]


def _completion(pred: str) -> str:
    return f"Let's think step by step. Some work \\boxed{{wrong draft}} ... so the answer is $\\boxed{{{pred}}}$."


def test_equivalent_pairs(grader):
    golds, preds = zip(*EQUIVALENT, strict=True)
    result = grader.grade([_completion(p) for p in preds], list(golds))
    wrong = [pair for pair, ok in zip(EQUIVALENT, result.correct, strict=True) if not ok]
    assert not wrong, f"graded as different: {wrong}"
    assert (result.status == OK).all()


def test_different_pairs(grader):
    golds, preds = zip(*DIFFERENT, strict=True)
    result = grader.grade([_completion(p) for p in preds], list(golds))
    wrong = [pair for pair, ok in zip(DIFFERENT, result.correct, strict=True) if ok]
    assert not wrong, f"graded as equivalent: {wrong}"


def test_last_box_wins_and_no_box_is_zero(grader):
    completions = [r"\boxed{1} then \boxed{2}", r"\boxed{2} then \boxed{1}", "the answer is 2", r"\boxed{}"]
    result = grader.grade(completions, ["2", "2", "2", "2"])
    np.testing.assert_array_equal(result.correct, [True, False, False, False])
    np.testing.assert_array_equal(result.status, [OK, OK, NO_ANSWER, EMPTY])


def test_last_boxed_brace_matching():
    assert last_boxed(r"so $\boxed{\frac{1}{2}}$.") == r"\frac{1}{2}"
    assert last_boxed(r"\boxed{\{1,2\}}") == r"\{1,2\}"
    assert last_boxed(r"\boxed {7}") == "7"
    assert last_boxed(r"\boxed 5$") == "5"
    assert last_boxed(r"\fbox{3}") == "3"
    assert last_boxed(r"\boxed{1} and an unbalanced \boxed{2") == "1"
    assert last_boxed("no box") is None
    assert last_boxed(r"\boxed{" + "9" * 50 + "}", limit=10) == "9" * 11


def test_model_text_is_never_executed(grader, tmp_path):
    marker = tmp_path / "pwned"
    payloads = [
        f"\\boxed{{__import__('os').system('touch {marker}')}}",
        f"\\boxed{{exec(\"open('{marker}', 'w').write('x')\")}}",
        f"\\boxed{{eval(\"__import__('pathlib').Path('{marker}').touch()\")}}",
        f"The answer is __import__('os').system('touch {marker}') \\boxed{{1}}",
        f"\\boxed{{\\text{{__import__('os').system('touch {marker}')}}}}",
        f"\\boxed{{Symbol('x').__class__.__mro__[-1].__subclasses__()}} touch {marker}",
    ]
    # As gold answers too (gold text is parsed with the expression extractor as a fallback).
    result = grader.grade(payloads + [r"\boxed{0}"] * len(payloads), ["0"] * len(payloads) + payloads)
    assert not marker.exists()
    assert not result.correct[: len(payloads)].any()


HOSTILE = {
    "tower": r"\boxed{9^{9^{9^{9}}}}",
    "python_power": r"\boxed{10**10**10**10}",
    "latex_power": r"\boxed{10^{10^{10^{10}}}}",
    "deep_braces": r"\boxed{" + "{" * 5000 + "1" + "}" * 5000 + "}",
    "deep_parens": r"\boxed{" + "(" * 60 + "1" + ")" * 60 + "}",
    "deep_fracs": r"\boxed{" + r"\frac{1}{" * 200 + "2" + "}" * 200 + "}",
    "megabyte": r"\boxed{" + "1" * 1_000_000 + "}",
    "megabyte_unclosed": r"\boxed{" + "x+" * 500_000,
    "unbalanced": r"\boxed{\frac{1}{",
    "surrogate": "\ud800\udfff \\boxed{1}\ud800",
    "bytes_invalid_utf8": b"\xff\xfe\\boxed{1}",
    "empty": "",
    "nul": "\x00\\boxed{\x00}",
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_input_returns_within_limit(hostile_grader, name):
    hostile_grader.start()  # replacements of workers killed by the previous case are up
    start = time.monotonic()
    result = hostile_grader.grade([HOSTILE[name]], ["1"])
    elapsed = time.monotonic() - start
    # The deadline plus IPC and pre-check overhead; the respawn after a kill happens in the background.
    assert elapsed < HOSTILE_TIMEOUT + 1.5, f"{name} took {elapsed:.2f}s"
    assert result.correct.dtype == bool and result.correct.shape == (1,)
    if name in ("surrogate", "bytes_invalid_utf8"):
        assert result.correct[0]  # the garbage around a good answer does not spoil it
    if name in ("megabyte", "megabyte_unclosed"):
        assert result.status[0] == TOO_LONG
    if name in ("empty", "unbalanced"):
        assert result.status[0] == NO_ANSWER


def test_hostile_batch_is_bounded_and_timeouts_counted(hostile_grader):
    items = [*HOSTILE.values(), r"\boxed{1}", r"\boxed{2}"]
    before = hostile_grader.stats["timeouts"]
    start = time.monotonic()
    result = hostile_grader.grade(items, ["1"] * len(items))
    elapsed = time.monotonic() - start
    n_timeouts = int((result.status == TIMEOUT).sum())
    # At least the power tower must hit the deadline; a good answer after the hostile ones is still graded.
    assert n_timeouts >= 1
    assert result.correct[-2] and not result.correct[-1]
    assert result.metrics()["timeouts"] == n_timeouts
    assert hostile_grader.stats["timeouts"] - before == n_timeouts
    # Each timeout costs at most one deadline per worker plus a respawn; bound the whole batch.
    assert elapsed < len(items) * (HOSTILE_TIMEOUT + 3.0) / hostile_grader.num_workers + 5.0


def test_grading_from_a_worker_thread(grader):
    out = {}

    def run():
        out["scores"] = math_reward([r"\boxed{\frac{2}{4}}", r"\boxed{3}"], ["0.5", "4"], grader=grader)

    t = threading.Thread(target=run)
    t.start()
    t.join(timeout=60)
    np.testing.assert_array_equal(out["scores"], np.array([1.0, 0.0], np.float32))


def test_concurrent_threads_share_a_grader(grader):
    results = [None] * 4

    def run(k):
        results[k] = math_reward([rf"\boxed{{{k}}}", rf"\boxed{{{k + 1}}}"], [str(k), str(k)], grader=grader)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for r in results:
        np.testing.assert_array_equal(r, [1.0, 0.0])


def test_paper_reward(grader):
    scores = paper_reward([r"\boxed{5}", r"\boxed{6}", "5"], ["5", "5", "5"], grader=grader)
    assert scores.dtype == np.float32
    np.testing.assert_allclose(scores, [1.0, 0.1, 0.0])


def test_paper_reward_extracts_as_the_official_code(grader):
    # Official (verl latex_math.py): an empty box is a wrong boxed answer (0.1); \fbox is no answer (0.0);
    # "\boxed 5" takes the text up to "$"; an unbalanced last box is no answer even after a balanced one.
    completions = [r"\boxed{}", r"\boxed{ }", r"\fbox{5}", r"$\boxed 5$", r"\boxed{5} \boxed{6", r"\boxed{5}"]
    scores = paper_reward(completions, ["5"] * len(completions), grader=grader)
    np.testing.assert_allclose(scores, [0.1, 0.1, 0.0, 1.0, 0.0, 1.0])
    # math_reward keeps its lenient extraction: \fbox and the earlier balanced box count.
    np.testing.assert_array_equal(math_reward(completions, ["5"] * len(completions), grader=grader), [0, 0, 1, 1, 1, 1])


def test_format_reward():
    scores = format_reward([r"\boxed{5}", r"\boxed{5} or \boxed{6}", r"\boxed{}", "5", r"\boxed{5"])
    np.testing.assert_array_equal(scores, [1.0, 0.0, 0.0, 0.0, 0.0])


def test_combine_rewards(grader):
    def correct(completions, answers, **kw):
        return math_reward(completions, answers, grader=grader, **kw)

    reward = combine_rewards([(correct, 1.0), (format_reward, 0.25)])
    scores = reward([r"\boxed{5}", r"\boxed{6}", "5"], ["5", "5", "5"], prompts=["p"] * 3)
    assert scores.dtype == np.float32
    np.testing.assert_allclose(scores, [1.25, 0.25, 0.0])
    with pytest.raises(ValueError, match="fns"):
        combine_rewards([])
    with pytest.raises(ValueError, match=r"fns\[0\]"):
        combine_rewards([(format_reward,)])
    bad = combine_rewards([(lambda c, a, **k: np.zeros(1), 1.0)])
    with pytest.raises(ValueError, match="shape"):
        bad(["a", "b"], ["a", "b"])


def test_argument_checks_and_close():
    with pytest.raises(ValueError, match="num_workers"):
        MathGrader(num_workers=0)
    with pytest.raises(ValueError, match="timeout"):
        MathGrader(timeout=0)
    with pytest.raises(ValueError, match="batch_timeout"):
        MathGrader(batch_timeout=0)
    g = MathGrader(num_workers=1)
    with pytest.raises(ValueError, match="length"):
        g.grade(["a"], [])
    # Pre-checks need no worker: nothing is started for a batch without boxed answers.
    assert g.grade(["no answer"], ["1"]).status[0] == NO_ANSWER
    assert g._workers == []
    g.close()
    with pytest.raises(RuntimeError, match="closed"):
        g.grade([r"\boxed{1}"], ["1"])


def test_batch_deadline_bounds_a_hostile_batch():
    # Six items that hang far longer than the batch deadline: without it this batch took 3 x 10 s per worker.
    batch_timeout = 2.0
    hang = HOSTILE["tower"]
    items = [r"\boxed{1}", *[hang] * 6, r"\boxed{}", "no box"]
    with MathGrader(num_workers=2, timeout=10.0, batch_timeout=batch_timeout) as g:
        g.start()
        start = time.monotonic()
        scores = math_reward(items, ["1"] * len(items), grader=g)  # the trainer's call; counts in last_result
        elapsed = time.monotonic() - start
        result = g.last_result
        assert elapsed < batch_timeout + 4.0, f"took {elapsed:.2f}s"
        np.testing.assert_array_equal(scores, [1, 0, 0, 0, 0, 0, 0, 0, 0])
        np.testing.assert_array_equal(result.status, [OK, *[DEADLINE] * 6, EMPTY, NO_ANSWER])
        metrics = result.metrics()
        assert metrics["deadline"] == 6 and metrics["timed_out"] == 6 and result.timed_out == 6
        assert metrics["timeouts"] == 0 and g.stats["deadline"] == 6
        # Boxed answers not graded in time keep the paper reward's 0.1 format credit.
        np.testing.assert_allclose(result.paper_rewards(), [1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0])
        # The workers caught mid-item were replaced: the next batch is graded normally. (Its deadline is lifted: the
        # replacements start in the background, and on a loaded machine their start-up alone can take 2 s.)
        g.batch_timeout = 120.0
        np.testing.assert_array_equal(math_reward([r"\boxed{2}", r"\boxed{3}"], ["2", "2"], grader=g), [1, 0])
        assert g.last_result.metrics()["timed_out"] == 0


def test_the_batch_deadline_scales_with_the_batch_not_with_its_hangs():
    g = MathGrader(num_workers=2, timeout=5.0, batch_timeout=60.0, item_seconds=0.5)
    g.startup_seconds = 1.0  # measured when workers become ready
    # 8 answers on 2 workers: one timeout (the hangs side by side), one worker start-up, 4 rounds of 0.5 s.
    assert g.batch_seconds(8) == 5.0 + 1.0 + 4 * 0.5
    assert g.batch_seconds(1) == 5.0 + 1.0 + 0.5 and g.batch_seconds(10_000) == 60.0
    assert MathGrader(num_workers=2, item_seconds=None, batch_timeout=60.0).batch_seconds(8) == 60.0
    assert MathGrader(num_workers=2, batch_timeout=None).batch_seconds(8) == 5.0 + 0.0 + 2.0
    with pytest.raises(ValueError, match="item_seconds"):
        MathGrader(item_seconds=-1.0)


def test_hanging_answers_do_not_hold_up_the_answers_behind_them():
    """Two hangs take both workers; spare workers grade the rest before the batch deadline (without them the four
    good answers waited behind the hangs and were cut off by it), and the pool is back to its size afterwards."""
    hang = HOSTILE["tower"]
    items = [hang, hang, r"\boxed{1}", r"\boxed{2}", r"\boxed{1}", r"\boxed{1}"]
    with MathGrader(num_workers=2, timeout=60.0, batch_timeout=15.0, item_seconds=0.2) as g:
        g.start()
        result = g.grade(items, ["1"] * len(items))
        np.testing.assert_array_equal(result.status, [DEADLINE, DEADLINE, OK, OK, OK, OK])
        np.testing.assert_array_equal(result.correct, [False, False, True, False, True, True])
        assert len(g._workers) == g.num_workers


def test_math_reward_from_a_plain_script(tmp_path):
    # No `if __name__ == "__main__":` guard: multiprocessing's spawn re-imported (and re-ran) this in every worker.
    script = tmp_path / "plain_script.py"
    script.write_text(
        textwrap.dedent(
            r"""
            from sfpo_jax.rewards import default_grader, math_reward, paper_reward

            completions = [r"\boxed{\frac{1}{2}}", r"\boxed{3}", "no box", r"\boxed{}"]
            answers = ["0.5", "4", "1", "1"]
            print("math", math_reward(completions, answers).tolist())
            print("paper", [round(float(x), 3) for x in paper_reward(completions, answers)])
            print("graded", default_grader().last_result.metrics()["graded"])
            """
        )
    )
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == "math [1.0, 0.0, 0.0, 0.0]"
    assert lines[1] == "paper [1.0, 0.1, 0.0, 0.1]"
    assert lines[2] == "graded 4"


def test_worker_start_up_failure_names_its_cause(monkeypatch):
    with MathGrader(num_workers=1, max_memory_mb=40) as g:
        with pytest.raises(RuntimeError, match=r"MemoryError.*max_memory_mb=40"):
            g.start()
    # Workers get the caller's sys.path: without math-verify's folder on it, the error says the module is missing.
    import math_verify

    home = os.path.dirname(os.path.dirname(os.path.abspath(math_verify.__file__)))
    monkeypatch.setattr(sys, "path", [p for p in sys.path if os.path.abspath(p or ".") != home])
    with MathGrader(num_workers=1) as g:
        with pytest.raises(RuntimeError, match="No module named 'math_verify'"):
            g.grade([r"\boxed{1}"], ["1"])
