"""Answer extraction: the official SFPO (verl) extraction reproduced exactly, and linear time on hostile text."""

import random
import time

import pytest

from sfpo_jax.rewards import last_boxed, verl_boxed

# ------------------------------------------------------------------------------------------------------------
# Reference: the official code, verbatim from github.com/Urheen/SFPO, Code/SFPO/verl/utils/reward_score/
# latex_math.py lines 9-49 (identical to math_dataset.py lines 49-90, whose remove_boxed comes first); the
# paper reward (latex_math.compute_score) calls extract_solution (lines 51-65, its prints dropped here).
# fmt: off


def last_boxed_only_string(string):
    idx = string.rfind("\\boxed")
    if "\\boxed " in string:
        return "\\boxed " + string.split("\\boxed ")[-1].split("$")[0]
    if idx < 0:
        idx = string.rfind("\\fbox")
        if idx < 0:
            return None

    i = idx
    right_brace_idx = None
    num_left_braces_open = 0
    while i < len(string):
        if string[i] == "{":
            num_left_braces_open += 1
        if string[i] == "}":
            num_left_braces_open -= 1
            if num_left_braces_open == 0:
                right_brace_idx = i
                break
        i += 1

    if right_brace_idx is None:
        retval = None
    else:
        retval = string[idx:right_brace_idx + 1]

    return retval


def remove_boxed(s):
    if "\\boxed " in s:
        left = "\\boxed "
        assert s[:len(left)] == left
        return s[len(left):]

    left = "\\boxed{"

    assert s[:len(left)] == left
    assert s[-1] == "}"

    return s[len(left):-1]


def extract_solution(solution_str):
    try:
        string_in_last_boxed = last_boxed_only_string(solution_str)
        if string_in_last_boxed is not None:
            return remove_boxed(string_in_last_boxed)
        else:
            return None
    except Exception:
        return None


# fmt: on
# ------------------------------------------------------------------------------------------------------------
# Reference for last_boxed: the straightforward (quadratic) definition it had before it was made linear.


def _last_boxed_reference(text, limit=None):
    end = len(text)
    while True:
        best, best_cmd = -1, ""
        for cmd in ("\\boxed", "\\fbox"):
            k = text.rfind(cmd, 0, end)
            if k > best:
                best, best_cmd = k, cmd
        if best < 0:
            return None
        content = _boxed_at_reference(text, best, best_cmd, limit)
        if content is not None:
            return content
        end = best


def _boxed_at_reference(text, start, command, limit):
    i = k = start + len(command)
    n = len(text)
    while k < n and text[k] in " \t":
        k += 1
    if k < n and text[k] == "{":
        i = k
    elif k > i:
        j = k
        while j < n and text[j] not in "$\n ":
            j += 1
        return text[k:j] or None
    else:
        return None
    depth, j = 0, i
    stop = n if limit is None else min(n, i + limit + 2)
    while j < stop:
        c = text[j]
        if c == "\\":
            j += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
        j += 1
    return text[i + 1 : stop] if stop < n else None


