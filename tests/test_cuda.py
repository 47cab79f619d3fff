"""CUDA paths: device placement, bf16/fp16 autocast with δ kept in fp32, and the fp16 loss scaler.

These need a GPU, so CI (CPU only) skips them; they were run on an H100 through the project's device
machine (see the closing notes). Each asserts what the CPU tests assert elsewhere, on CUDA: every method
trains a step with finite loss under each autocast dtype, its attack stays in the ball in fp32 on the
model's device, and the loop's loss scaler neither skips nor diverges.
"""

import pytest
import torch

from vlat.adversarial import registry

from tests.conftest import make_batch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

FAMILIES = {"single_stream": "itm", "clip": "itc", "albef": "pretrain"}


def cuda_model(name):
    from vlat.models import build_model

    torch.manual_seed(0)
    return build_model(name, "nano").cuda()


def cuda_batch(task):
    from vlat.train import to_device

    return to_device(make_batch(task, n=8), torch.device("cuda"))


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("method", registry.names())
def test_every_method_trains_a_step_under_autocast(method, family, amp):
    from vlat.adversarial import per_example_norm
    from vlat.train import StepContext, TrainConfig

    model, task = cuda_model(family), FAMILIES[family]
    batch = cuda_batch(task)
    spec = registry.get(method)
    # every registered method through its preset: text and image (a one-site method: text), ε = 1, K = 2
    step = spec.build(("text",) if spec.single_site else ("text", "image"), 1.0, 2, 0.1)
    ctx = StepContext.standalone(model, task, TrainConfig(device="cuda", amp=amp, progress=False))
    before = [p.detach().clone() for p in model.parameters()]
    # fp16: the loss scaler starts at 2^16 and skips the steps whose scaled gradients overflow, halving the
    # scale each time; every such step must be counted as skipped, and a real update must follow
    for calls in range(1, 25):
        loss = step(ctx, batch)
        if any(not torch.equal(a, p) for a, p in zip(before, model.parameters())):
            break
    assert torch.isfinite(loss).item()
    assert calls == 1 or amp == "fp16", "bf16 needs no warm-up of a loss scale"
    replays = getattr(step, "replays", 1)  # FreeAT takes m optimiser steps per call
    assert ctx.state.skipped <= calls * replays - 1 and ctx.state.skipped >= (calls - 1) * replays
    assert all(p.device.type == "cuda" for p in model.parameters())

    deltas = step.attack(model, batch, task)
    for name, d in deltas.items():
        assert d.dtype == torch.float32 and d.device.type == "cuda", (name, d.dtype, d.device)
        eps = step.eps * step.scale(name)
        assert per_example_norm(d, step.norm).max().item() <= eps * (1 + 1e-4) + 1e-6


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_loop_on_cuda_with_freelb_skips_nothing(amp):
    from vlat.adversarial import FreeLB
    from vlat.train import TrainConfig, train
    from vlat.world import Collator, WorldDataset, load_tokenizer

    model = cuda_model("single_stream")
    data = WorldDataset("itm", "train", 128, 0)
    cfg = TrainConfig(epochs=2, batch_size=32, device="cuda", amp=amp, progress=False)
    state = train(model, "itm", data, cfg, step_fn=FreeLB(sites=("text", "image")), collate_fn=Collator(load_tokenizer(), "itm"))
    assert state.skipped == 0 and state.step == 8
    assert all(torch.isfinite(torch.tensor(state.losses)))
    assert state.losses[-1] < state.losses[0] + 0.5


def test_robust_accuracy_on_cuda_is_at_most_clean():
    from vlat.adversarial import PGD
    from vlat.evaluate import accuracy, robust_accuracy
    from vlat.world import WorldDataset

    model = cuda_model("single_stream")
    data = WorldDataset("itm", "test", 64, 0)
    clean = accuracy(model, data, "itm")
    robust = robust_accuracy(model, data, "itm", PGD(sites=("text",), eps=1.0, steps=5, step_size=0.4))
    assert 0.0 <= robust <= clean


def test_attention_and_rollout_on_cuda():
    for family in FAMILIES:
        model = cuda_model(family).eval()
        att = model.image_attention(cuda_batch("itm"))
        assert att.device.type == "cuda" and torch.isfinite(att).all()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_public_functions_take_a_cpu_batch_for_a_cuda_model(family):
    """A notebook on a GPU runtime hands vlat batches straight from the (CPU) collator: attacks, calibrate,
    site_norms, a method's training step, features, explore and WiSE-FT all move them to the model."""
    from vlat.adversarial import PGD, site_norms
    from vlat.models import build_model
    from vlat.robust import wise_ft
    from vlat.train import StepContext, TrainConfig

    model, task = cuda_model(family), FAMILIES[family]
    batch = make_batch(task, n=8)                                   # on the CPU
    pgd = PGD(sites=("text", "image"), eps=0.1, step_size=0.05, steps=2).calibrate(model, batch, task)
    deltas = pgd.attack(model, batch, task)
    assert all(d.device.type == "cuda" for d in deltas.values())
    assert set(site_norms(model, batch, task)) == set(model.perturbation_sites())
    ctx = StepContext.standalone(model, task, TrainConfig(amp="off", progress=False))
    assert ctx.device.type == "cuda" and torch.isfinite(pgd(ctx, batch)).item()
    if model.feature_scores:
        img, _ = model.image_features(batch["pixel_values"])
        txt, _ = model.text_features(batch["input_ids"], batch["attention_mask"])
        assert img.device.type == txt.device.type == "cuda"
    other = build_model(family, "nano")                             # on the CPU
    mixed = wise_ft(other, model, 0.5)
    assert all(v.device.type == "cuda" for v in mixed.values())


def test_explore_and_figures_with_a_cuda_model():
    from vlat.explain.pair import explore
    from vlat.explain.views import perturbation_figure
    from vlat.models import load_model
    from vlat.resources import checkpoint, sample_pairs
    from vlat.world import load_tokenizer

    model = load_model(checkpoint("single_stream_tiny_itm")).cuda()
    image = sample_pairs() / "images" / "00000.png"
    ex = explore(model, load_tokenizer(), image, "a large orange circle", "PGD", "both", eps=0.1, steps=3)
    assert ex.probs_adv.device.type == "cpu" and perturbation_figure(ex) is not None
