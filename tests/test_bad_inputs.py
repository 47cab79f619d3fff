"""The catalogue of bad inputs (issue 18): for each, the kind of outcome a person should meet, a clear
error before any work (exit status 2 and one line, never a traceback), or the input handled correctly.
Five surfaces: the command line, the Python API, checkpoint files, folder datasets (and images), the
explorer."""

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlat.cli import main as vlat
from vlat.models import ClipDualEncoder, SingleStreamModel, build_model, load_model, save_model
from vlat.resources import checkpoint
from vlat.world import load_tokenizer

ITM = str(checkpoint("single_stream_tiny_itm"))
TRAIN = ["train", "--model", "single_stream", "--preset", "nano", "--train-size", "32", "--batch-size", "16",
         "--epochs", "1", "--eval-size", "16", "--no-progress", "--device", "cpu"]


def refused(capsys, argv, *words):
    """The command ends at once with status 2 and one line naming the problem, no traceback."""
    try:
        rc = vlat(argv)
    except SystemExit as e:                         # argparse's own errors (types, choices): also status 2
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    low = err.lower()
    assert all(w.lower() in low for w in words), err
    return err


# ---- 1 · the command line -----------------------------------------------------------------------------
@pytest.mark.parametrize("extra,words", [
    (["--batch-size", "0"], ["batch-size"]),
    (["--batch-size", "-3"], ["batch-size"]),
    (["--epochs", "0"], ["epochs"]),
    (["--epochs", "-1"], ["epochs"]),
    (["--train-size", "0"], ["train-size"]),
    (["--train-size", "1000000000000"], ["train-size"]),
    (["--train-size", "1e12"], ["train-size"]),
    (["--lr", "0"], ["lr"]),
    (["--lr", "-1"], ["lr"]),
    (["--lr", "1e30"], ["lr"]),
    (["--lr", "nan"], ["lr"]),
    (["--lr", "inf"], ["lr"]),
    (["--method", "pgd", "--eps", "-1"], ["eps"]),
    (["--method", "pgd", "--eps", "nan"], ["eps"]),
    (["--method", "pgd", "--eps", "inf"], ["eps"]),
    (["--method", "pgd", "--step-size", "-0.1"], ["step"]),
    (["--device", "foo"], ["device"]),
    (["--device", "cuda:7"], ["device"]),
    (["--max-steps", "0"], ["max-steps"]),
    (["--max-steps", "-5"], ["max-steps"]),
    (["--eval-size", "0"], ["eval-size"]),
    (["--warmup", "1.5"], ["warmup"]),
    (["--warmup", "-0.1"], ["warmup"]),
    (["--grad-clip", "-1"], ["grad-clip"]),
    (["--grad-clip", "nan"], ["grad-clip"]),
    (["--weight-decay", "-1"], ["weight-decay"]),
    (["--noise-rate", "1.5"], ["noise-rate"]),
    (["--save-every", "-1"], ["save-every"]),
    (["--eval-every", "-1"], ["eval-every"]),
    (["--seed", "-1"], ["seed"]),
    (["--grad-accum", "0"], ["grad-accum"]),
    (["--grad-accum", "3"], ["grad-accum"]),                      # 16 does not split into 3 parts
    (["--workers", "-1"], ["workers"]),
    (["--workers", "1000"], ["workers"]),
    (["--radapter"], ["radapter", "clip"]),                          # R-Adapter adapts a CLIP only
    (["--radapter", "--adapter-rank", "0"], ["adapter-rank"]),
    (["--radapter", "--adapter-alpha", "1.5"], ["adapter-alpha"]),
    (["--radapter", "--adapter-ema", "1"], ["adapter-ema"]),
    (["--radapter", "--adapter-ema", "-0.1"], ["adapter-ema"]),
    (["--adapter-alpha", "0.5"], ["--radapter"]),                    # an R-Adapter setting without R-Adapter
    (["--model-overrides", "not json"], ["model-overrides"]),
    (["--model-overrides", "[1, 2]"], ["model-overrides"]),
    (["--model-overrides", '{"hidden_size": -4}'], ["hidden_size"]),
    (["--model-overrides", '{"num_layers": 100000}'], ["num_layers"]),
    (["--model", "nope"], ["nope"]),
    (["--preset", "huge"], ["huge"]),
    (["--task", "nonsense"], ["task"]),
    (["--method", "nope"], ["method"]),
    (["--method", "pgd", "--sites", "nowhere"], ["nowhere"]),
    (["--init", "missing.safetensors"], ["missing.safetensors"]),
    (["--resume", "missing.safetensors"], ["missing.safetensors"]),
    (["--data", "no/such/folder"], ["no/such/folder"]),
])
def test_train_refuses_bad_arguments_before_any_work(extra, words, capsys, tmp_path):
    refused(capsys, [*TRAIN, "--out", str(tmp_path / "out"), *extra], *words)
    assert not (tmp_path / "out").exists()                         # nothing written, nothing lost


