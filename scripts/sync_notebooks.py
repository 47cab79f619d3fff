"""Notebooks have one source of truth: ``notebooks/src/*.py`` (jupytext py:percent).

``python scripts/sync_notebooks.py`` first writes into the sources what is generated from pyproject.toml
(the Colab badge and the install cell, below), then writes ``notebooks/*.ipynb`` from them, without
outputs, so the diff stays readable; ``tests/test_notebooks.py`` checks that the two forms agree, that
the generated parts are current, and runs every notebook.

**The public source is one setting**: ``Source`` under ``[project.urls]`` in pyproject.toml. While it is
not set, no badge is emitted and the install cell installs vlat by name; once it names a GitHub
repository, every notebook gets an "Open in Colab" badge for its own file and installs from it. No
repository URL is typed into a notebook by hand.
"""

import re
try:
    import tomllib
except ModuleNotFoundError:        # Python 3.10
    import tomli as tomllib
from pathlib import Path

import jupytext

REPO = Path(__file__).resolve().parents[1]
ROOT = REPO / "notebooks"
BADGE = re.compile(r"^# \[!\[Open In Colab\].*\n#\n", re.M)
INSTALL = re.compile(r'(# %% tags=\["install"\]\n)(.*?)(?=\n# %%)', re.S)
INSTALL_CELL = '''\
# Setup, written by scripts/sync_notebooks.py: installs vlat where it is missing (Colab, a fresh kernel)
# and is safe to re-run. To install another build, set VLAT_SOURCE to a wheel's path or a URL.
VLAT_SOURCE = "{spec}"
import importlib
import importlib.util
import subprocess
import sys

found = importlib.util.find_spec("vlat")
if found is None or found.origin is None:          # missing, or only a folder named vlat (no package)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", VLAT_SOURCE], check=True)
    importlib.invalidate_caches()
import torch

import vlat

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"   # every model below lives here, the GPU when present
where = torch.cuda.get_device_name(0) if DEVICE == "cuda" else "the CPU (no GPU found)"
print(f"vlat {{vlat.__version__}} from {{vlat.__file__}}; running on {{where}}")
'''


def public_source(pyproject: Path = REPO / "pyproject.toml") -> str | None:
    """``[project.urls] Source`` of pyproject.toml, or ``None`` while no public repository is set."""
    return tomllib.loads(pyproject.read_text())["project"].get("urls", {}).get("Source")


def colab_badge(name: str, source: str | None) -> str | None:
    """The badge's markdown for notebook ``name``, when ``source`` is a GitHub repository."""
    m = re.fullmatch(r"https://github\.com/([\w.-]+)/([\w.-]+?)(?:\.git)?/?", source or "")
    if m is None:
        return None
    url = f"https://colab.research.google.com/github/{m[1]}/{m[2]}/blob/main/notebooks/{name}.ipynb"
    return f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url})"


def render_source(text: str, name: str, source: str | None) -> str:
    """A source with its generated parts written from ``source``: the badge under the title (or none) and
    the body of the cell tagged ``install``."""
    if not INSTALL.search(text):
        raise ValueError(f"{name}: no install cell (a code cell tagged install: # %% tags=[\"install\"])")
    text = BADGE.sub("", text)
    badge = colab_badge(name, source)
    if badge:
        text = re.sub(r"^(# # .*\n#\n)", lambda m: f"{m[1]}# {badge}\n#\n", text, count=1, flags=re.M)
    spec = f"git+{source}" if source else "vlat"
    return INSTALL.sub(lambda m: m[1] + INSTALL_CELL.format(spec=spec), text, count=1)


def notebook_from_source(src: Path):
    nb = jupytext.read(src)
    nb.metadata.pop("jupytext", None)
    nb.metadata["colab"] = {"provenance": []}
    return nb


def main() -> None:
    import nbformat

    source = public_source()
    for src in sorted((ROOT / "src").glob("*.py")):
        text = src.read_text()
        rendered = render_source(text, src.stem, source)
        if rendered != text:
            src.write_text(rendered)
            print(f"wrote {src.relative_to(REPO)}")
        out = ROOT / (src.stem + ".ipynb")
        nb = notebook_from_source(src)
        if out.exists():  # unchanged sources keep their notebook (and its cell ids): diffs show real changes only
            old = nbformat.read(out, as_version=4)
            if [(c.cell_type, c.source) for c in old.cells] == [(c.cell_type, c.source) for c in nb.cells]:
                continue
        jupytext.write(nb, out, fmt="ipynb")
        print(f"wrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
