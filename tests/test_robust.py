"""R-Adapter, WiSE-FT and MPM-NCE: the invariants of the issue, on the tiny CLIP and on hand-worked cases."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import make_batch
from vlat.models import build_model
from vlat.objectives import mpm_nce
from vlat.robust import RAdapter, adapters_of, add_adapters, merge_adapters, set_alpha, unmerge_adapters, wise_ft


def tiny_clip():
    torch.manual_seed(0)
    return build_model("clip", "nano")


def randomise(adapters, seed=1):
    """Give zero-initialised adapters some weight, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for ad in adapters:
            if ad.rank is None:
                ad.weight.copy_(torch.randn(ad.weight.shape, generator=g) * 0.3)
            else:
                ad.up.copy_(torch.randn(ad.up.shape, generator=g) * 0.3)


def test_adapters_sit_after_attention_output_and_ffn_in_both_towers_and_only_they_train():
    model = tiny_clip()
    clip = model.clip
    adapters = add_adapters(model)
    layers = len(clip.vision_model.encoder.layers) + len(clip.text_model.encoder.layers)
    assert len(adapters) == 2 * layers
    for tower in (clip.vision_model, clip.text_model):
        for layer in tower.encoder.layers:
            assert isinstance(layer.self_attn.out_proj, RAdapter) and isinstance(layer.mlp.fc2, RAdapter)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".weight", ".scale")) and ("out_proj" in n or "fc2" in n) for n in trainable)
    assert not any(n.endswith("linear.weight") or n.endswith("linear.bias") for n in trainable)
    assert all(ad.scale.item() == pytest.approx(0.1) for ad in adapters)
    with pytest.raises(ValueError, match="already"):
        add_adapters(model)


@pytest.mark.parametrize("rank", [None, 4])
def test_zero_initialised_adapters_reproduce_the_zero_shot_model(rank):
    model = tiny_clip().eval()
    batch = make_batch("itc", n=4)
    with torch.no_grad():
        before = model(batch, "itc").logits
        add_adapters(model, rank=rank)
        after = model(batch, "itc").logits
    assert torch.equal(before, after)


@pytest.mark.parametrize("rank", [None, 4])
def test_merged_equals_unmerged_and_unmerge_restores_exactly(rank):
    model = tiny_clip().eval()
    batch = make_batch("itc", n=4)
    adapters = add_adapters(model, rank=rank)
    randomise(adapters)
    originals = [ad.linear.weight.detach().clone() for ad in adapters]
    with torch.no_grad():
        unmerged = model(batch, "itc").logits
        merge_adapters(model)
        merged = model(batch, "itc").logits
        assert all(not torch.equal(o, ad.linear.weight) for o, ad in zip(originals, adapters))
        unmerge_adapters(model)
        again = model(batch, "itc").logits
    assert torch.allclose(merged, unmerged, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(o, ad.linear.weight) for o, ad in zip(originals, adapters))
    assert torch.equal(again, unmerged)


