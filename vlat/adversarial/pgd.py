"""PGD — Madry, Makelov, Schmidt, Tsipras & Vladu, *Towards Deep Learning Models Resistant to
Adversarial Attacks*, ICLR 2018. https://arxiv.org/abs/1706.06083 · method sheet: docs/methods.md#pgd

K projected ascent steps from ``δ₀`` (0, or uniform in the ball for a random start):

    L2:    δ ← Π_ε(δ + η · g / ||g||₂)          L-inf: δ ← clip(δ + η · sign(g), -ε, ε)

**Training step** (the NLP variant): a clean forward/backward fills the parameter
gradients and gives ``g``; steps 1..K-1 only move δ (``autograd.grad`` w.r.t. δ, so parameter gradients
are never touched, which is what "back up, zero, restore" achieves in the common snippet); the final
``x + δ_K`` is back-propagated onto the clean gradients. Only the last δ trains the parameters.
Cost: K + 1 passes.

**Evaluation attack** (:meth:`PGD.attack`): PGD-K with random start; robust accuracy is the accuracy
on ``x + δ_K``. Parameters are never changed and never receive gradients.

Reference defaults: pixels ``ε = 8/255, η = 2/255, K = 10, random start`` (torchattacks);
embeddings (L2) ``ε = 1, η = 0.3, K = 3``.

>>> deltas = PGD(sites=("image",), eps=1.0, step_size=0.25, steps=10).attack(model, batch, "itm")  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlat.adversarial.base import Adversary, check_number, forward_capturing, forward_with, site_grads
from vlat.adversarial.registry import STEPS, Paper, register


@register(
    name="pgd", label="PGD",
    paper=Paper("Towards Deep Learning Models Resistant to Adversarial Attacks",
                "Madry, Makelov, Schmidt, Tsipras & Vladu", "ICLR", 2018, "https://arxiv.org/abs/1706.06083"),
    summary="K projected ascent steps; train on the last one (the NLP variant keeps the clean gradient too)",
    reference={"pixels": "eps 8/255, step 2/255, 10 steps, random start (torchattacks)",
               "embeddings": "L2, eps 1.0, step 0.3, 3 steps (the NLP snippet)"},
    options=(STEPS,),
    preset=lambda sites, eps, steps, eta: PGD(sites=sites, eps=eps, step_size=eta, steps=steps),
    passes=lambda m, layer_one: m.steps + 1)
@dataclass
class PGD(Adversary):
    sites: tuple[str, ...] = ("text",)
    norm: str = "l2"
    eps: float = 1.0
    step_size: float = 0.3
    steps: int = 3
    random_start: bool = False      # training default: δ₀ = 0; attack() below may override

    def __post_init__(self):
        super().__post_init__()
        check_number("steps", self.steps, 1, 1000, integer=True)
        if self.eps <= 0:
            raise ValueError("PGD needs eps > 0 (the ball it projects onto)")

    def attack_steps(self) -> int:
        return self.steps

    def attack(self, model, batch: dict, task: str, generator=None, random_start: bool = True,
               return_losses: bool = False):
        """PGD-K on a fixed model: returns ``{site: δ_K}`` (and the loss at each step if asked); random
        start by default, as an evaluation attack should."""
        return super().attack(model, batch, task, generator, random_start, return_losses)

    def __call__(self, ctx, batch) -> torch.Tensor:
        deltas = self.start(ctx.model, batch, self.random_start)
        if self.random_start:                                       # pass 1: loss and g at δ₀
            clean = forward_with(ctx, batch, deltas)
            ctx.backward(clean.loss)
            grads = {k: d.grad for k, d in deltas.items()}
        else:                                                       # pass 1: clean loss; g from the site outputs
            clean, outputs = forward_capturing(ctx, batch, self.sites)
            ctx.backward(clean.loss)
            grads = site_grads(outputs)
        deltas = self.maximize(ctx, batch, deltas, grads=grads)     # passes 2..K move δ only (the attack's loop)
        adv = forward_with(ctx, batch, deltas)                      # pass K+1: train on the final δ
        ctx.backward(adv.loss)
        ctx.optimizer_step(clean.loss + adv.loss)
        return clean.loss.detach()
