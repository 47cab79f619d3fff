"""Every notebook agrees with its jupytext source and runs top to bottom in fast mode."""

import os
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from sync_notebooks import notebook_from_source, public_source, render_source  # noqa: E402

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_every_source_has_its_notebook():
    assert {p.stem for p in (ROOT / "notebooks" / "src").glob("*.py")} == {p.stem for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_matches_source_and_has_no_outputs(path):
    nb = nbformat.read(path, as_version=4)
    src = notebook_from_source(ROOT / "notebooks" / "src" / (path.stem + ".py"))
    assert [c.source for c in nb.cells] == [c.source for c in src.cells], "run python scripts/sync_notebooks.py"
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")
    assert ("colab-badge" in nb.cells[0].source) == (public_source() is not None)
    assert any("install" in c.metadata.get("tags", []) for c in nb.cells)
    assert any("parameters" in c.metadata.get("tags", []) for c in nb.cells)


def test_badges_and_install_cells_are_generated_from_the_one_setting():
    for src in sorted((ROOT / "notebooks" / "src").glob("*.py")):
        text = src.read_text()
        assert render_source(text, src.stem, public_source()) == text, "run python scripts/sync_notebooks.py"
    text = (ROOT / "notebooks" / "src" / "02_pgd.py").read_text()
    unset = render_source(text, "02_pgd", None)
    assert "colab-badge" not in unset and 'VLAT_SOURCE = "vlat"' in unset
    set_ = render_source(text, "02_pgd", "https://github.com/someone/vlat")
    assert ("https://colab.research.google.com/github/someone/vlat/blob/main/notebooks/02_pgd.ipynb" in set_
            and 'VLAT_SOURCE = "git+https://github.com/someone/vlat"' in set_)
    assert render_source(set_, "02_pgd", None) == unset            # unsetting removes the badge again


def test_no_repository_url_is_typed_by_hand():
    """Every link to vlat's own repository comes from pyproject's [project.urls] Source."""
    import re

    source = public_source()
    repo = source.split("github.com/")[-1].removesuffix(".git").strip("/") if source else None
    allowed = {f"github.com/{repo}", f"colab.research.google.com/github/{repo}"} if repo else set()
    files = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "notebooks" / "src").glob("*.py"),
             *(ROOT / "notebooks").glob("*.ipynb")]
    pattern = r"(colab\.research\.google\.com/github/[\w.-]+/[\w.-]+|github\.com/[\w.-]+/vlat)\b"
    for f in files:
        for url in re.findall(pattern, f.read_text()):
            assert url in allowed, f"{f.name}: {url} is typed by hand; set [project.urls] Source instead"


def test_notebooks_never_hard_code_a_device():
    """The install cell picks ``DEVICE`` (the GPU when present); every other cell runs where that says."""
    import re

    hard = re.compile(r"""["'](cpu|cuda)(:\d+)?["']|\.cuda\(|\.cpu\(\)\s*$|device\s*=\s*torch\.device\(""")
    for path in NOTEBOOKS:
        cells = nbformat.read(path, as_version=4).cells
        for cell in cells:
            if cell.cell_type != "code" or "install" in cell.metadata.get("tags", []):
                continue
            found = [line for line in cell.source.splitlines() if hard.search(line.split("#")[0])]
            assert not found, f"{path.name} hard-codes a device (use DEVICE from the install cell): {found}"
        install = next(c.source for c in cells if "install" in c.metadata.get("tags", []))
        assert 'DEVICE = "cuda" if torch.cuda.is_available() else "cpu"' in install and "running on" in install


METHOD_NOTEBOOKS = ["01_fgsm_fgm", "02_pgd", "03_freeat_yopo", "04_freelb", "05_smart", "06_albef", "07_villa",
                    "08_radapter"]


@pytest.mark.parametrize("name", METHOD_NOTEBOOKS)
def test_every_method_notebook_has_the_learner_write_check_and_answer(name):
    """Issue 21: a write-it-yourself cell (lines marked # ← that vlat.exercises blanks, still valid Python
    once blanked) with a check against vlat, a predict-before-you-run prompt, graded exercises and a recap."""
    import ast

    from vlat.exercises import MARK, blank

    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert sum(src.count(MARK) for src in code) >= 3
    assert any("check(" in src for src in code)                                # compared with vlat's own
    assert sum(src.count("grade(") for src in code) >= 3
    assert "Predict before you run" in text and "## Exercises" in text and "Recap" in text
    for src in code:
        ast.parse(blank(src).replace("%matplotlib", "#"))                     # the learner's copy still parses


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_notebook_ends_with_a_recap(path):
    last = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "markdown"][-1].source
    assert "Recap" in last and "next" in last.lower()


CELL_TIMEOUT = 180   # seconds a cell may take in fast mode before the run stops and names it


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_fast_mode(path, tmp_path):
    """Top to bottom in fast mode, cell by cell, so that a failure or a hang (a widget waiting for a browser,
    say) names its cell; exercises that print ✗ count as failures too."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError

    nb = nbformat.read(path, as_version=4)
    os.environ["VLAT_FAST"] = "1"
    client = NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    with client.setup_kernel():
        for i, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            head = cell.source.strip().splitlines()[0][:100] if cell.source.strip() else ""
            try:
                client.execute_cell(cell, i)
            except CellTimeoutError:
                pytest.fail(f"{path.name}: code cell {i} ({head!r}) ran over {CELL_TIMEOUT} s in fast mode")
            except CellExecutionError as e:
                pytest.fail(f"{path.name}: code cell {i} ({head!r}) failed: {str(e)[-1500:]}")
            printed = "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")
            assert "✗" not in printed, f"{path.name}: code cell {i} ({head!r}): {printed[-600:]}"