def test_merge_on_a_single_layer_by_hand():
    lin = torch.nn.Linear(2, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        lin.bias.copy_(torch.tensor([1.0, -1.0]))
    ad = RAdapter(lin, drop=0.0, scale=0.5)
    with torch.no_grad():
        ad.weight.copy_(torch.tensor([[0.0, 1.0], [2.0, 0.0]]))
    x = torch.tensor([[1.0, 1.0]])
    # y = W x + b = [4, 6]; z = y + 0.5 * W_adp y = [4 + 0.5*6, 6 + 0.5*8] = [7, 10]
    assert torch.allclose(ad(x), torch.tensor([[7.0, 10.0]]))
    ad.merge()
    # (I + 0.5 W_adp) = [[1, .5], [1, 1]]; W_rep = [[2.5, 4], [4, 6]]; b_rep = [0.5, 0]
    assert torch.allclose(lin.weight, torch.tensor([[2.5, 4.0], [4.0, 6.0]]))
    assert torch.allclose(lin.bias, torch.tensor([0.5, 0.0]))
    assert torch.allclose(ad(x), torch.tensor([[7.0, 10.0]]))


def test_alpha_zero_is_the_zero_shot_model_and_alpha_is_wise_ft_in_weight_space():
    model = tiny_clip().eval()
    batch = make_batch("itc", n=4)
    with torch.no_grad():
        zero_shot = model(batch, "itc").logits
    adapters = add_adapters(model)
    randomise(adapters)
    set_alpha(model, 0.0)
    with torch.no_grad():
        assert torch.allclose(model(batch, "itc").logits, zero_shot, atol=1e-6)
        set_alpha(model, 1.0)
        full = model(batch, "itc").logits
        assert not torch.allclose(full, zero_shot, atol=1e-3)
    # α = 0.5 on one merged layer is exactly the midpoint of the zero-shot and fine-tuned merged weights
    ad = adapters[0]
    w0 = ad.linear.weight.detach().clone()
    ad.alpha = 1.0
    ad.merge()
    w1 = ad.linear.weight.detach().clone()
    ad.unmerge()
    ad.alpha = 0.5
    ad.merge()
    assert torch.allclose(ad.linear.weight, 0.5 * w0 + 0.5 * w1, atol=1e-6)


@pytest.mark.parametrize("rescale", [True, False])
def test_dropping_is_per_sample_in_training_and_off_in_eval(rescale):
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 3)
    ad = RAdapter(lin, drop=0.5, rescale=rescale)
    with torch.no_grad():
        ad.weight.copy_(torch.eye(3))
    x = torch.randn(400, 5, 3)
    y = lin(x)
    ad.train()
    out = ad(x)
    branch = 0.1 / 0.5 if rescale else 0.1                                   # a kept branch ÷ (1 - p) when rescaled
    kept = torch.isclose(out, y + branch * y, atol=1e-6).all(-1).all(-1)     # [400] adapter on, every token
    dropped = torch.isclose(out, y, atol=1e-6).all(-1).all(-1)               # adapter off, every token
    assert bool((kept ^ dropped).all())                                      # one gate per sample
    assert 0.4 < kept.float().mean().item() < 0.6
    ad.eval()
    assert torch.allclose(ad(x), 1.1 * y, atol=1e-6)


def test_alpha_and_ema_are_inference_settings_training_sees_the_live_branch():
    lin = torch.nn.Linear(2, 2)
    ad = RAdapter(lin, drop=0.0, ema=0.9)
    with torch.no_grad():
        ad.weight.fill_(1.0)
    ad.alpha, ad.use_ema = 0.5, True                                         # ema_weight is still zero
    x = torch.randn(4, 2)
    y = lin(x)
    assert torch.allclose(ad.train()(x), y + 0.1 * y.sum(-1, keepdim=True), atol=1e-6)
    assert torch.allclose(ad.eval()(x), y, atol=1e-6)                        # α · s · W̃ = 0
    ad.train().merge()                                                       # merging folds the inference branch
    assert torch.allclose(ad.linear.weight, lin.weight) and ad.merged


def test_ema_update_is_exact_and_used_on_request():
    lin = torch.nn.Linear(2, 2)
    ad = RAdapter(lin, drop=0.0, ema=0.9)
    with torch.no_grad():
        ad.weight.fill_(1.0)
    ad.update_ema()
    assert torch.allclose(ad.ema_weight, torch.full((2, 2), 0.1))
    with torch.no_grad():
        ad.weight.fill_(3.0)
    ad.update_ema()
    assert torch.allclose(ad.ema_weight, torch.full((2, 2), 0.9 * 0.1 + 0.1 * 3.0))
    assert torch.allclose(ad.ema_scale, torch.tensor(0.1))                    # s̃ of a constant s stays s
    with torch.no_grad():
        ad.scale.fill_(0.5)
    ad.update_ema()
    assert torch.allclose(ad.ema_scale, torch.tensor(0.9 * 0.1 + 0.1 * 0.5))
    ad.use_ema = True
    assert torch.allclose(ad.eval().effective(), ad.ema_scale * ad.ema_weight)
    ad.ema_scale_on = False                                                  # vlat 0.1: the live s with W̃
    assert torch.allclose(ad.effective(), ad.scale * ad.ema_weight)


