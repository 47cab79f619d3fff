"""The benchmark scripts run end to end (smoke sizes) and their rows obey the metrics' invariants."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_robustness_fast_run_writes_rows_and_reports(tmp_path, capsys):
    rob = load("robustness")
    out = tmp_path / "rows.json"
    rob.main(["--fast", "--methods", "clean,FGM", "--cache", str(tmp_path / "cache"), "--json", str(out)])
    saved = json.loads(out.read_text())
    assert "MLM pre-training 1 epochs" in saved["settings"]
    assert sorted(r["method"] for r in saved["runs"]) == ["FGM", "clean"]
    for r in saved["runs"]:
        assert 0 <= r["PGD10_text"] <= r["clean"] <= 1 and 0 <= r["PGD10_image"] <= r["clean"]
        assert {"sketch", "texture", "composition", "paraphrase", "palette"} <= set(r)
    assert len(list((tmp_path / "cache").glob("mlm_seed0_*.safetensors"))) == 1  # pre-trained once, shared
    capsys.readouterr()
    rob.main(["--report", str(out)])
    table = capsys.readouterr().out
    assert "| clean |" in table and "| FGM |" in table