def test_train_refuses_an_out_that_is_an_existing_file_or_empty(capsys, tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("keep me")
    refused(capsys, [*TRAIN, "--out", str(f)], "--out")
    refused(capsys, [*TRAIN, "--out", str(f / "sub")], "--out")
    refused(capsys, [*TRAIN, "--out", ""], "--out")
    assert f.read_text() == "keep me"


def test_train_refuses_a_cuda_device_on_a_machine_without_one(capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    refused(capsys, [*TRAIN, "--out", str(tmp_path / "o"), "--device", "cuda"], "cuda")


@pytest.mark.parametrize("extra,words", [
    (["--checkpoint", "missing.safetensors"], ["missing.safetensors"]),
    (["--checkpoint", ITM, "--eval-size", "-1"], ["eval-size"]),
    (["--checkpoint", ITM, "--shifts", "bogus"], ["bogus"]),
    (["--checkpoint", ITM, "--attack", "pgd", "--eps", "-1"], ["eps"]),
    (["--checkpoint", ITM, "--attack", "pgd", "--steps", "0"], ["steps"]),
    (["--checkpoint", ITM, "--device", "foo"], ["device"]),
    (["--checkpoint", ITM, "--task", "classify"], ["classify"]),
])
def test_eval_refuses_bad_arguments(extra, words, capsys):
    refused(capsys, ["eval", *extra], *words)


def test_eval_refuses_a_json_path_that_is_a_folder_before_evaluating(capsys, tmp_path):
    refused(capsys, ["eval", "--checkpoint", ITM, "--json", str(tmp_path)], "--json")




def test_debug_shows_the_traceback_for_the_same_error(capsys, tmp_path):
    with pytest.raises(FileNotFoundError):
        vlat(["--debug", "eval", "--checkpoint", str(tmp_path / "nope.safetensors")])


# ---- 2 · training that goes wrong: stops clearly, never saves a ruined model ---------------------------------
def nan_step(ctx, batch):
    """A training step whose every loss is NaN (what a far too large step size or radius leads to)."""
    out = ctx.forward(batch)
    loss = out.loss * float("nan")
    ctx.backward(loss)
    ctx.optimizer_step(loss)
    return loss.detach()


def test_training_that_diverges_stops_with_a_clear_error_and_writes_no_model(capsys, tmp_path, monkeypatch):
    import vlat.train

    out = tmp_path / "out"
    monkeypatch.setattr(vlat.train, "clean_step", nan_step)
    refused(capsys, [*TRAIN, "--out", str(out), "--train-size", "512"], "non-finite", "lower")
    assert not (out / "model.safetensors").exists()


def test_a_diverging_run_keeps_its_last_good_checkpoint(tmp_path):
    from vlat.train import TrainConfig, TrainingDiverged, clean_step, train
    from vlat.world import Collator, WorldDataset

    calls = {"n": 0}

    def good_then_nan(ctx, batch):
        calls["n"] += 1
        return clean_step(ctx, batch) if calls["n"] <= 2 else nan_step(ctx, batch)

    model = build_model("single_stream", "nano")
    cfg = TrainConfig(epochs=20, batch_size=8, save_every=2, max_skipped_in_a_row=5, device="cpu", progress=False,
                      out_dir=str(tmp_path))
    with pytest.raises(TrainingDiverged, match="5 steps"):
        train(model, "itm", WorldDataset("itm", size=16), cfg, step_fn=good_then_nan,
              collate_fn=Collator(load_tokenizer(), "itm"))
    saved = json.loads((tmp_path / "history.json").read_text())
    assert saved["skipped"] == saved["step"] - 2                      # skipped steps leave the weights alone ...
    kept = load_model(tmp_path / "last.safetensors")
    assert all(bool(p.isfinite().all()) for p in kept.parameters())  # ... so the checkpoint holds good ones


def test_max_steps_writes_the_same_files_as_a_full_run(capsys, tmp_path):
    assert vlat([*TRAIN, "--out", str(tmp_path / "full")]) == 0
    assert vlat([*TRAIN, "--out", str(tmp_path / "cut"), "--max-steps", "1"]) == 0
    capsys.readouterr()
    names = sorted(p.name for p in (tmp_path / "full").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "cut").iterdir()) == \
        ["history.json", "last.safetensors", "model.safetensors"]
    history = json.loads((tmp_path / "cut" / "history.json").read_text())
    assert history["step"] == 1


# ---- 3 · the Python API ----------------------------------------------------------------------------------
def api_cases():
    from vlat.adversarial import FGM, PGD, SMART
    from vlat.train import TrainConfig, train
    from vlat.world import Collator, WorldDataset, load_tokenizer

    def train_with(**kw):
        model = build_model("single_stream", "nano")
        train(model, "itm", WorldDataset("itm", size=8), TrainConfig(progress=False, device="cpu", **kw),
              collate_fn=Collator(load_tokenizer(), "itm"))

    return {
        "unknown model": (lambda: build_model("nope"), "nope"),
        "unknown preset": (lambda: build_model("clip", "huge"), "huge"),
        "unknown config field": (lambda: build_model("clip", "nano", hidden=3), "hidden"),
        "negative width": (lambda: build_model("clip", "nano", text_hidden=-8), "text_hidden"),
        "absurd depth": (lambda: build_model("single_stream", "nano", num_layers=10_000), "num_layers"),
        "a model of 100 GB": (lambda: build_model("single_stream", "nano", hidden_size=200_000, num_heads=1),
                              "GB"),
        "batch size 0": (lambda: train_with(batch_size=0), "batch"),
        "epochs 0": (lambda: train_with(epochs=0), "epochs"),
        "lr nan": (lambda: train_with(lr=float("nan")), "lr"),
        "PGD eps -1": (lambda: PGD(eps=-1.0), "eps"),
        "PGD steps 0": (lambda: PGD(steps=0), "steps"),
        "FGM norm l3": (lambda: FGM(norm="l3"), "norm"),
        "SMART eps nan": (lambda: SMART(eps=float("nan")), "eps"),
        "unknown task": (lambda: build_model("clip", "nano")(WorldDataset("itc", size=2)[0], "nonsense"), "nonsense"),
        "negative dataset size": (lambda: WorldDataset("itm", size=-1), "size"),
        "unknown shift": (lambda: WorldDataset("itm", size=2, shift="moon"), "moon"),
        "empty batch": (lambda: Collator(load_tokenizer(), "itm")([]), "empty"),
        "load a folder": (lambda: load_model(Path(ITM).parent), "not"),
    }


@pytest.mark.parametrize("case", list(api_cases()))
def test_the_api_refuses_bad_input_with_a_message(case):
    fn, word = api_cases()[case]
    with pytest.raises((ValueError, FileNotFoundError, IsADirectoryError)) as e:
        fn()
    assert word.lower() in str(e.value).lower()


# ---- 4 · checkpoint files: loading runs nothing and allocates within bounds ----------------------------------
def safetensors_with(path: Path, metadata: dict | None, tensors: dict | None = None, raw_header: bytes | None = None):
    """A safetensors file written by hand: any header, any metadata."""
    tensors = tensors or {"x": torch.zeros(2)}
    header, blob, off = {}, b"", 0
    for k, t in tensors.items():
        data = t.numpy().tobytes()
        header[k] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [off, off + len(data)]}
        blob += data
        off += len(data)
    if metadata is not None:
        header["__metadata__"] = metadata
    h = raw_header if raw_header is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + blob)
    return path


