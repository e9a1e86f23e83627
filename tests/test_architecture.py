"""The architecture the top of ``sfpo_jax/__init__.py`` describes, checked: the layers import only downwards, and
through each other's public faces; no function is longer than a screen; the training loop reads on one."""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sfpo_jax"
# Bottom to top; a package may import the ones listed before it (and `rewards` / `analysis` none of the others).
LAYERS = ["optim", "rl", "parallel", "models", "sampling", "rewards", "data", "tasks", "train", "analysis"]
ALLOWED = {
    "optim": set(), "rl": set(), "parallel": set(), "models": {"parallel"}, "sampling": {"models", "parallel"},
    "rewards": set(), "data": {"rewards"}, "tasks": {"data", "rewards", "models"},
    "train": {"optim", "rl", "parallel", "models", "sampling", "rewards", "data", "tasks"}, "analysis": set(),
}
MAX_FUNCTION_LINES = 80
MAX_TRAIN_LINES = 60


def modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if p.parent != PACKAGE)


def imported(tree: ast.Module) -> list[tuple[str, int]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sfpo_jax"):
            out.append((node.module, node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.startswith("sfpo_jax")]
    return out


def code_lines(source: str, node: ast.AST) -> int:
    """Lines of ``node`` holding code: docstrings, comments and blank lines not counted."""
    lines = source.splitlines()[node.lineno - 1 : node.end_lineno]
    text = "\n".join(lines)
    doc = ast.get_docstring(node, clean=False) if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) else None
    counted = set()
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                            tokenize.ENDMARKER):
            if tok.type == tokenize.STRING and doc is not None and doc in tok.string:
                continue
            counted.update(range(tok.start[0], tok.end[0] + 1))
    return len(counted)


def test_layers_import_only_downwards_and_only_public_faces():
    bad = []
    for path in modules():
        layer = path.relative_to(PACKAGE).parts[0]
        for module, line in imported(ast.parse(path.read_text())):
            parts = module.split(".")
            if len(parts) < 2 or parts[1] == layer:
                continue
            where = f"{path.relative_to(PACKAGE.parent)}:{line} imports {module}"
            if parts[1] not in ALLOWED[layer]:
                bad.append(f"{where} ({layer} may import {sorted(ALLOWED[layer])})")
            elif len(parts) > 2:
                bad.append(f"{where} (import from sfpo_jax.{parts[1]}, its public face)")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_function_is_longer_than_a_screen(path):
    source = path.read_text()
    long = [f"{node.name} ({code_lines(source, node)} lines)" for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.FunctionDef) and code_lines(source, node) > MAX_FUNCTION_LINES]
    assert not long, long


def test_the_training_loop_reads_on_one_screen():
    source = (PACKAGE / "train" / "loop.py").read_text()
    # `train` holds the run folder and the signal handlers open around `_train`, the loop itself.
    loops = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef) and n.name in ("train", "_train")]
    assert len(loops) == 2 and all(code_lines(source, n) <= MAX_TRAIN_LINES for n in loops)


def test_subpackages_are_reachable_from_the_top_level_import_lazily():
    import subprocess
    import sys

    code = ("import sys, sfpo_jax; "
            "assert 'sfpo_jax.train' not in sys.modules and 'sfpo_jax.rewards' not in sys.modules; "
            "assert callable(sfpo_jax.rewards.math_reward) and callable(sfpo_jax.train.make_rl_step); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]
