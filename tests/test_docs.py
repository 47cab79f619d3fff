"""The documentation: the method sheet covers every registered method, every method docstring links its
section and its paper, and the site builds with MkDocs in strict mode (a warning fails the build)."""

import subprocess
import sys
from pathlib import Path

import pytest

from vlat.adversarial import registry

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("spec", registry.specs(), ids=lambda s: s.name)
def test_every_method_docstring_links_its_section_and_paper(spec):
    doc = sys.modules[spec.cls.__module__].__doc__
    assert spec.docs in doc, f"{spec.cls.__module__} should link {spec.docs}"
    assert spec.paper.url in doc, f"{spec.cls.__module__} should link its paper {spec.paper.url}"


def test_the_method_sheet_has_a_section_per_method():
    sys.path.insert(0, str(ROOT / "docs"))
    import hooks

    sheet = hooks.method_sections()
    for spec in registry.specs():
        assert f"{{#{spec.anchor}}}" in sheet and spec.paper.url in sheet


def test_docs_build_strictly(tmp_path):
    """``mkdocs build --strict``: the method sheet, the API pages (mkdocstrings) and the ten notebooks."""
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"})
    assert out.returncode == 0, out.stdout + out.stderr
    page = (tmp_path / "site" / "methods" / "index.html").read_text()
    for spec in registry.specs():
        assert f'id="{spec.anchor}"' in page
    assert (tmp_path / "site" / "notebooks" / "02_pgd" / "index.html").exists()
