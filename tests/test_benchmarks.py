"""The benchmark scripts run end to end (smoke sizes) and their rows obey the metrics' invariants."""

import importlib.util
import json
from pathlib import Path

import pytest

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
        shifts = ["sketch", "texture", "composition", "paraphrase", "palette"]
        assert r["ood_mean"] == pytest.approx(sum(r[s] for s in shifts) / 5)
        assert r["ood_mean_no_composition"] == pytest.approx(sum(r[s] for s in shifts if s != "composition") / 4)
        assert 0 <= r["corruptions@3"] <= 1
    assert len(list((tmp_path / "cache").glob("mlm_seed0_*.safetensors"))) == 1  # pre-trained once, shared
    capsys.readouterr()
    rob.main(["--report", str(out)])
    table = capsys.readouterr().out
    assert "| clean |" in table and "| FGM |" in table


def test_albef_ablation_fast_run_has_both_arms_per_noise_rate(tmp_path, capsys):
    abl = load("albef_ablation")
    out = tmp_path / "rows.json"
    abl.main(["--fast", "--noise", "0.4", "--json", str(out)])
    runs = json.loads(out.read_text())["runs"]
    assert sorted((r["noise"], r["distill"]) for r in runs) == [(0.4, False), (0.4, True)]
    for r in runs:
        assert 0 <= r["TR@1"] <= r["TR@5"] <= 1 and 0 <= r["IR@1"] <= r["IR@5"] <= 1 and 0 <= r["ITM acc"] <= 1
    capsys.readouterr()
    abl.main(["--report", str(out)])
    assert "| noise 40%, MD on |" in capsys.readouterr().out


def test_villa_fast_run_builds_each_pretraining_once_and_scores_every_arm(tmp_path, capsys):
    vil = load("villa")
    out = tmp_path / "rows.json"
    arms = "baseline,VILLA-pre,FreeLB (w=0)"
    vil.main(["--fast", "--arms", arms, "--cache", str(tmp_path / "cache"), "--json", str(out)])
    saved = json.loads(out.read_text())
    assert "MLM + ITM pre-training 1 epochs" in saved["settings"]
    assert sorted(r["method"] for r in saved["runs"]) == sorted(arms.split(","))
    for r in saved["runs"]:
        assert 0 <= r["PGD10_text"] <= r["clean"] <= 1 and 0 <= r["PGD10_image"] <= r["clean"]
        assert r["epoch_s"] > 0 and r["pre_epoch_s"] > 0
    cached = sorted(p.name.split("_")[0] for p in (tmp_path / "cache").glob("*.safetensors"))
    assert cached == ["clean", "villa"]                      # one pre-trained model per kind, shared by arms
    capsys.readouterr()
    vil.main(["--report", str(out)])
    assert "| VILLA-pre |" in capsys.readouterr().out


def test_radapter_fast_run_scores_arms_wise_ft_and_writes_the_plot(tmp_path, capsys):
    ra = load("radapter")
    out = tmp_path / "rows.json"
    ra.main(["--fast", "--arms", "zero-shot,full fine-tuning,R-Adapter (+ rescaling),LoRA r=8 (peft)",
             "--json", str(out)])
    runs = [r for item in json.loads(out.read_text())["runs"] for r in item]
    names = sorted(r["method"] for r in runs)
    assert names == sorted(["zero-shot", "full fine-tuning", "R-Adapter (+ rescaling)", "LoRA r=8 (peft)",
                            "WiSE-FT α=0.25", "WiSE-FT α=0.5", "WiSE-FT α=0.75"])
    by = {r["method"]: r for r in runs}
    assert by["zero-shot"]["trainable_%"] == 0 and by["full fine-tuning"]["trainable_%"] == 100
    assert 0 < by["LoRA r=8 (peft)"]["trainable_%"] < by["R-Adapter (+ rescaling)"]["trainable_%"] < 100
    for r in runs:
        shifts = ("sketch", "texture", "composition", "paraphrase", "palette")
        assert 0 <= r["id"] <= 1 and r["ood_mean"] == pytest.approx(sum(r[s] for s in shifts) / 5)
        assert r["ood_mean_no_composition"] == pytest.approx(sum(r[s] for s in shifts if s != "composition") / 4)
        # with fewer candidates an image can only gain: a closed or open protocol never scores below the full one
        assert r["id_closed"] >= r["id"] and r["composition_open"] >= r["composition"]
        assert 0 <= r["held_out_pred_id"] <= 1 - r["id"] and 0 <= r["corruptions@3"] <= 1
    capsys.readouterr()
    ra.main(["--report", str(out), "--plot", str(tmp_path / "plot.html")])
    assert "| WiSE-FT α=0.5 |" in capsys.readouterr().out
    assert "plotly" in (tmp_path / "plot.html").read_text()


SHIPPED = ROOT / "data_samples" / "checkpoints"


