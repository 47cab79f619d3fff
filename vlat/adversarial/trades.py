"""TRADES — Zhang, Yu, Jiao, Xing, El Ghaoui & Jordan, *Theoretically Principled Trade-off between
Robustness and Accuracy*, ICML 2019. https://arxiv.org/abs/1901.08573 · method sheet:
docs/methods.md#trades

TRADES splits the robust error into the natural error and a boundary term, and trains on a surrogate of
both: the clean loss plus β times how far the prediction moves inside the ball,

    min_θ  CE(f(x), y) + β · max_{‖δ‖ ≤ ε} KL(p(x) ‖ p(x + δ))

The inner max needs no label (like SMART), but it is one-sided and its clean side is **not** detached in
the outer loss: the gradient of the KL reaches the parameters through both ``p(x)`` and ``p(x + δ)``.

As in the authors' ``trades.py``:

- δ₀ ~ ``0.001 · N(0, 1)`` per entry (``sigma``; scaled per site after :meth:`calibrate`);
- K ascent steps on ``KL(p(x) ‖ p(x + δ))`` with the clean prediction held fixed; L-inf:
  ``δ ← clip(δ + η · sign(g), -ε, ε)`` (L2: ``g / ‖g‖`` and a rescale onto the ball; the reference's L2 branch
  takes steps of ``2ε/K`` on the normalised gradient: pass ``step_size = 2 * eps / steps`` to match);
- the inner maximisation runs with the model in **eval mode** (no dropout), the outer loss in train mode;
- the KL is summed over classes and averaged over the batch (``KLDivLoss(sum) / B``).

**Deviation.** The reference runs the clean forward twice in the outer loss (once for the cross-entropy,
once for the KL's target); here one clean forward serves both. Without dropout the two are the same
number; under dropout the reference draws two masks. One pass saved.

Reference settings: CIFAR-10 ``ε = 0.031, η = 0.007, K = 10, β = 6`` (L-inf on pixels); MNIST
``ε = 0.3, η = 0.01, K = 40, β = 1``. Cost: K + 2 passes (K ascent, clean, adversarial; one backward
through both).

>>> step = TRADES(sites=("pixels",), eps=0.031, step_size=0.007, steps=10, beta=6.0)   # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlat.adversarial.base import Adversary, check_number, forward_with
from vlat.adversarial.registry import STEPS, Option, Paper, register
from vlat.models.base import evaluating
from vlat.objectives import kl_logits


def trades_loss(clean_loss: torch.Tensor, clean_logits: torch.Tensor, adv_logits: torch.Tensor,
                beta: float) -> torch.Tensor:
    """``CE(f(x), y) + β · KL(p(x) ‖ p(x + δ))``, gradients through both sides of the KL."""
    return clean_loss + beta * kl_logits(clean_logits, adv_logits)


@register(
    name="trades", label="TRADES",
    paper=Paper("Theoretically Principled Trade-off between Robustness and Accuracy",
                "Zhang, Yu, Jiao, Xing, El Ghaoui & Jordan", "ICML", 2019, "https://arxiv.org/abs/1901.08573"),
    summary="the clean loss plus β times the KL between the prediction at x and at the worst x + δ",
    reference={"CIFAR-10": "eps 0.031, step 0.007, K 10, β 6 (L-inf, pixels)", "MNIST": "eps 0.3, step 0.01, K 40, β 1",
               "δ₀": "0.001 · N(0, 1)", "attack": "model.eval(); KL(p(x) ‖ p(x + δ)), KLDivLoss(sum) / B"},
    options=(STEPS,
             Option("beta", "TRADES weight beta of the KL (robustness) term", float, 0.0)),
    preset=lambda sites, eps, steps, eta: TRADES(sites=sites, eps=eps, step_size=eta, steps=steps, sigma=eps / 100),
    passes=lambda m, layer_one: m.steps + 2)
@dataclass
class TRADES(Adversary):
    sites: tuple[str, ...] = ("pixels",)   # the reference's setting; any site works (calibrate the radius)
    norm: str = "linf"
    eps: float = 0.031             # the CIFAR-10 radius on pixels
    step_size: float = 0.007       # η
    steps: int = 10                # K
    beta: float = 6.0              # β (CIFAR-10; the function default in the reference code is 1.0)
    sigma: float = 0.001           # δ₀ ~ σ · N(0, 1)

    def __post_init__(self):
        super().__post_init__()
        check_number("steps", self.steps, 1, 1000, integer=True)
        check_number("beta", self.beta, 0.0)
        check_number("sigma", self.sigma, 0.0)

    needs_clean_logits = True

    def attack_steps(self) -> int:
        return self.steps

    def attack_start(self, random_start: bool) -> tuple[str, float]:
        return "normal", self.sigma

    def objective(self, runner, batch, deltas, clean=None) -> torch.Tensor:
        """``KL(p(x) ‖ p(x + δ))`` against the clean prediction held fixed (no label needed)."""
        return kl_logits(clean, forward_with(runner, batch, deltas).logits)

    def __call__(self, ctx, batch) -> torch.Tensor:
        model = ctx.model
        with evaluating(model):                                  # the attack: no dropout, as the reference
            with torch.no_grad():
                fixed = ctx.forward(batch).logits.float()
            deltas = self.maximize(ctx, batch, self.start(model, batch), fixed)
        clean = ctx.forward(batch)                               # the outer loss, in train mode
        adv = forward_with(ctx, batch, {k: d.detach() for k, d in deltas.items()})
        loss = trades_loss(clean.loss, clean.logits, adv.logits, self.beta)
        ctx.backward(loss)
        ctx.optimizer_step(loss)
        return clean.loss.detach()
