"""SMART — Jiang, He, Chen, Liu, Gao & Zhao, *SMART: Robust and Efficient Fine-Tuning for Pre-trained
Natural Language Models through Principled Regularized Optimization*, ACL 2020. https://arxiv.org/abs/1911.03437 · method sheet:
docs/methods.md#smart

Smoothness-inducing adversarial regularisation:

    min_θ  L_task(f(x), y) + λ_s · max_{δ} ℓ_s(f(x + δ), f(x))
    ℓ_s(p, q) = KL(p ‖ q) + KL(q ‖ p)

**What the authors' code computes** (``namisan/mt-dnn``, ``mt_dnn/perturbation.py`` ``SmartPerturbation``
and ``mt_dnn/loss.py``, commit 676b48b), and vlat's defaults do:

- ``δ₀ = σ · N(0, 1)`` with ``σ = 1e-5`` (their ``noise_var``).
- K ascent steps (reference K = 1), each on ``stable_kl(f(x + δ), stopgrad f(x))`` summed over the
  batch (:func:`vlat.objectives.stable_kl`, a KL with detached log-odds), then
  ``δ ← (δ + η g) / (max_d |δ + η g| + 1e-6)`` **per token**, with ``η = 1e-3``. The update
  *normalises* δ: after a step every token's δ has an L-inf norm of (just under) 1. There is no ball
  and no projection; their ``epsilon = 1e-6`` is the guard in that denominator, not a radius.
  ``norm="l2"`` is their ``l2`` option (per-token L2 normalisation).
- The regulariser is their ``SymKlCriterion(f(x), f(x + δ))`` at the final, detached δ:
  ``KL(sg p_adv ‖ p) + KL(sg p ‖ p_adv)``: each KL's gradient flows through its log side.
- Loss ``L_task + λ_s · ℓ_s`` with ``λ_s = 1`` (their ``adv_alpha``); if the δ-gradient is not finite the
  regulariser is 0 for that batch (counted in ``self.skipped``).

``eps`` is the size δ is normalised to (per token, in ``norm``): 1 is the authors'. vlat runs the authors'
update in units of it, ``u = δ/ε``: ``u ← N(u + η ε g)``, ``δ = ε u`` (with ``ε = 1`` exactly the authors'
arithmetic), so after :meth:`calibrate` the registered preset's ``eps`` is a fraction of each site's
L-inf norm and ``σ``, ``η`` keep their meaning. Note the authors' δ is large on a small-scale input:
the shipped single-stream model's word embeddings have a largest entry near 0.24 per caption, so
``eps=1`` there perturbs each word by about four times its largest coordinate; pass a smaller ``eps``
(or use the preset) for a gentler regulariser.

Deviations, all without effect on the result: δ is masked (padding is never perturbed; the authors'
noise also covers padding, which the attention mask hides); δ is added at the word-embedding output, as
for every method (docs/methods.md#where-perturbations-live), where mt-dnn adds it to BERT's full embedding
output. ``tests/test_fidelity.py`` re-computes their step and compares δ, loss and gradients.

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

from vlat.adversarial.base import Adversary, check_number, delta_gradients, forward_with, init_delta
from vlat.adversarial.registry import STEPS, Option, Paper, register
from vlat.objectives import kl_logits, stable_kl, symmetric_kl
from vlat.models.base import device_of


def per_token_normalise(t: torch.Tensor, site, norm: str = "linf", guard: float = 1e-6) -> torch.Tensor:
    """``t / (||t_token|| + guard)`` for every token (L-inf: ``max_d |t|``; L2), tokens as given by the
    site's ``[B, N, D]`` view; the shape of ``t`` is kept."""
    v = site.tokens(t)                                                        # [B, N, D]
    size = v.abs().amax(-1, keepdim=True) if norm == "linf" else v.norm(dim=-1, keepdim=True)
    scaled = v / (size + guard)
    if site.token_axes == "BND":
        return scaled
    return scaled.transpose(1, 2).reshape(t.shape)                            # [B, h*w, D] -> [B, D, h, w]


