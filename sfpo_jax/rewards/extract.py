"""Brace-matching extraction of ``\\boxed{...}`` answers, in time linear in the length of the text.

A regex cannot match nested braces (``\\boxed{\\frac{1}{2}}``), so the helpers here count braces. Every helper
is linear whatever the input: the box commands are found by one regex pass, braces are matched by scanning
only the braces and backslashes (found by a regex, at C speed), and when the last box is unbalanced one pass
over the rest of the text matches every brace at once instead of rescanning the text for each earlier box.

Two extractors:

- :func:`last_boxed` (used by ``math_reward``, ``format_reward`` and the dataset loaders): the last *balanced*
  box, ``\\boxed`` or ``\\fbox``, with escaped braces ignored and ``\\boxed {x}`` accepted.
- :func:`verl_boxed` (used by ``paper_reward``): exactly what the official SFPO code extracts (verl's
  ``last_boxed_only_string`` + ``remove_boxed``, ``verl/utils/reward_score/latex_math.py``), quirks included.
"""

from __future__ import annotations

import re

_COMMAND = re.compile(r"\\(boxed|fbox)")
_SPACES = re.compile(r"[ \t]*")
_BARE_END = re.compile(r"[$\n ]")  # where the argument of ``\boxed 5`` ends
# An escaped character (``\{``, ``\}``, ``\\``: never opens or closes a group), or a brace.
_TOKEN = re.compile(r"\\[\s\S]|[{}]")
_BRACE = re.compile(r"[{}]")


def _close_of(text: str, i: int, stop: int) -> int | None:
    """The index of the ``}`` closing the ``{`` at ``text[i]`` when it is before ``stop``, else None."""
    depth = 0
    for m in _TOKEN.finditer(text, i, stop):
        c = m.group()
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return m.start()
    return None


def _all_closes(text: str, start: int) -> dict[int, int]:
    """``{open: close}`` for every balanced unescaped brace pair at or after ``text[start]``, in one pass.

    ``text[start - 1]`` must not be a backslash (here it ends a command name); then escape parity from ``start``
    on is the same as in a scan from any later ``{`` of a box argument (never preceded by a backslash either), and
    the pair of each ``{`` is the one a depth-counting scan from it would find.
    """
    stack: list[int] = []
    out: dict[int, int] = {}
    for m in _TOKEN.finditer(text, start):
        c = m.group()
        if c == "{":
            stack.append(m.start())
        elif c == "}" and stack:
            out[stack.pop()] = m.start()
    return out


def last_boxed(text: str, limit: int | None = None) -> str | None:
    """The content of the last balanced ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``; None when there is none.

    ``last_boxed(r"so \\boxed{\\frac{1}{2}}.")`` is ``r"\\frac{1}{2}"``. Escaped braces (``\\{``) do not count, so
    sets such as ``\\boxed{\\{1,2\\}}`` come out whole. ``\\boxed 5`` gives the text up to the next space, newline
    or ``$``. An unbalanced last box is skipped in favour of an earlier balanced one. With ``limit``, a box whose
    content runs past ``limit`` characters comes back cut to ``limit + 1`` characters, balanced or not.
    Linear time in ``len(text)`` (about 0.3 s per megabyte of braces, far less for ordinary text).
    """
    n = len(text)
    ends = [m.end() for m in _COMMAND.finditer(text)]  # just after each command name
    closes: dict[int, int] | None = None  # built on the first unbalanced box, then shared by the earlier ones
    for end in reversed(ends):
        k = _SPACES.match(text, end).end()
        if k < n and text[k] == "{":
            stop = n if limit is None else min(n, k + limit + 2)
            if closes is None:
                j = _close_of(text, k, stop)
            else:
                j = closes.get(k)
                if j is not None and j >= stop:
                    j = None
            if j is not None:
                return text[k + 1 : j]
            if stop < n:
                return text[k + 1 : stop]
            if closes is None:
                closes = _all_closes(text, ends[0])
        elif k > end:
            # ``\boxed 5``: TeX takes the next token; we take everything up to the next delimiter, as verl does.
            m = _BARE_END.search(text, k)
            j = n if m is None else m.start()
            if j > k:
                return text[k:j]
    return None


def verl_boxed(text: str) -> str | None:
    """The answer the official SFPO reward extracts from ``text``; None where it finds none (it scores 0.0).

    Equal to verl's ``remove_boxed(last_boxed_only_string(text))`` with an exception mapped to None, as in
    ``extract_solution`` (``Code/SFPO/verl/utils/reward_score/latex_math.py``: lines 9-36, 38-49, 51-65), in
    linear time. Its rules:

    - If ``"\\boxed "`` (with a space) occurs anywhere, the answer is the text after its last occurrence up to the
      first ``$`` (or the end), newlines and later boxes included, even when a ``\\boxed{...}`` comes after it.
    - Otherwise the last ``\\boxed`` (or, only when there is none, the last ``\\fbox``); from there braces are
      counted without escapes, and the box ends at the first ``}`` that brings the count back to 0. No such
      ``}``: None (no fallback to an earlier box).
    - The box must start with ``\\boxed{``: ``\\fbox{3}``, ``\\boxedX{3}`` and ``\\boxed\\t{3}`` give None.
    - ``\\boxed{}`` gives ``""``: a boxed answer, wrong, which the paper reward scores 0.1.
    """
    bare = text.rfind("\\boxed ")
    if bare >= 0:
        rest = bare + len("\\boxed ")
        dollar = text.find("$", rest)
        return text[rest:] if dollar < 0 else text[rest:dollar]
    idx = text.rfind("\\boxed")
    if idx < 0:
        idx = text.rfind("\\fbox")
        if idx < 0:
            return None
    depth = 0
    for m in _BRACE.finditer(text, idx):
        if m.group() == "{":
            depth += 1
        else:
            depth -= 1
            if depth == 0:
                box = text[idx : m.start() + 1]
                return box[len("\\boxed{") : -1] if box.startswith("\\boxed{") else None
    return None


def has_boxed(text: str) -> bool:
    """Whether ``text`` contains a balanced ``\\boxed{...}``."""
    return last_boxed(text) is not None
