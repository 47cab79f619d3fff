"""LLR (Qin et al. 2019): hand-worked cases and the invariants the method promises (the method-wide
invariants, in the ball, mask respected, every family trains, live in test_methods.py and run over the
registry)."""

import pytest
import torch

from conftest import assert_updates_like_a_clean_step, make_batch
from vlat.adversarial import LLR, Frozen, per_example_norm
from vlat.adversarial.llr import linearity_gap
from vlat.models import TaskOutput, build_model
from vlat.train import StepContext, TrainConfig


def ctx_for(model, task):
    return StepContext.standalone(model, task, TrainConfig(lr=1e-2, device="cpu", grad_clip=0.0), total_steps=10)


class Surface(torch.nn.Module):
    """A model whose per-example loss is a chosen function of the image site's output ``o = x + δ``:
    ``loss_fn(o) -> [B]``. The image site of a nano CLIP provides x, the shape and the hook."""

    def __init__(self, loss_fn):
        super().__init__()
        torch.manual_seed(0)
        self.m = build_model("clip", "nano").eval()
        self.loss_fn = loss_fn

    def perturbation_sites(self):
        return self.m.perturbation_sites()

    def forward(self, batch, task, **kw):
        seen = {}
        h = self.m.clip.vision_model.embeddings.patch_embedding.register_forward_hook(
            lambda mod, a, o: seen.setdefault("o", o))
        self.m(batch, task)
        h.remove()
        losses = self.loss_fn(seen["o"])
        return TaskOutput(loss=losses.mean(), logits=torch.zeros(len(losses), 2), losses=losses)


# ---- LLR ------------------------------------------------------------------------------------------
def test_llr_gap_of_a_quadratic_loss_is_the_squared_norm_by_hand():
    """ℓ(o) = ‖o‖²: ℓ(x+δ) − ℓ(x) − δ·2x = ‖δ‖², so g(δ; x) = ‖δ‖² exactly, for any x and δ."""
    x = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    d = {"image": torch.tensor([[0.3, 0.4], [-1.0, 0.0]])}
    losses = lambda o: (o ** 2).sum(1)                                    # noqa: E731
    gap = linearity_gap(losses(x + d["image"]), losses(x), d, {"image": 2 * x})
    assert torch.allclose(gap, torch.tensor([0.25, 1.0]))                 # 0.3² + 0.4², 1²


def test_llr_attack_finds_the_worst_gap_of_a_quadratic_loss():
    """max_{‖δ‖₂ ≤ ε} ‖δ‖² = ε², reached on the sphere: the inner maximisation must get there."""
    model = Surface(lambda o: (o.float() ** 2).flatten(1).sum(1))
    batch = make_batch("classify")
    llr = LLR(sites=("image",), norm="l2", eps=0.7, step_size=0.3, steps=6)
    deltas, losses = llr.attack(model, batch, "classify", return_losses=True)
    n = per_example_norm(deltas["image"])
    assert torch.allclose(n, torch.full_like(n, 0.7), atol=1e-4)
    final = llr.objective(Frozen(model, "classify"), batch, deltas, llr.clean_reference(Frozen(model, "classify"), batch))
    assert float(final.detach()) == pytest.approx(0.49, rel=1e-3)
    assert all(b >= a - 1e-5 for a, b in zip(losses, losses[1:]))        # the gap only grows


def test_llr_gap_of_a_linear_loss_is_zero():
    """A loss that is linear in the input is its own Taylor expansion: no δ makes it non-linear."""
    torch.manual_seed(1)
    w = {}
    model = Surface(lambda o: (o.float() * w.setdefault("w", torch.randn(o.shape[1:]))).flatten(1).sum(1))
    batch = make_batch("classify")
    llr = LLR(sites=("image",), norm="l2", eps=0.5, step_size=0.2, steps=3)
    run = Frozen(model, "classify")
    deltas = llr.attack(model, batch, "classify")
    gap = float(llr.objective(run, batch, deltas, llr.clean_reference(run, batch)).detach())
    assert gap == pytest.approx(0.0, abs=1e-4)


def test_llr_with_no_regulariser_is_a_clean_step():
    assert_updates_like_a_clean_step(LLR(sites=("text",), eps=0.5, step_size=0.2, steps=2, lam=0.0, mu=0.0))


def test_llr_trains_through_the_input_gradient():
    """μ|δᵀ∇ₓℓ| has a parameter gradient only because ∇ₓℓ keeps its graph (double back-propagation)."""
    torch.manual_seed(0)
    model = build_model("single_stream", "nano").eval()
    batch = make_batch("itm")
    llr = LLR(sites=("text",), eps=0.5, steps=1)
    losses, grads, _ = llr.expansion(Frozen(model, "itm"), batch, create_graph=True)
    d = {"text": torch.randn_like(grads["text"])}
    first = (d["text"] * grads["text"]).flatten(1).sum(1).abs().mean()
    g = torch.autograd.grad(first, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
    assert any(x is not None and x.abs().sum() > 0 for x in g)
