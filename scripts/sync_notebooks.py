"""Notebooks have one source of truth: ``notebooks/src/*.py`` (jupytext py:percent).

``python scripts/sync_notebooks.py`` writes ``notebooks/*.ipynb`` from them, without outputs, so the
diff stays readable; ``tests/test_notebooks.py`` checks that the two forms agree and runs every notebook.
"""

from pathlib import Path

import jupytext

ROOT = Path(__file__).resolve().parents[1] / "notebooks"


def notebook_from_source(src: Path):
    nb = jupytext.read(src)
    nb.metadata.pop("jupytext", None)
    nb.metadata["colab"] = {"provenance": []}
    return nb


def main() -> None:
    import nbformat

    for src in sorted((ROOT / "src").glob("*.py")):
        out = ROOT / (src.stem + ".ipynb")
        nb = notebook_from_source(src)
        if out.exists():  # unchanged sources keep their notebook (and its cell ids): diffs show real changes only
            old = nbformat.read(out, as_version=4)
            if [(c.cell_type, c.source) for c in old.cells] == [(c.cell_type, c.source) for c in nb.cells]:
                continue
        jupytext.write(nb, out, fmt="ipynb")
        print(f"wrote {out.relative_to(ROOT.parent)}")


if __name__ == "__main__":
    main()