def test_mpm_nce_equals_infonce_with_one_positive_no_smoothing_no_margin():
    torch.manual_seed(0)
    img, txt = F.normalize(torch.randn(5, 8), dim=1), F.normalize(torch.randn(5, 8), dim=1)
    temp = 0.07
    logits = img @ txt.t() / temp
    labels = torch.arange(5)
    infonce = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))
    got = mpm_nce(img, txt, torch.arange(5), temp=temp, eps=0.0, margin=0.0)
    assert got.item() == pytest.approx(infonce.item(), rel=1e-6)


def test_mpm_nce_on_a_hand_worked_3x3_case():
    """Pairs 0 and 1 share a caption group; 2 is alone. cos = identity-like, τ = 0.5, ε = 0.1, δ = 0.2."""
    img = torch.eye(3)
    txt = torch.eye(3)
    groups = torch.tensor([7, 7, 3])
    tau, eps, delta = 0.5, 0.1, 0.2
    # row 0: positives {0, 1} with q = 0.45 each, negative {2} with q = 0.1;
    # logits: cos 1, 0, 0 -> (1)/τ = 2, (0)/τ = 0, (0 + 0.2)/τ = 0.4
    def ce(logits, q):
        logp = [l - math.log(sum(math.exp(m) for m in logits)) for l in logits]
        return -sum(qi * lp for qi, lp in zip(q, logp))
    row0 = ce([2.0, 0.0, 0.4], [0.45, 0.45, 0.1])
    row1 = ce([0.0, 2.0, 0.4], [0.45, 0.45, 0.1])
    # row 2: positive {2} q = 0.9, negatives {0, 1} q = 0.05 each; logits 0.4, 0.4, 2
    row2 = ce([0.4, 0.4, 2.0], [0.05, 0.05, 0.9])
    want = (row0 + row1 + row2) / 3                        # cos is symmetric: both directions agree
    got = mpm_nce(img, txt, groups, temp=tau, eps=eps, margin=delta)
    assert got.item() == pytest.approx(want, rel=1e-6)


def test_wise_ft_interpolates_two_models():
    a, b = tiny_clip(), tiny_clip()
    with torch.no_grad():
        for p in b.parameters():
            p.add_(1.0)
    mid = wise_ft(a, b, 0.25)
    k = next(k for k, v in a.state_dict().items() if v.is_floating_point())
    assert torch.allclose(mid[k], a.state_dict()[k] + 0.25)
    c = tiny_clip()
    c.load_state_dict(wise_ft(a, b, 0.0))
    assert all(torch.equal(x, y) for x, y in zip(c.state_dict().values(), a.state_dict().values()))


@pytest.mark.parametrize("kw,msg", [({"drop": 1.0}, "drop"), ({"rank": 0}, "rank"), ({"ema": 1.0}, "ema")])
def test_bad_adapter_settings_are_refused(kw, msg):
    with pytest.raises(ValueError, match=msg):
        RAdapter(torch.nn.Linear(4, 4), **kw)


def test_adapters_of_counts_and_training_moves_only_adapters():
    model = tiny_clip().train()
    add_adapters(model, rank=2)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    out = model(make_batch("itc", n=4), "itc")
    out.loss.backward()
    opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert any(ad.up.abs().sum() > 0 for ad in adapters_of(model))


def test_a_bare_transformers_clip_model_takes_adapters_too():
    from transformers import CLIPModel

    hf = tiny_clip().clip
    assert isinstance(hf, CLIPModel)
    adapters = add_adapters(hf, rank=2)
    assert len(adapters) == 2 * (len(hf.vision_model.encoder.layers) + len(hf.text_model.encoder.layers))


