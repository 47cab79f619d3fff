"""FGM and FGSM: one gradient step on the input, then train on clean + adversarial loss.

**FGM** — Miyato, Dai & Goodfellow, *Adversarial Training Methods for Semi-Supervised Text
Classification*, ICLR 2017 (https://arxiv.org/abs/1605.07725;
method sheet: docs/methods.md#fgm). Perturbs embeddings under L2: ``δ = ε · g / ||g||₂``, ``g = ∇_x L``.
**FGSM** — Goodfellow, Shlens & Szegedy, *Explaining and Harnessing Adversarial Examples*, ICLR 2015
(https://arxiv.org/abs/1412.6572; method sheet: docs/methods.md#fgsm).
L-inf: ``δ = ε · sign(g)``; on pixels ``x_adv = clamp(x + δ, 0, 1)`` (the site clamps).

Training step: (1) clean forward/backward — the site outputs are kept with
``retain_grad`` so the same backward also yields ``g`` (no zero δ is added); (2) build δ: one step of
:meth:`~vlat.adversarial.base.Adversary.maximize`, of length ε, from the gradient in hand (``attack()``
takes the same step from its own gradient at δ = 0); (3) adversarial forward/backward, parameter
gradients **accumulate** onto (1); (4) δ is dropped; (5) one optimiser step. Cost: 2 passes.

Args (reference defaults): ``eps`` 1.0 for FGM on embeddings (L2), 8/255 for FGSM on pixels (L-inf).
Shapes: δ per site as :meth:`PerturbationSite.shape`, e.g. text ``[B, L, D]``.

>>> step = FGM(sites=("text",), eps=1.0)                 # doctest: +SKIP
>>> train(model, "itm", data, step_fn=step, collate_fn=collate)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlat.adversarial.base import Adversary, forward_capturing, forward_with, site_grads
from vlat.adversarial.registry import Paper, register


@register(
    name="fgm", label="FGM",
    paper=Paper("Adversarial Training Methods for Semi-Supervised Text Classification",
                "Miyato, Dai & Goodfellow", "ICLR", 2017, "https://arxiv.org/abs/1605.07725"),
    summary="one L2-normalised gradient step on the embeddings, then train on clean + adversarial loss",
    reference={"norm": "l2 on word embeddings", "eps": "1.0 (text classification)"},
    steps_mean="one step (steps is ignored)",
    passes=lambda m, layer_one: 2)
@dataclass
class FGM(Adversary):
    sites: tuple[str, ...] = ("text",)
    norm: str = "l2"
    eps: float = 1.0

    def step_length(self, site: str) -> float:
        """FGM's one step has length ε: ``δ = Π_ε(0 + ε · normalize(g))``, which is ``ε · normalize(g)``."""
        return self.scale(site) * self.eps

    def __call__(self, ctx, batch) -> torch.Tensor:
        self.resolve_sites(ctx.model)
        clean, outputs = forward_capturing(ctx, batch, self.sites)    # (1) clean pass keeps site outputs
        ctx.backward(clean.loss)                                       # ... so this backward also gives ∇_x L
        deltas = self.maximize(ctx, batch, self.new_deltas(ctx.model, batch), grads=site_grads(outputs))  # (2)
        adv = forward_with(ctx, batch, {k: d.detach() for k, d in deltas.items()})   # (3)
        ctx.backward(adv.loss)                                         # accumulates onto the clean grads
        ctx.optimizer_step(clean.loss + adv.loss)                      # (5)
        return clean.loss.detach()


@register(
    name="fgsm", label="FGSM",
    paper=Paper("Explaining and Harnessing Adversarial Examples", "Goodfellow, Shlens & Szegedy", "ICLR", 2015,
                "https://arxiv.org/abs/1412.6572"),
    summary="one sign-of-gradient step (L-inf), the first adversarial example",
    reference={"norm": "linf on pixels", "eps": "8/255 (torchattacks)"},
    steps_mean="one step (steps is ignored)",
    passes=lambda m, layer_one: 2)
@dataclass
class FGSM(FGM):
    """FGM's step with the L-inf norm: ``δ = ε · sign(∇_x L)``. Default: pixels, ε = 8/255."""

    sites: tuple[str, ...] = ("pixels",)
    norm: str = "linf"
    eps: float = 8 / 255
