"""SMART — Jiang, He, Chen, Liu, Gao & Zhao, *SMART: Robust and Efficient Fine-Tuning for Pre-trained
Natural Language Models through Principled Regularized Optimization*, ACL 2020. https://arxiv.org/abs/1911.03437 · method sheet:
docs/methods.md#smart

Smoothness-inducing adversarial regularisation:

    min_θ  L_task(f(x), y) + λ_s · max_{||δ|| ≤ ε} ℓ_s(f(x + δ), f(x))
    ℓ_s(p, q) = KL(p ‖ q) + KL(q ‖ p)

Inner max: ``δ₀ ~ N(0, σ²) ⊙ m`` with ``σ = 1e-5``; K ascent steps (reference K = 1) on
``KL(p(x+δ) ‖ stopgrad p(x))`` with step ``η = 1e-5`` and **per-token L-inf normalisation** of the
gradient (``g / max_d |g|`` for each token, as in the authors' code), then clip to ε. The regulariser is
the symmetric KL with each side's target detached in turn:
``KL(p_adv ‖ sg p) + KL(p ‖ sg p_adv)``. **NaN/Inf guard**: if the δ-gradient norm is not finite the
regulariser is 0 for that batch (counted in ``self.skipped``).

**Bregman proximal point** (optional, ``mu > 0``): an EMA teacher ``θ̃ ← β θ̃ + (1-β) θ`` (β = 0.99)
adds ``μ · ℓ_s(f_θ(x), f_θ̃(x))`` so each update stays near the previous iterates. Not in the
authors' public code; implemented here from the paper.

Cost: K + 2 passes (clean, K ascent, regulariser) — plus one teacher forward with the proximal term.

>>> step = SMART(sites=("text",), weight=1.0)          # doctest: +SKIP
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from vlat.adversarial.base import Adversary, check_number, delta_gradients, forward_with
from vlat.adversarial.registry import STEPS, Option, Paper, register
from vlat.objectives import kl_logits, symmetric_kl


def per_token_linf(g: torch.Tensor, site) -> torch.Tensor:
    """``g / max_d |g|`` for every token (tokens as given by the site's ``[B, N, D]`` view)."""
    t = site.tokens(g)                                                        # [B, N, D]
    scaled = t / t.abs().amax(-1, keepdim=True).clamp_min(1e-12)
    if site.token_axes == "BND":
        return scaled
    return scaled.transpose(1, 2).reshape(g.shape)                            # [B, D, N] -> [B, D, h, w]


@register(
    name="smart", label="SMART",
    paper=Paper("SMART: Robust and Efficient Fine-Tuning for Pre-trained Natural Language Models through Principled "
                "Regularized Optimization", "Jiang, He, Chen, Liu, Gao & Zhao", "ACL", 2020,
                "https://arxiv.org/abs/1911.03437"),
    summary="a smoothness regulariser: the symmetric KL between the prediction at x and at the worst x + δ",
    reference={"λ_s": 1, "σ (δ₀ noise)": "1e-5", "K": 1, "step": "1e-3 (mt-dnn SmartPerturbation)",
               "epsilon": "1e-6, a numerical guard, not a radius"},
    options=(STEPS,
             Option("weight", "SMART regulariser weight lambda_s", float, 0.0, flag="reg-weight")),
    preset=lambda sites, eps, steps, eta: SMART(sites=sites, norm="linf", eps=eps, step_size=eta, steps=steps,
                                                sigma=eps / 10),
    passes=lambda m, layer_one: m.steps + 2)
@dataclass
class SMART(Adversary):
    sites: tuple[str, ...] = ("text",)
    norm: str = "linf"
    eps: float = 1e-5              # the reference keeps δ tiny: the regulariser probes local smoothness
    step_size: float = 1e-3        # η; the reference run uses 1e-5 with fp32 embeddings of scale ~1
    steps: int = 1                 # K
    sigma: float = 1e-5            # δ₀ ~ N(0, σ²)
    weight: float = 1.0            # λ_s
    mu: float = 0.0                # Bregman proximal weight (0 = off)
    beta: float = 0.99             # EMA rate of the proximal teacher
    skipped: int = field(default=0, init=False)

    def __post_init__(self):
        super().__post_init__()
        check_number("steps", self.steps, 1, 1000, integer=True)
        check_number("weight", self.weight, 0.0)
        check_number("mu", self.mu, 0.0)
        self._teacher = None

    def attack_steps(self) -> int:
        return self.steps

    def regulariser(self, runner, batch, clean_logits: torch.Tensor) -> torch.Tensor:
        """``max_δ ℓ_s`` estimated by :meth:`maximize` (K ascent steps on the KL to the detached clean
        prediction, the same loop :meth:`attack` runs); returns the symmetric-KL term (0 if the
        δ-gradient is not finite). ``runner``: a training context or ``Frozen(model, task)``."""
        finite = []

        def guarded(loss, deltas):                                  # NaN/Inf guard
            g = delta_gradients(loss, deltas)
            if not all(bool(torch.isfinite(x.norm())) for x in g.values()):
                return None
            finite.append(True)
            return g

        deltas = self.maximize(runner, batch, self.start(runner.model, batch), clean_logits.detach(), gradient=guarded)
        if len(finite) < self.steps:
            self.skipped += 1
            return clean_logits.new_zeros(())
        adv = forward_with(runner, batch, {k: d.detach() for k, d in deltas.items()}).logits
        return kl_logits(adv, clean_logits.detach()) + kl_logits(clean_logits, adv.detach())

    needs_clean_logits = True

    def attack_start(self, random_start: bool) -> tuple[str, float]:
        return "normal", self.sigma

    def objective(self, runner, batch, deltas, clean=None) -> torch.Tensor:
        """SMART maximises ``KL(f(x+δ) || f(x))`` (no label), in training and in ``attack()`` alike."""
        return kl_logits(forward_with(runner, batch, deltas).logits, clean)

    def direction(self, site, g: torch.Tensor) -> torch.Tensor:
        return per_token_linf(g, site)

    def _update_teacher(self, model):
        if self._teacher is None:
            self._teacher = copy.deepcopy(model).eval().requires_grad_(False)
            return
        with torch.no_grad():
            for t, p in zip(self._teacher.parameters(), model.parameters()):
                t.mul_(self.beta).add_(p.detach(), alpha=1 - self.beta)

    def __call__(self, ctx, batch) -> torch.Tensor:
        clean = ctx.forward(batch)
        loss = clean.loss + self.weight * self.regulariser(ctx, batch, clean.logits)
        if self.mu > 0:
            self._update_teacher(ctx.model)
            with torch.no_grad(), ctx.autocast():
                teacher_logits = self._teacher(batch, ctx.task).logits
            loss = loss + self.mu * symmetric_kl(clean.logits, teacher_logits)
        ctx.backward(loss)
        ctx.optimizer_step(loss)
        return clean.loss.detach()
