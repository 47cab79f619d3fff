"""The package is self-contained: a wheel built from this checkout and installed into a fresh folder outside
it runs ``vlat eval`` on a shipped checkpoint, builds the explorer app and executes notebook 00 in fast
mode, from another directory, finding every file through :mod:`vlat.resources` (issue 16)."""

import json
import os
import shutil
import subprocess
import sys
try:
    import tomllib
except ModuleNotFoundError:        # Python 3.10
    import tomli as tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP = shutil.ignore_patterns(".git", ".venv", ".cache", "build", "dist", "runs", "site", "*.egg-info", "__pycache__",
                              ".pytest_cache", "_run_*", ".ipynb_checkpoints")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(wheel, target folder, a working directory outside the checkout)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=SKIP)            # build from a copy: the checkout gets no build/ folder
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp / "dist"), str(src)], check=True, capture_output=True)
    (wheel,) = (tmp / "dist").glob("vlat-*.whl")
    target = tmp / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    return wheel, target, elsewhere


def run_installed(target: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(target), "GRADIO_ANALYTICS_ENABLED": "False"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_the_package_list_names_every_vlat_package_and_the_wheel_carries_the_data(installed):
    wheel, _, _ = installed
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "vlat").rglob("__init__.py")}
    assert on_disk <= listed, f"add {sorted(on_disk - listed)} to [tool.setuptools] packages in pyproject.toml"
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"vlat/samples/checkpoints/{p.name}" for p in (ROOT / "data_samples" / "checkpoints").glob("*.safetensors")}
    assert len(shipped) == 5 and shipped <= names
    assert {"vlat/apps/explorer.py", "vlat/samples/pairs/captions.jsonl", "vlat/world/vocab/vocab.txt"} <= names
    assert sum(n.startswith("vlat/samples/pairs/images/") for n in names) == 300
    assert {f"vlat/results/{p.name}" for p in (ROOT / "benchmarks" / "results").glob("*.json")} <= names


def test_vlat_eval_runs_from_the_installed_wheel_elsewhere(installed):
    _, target, elsewhere = installed
    where = run_installed(target, elsewhere, "-c", "import vlat, vlat.resources as r; print(vlat.__file__); "
                          "print(r.checkpoint('single_stream_tiny_itm'))")
    assert where.returncode == 0, where.stderr
    module, ckpt = where.stdout.split()
    assert Path(module).is_relative_to(target) and Path(ckpt).is_relative_to(target)
    out = run_installed(target, elsewhere, "-m", "vlat", "eval", "--checkpoint", ckpt, "--eval-size", "32",
                        "--shifts", "none", "--json", "table.json")
    assert out.returncode == 0, out.stderr
    assert 0.0 <= json.loads((elsewhere / "table.json").read_text())["id"] <= 1.0


def test_the_explorer_app_builds_from_the_installed_wheel(installed):
    _, target, elsewhere = installed
    out = run_installed(target, elsewhere, "-c", "from vlat.apps.explorer import MODELS, build_app, gallery_pairs; "
                        "app = build_app(); print(type(app).__name__, len(gallery_pairs()), "
                        "all(p.is_file() for p in MODELS.values()))")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["Blocks", "24", "True"]


@pytest.mark.slow
def test_notebook_00_runs_from_the_installed_wheel(installed, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    _, target, elsewhere = installed
    monkeypatch.setenv("PYTHONPATH", str(target))
    monkeypatch.setenv("VLAT_FAST", "1")
    nb = nbformat.read(ROOT / "notebooks" / "00_tour.ipynb", as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("import vlat; print(vlat.__file__)"))
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(elsewhere)}}).execute()
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    assert Path(nb.cells[-1].outputs[0]["text"].strip()).is_relative_to(target)
