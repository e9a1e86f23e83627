"""Brace-matching extraction of ``\\boxed{...}`` answers.

A regex cannot match nested braces (``\\boxed{\\frac{1}{2}}``), so the helpers here scan the text once and
count braces. Used by the graders (model completions) and by the dataset loaders (MATH solutions).
"""

from __future__ import annotations

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def _boxed_at(text: str, start: int, command: str, limit: int | None) -> str | None:
    """The argument of ``command`` starting at ``text[start]``, or None when it is unbalanced or missing.

    With ``limit``, the scan stops after ``limit + 1`` characters and returns them (so callers see the answer is
    too long without paying for a scan of a megabyte of text).
    """
    i = start + len(command)
    n = len(text)
    k = i
    while k < n and text[k] in " \t":
        k += 1
    if k < n and text[k] == "{":
        i = k
    elif k > i:
        # ``\boxed 5``: TeX takes the next token; we take everything up to the next delimiter, as verl does.
        j = k
        while j < n and text[j] not in "$\n ":
            j += 1
        return text[k:j] or None
    else:
        return None
    depth = 0
    j = i
    stop = n if limit is None else min(n, i + limit + 2)
    while j < stop:
        c = text[j]
        if c == "\\":
            j += 2  # an escaped character (``\\{``, ``\\}``, ``\\\\``) never opens or closes a group
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
        j += 1
    if stop < n:
        return text[i + 1 : stop]
    return None


def last_boxed(text: str, limit: int | None = None) -> str | None:
    """The content of the last balanced ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``; None when there is none.

    ``last_boxed(r"so \\boxed{\\frac{1}{2}}.")`` is ``r"\\frac{1}{2}"``. Escaped braces (``\\{``) do not count, so
    sets such as ``\\boxed{\\{1,2\\}}`` come out whole. An unbalanced last box is skipped in favour of an earlier
    balanced one. With ``limit``, a box whose content runs past ``limit`` characters comes back cut to
    ``limit + 1`` characters, balanced or not.
    """
    end = len(text)
    while True:
        best = -1
        best_cmd = ""
        for cmd in _BOX_COMMANDS:
            k = text.rfind(cmd, 0, end)
            if k > best:
                best, best_cmd = k, cmd
        if best < 0:
            return None
        content = _boxed_at(text, best, best_cmd, limit)
        if content is not None:
            return content
        end = best


def has_boxed(text: str) -> bool:
    """Whether ``text`` contains a balanced ``\\boxed{...}``."""
    return last_boxed(text) is not None