def itm_metadata(**config_changes) -> dict:
    from vlat.models import read_metadata

    info = read_metadata(ITM)
    info["config"].update(config_changes)
    return {"vlat": json.dumps(info)}


def checkpoint_cases(tmp: Path):
    deep = "[" * 100_000 + "]" * 100_000
    return {
        "empty file": (lambda p: p.write_bytes(b""), "corrupt"),
        "random bytes": (lambda p: p.write_bytes(os.urandom(4096)), "corrupt"),
        "header length past the end": (lambda p: p.write_bytes(struct.pack("<Q", 10**6) + b"{}"), "corrupt"),
        "header not JSON": (lambda p: safetensors_with(p, None, raw_header=b"{not json"), "corrupt"),
        "deeply nested header": (lambda p: safetensors_with(p, None, raw_header=deep.encode()), "corrupt"),
        "no vlat metadata": (lambda p: safetensors_with(p, {"other": "1"}), "not a vlat"),
        "vlat metadata not JSON": (lambda p: safetensors_with(p, {"vlat": "{oops"}), "metadata"),
        "deeply nested vlat metadata": (lambda p: safetensors_with(p, {"vlat": deep}), "metadata"),
        "unknown kind": (lambda p: safetensors_with(p, {"vlat": json.dumps({"kind": "gpt", "config": {}})}), "gpt"),
        "config not an object": (lambda p: safetensors_with(p, {"vlat": json.dumps({"kind": "clip", "config": 3})}),
                                 "config"),
        "unknown config field": (lambda p: safetensors_with(p, itm_metadata(evil=1)), "evil"),
        "a huge model asked for, small tensors": (
            lambda p: safetensors_with(p, itm_metadata(hidden_size=400_000, num_heads=1)), "GB"),
        "absurd depth": (lambda p: safetensors_with(p, itm_metadata(num_layers=10**6)), "num_layers"),
        "negative size": (lambda p: safetensors_with(p, itm_metadata(hidden_size=-3)), "hidden_size"),
        "tensors that do not fit": (lambda p: safetensors_with(p, itm_metadata()), "do not fit"),
        "a string where a number goes": (lambda p: safetensors_with(p, itm_metadata(num_layers="2")), "num_layers"),
    }


