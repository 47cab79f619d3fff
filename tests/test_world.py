import numpy as np
import pytest
import torch

import vlat.world.captions as C
from vlat.world import (ALL_PAIRS, HELD_OUT_PAIRS, SHIFTS, Collator, FolderDataset, WorldDataset, encode_text,
                        load_tokenizer, make_scene, render, write_folder)
from vlat.world.scenes import BACKGROUND, PALETTE, SHIFTED_PALETTE, Obj, relation
from vlat.world.tokenizer import VOCAB_FILE, build_vocab


def test_same_seed_same_world_and_different_seed_differs():
    a, b = WorldDataset("itm", size=20, seed=3), WorldDataset("itm", size=20, seed=3)
    c = WorldDataset("itm", size=20, seed=4)
    assert torch.equal(a.images, b.images) and a.captions == b.captions
    assert [a[i]["text"] for i in range(20)] == [b[i]["text"] for i in range(20)]
    assert not torch.equal(a.images, c.images)


def test_splits_are_disjoint():
    tr, te = WorldDataset("itc", "train", 50), WorldDataset("itc", "test", 50)
    assert not any(torch.equal(x, y) for x in tr.images[:10] for y in te.images[:10])


def test_relation_by_hand():
    a, b = Obj("circle", "red", "small", 0.2, 0.5), Obj("square", "blue", "small", 0.8, 0.55)
    assert relation(a, b) == "left of" and relation(b, a) == "right of"
    c = Obj("square", "blue", "small", 0.25, 0.9)
    assert relation(a, c) == "above" and relation(c, a) == "below"


def test_every_caption_true_and_every_hard_negative_false():
    rng = np.random.default_rng(0)
    for i in range(300):
        scene = make_scene(np.random.default_rng(i))
        assert all(C.holds(scene, c) for c in C.true_claims(scene))
        assert not C.holds(scene, C.false_claim(scene, rng))
        q, a = C.question(scene, rng)
        if q.startswith("how many"):
            assert a == C.NUMBER_WORDS[len(scene)]
        if q.startswith("is there"):
            colour, shape = q.split()[3:5]
            assert (a == "yes") == any((o.colour, o.shape) == (colour, shape) for o in scene)


def test_itm_and_tf_labels_match_truth():
    ds = WorldDataset("itm", size=200)
    for i in range(200):
        it = ds[i]
        if it["label"] == 1:
            assert it["text"] in ds.captions[i]
    labels = [ds[i]["label"] for i in range(200)]
    assert 0.35 < np.mean(labels) < 0.65
    tf = WorldDataset("tf", size=200)
    assert 0.35 < np.mean([tf[i]["label"] for i in range(200)]) < 0.65


def _background_std(ds):
    corner = ds.images[:, :, :3, :3].float()  # objects never reach the 3x3 corner
    return corner.std(dim=(2, 3)).mean().item()


def test_sketch_draws_outlines_on_white():
    idd, sk = WorldDataset("itc", size=50, seed=1), WorldDataset("itc", size=50, seed=1, shift="sketch")
    assert [[(o.shape, o.colour) for o in s] for s in idd.scenes] == [[(o.shape, o.colour) for o in s] for s in sk.scenes]
    white_id = (idd.images == 255).all(1).float().mean()
    white_sk = (sk.images == 255).all(1).float().mean()
    assert white_sk > 0.85 and white_id < 0.01
    coloured = lambda d: (d.images.float().std(1) > 30).float().mean()  # saturated pixels
    assert coloured(sk) < 0.5 * coloured(idd)


def test_texture_makes_backgrounds_busy():
    idd, tx = WorldDataset("itc", size=50), WorldDataset("itc", size=50, shift="texture")
    assert _background_std(idd) == 0.0
    assert _background_std(tx) > 10.0
    assert (idd.images[:, :, 0, 0] == torch.tensor(BACKGROUND, dtype=torch.uint8)).all()


def test_palette_changes_colours_not_content():
    idd, pa = WorldDataset("itc", size=30, seed=2), WorldDataset("itc", size=30, seed=2, shift="palette")
    pix = lambda d: {tuple(p) for p in d.images.permute(0, 2, 3, 1).reshape(-1, 3).tolist()}
    assert set(map(tuple, SHIFTED_PALETTE.values())) & pix(pa)
    assert not set(map(tuple, PALETTE.values())) & pix(pa)


def test_composition_uses_only_held_out_pairs():
    comp, idd = WorldDataset("itc", size=100, shift="composition"), WorldDataset("itc", size=300)
    assert all((o.colour, o.shape) in HELD_OUT_PAIRS for s in comp.scenes for o in s)
    assert not any((o.colour, o.shape) in HELD_OUT_PAIRS for s in idd.scenes for o in s)


