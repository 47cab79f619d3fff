"""FGM and FGSM: one gradient step on the input, then train on clean + adversarial loss.

**FGM** — Miyato, Dai & Goodfellow, *Adversarial Training Methods for Semi-Supervised Text
Classification*, ICLR 2017. Perturbs embeddings under L2: ``δ = ε · g / ||g||₂``, ``g = ∇_x L``.
**FGSM** — Goodfellow, Shlens & Szegedy, *Explaining and Harnessing Adversarial Examples*, ICLR 2015.
L-inf: ``δ = ε · sign(g)``; on pixels ``x_adv = clamp(x + δ, 0, 1)`` (the site clamps).

Training step (METHODS.md §2): (1) clean forward/backward — the site outputs are kept with
``retain_grad`` so the same backward also yields ``g`` (no zero δ is added); (2) build δ; (3) adversarial forward/backward, parameter gradients **accumulate**
onto (1); (4) δ is dropped; (5) one optimiser step. Cost: 2 passes.

Args (reference defaults): ``eps`` 1.0 for FGM on embeddings (L2), 8/255 for FGSM on pixels (L-inf).
Shapes: δ per site as :meth:`PerturbationSite.shape`, e.g. text ``[B, L, D]``.

>>> step = FGM(sites=("text",), eps=1.0)                 # doctest: +SKIP
>>> train(model, "itm", data, step_fn=step, collate_fn=collate)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlat.adversarial.base import Adversary, forward_capturing, forward_with, normalize_grad, site_grads


@dataclass
class FGM(Adversary):
    sites: tuple[str, ...] = ("text",)
    norm: str = "l2"
    eps: float = 1.0

    def perturbation(self, model, batch, grads) -> dict[str, torch.Tensor]:
        """``δ = ε · normalize(g ⊙ m)`` from the clean-pass gradient (no projection needed: ||δ|| = ε)."""
        sites = self.resolve_sites(model)
        out = {}
        for k, g in grads.items():
            m = sites[k].mask(batch).to(g.device)
            out[k] = (self.scale(k) * self.eps * normalize_grad(g * m, self.norm) * m).detach()
        return out

    def attack(self, model, batch, task, generator=None) -> dict[str, torch.Tensor]:
        """δ alone (parameters untouched): one gradient of the loss w.r.t. δ at 0 (deterministic, so
        ``generator`` is unused; it keeps one signature for every attack)."""
        zeros = self.new_deltas(model, batch)
        loss = forward_with(model, batch, zeros, task).loss
        grads = dict(zip(zeros, torch.autograd.grad(loss, list(zeros.values()))))
        return self.perturbation(model, batch, grads)

    def __call__(self, ctx, batch) -> torch.Tensor:
        self.resolve_sites(ctx.model)
        clean, outputs = forward_capturing(ctx, batch, self.sites)   # (1) clean pass keeps site outputs
        ctx.backward(clean.loss)                                      # ... so this backward also gives ∇_x L
        adv = forward_with(ctx, batch, self.perturbation(ctx.model, batch, site_grads(outputs)))  # (2)-(3)
        ctx.backward(adv.loss)                                        # accumulates onto the clean grads
        ctx.optimizer_step(clean.loss + adv.loss)                     # (5)
        return clean.loss.detach()


@dataclass
class FGSM(FGM):
    """FGM's step with the L-inf norm: ``δ = ε · sign(∇_x L)``. Default: pixels, ε = 8/255."""

    sites: tuple[str, ...] = ("pixels",)
    norm: str = "linf"
    eps: float = 8 / 255