@pytest.mark.parametrize("case", list(checkpoint_cases(Path("."))))
def test_a_hostile_or_broken_checkpoint_is_refused_with_a_message(case, tmp_path):
    make, word = checkpoint_cases(tmp_path)[case]
    path = tmp_path / "x.safetensors"
    make(path)
    with pytest.raises(ValueError) as e:
        load_model(path)
    assert word.lower() in str(e.value).lower()


def test_a_checkpoint_naming_a_tokenizer_with_custom_code_runs_none_of_it(tmp_path):
    from vlat.models import model_tokenizer

    evil = tmp_path / "evil_tok"
    evil.mkdir()
    marker = tmp_path / "ran.txt"
    (evil / "tokenization_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    (evil / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "EvilTokenizer", "auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}}))
    path = tmp_path / "m.safetensors"
    model = load_model(ITM)
    model.config.tokenizer = str(evil)
    save_model(model, path)
    loaded = load_model(path)                                      # loading the weights is fine ...
    with pytest.raises(ValueError) as e:                           # ... its tokenizer is refused
        model_tokenizer(loaded)
    assert "code" in str(e.value).lower()
    assert not marker.exists()


@pytest.mark.parametrize("name", ["", "../../etc/passwd", "a b c", "https://evil.example/x", "x" * 300])
def test_a_checkpoint_naming_a_tokenizer_that_is_no_folder_or_hub_id_is_refused(name, tmp_path):
    from vlat.models import model_tokenizer

    model = load_model(ITM)
    model.config.tokenizer = name
    with pytest.raises(ValueError):
        model_tokenizer(model)


def test_a_training_checkpoint_loads_as_a_model(tmp_path, capsys):
    assert vlat([*TRAIN, "--out", str(tmp_path / "o"), "--max-steps", "1"]) == 0
    assert isinstance(load_model(tmp_path / "o" / "last.safetensors"), SingleStreamModel)


