"""LLR — Qin, Martens, Gowal, Krishnan, Dvijotham, Fawzi, De, Stanforth & Kohli, *Adversarial Robustness
through Local Linearization*, NeurIPS 2019. https://arxiv.org/abs/1907.02610 · method sheet:
docs/methods.md#llr

A loss that is close to its own first-order Taylor expansion inside the ball cannot hide adversarial
examples behind a bumpy surface (gradient obfuscation), and its worst case is then about
``ε · ‖∇ₓℓ‖``. LLR measures how far the loss is from linear, per example,

    g(δ; x) = | ℓ(x + δ) − ℓ(x) − δᵀ ∇ₓℓ(x) |,        γ(ε, x) = max_{‖δ‖ ≤ ε} g(δ; x)

and trains on

    ℓ(x) + λ · γ(ε, x) + μ · | δ_LLRᵀ ∇ₓℓ(x) |            (δ_LLR: the maximiser of g)

The second term flattens the loss's curvature; the third keeps the first-order change along δ_LLR small.
Seed 003 of this project (the survey) names it as SMART's second regulariser.

Implemented from the paper (the authors released no code):

- ``ℓ`` is each example's loss (the model's ``TaskOutput.losses``; a task whose loss does not split into
  examples, e.g. a pre-training sum, uses the batch loss as one "example": the same formula on the mean);
- ``∇ₓℓ(x)`` is taken at every perturbed site with ``create_graph=True``, so λ and μ's terms train the
  parameters through the gradient too (double back-propagation, as the paper's objective requires);
- the inner maximisation is PGD on ``mean_i g(δ_i; x_i)`` from a random start in the ball, with ``ℓ(x)``
  and ``∇ₓℓ(x)`` held fixed; ``attack()`` runs the same loop and returns the least linear δ.

Reference settings (as we read the paper's experiments, CIFAR-10 at ε = 8/255 L-inf): ``λ = 4, μ = 3``.
Cost: K + 1 passes plus one double backward (about K + 3 clean passes).

>>> step = LLR(sites=("pixels",), eps=8/255, step_size=2/255, steps=3, lam=4.0, mu=3.0)   # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlat.adversarial.base import Adversary, check_number, forward_with
from vlat.adversarial.registry import STEPS, Option, Paper, register


def example_losses(out) -> torch.Tensor:
    """Each example's loss ``[B]`` (``TaskOutput.losses``), or the batch loss as ``[1]`` where it does not split."""
    return out.losses.float() if out.losses is not None else out.loss.float().reshape(1)


def linear_term(deltas: dict, grads: dict, n: int) -> torch.Tensor:
    """``δᵀ ∇ₓℓ`` per example ``[n]`` summed over the sites (``n = 1``: one dot product over the batch)."""
    total = 0.0
    for k, d in deltas.items():
        prod = (d.float() * grads[k].float()).flatten(1).sum(1)                    # [B]
        total = total + (prod if n == prod.shape[0] else prod.sum().reshape(1))
    return total


def linearity_gap(losses: torch.Tensor, clean_losses: torch.Tensor, deltas: dict, grads: dict) -> torch.Tensor:
    """``g(δ; x) = |ℓ(x + δ) − ℓ(x) − δᵀ ∇ₓℓ(x)|`` per example."""
    return (losses - clean_losses - linear_term(deltas, grads, clean_losses.shape[0])).abs()


@register(
    name="llr", label="LLR",
    paper=Paper("Adversarial Robustness through Local Linearization", "Qin, Martens, Gowal, Krishnan, Dvijotham, "
                "Fawzi, De, Stanforth & Kohli", "NeurIPS", 2019, "https://arxiv.org/abs/1907.02610"),
    summary="penalise how far the loss is from its own linear approximation inside the ball",
    reference={"λ": "4.0", "μ": "3.0", "eps": "8/255 L-inf on pixels (CIFAR-10)",
               "code": "none released; implemented from the paper"},
    options=(STEPS,
             Option("lam", "LLR weight lambda of the local-linearity gap", float, 0.0),
             Option("mu", "LLR weight mu of the first-order term |delta . grad|", float, 0.0)),
    preset=lambda sites, eps, steps, eta: LLR(sites=sites, eps=eps, step_size=eta, steps=steps),
    passes=lambda m, layer_one: m.steps + 3)
@dataclass
class LLR(Adversary):
    sites: tuple[str, ...] = ("pixels",)   # the paper's setting; any site works (calibrate the radius)
    norm: str = "linf"
    eps: float = 8 / 255
    step_size: float = 2 / 255     # η of the inner PGD
    steps: int = 3                 # K
    lam: float = 4.0               # λ: weight of γ(ε, x)
    mu: float = 3.0                # μ: weight of |δ_LLRᵀ ∇ₓℓ(x)|

    def __post_init__(self):
        super().__post_init__()
        check_number("steps", self.steps, 1, 1000, integer=True)
        check_number("lam", self.lam, 0.0)
        check_number("mu", self.mu, 0.0)

    needs_clean_logits = True          # the objective compares with the clean loss and gradient

    def attack_steps(self) -> int:
        return self.steps

    def attack_start(self, random_start: bool) -> tuple[str, float]:
        return "uniform", self.eps     # LLR starts inside the ball: at δ = 0 the gap and its gradient are 0

    def expansion(self, runner, batch, create_graph: bool = False):
        """``(ℓ(x), ∇ₓℓ(x), out)`` at δ = 0: each example's clean loss, its gradient at every site (with the
        graph kept for the outer loss when ``create_graph``), and the clean output."""
        zeros = self.new_deltas(runner.model, batch)
        out = forward_with(runner, batch, zeros)
        losses = example_losses(out)
        grads = torch.autograd.grad(losses.sum(), list(zeros.values()), create_graph=create_graph)
        return losses, dict(zip(zeros, grads)), out

    def clean_reference(self, runner, batch):
        losses, grads, _ = self.expansion(runner, batch)
        return losses.detach(), {k: g.detach() for k, g in grads.items()}

    def objective(self, runner, batch, deltas, clean=None) -> torch.Tensor:
        """``mean_i g(δ_i; x_i)``, the linearity gap, with ``ℓ(x)`` and ``∇ₓℓ(x)`` held fixed."""
        clean_losses, grads = clean
        losses = example_losses(forward_with(runner, batch, deltas))
        return linearity_gap(losses, clean_losses, deltas, grads).mean()

    def __call__(self, ctx, batch) -> torch.Tensor:
        clean_losses, grads, clean = self.expansion(ctx, batch, create_graph=True)
        fixed = (clean_losses.detach(), {k: g.detach() for k, g in grads.items()})
        deltas = self.maximize(ctx, batch, self.start(ctx.model, batch, True), fixed)
        deltas = {k: d.detach() for k, d in deltas.items()}
        adv = example_losses(forward_with(ctx, batch, deltas))
        first = linear_term(deltas, grads, clean_losses.shape[0])
        gamma = (adv - clean_losses - first).abs().mean()
        loss = clean.loss + self.lam * gamma + self.mu * first.abs().mean()
        ctx.backward(loss)
        ctx.optimizer_step(loss)
        return clean.loss.detach()
