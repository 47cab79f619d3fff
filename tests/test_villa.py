"""VILLA: the invariants of the issue, hand-derived reference gradients, and both model families."""

import pytest
import torch

from conftest import make_batch
from vlat.adversarial import VILLA, FreeLB
from vlat.adversarial.villa import task_kl
from vlat.models import build_model, perturbed
from vlat.objectives import symmetric_kl
from vlat.train import StepContext, TrainConfig, clean_step


def ctx_for(model, task, lr=1e-3):
    return StepContext.standalone(model, task, TrainConfig(lr=lr, device="cpu", grad_clip=0.0), total_steps=10)


def train_steps(step_fn, model, task, batches):
    ctx = ctx_for(model, task)
    for b in batches:
        step_fn(ctx, b)
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("modality,site", [("text", "text"), ("image", "image")])
def test_with_kl_weight_zero_villa_is_freelb_step_for_step(modality, site):
    """w = 0, one modality: the same seed gives the same parameters after every step (dropout on)."""
    batches = [make_batch("itm", n=6, seed=s) for s in range(3)]
    runs = {}
    for name, step in {"villa": VILLA(modality=modality, kl_weight=0.0, steps=3, step_size=0.1),
                       "freelb": FreeLB(sites=(site,), steps=3, step_size=0.1, init_mag=0.0)}.items():
        torch.manual_seed(0)
        model = build_model("single_stream", "nano").train()
        assert model.config.dropout > 0
        runs[name] = train_steps(step, model, "itm", batches)
    start = [p.detach() for p in (torch.manual_seed(0), build_model("single_stream", "nano"))[1].parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(start, runs["villa"]))          # it did train
    assert all(torch.equal(a, b) for a, b in zip(runs["villa"], runs["freelb"]))


def test_kl_term_is_zero_at_delta_zero_and_positive_after_a_step():
    torch.manual_seed(0)
    model = build_model("single_stream", "nano").train()
    step = VILLA(modality="both", kl_weight=1.5, steps=3, step_size=2.0, trace=True)
    step.accumulate(ctx_for(model, "itm"), make_batch("itm"))
    kls = [row["kl"] for row in step.last_trace]
    assert kls[0] == pytest.approx(0.0, abs=1e-7)        # δ₀ = 0 and the same dropout masks: identical logits
    assert kls[1] > 1e-6 and kls[2] > 1e-6


def test_task_kl_by_hand_and_masked_positions():
    p = torch.tensor([[0.0, 0.0]])
    q = torch.tensor([[0.0, torch.log(torch.tensor(3.0))]])          # softmax [1/4, 3/4]
    # KL([.5,.5] || [.25,.75]) + KL([.25,.75] || [.5,.5])
    want = 0.5 * torch.log(torch.tensor(2.0)) + 0.5 * torch.log(torch.tensor(2 / 3)) \
        + 0.25 * torch.log(torch.tensor(0.5)) + 0.75 * torch.log(torch.tensor(1.5))
    assert task_kl(p, q) == pytest.approx(float(want), abs=1e-6)
    # token logits: only labelled positions count (the other position differs wildly and must not matter)
    adv = torch.stack([p[0], torch.tensor([5.0, -5.0])])[None]        # [1, 2, 2]
    clean = torch.stack([q[0], torch.tensor([-5.0, 5.0])])[None]
    labels = torch.tensor([[1, -100]])
    assert task_kl(adv, clean, labels) == pytest.approx(float(want), abs=1e-6)


@pytest.mark.parametrize("modality", ["text", "image"])
def test_single_modality_leaves_the_other_modality_untouched(modality):
    """What the encoder consumes (after the δ hooks): the other modality's tokens are the clean ones in the
    clean forward and all K steps; the perturbed modality's move."""
    torch.manual_seed(0)
    model = build_model("single_stream", "nano").train()
    batch = make_batch("itm")
    L = batch["input_ids"].shape[1]
    text, image = [], []
    h1 = model.bert.register_forward_pre_hook(
        lambda m, args, kw: text.append(kw["inputs_embeds"][:, :L].detach().clone()), with_kwargs=True)
    h2 = model.image_proj.register_forward_pre_hook(lambda m, args: image.append(args[0].detach().clone()))
    try:
        VILLA(modality=modality, kl_weight=1.5, steps=3, step_size=1.0).accumulate(ctx_for(model, "itm"), batch)
    finally:
        h1.remove()
        h2.remove()
    still, moved = (image, text) if modality == "text" else (text, image)
    assert len(still) == len(moved) == 1 + 3                     # the clean forward + K steps
    assert all(torch.equal(still[0], x) for x in still)
    assert torch.equal(moved[0], moved[1])                       # step 1 runs at δ = 0
    assert not torch.equal(moved[0], moved[-1])


def test_one_step_villa_is_a_clean_step():
    """K = 1: the only step runs at δ = 0, where the KL and its gradient vanish: exactly ordinary training."""
    batches = [make_batch("itm", n=6, seed=s) for s in range(2)]
    runs = []
    for step in (VILLA(modality="both", kl_weight=1.5, steps=1), clean_step):
        torch.manual_seed(0)
        model = build_model("single_stream", "nano").train()
        runs.append(train_steps(step, model, "itm", batches))
    for a, b in zip(*runs):
        assert torch.allclose(a, b, atol=1e-6)