@register(
    name="smart", label="SMART",
    paper=Paper("SMART: Robust and Efficient Fine-Tuning for Pre-trained Natural Language Models through Principled "
                "Regularized Optimization", "Jiang, He, Chen, Liu, Gao & Zhao", "ACL", 2020,
                "https://arxiv.org/abs/1911.03437"),
    summary="a smoothness regulariser: the symmetric KL between the prediction at x and at the worst x + δ",
    reference={"λ_s (adv_alpha)": 1, "σ (noise_var)": "1e-5", "K": 1, "η (step_size)": "1e-3",
               "update": "δ ← (δ + ηg) / (max_d |δ + ηg| + 1e-6) per token: δ is normalised, not projected",
               "epsilon": "1e-6, the guard in that denominator, not a radius"},
    options=(STEPS,
             Option("weight", "SMART regulariser weight lambda_s", float, 0.0, flag="reg-weight")),
    preset=lambda sites, eps, steps, eta: SMART(sites=sites, eps=eps, steps=steps),
    passes=lambda m, layer_one: m.steps + 2)
@dataclass
class SMART(Adversary):
    sites: tuple[str, ...] = ("text",)
    norm: str = "linf"             # per-token normalisation: "linf" (the authors' default) or "l2"
    eps: float = 1.0               # the per-token size δ is normalised to; 1 = the authors' (see the docstring)
    step_size: float = 1e-3        # η, in units of eps
    steps: int = 1                 # K
    sigma: float = 1e-5            # δ₀ ~ N(0, (σ eps)²)
    guard: float = 1e-6            # the authors' epsilon: the guard in the normalisation's denominator
    weight: float = 1.0            # λ_s
    mu: float = 0.0                # Bregman proximal weight (0 = off)
    beta: float = 0.99             # EMA rate of the proximal teacher
    skipped: int = field(default=0, init=False)

    def __post_init__(self):
        super().__post_init__()
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0 for SMART: it is the per-token size δ is normalised to; "
                             f"got {self.eps!r}")
        check_number("steps", self.steps, 1, 1000, integer=True)
        check_number("sigma", self.sigma, 0.0)
        check_number("guard", self.guard, 0.0)
        check_number("weight", self.weight, 0.0)
        check_number("mu", self.mu, 0.0)
        self._teacher = None

    def attack_steps(self) -> int:
        return self.steps

    def radius(self, site: str) -> float:
        """The per-token size of δ at ``site`` after a step (``eps``, times the site's calibration scale)."""
        return self.scale(site) * self.eps

    def start(self, model, batch: dict, random_start: bool = False, generator=None) -> dict:
        """``δ₀ = σ · radius · N(0, 1)`` at every site (masked); SMART always starts from noise."""
        dev = device_of(model, batch)
        return {name: init_delta(site.shape(batch), site.mask(batch), "normal", self.sigma * self.radius(name),
                                 "linf", dev, generator)
                for name, site in self.resolve_sites(model).items()}

    def ascend(self, model, batch: dict, deltas: dict, grads: dict) -> dict[str, torch.Tensor]:
        """The authors' step in units of the radius r: ``δ ← r · N(δ/r + η r g)``, ``N`` the per-token
        normalisation with their guard (new leaf tensors, masked)."""
        sites = self.resolve_sites(model)
        out = {}
        for name, d in deltas.items():
            r, m = self.radius(name), sites[name].mask(batch).to(d.device)
            u = d.detach() / r + self.step_size * r * grads[name] * m
            out[name] = (r * per_token_normalise(u, sites[name], self.norm, self.guard) * m).requires_grad_(True)
        return out

    def regulariser(self, runner, batch, clean_logits: torch.Tensor) -> torch.Tensor:
        """``max_δ ℓ_s`` estimated by :meth:`maximize` (K steps on the stable KL to the detached clean
        prediction, the same loop :meth:`attack` runs); returns ``KL(sg p_adv ‖ p) + KL(sg p ‖ p_adv)``
        (0 if a δ-gradient is not finite). ``runner``: a training context or ``Frozen(model, task)``."""
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
        return kl_logits(adv.detach(), clean_logits) + kl_logits(clean_logits.detach(), adv)

    needs_clean_logits = True

    def objective(self, runner, batch, deltas, clean=None) -> torch.Tensor:
        """SMART ascends the stable KL of ``f(x+δ)`` to the clean prediction, summed over the batch (no
        label), in training and in ``attack()`` alike."""
        return stable_kl(forward_with(runner, batch, deltas).logits, clean, reduce=False)

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