# ---- 5 · folder datasets and images as users have them --------------------------------------------------------
def pairs_folder(root: Path, records: list, images: dict | None = None) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    for name, im in (images or {"a.png": Image.new("RGB", (8, 8), (255, 0, 0))}).items():
        im.save(root / "images" / name)
    (root / "captions.jsonl").write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records))
    return root


GOOD = {"image": "images/a.png", "captions": ["a red square"]}


def outside_file(tmp: Path) -> Path:
    """A real image beside the dataset folder, the target of the path-escape cases."""
    Image.new("RGB", (4, 4)).save(tmp / "secret.png")
    return tmp / "secret.png"


def folder_cases(tmp: Path):
    return {
        "no captions.jsonl": (lambda r: r.mkdir(), "captions.jsonl"),
        "malformed line": (lambda r: pairs_folder(r, [GOOD, "{oops"]), ":2"),
        "captions not a list": (lambda r: pairs_folder(r, [{"image": "images/a.png", "captions": "x"}]), ":1"),
        "an empty caption": (lambda r: pairs_folder(r, [{"image": "images/a.png", "captions": [" "]}]), ":1"),
        "no image key": (lambda r: pairs_folder(r, [{"captions": ["x"]}]), ":1"),
        "image path out of the folder": (lambda r: (outside_file(tmp), pairs_folder(r, [{**GOOD, "image": "../secret.png"}])),
                                         "outside"),
        "absolute image path": (lambda r: pairs_folder(r, [{**GOOD, "image": str(outside_file(tmp))}]), "outside"),
        "missing image": (lambda r: pairs_folder(r, [{**GOOD, "image": "images/none.png"}]), "none.png"),
        "image that is text": (lambda r: (pairs_folder(r, [{**GOOD, "image": "images/t.png"}]),
                                          (r / "images" / "t.png").write_text("hello")), "t.png"),
        "image that is a folder": (lambda r: (pairs_folder(r, [{**GOOD, "image": "images"}])), "images"),
        "image that is a FIFO": (lambda r: (pairs_folder(r, [{**GOOD, "image": "images/f.png"}]),
                                            os.mkfifo(r / "images" / "f.png")), "f.png"),
        "no pairs at all": (lambda r: pairs_folder(r, []), "no pairs"),
        "image path not a string": (lambda r: pairs_folder(r, [{**GOOD, "image": 3}]), ":1"),
    }


@pytest.mark.parametrize("case", list(folder_cases(Path("."))))
def test_a_broken_pairs_folder_is_refused_with_a_message_naming_the_place(case, tmp_path):
    from vlat.world import FolderDataset

    make, word = folder_cases(tmp_path)[case]
    root = tmp_path / "pairs"
    make(root)
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        FolderDataset(root)
    assert word.lower() in str(e.value).lower()


def pixel(path: Path) -> torch.Tensor:
    from vlat.world.folder import load_image

    return load_image(path, 4)[:, 0, 0]


def test_16_bit_greyscale_png_keeps_its_brightness(tmp_path):
    arr = np.full((4, 4), 32768, dtype=np.uint16)                # half of 65535
    Image.fromarray(arr).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    assert torch.allclose(pixel(tmp_path / "g16.png"), torch.full((3,), 128 / 255), atol=1 / 255)


def test_float_tiff_in_0_1_keeps_its_values(tmp_path):
    Image.fromarray(np.full((4, 4), 0.25, dtype=np.float32)).save(tmp_path / "f.tif")
    assert Image.open(tmp_path / "f.tif").mode == "F"
    assert torch.allclose(pixel(tmp_path / "f.tif"), torch.full((3,), 0.25), atol=1 / 255)


def test_32_bit_integer_image_of_8_bit_values(tmp_path):
    Image.fromarray(np.full((4, 4), 200, dtype=np.int32)).save(tmp_path / "i.tif")
    assert torch.allclose(pixel(tmp_path / "i.tif"), torch.full((3,), 200 / 255), atol=1 / 255)