def test_clip_with_mpm_nce_reduces_to_infonce_and_groups_identical_captions():
    from vlat.objectives import MPMNCE

    model = tiny_clip().eval()
    batch = make_batch("itc", n=6)
    assert len({tuple(r.tolist()) for r in batch["input_ids"]}) == 6      # six different captions
    with torch.no_grad():
        infonce = model(batch, "itc")
        scale = float(model.clip.logit_scale.exp().clamp(max=100.0))
        mpm = model(batch, "itc", objective=MPMNCE(temp=1 / scale, eps=0.0, margin=0.0))
        assert mpm.loss.item() == pytest.approx(infonce.loss.item(), rel=1e-5)
        # two identical captions are positives of each other: the model passes caption groups [0, 0, 2, ...]
        ids = batch["input_ids"].clone()
        ids[1] = ids[0]
        am = batch["attention_mask"].clone()
        am[1] = am[0]
        dup = {**batch, "input_ids": ids, "attention_mask": am}
        obj = MPMNCE(temp=1 / scale, eps=0.0, margin=0.2)
        got = model(dup, "itc", objective=obj).loss
        img, _ = model.image_features(dup["pixel_values"])
        txt, _ = model.text_features(ids, am)
        grouped = mpm_nce(img, txt, torch.tensor([0, 0, 2, 3, 4, 5]), obj.temp, obj.eps, obj.margin)
        apart = mpm_nce(img, txt, torch.arange(6), obj.temp, obj.eps, obj.margin)
    assert got.item() == pytest.approx(grouped.item(), rel=1e-6)
    assert grouped.item() < apart.item()                  # the copy gets no margin against its twin


def test_clip_classify_with_mpm_nce_trains_and_the_loop_updates_the_adapter_ema():
    from vlat.train import StepContext, TrainConfig, clean_step

    torch.manual_seed(0)
    model = build_model("clip", "nano").train()
    adapters = add_adapters(model, drop=0.0, ema=0.9)
    ctx = StepContext.standalone(model, "classify", TrainConfig(device="cpu", progress=False, lr=1e-2, grad_clip=0.0,
                                                                objective="mpm_nce"))
    seen = []
    orig = model._objective
    model._objective = lambda objective, *a: (seen.append(objective), orig(objective, *a))[1]
    loss = clean_step(ctx, make_batch("classify", n=6))
    assert torch.isfinite(loss)
    assert len(seen) == 1 and seen[0].temp == 0.01        # the training configuration chose MPM-NCE
    moved = [ad for ad in adapters if ad.weight.abs().sum() > 0]
    assert moved
    for ad in moved:                                      # one applied update: W̃ = 0.9 · 0 + 0.1 · W
        assert torch.allclose(ad.ema_weight, 0.1 * ad.weight.detach(), atol=1e-7)
    with pytest.raises(ValueError, match="objective"):
        StepContext.standalone(model, "classify", TrainConfig(objective="hinge"))
    with pytest.raises(ValueError, match="dual encoder"):   # single-stream models train with their task loss
        StepContext.standalone(build_model("single_stream", "nano"), "itm", TrainConfig(objective="mpm_nce"))


