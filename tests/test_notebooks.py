"""Every notebook listed here executes top to bottom without a cell error (what nbmake checks, run by pytest).

CI collects only `tests/`, so the notebooks are executed from here with nbclient (an nbmake dependency) on the
`python3` kernel (ipykernel), each in its own folder, offline and on CPU. Adding a notebook is one line in
NOTEBOOKS; notebooks not listed there are not run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="nbformat comes with nbmake (the dev extra)")
nbclient = pytest.importorskip("nbclient", reason="nbclient comes with nbmake (the dev extra)")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = [
    "01_sfpo_transform.ipynb",
    "02_reproduce_cpu.ipynb",
    "03_real_models.ipynb",
]
# Per-cell limit: each notebook is meant to run in well under a minute on a 2-core CPU.
CELL_TIMEOUT_S = 300


def kernel_env() -> dict[str, str]:
    """The kernel's environment: CPU only, no network, and the checkout importable without `pip install -e`."""
    env = dict(os.environ)
    # The test session forces 8 host devices (conftest.py); a notebook runs as a user would, with the default.
    env.pop("XLA_FLAGS", None)
    env.update(
        JAX_PLATFORMS="cpu",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p),
    )
    return env


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_executes(name: str):
    path = NOTEBOOK_DIR / name
    nb = nbformat.read(path, as_version=4)
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    # Notebooks are committed with their outputs, so that they read without running them.
    unexecuted = [i for i, c in enumerate(code_cells) if c.execution_count is None]
    assert code_cells and not unexecuted, f"{name}: saved without outputs (code cells {unexecuted} never ran)"
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},  # the kernel's working directory
    )
    try:
        client.execute(env=kernel_env())
    except nbclient.exceptions.CellExecutionError as err:
        pytest.fail(f"{name}: a cell raised\n{err}", pytrace=False)