def test_paraphrase_rewords_but_keeps_images():
    idd, pa = WorldDataset("itc", size=30, seed=5), WorldDataset("itc", size=30, seed=5, shift="paraphrase")
    assert torch.equal(idd.images, pa.images)
    id_words = {w for caps in idd.captions for c in caps for w in c.split()}
    pa_texts = {c for caps in pa.captions for c in caps}
    assert not pa_texts & {c for caps in idd.captions for c in caps}
    assert {"little", "big", "that", "things"} & {w for c in pa_texts for w in c.split()} - id_words


def test_noise_rate_replaces_that_fraction_of_captions():
    ds = WorldDataset("itc", size=2000, noise_rate=0.3)
    assert abs(ds.noisy.mean() - 0.3) < 0.04
    clean = WorldDataset("itc", size=2000)
    changed = [ds.captions[i] != clean.captions[i] for i in range(2000)]
    assert changed == list(ds.noisy)


def test_classify_labels_name_the_main_object():
    ds = WorldDataset("classify", size=50)
    for i in range(50):
        main = ds.scenes[i][0]
        assert main.size == "large" and all(o.size == "small" for o in ds.scenes[i][1:])
        assert ALL_PAIRS[ds[i]["label"]] == (main.colour, main.shape)


def test_tokenizer_round_trip_and_vocab_in_sync():
    tok = load_tokenizer()
    assert VOCAB_FILE.read_text().split("\n")[:-1] == build_vocab()
    for caps in WorldDataset("itc", size=30).captions + WorldDataset("itc", size=30, shift="paraphrase").captions:
        for c in caps:
            ids = tok(c)["input_ids"]
            assert tok.unk_token_id not in ids
            assert tok.decode(ids, skip_special_tokens=True) == c
    assert tok.unk_token_id not in tok("a zebra")["input_ids"]  # unknown words fall back to letters


def test_bad_inputs_are_refused_clearly():
    tok = load_tokenizer()
    with pytest.raises(ValueError, match="empty caption"):
        encode_text(tok, ["a red circle", "  "])
    with pytest.raises(ValueError, match="at most 32"):
        encode_text(tok, ["a red circle " * 20])
    with pytest.raises(ValueError, match="unknown shift"):
        WorldDataset("itm", shift="cartoon")
    with pytest.raises(ValueError, match="unknown task"):
        WorldDataset("vqa")


def test_collate_shapes():
    tok = load_tokenizer()
    b = Collator(tok, "classify")([WorldDataset("classify", size=4)[i] for i in range(4)])
    assert b["class_input_ids"].shape[0] == 24 and b["pixel_values"].shape == (4, 3, 64, 64)
    b = Collator(tok, "mlm")([WorldDataset("mlm", size=64)[i] for i in range(64)])
    chosen = b["mlm_labels"] != -100
    assert chosen.any() and not chosen[:, 0].any()  # [CLS] never masked


def test_folder_round_trip(tmp_path):
    n = write_folder(tmp_path, {"id": 6, "sketch": 2})
    ds = FolderDataset(tmp_path)
    ref = WorldDataset("itc", "test", 6, seed=1234)
    assert len(ds) == n == 8
    assert torch.allclose(ds.images[:6], ref.images.float() / 255)  # PNG is lossless
    assert ds.captions[:6] == ref.captions and ds.scenes[0] == ref.scenes[0]


def test_folder_accepts_user_images_in_other_modes_and_sizes(tmp_path):
    from PIL import Image

    (tmp_path / "images").mkdir()
    Image.new("L", (100, 80), 128).save(tmp_path / "images/g.png")
    Image.new("RGBA", (64, 64), (255, 0, 0, 0)).save(tmp_path / "images/a.png")
    (tmp_path / "captions.jsonl").write_text('{"image": "images/g.png", "captions": ["a grey square"]}\n'
                                             '{"image": "images/a.png", "captions": ["nothing"]}\n')
    ds = FolderDataset(tmp_path)
    assert ds.images.shape == (2, 3, 64, 64)
    assert torch.allclose(ds.images[1], torch.ones(3, 64, 64))  # transparent composites onto white
    (tmp_path / "images/bad.png").write_text("not an image")
    (tmp_path / "captions.jsonl").write_text('{"image": "images/bad.png", "captions": ["x"]}\n')
    with pytest.raises(ValueError, match="not a readable image"):
        FolderDataset(tmp_path)
    (tmp_path / "captions.jsonl").write_text('{"image": "images/g.png", "captions": []}\n')
    with pytest.raises(ValueError, match=":1:"):
        FolderDataset(tmp_path)


def test_shipped_samples_load():
    from vlat.resources import sample_pairs

    root = sample_pairs()
    ds = FolderDataset(root)
    assert len(ds) >= 200
    shifts = {r.get("shift") for r in ds.records}
    assert set(SHIFTS) <= shifts
