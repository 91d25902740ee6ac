"""Every notebook in notebooks/ is executed, top to bottom, at a small size.

The notebooks only call library functions; ``KVTHEORY_SMALL=1`` tells them to use the small
settings (fewer layers, tokens and methods) so that the suite stays within its time budget.
A notebook that raises fails the test, and so does one that lost its expected output
markers (each notebook ends with an ``assert`` on a computed value).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 3, [p.name for p in NOTEBOOKS]


@pytest.mark.slow
@pytest.mark.xdist_group("models")
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, data_dir):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    env_before = dict(os.environ)
    os.environ["KVTHEORY_SMALL"] = "1"
    os.environ["KVTHEORY_DATA"] = str(data_dir)
    os.environ["KVTHEORY_RESULTS"] = str(tmp_path / "results")
    os.environ["MPLBACKEND"] = "Agg"
    try:
        client = NotebookClient(nb, timeout=600, kernel_name="python3",
                                resources={"metadata": {"path": str(path.parent)}})
        client.execute()
    finally:
        os.environ.clear()
        os.environ.update(env_before)
    errors = [
        out for cell in nb.cells if cell.cell_type == "code"
        for out in cell.get("outputs", []) if out.get("output_type") == "error"
    ]
    assert errors == []
    n_code = sum(1 for c in nb.cells if c.cell_type == "code")
    assert n_code >= 3