# (text, official answer, last_boxed answer). Where the last two differ, the difference is deliberate: last_boxed
# (math_reward, format_reward, dataset loaders) is lenient, verl_boxed (paper_reward) is the official extraction.
CASES = {
    "nested_braces": (r"so $\boxed{\frac{1}{2}}$.", r"\frac{1}{2}", r"\frac{1}{2}"),
    "multiple_boxes_last_wins": (r"\boxed{1} then \boxed{2}", "2", "2"),
    "no_box": ("the answer is 2", None, None),
    "empty_box": (r"\boxed{}", "", ""),
    "blank_box": (r"\boxed{ }", " ", " "),
    "empty_after_answer": (r"\boxed{5} so \boxed{}", "", ""),
    "box_in_dollars": (r"The answer is $\boxed{x^2}$, i.e. $x^2$.", "x^2", "x^2"),
    "escaped_braces_balanced": (r"\boxed{\{1,2\}}", r"\{1,2\}", r"\{1,2\}"),
    "escaped_backslash_before": (r"\\boxed{2}", "2", "2"),
    "extra_close": (r"\boxed{a}}", "a", "a"),
    "unbalanced_only": (r"\boxed{\frac{1}{", None, None),
    "close_before_open": (r"\boxed}{1}", None, None),
    "no_argument": (r"\boxed2", None, None),
    "no_argument_then_brace": (r"\boxed2 {3}", None, None),
    "space_form": (r"\boxed 2", "2", "2"),
    "space_form_in_dollars": (r"$\boxed 2$ done", "2", "2"),
    # Deliberate differences.
    "unbalanced_last_box": (r"\boxed{1} and \boxed{2", None, "1"),  # official: no fallback to an earlier box
    "trailing_bare_command": (r"\boxed{1} \boxed", None, "1"),
    "fbox": (r"\fbox{3}", None, "3"),  # official: remove_boxed asserts the "\boxed{" prefix
    "fbox_after_boxed": (r"\boxed{1} \fbox{2}", "1", "2"),  # official: \fbox only when there is no \boxed
    "space_then_brace": (r"\boxed {7}", "{7}", "7"),
    "tab_then_brace": ("\\boxed\t{7}", None, "7"),
    "space_form_runs_to_dollar": ("\\boxed 5 apples\nso", "5 apples\nso", "5"),
    "space_form_beats_later_box": (r"\boxed 1 then \boxed{2}", r"1 then \boxed{2}", "2"),
    "escaped_close_brace": (r"\boxed{\}1}", "\\", r"\}1"),  # official counts \} as a closing brace
}


@pytest.mark.parametrize("name", list(CASES))
def test_extraction_edge_cases(name):
    text, official, lenient = CASES[name]
    assert extract_solution(text) == official  # the table describes the official code truly
    assert verl_boxed(text) == official
    assert last_boxed(text) == lenient
    assert _last_boxed_reference(text) == lenient


def test_extraction_matches_references_on_random_text():
    pieces = ["\\boxed", "\\fbox", "\\boxed ", "{", "}", "{", "}", " ", "\t", "$", "\\", "\n", "1", "x", "\\{", "\\}"]
    rng = random.Random(0)
    for _ in range(20_000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        assert verl_boxed(text) == extract_solution(text), repr(text)
        for limit in (None, 2):
            assert last_boxed(text, limit) == _last_boxed_reference(text, limit), (repr(text), limit)


# Text that made the old last_boxed quadratic (many boxes without a balanced argument) or deep.
ADVERSARIAL = {
    "bare_commands": lambda n: "\\boxedX" * (n // 7),
    "unclosed_boxes": lambda n: "\\boxed{" * (n // 7),
    "open_braces": lambda n: "\\boxed{" + "{" * n,
    "escapes": lambda n: "\\boxed{" + "\\{" * (n // 2),
    "fbox_and_bare": lambda n: "\\fbox{\\boxedX" * (n // 13),
    "space_forms": lambda n: "\\boxed $" * (n // 8),
}


def _seconds(fn, *args):
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - start)
    return best


@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_extraction_is_fast_and_linear(name):
    small, big = ADVERSARIAL[name](200_000), ADVERSARIAL[name](1_000_000)
    for fn, args in ((last_boxed, ()), (last_boxed, (1000,)), (verl_boxed, ())):
        t_big = _seconds(fn, big, *args)
        t_small = _seconds(fn, small, *args)
        # Loose bounds for a loaded CI machine: about 0.3 s per megabyte here; quadratic was 20 s (1 MB) vs 0.9 s.
        assert t_big < 2.0, f"{fn.__name__}{args} took {t_big:.2f}s on 1 MB of {name}"
        assert t_big < 12 * t_small + 0.05, f"{fn.__name__}{args}: 1 MB {t_big:.3f}s vs 200 KB {t_small:.3f}s"