def test_palette_with_transparency_goes_over_white(tmp_path):
    im = Image.new("P", (4, 4), 0)
    im.putpalette([255, 0, 0] + [0, 0, 0] * 255)
    im.info["transparency"] = 0
    im.save(tmp_path / "p.png", transparency=0)
    assert torch.allclose(pixel(tmp_path / "p.png"), torch.ones(3), atol=1 / 255)


def test_cmyk_jpeg_and_la_png(tmp_path):
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=100)   # pure red in CMYK
    red = pixel(tmp_path / "c.jpg")
    assert red[0] > 0.9 and red[1] < 0.1 and red[2] < 0.1
    Image.new("LA", (4, 4), (0, 0)).save(tmp_path / "la.png")                         # black, fully transparent
    assert torch.allclose(pixel(tmp_path / "la.png"), torch.ones(3), atol=1 / 255)


def test_unknown_characters_in_captions_are_counted_and_reported_once(tmp_path, capsys):
    from vlat.world import FolderDataset, load_tokenizer

    root = pairs_folder(tmp_path / "pairs", [GOOD, {**GOOD, "captions": ["a red 😀 square"]},
                                              {**GOOD, "captions": ["红色 square"]}] + [GOOD] * 20)
    ds = FolderDataset(root)
    unknown = ds.unknown_characters(load_tokenizer())
    assert unknown["captions"] == 2 and {"😀", "红", "色"} <= set(unknown["characters"])
    assert vlat(["train", "--model", "clip", "--preset", "nano", "--data", str(root), "--task", "itc", "--epochs",
                 "1", "--batch-size", "8", "--device", "cpu", "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    out = capsys.readouterr()
    assert (out.out + out.err).count("[UNK]") == 1


# ---- 6 · the explorer ---------------------------------------------------------------------------------------
def test_the_explorer_loads_only_shipped_models_and_those_allowed_at_start(tmp_path):
    from vlat.apps.explorer import HUB_CHOICE, ModelCache

    cache = ModelCache()
    with pytest.raises(ValueError) as e:
        cache.get(HUB_CHOICE, str(tmp_path))                       # any local folder: not without --allow-model
    assert "--allow-model" in str(e.value)
    with pytest.raises(ValueError) as e:
        cache.get("a model nobody offered")
    assert "unknown model" in str(e.value)
    folder = tmp_path / "clip"
    build_model("clip", "nano").save_pretrained(folder, tokenizer=load_tokenizer())
    allowed = ModelCache(allow=[str(folder)])
    model, _ = allowed.get(HUB_CHOICE, str(folder))
    assert isinstance(model, ClipDualEncoder)


def test_the_explorer_model_cache_is_bounded():
    from vlat.apps.explorer import MODELS, ModelCache

    cache = ModelCache(size=2)
    for choice in MODELS:                                          # three models through a cache of two
        cache.get(choice)
    assert len(cache) == 2


def test_an_upload_over_the_size_cap_is_refused_and_removed(tmp_path):
    from vlat.apps.explorer import MAX_UPLOAD_BYTES, upload_status

    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * (MAX_UPLOAD_BYTES + 1))
    path, _, message = upload_status(str(big))
    assert path is None and "MB" in message and not big.exists()
    junk = tmp_path / "junk.png"
    junk.write_text("not an image")
    path, _, message = upload_status(str(junk))
    assert path is None and "image" in message and not junk.exists()


@pytest.mark.parametrize("host,warned", [("127.0.0.1", False), ("localhost", False), ("0.0.0.0", True),
                                         ("192.168.1.5", True)])
def test_binding_beyond_this_machine_is_said_out_loud(host, warned):
    from vlat.apps.explorer import host_warning

    assert bool(host_warning(host)) == warned
    if warned:
        assert "network" in host_warning(host)


def test_a_clip_folder_with_missing_weights_is_refused_not_filled_at_random(tmp_path):
    from safetensors.torch import load_file, save_file

    from vlat.models import ClipDualEncoder

    folder = tmp_path / "clip"
    build_model("clip", "nano").save_pretrained(folder, tokenizer=load_tokenizer())
    (weights,) = folder.glob("*.safetensors")
    state = load_file(weights)
    state.pop(next(k for k in state if "q_proj.weight" in k))
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing"):
        ClipDualEncoder.from_pretrained(folder)