def test_two_step_gradient_matches_the_formula_with_the_clean_side_kept():
    """K = 2 by hand: g = ½[∇L(x) + ∇(L(x+δ₁) + w·symKL(f(x+δ₁), f(x)))] with f(x) NOT detached,
    δ₁ = η ∇_δ L(x) / ‖∇_δ L(x)‖ (the KL's δ-gradient is zero at δ = 0)."""
    torch.manual_seed(0)
    model = build_model("single_stream", "nano").train()
    model.apply(lambda m: setattr(m, "p", 0.0) if isinstance(m, torch.nn.Dropout) else None)
    batch, w, eta = make_batch("itm"), 1.5, 0.7
    step = VILLA(modality="text", kl_weight=w, steps=2, step_size=eta)
    step.accumulate(ctx_for(model, "itm"), batch)
    params = [p for p in model.parameters() if p.grad is not None]
    got = [p.grad.clone() for p in params]
    model.zero_grad()

    d0 = step.new_deltas(model, batch)
    with perturbed(model, d0, batch):
        out0 = model(batch, "itm")
    (g0,) = torch.autograd.grad(out0.loss, [d0["text"]], retain_graph=True)
    m = model.perturbation_sites()["text"].mask(batch)
    d1 = eta * g0 / g0.flatten(1).norm(dim=1).view(-1, 1, 1) * m
    clean = model(batch, "itm").logits
    with perturbed(model, {"text": d1}, batch):
        out1 = model(batch, "itm")
    total = 0.5 * (out0.loss + out1.loss + w * symmetric_kl(out1.logits, clean))
    want = torch.autograd.grad(total, params, retain_graph=True)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-5)
    # detaching the clean side would give a different gradient: the test can tell them apart
    detached = 0.5 * (out0.loss + out1.loss + w * symmetric_kl(out1.logits, clean.detach()))
    other = torch.autograd.grad(detached, params, allow_unused=True)
    assert any(o is not None and not torch.allclose(a, o, atol=1e-5) for a, o in zip(got, other))


def test_alternating_runs_one_forward_per_modality_per_step():
    torch.manual_seed(0)
    model = build_model("single_stream", "nano").train()
    calls = []
    h = model.bert.register_forward_hook(lambda *a: calls.append(1))
    step = VILLA(modality="alternating", kl_weight=1.5, steps=3, step_size=0.5, trace=True)
    try:
        _, deltas = step.accumulate(ctx_for(model, "itm"), make_batch("itm"))
    finally:
        h.remove()
    assert len(calls) == 1 + 2 * 3
    assert set(deltas) == {"text", "image"}
    assert all(float(d.detach().abs().sum()) > 0 for d in deltas.values())


@pytest.mark.parametrize("name,task", [("single_stream", "pretrain"), ("single_stream", "tf"), ("single_stream", "mlm"),
                                       ("albef", "pretrain"), ("albef", "itm"), ("clip", "itc")])
@pytest.mark.parametrize("modality", ["text", "image", "both", "alternating"])
def test_villa_trains_every_family(name, task, modality):
    torch.manual_seed(0)
    model = build_model(name, "nano").train()
    batch = make_batch(task, n=8 if name == "albef" else 6)
    before = [p.detach().clone() for p in model.parameters()]
    updates = getattr(model, "updates", None)
    loss = VILLA(modality=modality, steps=2, step_size=0.05)(ctx_for(model, task), batch)
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    if updates is not None:
        assert model.updates == updates + 1                # ALBEF's queue and momentum move once per batch


def test_single_stream_pretrain_task_pairs_and_loss():
    torch.manual_seed(0)
    model = build_model("single_stream", "nano").eval()
    batch = make_batch("pretrain", n=6)
    out = model(batch, "pretrain")
    ids = batch["input_ids"]
    for i in range(6):
        j = i if i % 2 == 0 else (i + 1) % 6
        assert int(out.labels[i]) == int(torch.equal(ids[i], ids[j]))
    assert out.labels[0::2].eq(1).all()
    mlm = model({**batch, "input_ids": batch["mlm_input_ids"]}, "mlm").loss
    assert float(out.loss) == pytest.approx(float(mlm + out.extras["itm"]), rel=1e-5)


@pytest.mark.parametrize("kw,msg", [({"modality": "audio"}, "modality"), ({"kl_weight": -1.0}, "kl_weight"),
                                    ({"sites": ("text",), "modality": "image"}, "modality")])
def test_bad_settings_are_refused(kw, msg):
    with pytest.raises(ValueError, match=msg):
        VILLA(**kw)


def test_cli_runs_both_stages(tmp_path):
    from vlat.cli import main

    pre = tmp_path / "pre"
    assert main(["train", "--model", "single_stream", "--preset", "nano", "--task", "pretrain", "--method", "villa",
                 "--modality", "alternating", "--train-size", "16", "--batch-size", "8", "--epochs", "1",
                 "--eval-size", "8", "--no-progress", "--out", str(pre)]) == 0
    assert main(["train", "--init", str(pre / "model.safetensors"), "--task", "tf", "--method", "villa",
                 "--modality", "both", "--kl-weight", "1.0", "--train-size", "16", "--batch-size", "8",
                 "--epochs", "1", "--eval-size", "8", "--no-progress", "--out", str(tmp_path / "fine")]) == 0
    assert main(["train", "--preset", "nano", "--method", "villa", "--sites", "text", "--train-size", "8",
                 "--out", str(tmp_path / "bad")]) == 2