def test_robustness_and_villa_start_from_a_given_checkpoint_without_pretraining(tmp_path):
    out = tmp_path / "rows.json"
    init = str(SHIPPED / "single_stream_tiny_tf.safetensors")
    load("robustness").main(["--fast", "--methods", "clean", "--init", init, "--cache", str(tmp_path / "cache"),
                             "--json", str(out)])
    saved = json.loads(out.read_text())
    assert f"from {init}" in saved["settings"] and [r["method"] for r in saved["runs"]] == ["clean"]
    assert not (tmp_path / "cache").exists()                 # nothing pre-trained: every seed starts from init
    load("villa").main(["--fast", "--arms", "baseline,VILLA-pre", "--init", init, "--cache", str(tmp_path / "v"),
                        "--json", str(out)])
    cached = sorted(p.name for p in (tmp_path / "v").glob("*.safetensors"))
    assert cached == ["single_stream_tiny_tf_clean_seed0_1x128_b128.safetensors",   # both kinds continue from init
                      "single_stream_tiny_tf_villa_seed0_1x128_b128.safetensors"]


@pytest.mark.parametrize("script, init", [("robustness", "clip_tiny_itc"), ("villa", "albef_tiny_pretrain"),
                                          ("albef_ablation", "single_stream_tiny_itm")])
def test_an_init_of_the_wrong_kind_is_refused_before_any_work(script, init, tmp_path, capsys):
    with pytest.raises(SystemExit):
        load(script).main(["--fast", "--init", str(SHIPPED / f"{init}.safetensors"), "--json", str(tmp_path / "r")])
    assert "checkpoint; these arms need a" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_villa_pre_arms_need_pretraining_epochs_when_starting_from_a_checkpoint(capsys):
    with pytest.raises(SystemExit):
        load("villa").main(["--arms", "VILLA-pre", "--pretrain-epochs", "0",
                            "--init", str(SHIPPED / "single_stream_tiny_itm.safetensors")])
    assert "no pre-training for VILLA-pre to change" in capsys.readouterr().err


def test_albef_ablation_continues_the_shipped_model_with_distillation_on_and_off(tmp_path):
    out = tmp_path / "rows.json"
    load("albef_ablation").main(["--fast", "--noise", "0.4", "--init", str(SHIPPED / "albef_tiny_pretrain.safetensors"),
                                 "--json", str(out)])
    saved = json.loads(out.read_text())
    assert "continued from" in saved["settings"]
    assert sorted(r["distill"] for r in saved["runs"]) == [False, True]


def test_radapter_lora_arm_starts_at_the_zero_shot_model_and_trains_only_lora_weights():
    import torch

    from vlat.models import load_model

    ra = load("radapter")
    zero, model = load_model(ra.ZERO_SHOT).eval(), load_model(ra.ZERO_SHOT).eval()
    ra.add_lora(model, 8)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    blocks = len(model.clip.vision_model.encoder.layers) + len(model.clip.text_model.encoder.layers)
    assert len(trainable) == blocks * 2 * 2                  # A and B on q_proj and v_proj of every block
    pixels = torch.rand(2, 3, zero.config.image_size, zero.config.image_size)
    assert torch.equal(model.image_features(pixels)[0], zero.image_features(pixels)[0])   # B = 0 at the start


def test_albef_retrieval_fast_run_reports_the_three_ood_means(tmp_path, capsys):
    ar = load("albef_retrieval")
    out = tmp_path / "rows.json"
    ar.main(["--fast", "--json", str(out)])
    rows = [r for item in json.loads(out.read_text())["runs"] for r in item]
    assert sorted(r["stage"] for r in rows) == ["fine-tuned", "zero-shot"]
    shifts = ["sketch", "texture", "composition", "paraphrase", "palette"]
    for r in rows:
        for m in ("TR@1", "ITM"):
            assert r[f"{m} ood_mean"] == pytest.approx(sum(r[f"{m} {s}"] for s in shifts) / 5)
            assert r[f"{m} ood_mean_no_composition"] == pytest.approx(
                sum(r[f"{m} {s}"] for s in shifts if s != "composition") / 4)
            assert 0 <= r[f"{m} corruptions@3"] <= 1
    capsys.readouterr()
    ar.main(["--report", str(out)])
    assert "| stage | TR@1 ood_mean | TR@1 ood_mean_no_composition | TR@1 corruptions@3 |" in capsys.readouterr().out


def test_gpu_throughput_smoke_run_reports_every_method_against_clean(capsys):
    """The GPU benchmark's nano size runs on a CPU: every row has samples/s and a ratio to clean."""
    gpu = load("gpu_throughput")
    rows = gpu.main(["--size", "nano", "--batch", "8", "--repeats", "1", "--grad-checkpointing"])
    out = capsys.readouterr().out
    from vlat.adversarial import registry

    assert [r["method"].split(" (")[0] for r in rows] == ["clean", *(s.label for s in registry.specs())]
    assert rows[0]["ratio"] == 1.0 and all(r["samples_per_s"] > 0 and r["passes"] >= 1 for r in rows)
    assert "gradient checkpointing" in out and "ratio/passes" in out
    assert gpu.SIZES["vitb32"].vision_hidden == 768 and gpu.SIZES["vitb32"].image_size == 224