def test_models_do_not_import_the_robust_package():
    """R-Adapters hook into the loop through the model contract (FollowsOptimizer), not the reverse."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "vlat" / "models"
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                assert not any(n.startswith("vlat.robust") for n in names), path.name


def test_old_clip_checkpoints_with_a_loss_field_still_load(tmp_path):
    """Checkpoints written before the objective moved to TrainConfig carry ClipConfig.loss; they load."""
    import json

    from vlat.checkpoint import read_header, save_tensors
    from vlat.checkpoint import load_tensors
    from vlat.models import load_model, save_model

    model = build_model("clip", "nano")
    path = tmp_path / "new.safetensors"
    save_model(model, path)
    meta = json.loads(read_header(path)["vlat"])
    meta["config"].update(loss="mpm_nce", mpm_temp=0.01, mpm_eps=0.02, mpm_margin=0.05)
    old = tmp_path / "old.safetensors"
    save_tensors(load_tensors(path), old, {"vlat": json.dumps(meta)})
    assert type(load_model(old)).__name__ == "ClipDualEncoder"


def test_adapters_on_a_clip_model_loaded_from_a_saved_checkpoint(tmp_path):
    """The Colab path: transformers.CLIPModel.from_pretrained (here offline, from a checkpoint saved locally)."""
    from transformers import CLIPModel

    tiny_clip().clip.save_pretrained(tmp_path / "clip")
    hf = CLIPModel.from_pretrained(tmp_path / "clip").eval()
    adapters = add_adapters(hf)
    randomise(adapters)
    x = torch.rand(2, 3, hf.config.vision_config.image_size, hf.config.vision_config.image_size)
    with torch.no_grad():
        unmerged = hf.get_image_features(pixel_values=x, return_dict=True).pooler_output
        merge_adapters(hf)
        merged = hf.get_image_features(pixel_values=x, return_dict=True).pooler_output
    assert torch.allclose(merged, unmerged, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("use_ema,alpha", [(False, 1.0), (True, 0.5)])
def test_baked_adapters_leave_a_plain_clip_with_the_adapted_outputs(use_ema, alpha):
    """``bake_adapters`` folds each adapter in and removes the wrapper: the state dict has the original
    keys again, and the outputs are the adapted model's inference outputs (EMA and α as asked)."""
    from vlat.robust import bake_adapters

    model = tiny_clip().eval()
    keys = set(model.state_dict())
    batch = make_batch("itc", n=4)
    adapters = add_adapters(model, ema=0.5)
    randomise(adapters)
    for ad in adapters:
        ad.update_ema()                       # W̃ = W / 2 after one update from zero
        ad.use_ema, ad.alpha = use_ema, alpha
    with torch.no_grad():
        adapted = model(batch, "itc").logits
    assert bake_adapters(model, use_ema=use_ema, alpha=alpha) == len(adapters)
    assert not adapters_of(model) and set(model.state_dict()) == keys
    with torch.no_grad():
        baked = model(batch, "itc").logits
    assert torch.allclose(baked, adapted, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="no R-Adapters"):
        bake_adapters(model)


def test_cli_trains_radapter_on_a_pretrained_clip_and_saves_a_plain_clip(tmp_path, capsys):
    """``vlat train --radapter``: only adapters train (the backbone is the pretrained one up to the folded
    adapters), and ``model.safetensors`` loads as an ordinary CLIP that ``vlat eval`` scores."""
    from vlat.cli import main as vlat
    from vlat.models import load_model
    from vlat.world import load_tokenizer

    start = tmp_path / "clip"
    tiny_clip().save_pretrained(start, tokenizer=load_tokenizer())
    out = tmp_path / "run"
    rc = vlat(["train", "--model", "clip", "--pretrained", str(start), "--task", "classify", "--radapter",
               "--adapter-ema", "0", "--train-size", "64", "--batch-size", "16", "--epochs", "1", "--lr", "1e-2",
               "--eval-size", "32", "--device", "cpu", "--out", str(out), "--no-progress"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert "folded 4 R-Adapters" in printed.out
    model = load_model(out / "model.safetensors")
    zero = tiny_clip()
    moved = [k for k, v in zero.state_dict().items() if not torch.equal(v, model.state_dict()[k])]
    assert moved and all(k.endswith(("out_proj.weight", "out_proj.bias", "fc2.weight", "fc2.bias")) for k in moved)
    assert vlat(["eval", "--checkpoint", str(out / "model.safetensors"), "--eval-size", "16", "--shifts", "none"]) == 0
    assert vlat(["train", "--adapter-rank", "4", "--out", str(tmp_path / "x")]) == 2
    assert "add --radapter" in capsys.readouterr().err
