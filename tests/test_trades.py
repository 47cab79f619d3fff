"""TRADES (Zhang et al. 2019): hand-worked cases and the invariants the method promises (the method-wide
invariants live in test_methods.py and run over the registry)."""

import math

import pytest
import torch

from conftest import assert_updates_like_a_clean_step, make_batch
from vlat.adversarial import TRADES, Frozen, per_example_norm
from vlat.adversarial.trades import trades_loss
from vlat.models import build_model
from vlat.train import StepContext, TrainConfig


def ctx_for(model, task):
    return StepContext.standalone(model, task, TrainConfig(lr=1e-2, device="cpu", grad_clip=0.0), total_steps=10)


# ---- TRADES ---------------------------------------------------------------------------------------
def test_trades_loss_by_hand():
    """p = (.5, .5) clean, q = (.75, .25) attacked, label 0: CE = ln 2; KL(p‖q) = .5 ln(.5/.75) + .5 ln(.5/.25)
    = 0.143841 (the reverse KL(q‖p) would be 0.130812); β = 6 gives 0.693147 + 0.863046."""
    clean = torch.tensor([[0.0, 0.0]], requires_grad=True)
    adv = torch.tensor([[math.log(3.0), 0.0]])
    ce = torch.nn.functional.cross_entropy(clean, torch.tensor([0]))
    loss = trades_loss(ce, clean, adv, beta=6.0)
    assert float(loss) == pytest.approx(math.log(2) + 6 * 0.143841, abs=1e-5)
    # the clean side is not detached: ∂KL/∂a = p ⊙ (log p − log q − KL) = (−0.274653, 0.274653) per unit β
    kl_grad, = torch.autograd.grad(trades_loss(ce * 0, clean, adv, beta=1.0), [clean])
    assert torch.allclose(kl_grad, torch.tensor([[-0.274653, 0.274653]]), atol=1e-5)


def test_trades_attacks_in_eval_mode_and_trains_in_train_mode():
    torch.manual_seed(0)
    model = build_model("single_stream", "nano").train()
    modes = []
    model.register_forward_pre_hook(lambda m, a: modes.append(m.training))
    TRADES(sites=("text",), eps=0.5, step_size=0.2, steps=3)(ctx_for(model, "itm"), make_batch("itm"))
    assert modes == [False] * 4 + [True] * 2          # the fixed clean prediction, K ascent steps; clean, adversarial
    assert model.training


def test_trades_with_beta_zero_is_a_clean_step():
    """In eval mode (no dropout), so the noise the attack draws for δ₀ cannot change the clean step's masks."""
    assert_updates_like_a_clean_step(TRADES(sites=("text",), eps=0.5, step_size=0.2, steps=2, beta=0.0), train=False)


def test_trades_inner_maximisation_raises_the_kl_and_stays_in_the_linf_ball():
    torch.manual_seed(0)
    model = build_model("clip", "nano").eval()
    batch = make_batch("classify")
    t = TRADES(sites=("pixels",), eps=8 / 255, step_size=2 / 255, steps=5)
    deltas, losses = t.attack(model, batch, "classify", return_losses=True)
    assert per_example_norm(deltas["pixels"], "linf").max() <= 8 / 255 + 1e-7
    run = Frozen(model, "classify")
    final = float(t.objective(run, batch, deltas, t.clean_reference(run, batch)).detach())
    assert final > losses[0] >= -1e-6        # a KL is >= 0; at δ₀ near 0 float32 rounding can dip below
