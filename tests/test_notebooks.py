"""Every notebook agrees with its jupytext source and runs top to bottom in fast mode."""

import os
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from sync_notebooks import notebook_from_source  # noqa: E402

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_every_source_has_its_notebook():
    assert {p.stem for p in (ROOT / "notebooks" / "src").glob("*.py")} == {p.stem for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_matches_source_and_has_no_outputs(path):
    nb = nbformat.read(path, as_version=4)
    src = notebook_from_source(ROOT / "notebooks" / "src" / (path.stem + ".py"))
    assert [c.source for c in nb.cells] == [c.source for c in src.cells], "run python scripts/sync_notebooks.py"
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")
    assert "colab-badge" in nb.cells[0].source
    assert any("parameters" in c.metadata.get("tags", []) for c in nb.cells)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_fast_mode(path, tmp_path):
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    os.environ["VLAT_FAST"] = "1"
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
