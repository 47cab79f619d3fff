"""YOPO — Zhang, Zhang, Lu, Zhu & Dong, *You Only Propagate Once: Accelerating Adversarial Training via
Maximal Principle*, NeurIPS 2019. https://arxiv.org/abs/1905.00877 · method sheet:
docs/methods.md#yopo

Split the network as ``f = g ∘ f₀`` with ``f₀`` = embeddings + the first block ("layer one", declared by
the model through :meth:`VLModel.layer_one`). For ``j = 1..m`` outer steps:

1. one full forward/backward at ``x + δ`` accumulates the parameter gradients (``1/m`` each) and gives
   the co-state ``p = ∂L/∂f₀(x + δ)``, then held fixed;
2. ``n`` inner steps move δ through layer one only:
   ``δ ← Π_ε(δ + σ · sign(∇_δ ⟨f₀(x + δ), p⟩))`` (L-inf; L2 uses ``g/||g||``).

3. (``layer_one_update``, the authors' code) after the n steps, back-propagate the Hamiltonian at the new
   δ into layer one's weights: ``∇_θ₀ ⟨f₀(x + δ_new), p⟩``, ``p`` held fixed. Layer one's gradient is then
   what YOPO defines (the paper's "update θ₀ with the Hamiltonian"); without it, layer one learns only from
   the full passes.

One optimiser step per batch. m full passes buy m·n updates of δ; ``tests/test_methods.py`` counts the
calls of the last block to check that inner steps never run past layer one.

**The authors' loop** (``a1600012888/YOPO-You-Only-Propagate-Once``,
``experiments/CIFAR10/pre-res18.yopo-5-3/training_function.py``, commit 484acff): δ₀ ~ U(-ε, ε)
(``random_start``); each of the K full passes back-propagates its whole loss; the n sign steps run on the
Hamiltonian with the co-state fixed; then ``-H`` at the new δ is back-propagated into layer one; one
optimiser step after the K passes. ``tests/test_fidelity.py`` re-computes it and compares.

Deviation (an option gives the authors'): vlat averages the m passes (each backward is ``loss / m``, the
Hamiltonian term likewise), where the authors sum them and divide their SGD learning rate by ``K / 2``
instead (``lr = 0.1 · 2 / K``). Averaging keeps one learning rate meaningful across every method of
vlat; with AdamW the two differ only through gradient clipping and Adam's ε. ``sum_passes=True`` gives the
authors' sum. On pixels δ is kept so that ``x + δ`` stays in [0, 1], as the authors clamp it.

*Sign convention*: the method sheet (docs/methods.md#yopo) writes ``p = -∂L/∂f₀`` (the paper's Hamiltonian form); ascending
``⟨f₀, p⟩`` with that sign would lower the loss. The authors' code negates twice (``H = -⟨f₀, p⟩`` and a
descent step on ``-H``), which is an ascent on ``⟨f₀, ∂L/∂f₀⟩``; that is what is implemented, with ``p``
named for the plain gradient.

Reference (images): ``m = 5, n = 3, σ = 2/255, ε = 8/255``. Cost: m full + m·(n + 1) layer-one passes (n steps and
the Hamiltonian update per full pass).

>>> step = YOPO(sites=("pixels",), outer=5, inner=3, step_size=2/255, eps=8/255)   # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlat.adversarial.base import Adversary, check_number, forward_with
from vlat.adversarial.registry import Option, Paper, register
from vlat.models.base import perturbed, run_layer_one


@register(
    name="yopo", label="YOPO",
    paper=Paper("You Only Propagate Once: Accelerating Adversarial Training via Maximal Principle",
                "Zhang, Zhang, Lu, Zhu & Dong", "NeurIPS", 2019, "https://arxiv.org/abs/1905.00877"),
    summary="m full passes give a co-state; n cheap steps of δ through layer one each",
    reference={"m (full passes)": 5, "n (layer-one steps)": 3, "σ": "2/255", "eps": "8/255, L-inf, pixels",
               "δ₀": "U(-ε, ε)", "layer one": "also trained on the Hamiltonian at the final δ of each pass",
               "passes": "summed, with lr 0.1 · 2 / K (vlat: averaged; sum_passes=True)"},
    options=(Option("outer", "YOPO full passes m", int, 1, 100),
             Option("inner", "YOPO layer-one steps n per full pass", int, 0, 100)),
    preset=lambda sites, eps, steps, eta: YOPO(sites=sites, norm="l2", eps=eps, step_size=eta, outer=steps, inner=3),
    steps_mean="full passes m (3 layer-one steps each)",
    single_site=True,
    passes=lambda m, layer_one: m.outer + m.outer * (m.inner + m.layer_one_update) * layer_one)
@dataclass
class YOPO(Adversary):
    sites: tuple[str, ...] = ("text",)
    norm: str = "linf"
    eps: float = 0.1
    step_size: float = 0.03       # σ
    outer: int = 5                # m: full passes
    inner: int = 3                # n: layer-one steps per full pass
    random_start: bool = True     # δ₀ ~ U(-ε, ε) (the authors'); False: δ₀ = 0
    layer_one_update: bool = True  # back-propagate the Hamiltonian at the new δ into layer one (the authors')
    sum_passes: bool = False      # True: each pass back-propagates its whole loss (the authors'); False: loss / m

    def __post_init__(self):
        super().__post_init__()
        check_number("outer", self.outer, 1, 100, integer=True)
        check_number("inner", self.inner, 0, 100, integer=True)
        if len(self.sites) != 1:
            raise ValueError("YOPO perturbs one site at a time (its layer one is per site)")

    def attack_steps(self) -> int:
        return self.outer

    def attack_start(self, random_start: bool) -> tuple[str, float]:
        """YOPO's own δ₀: uniform in the ball (the authors'), unless ``random_start=False``."""
        return ("uniform", self.eps) if (random_start or self.random_start) else ("zero", 0.0)

    def _outer(self, runner, batch, deltas):
        """One full pass at ``x + δ`` that keeps layer one's output ``f₀`` (for the co-state)."""
        block, _ = runner.model.layer_one(self.sites[0])
        box = {}

        def keep(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            if out.requires_grad:
                out.retain_grad()
            box["f0"] = out

        h = block.register_forward_hook(keep)
        try:
            out = forward_with(runner, batch, deltas)
        finally:
            h.remove()
        return out, box["f0"]

    def _inner(self, runner, batch, deltas, p):
        """``n`` steps of δ through layer one only, with the co-state ``p`` held fixed."""
        site, model = self.sites[0], runner.model
        for _ in range(self.inner):
            with perturbed(model, deltas, batch), runner.autocast():
                f0 = run_layer_one(model, site, batch)
            g = torch.autograd.grad((f0.float() * p.float()).sum(), [deltas[site]])[0]
            deltas = self.ascend(model, batch, deltas, {site: g})
        return {k: d.detach().requires_grad_(True) for k, d in deltas.items()}

    def maximize(self, runner, batch, deltas, clean=None, grads=None, steps=None, gradient=None, losses=None,
                 after=None):
        """YOPO's inner maximisation, for training and ``attack()`` alike: m full passes, each giving the
        co-state ``p = ∂L/∂f₀`` and followed by n layer-one steps. ``gradient(loss, f0)`` returns ``p``
        (default: ``autograd.grad``, parameters untouched; training back-propagates the pass's loss and
        reads ``f0.grad``). ``after(deltas, p)`` runs after each pass's layer-one steps (training: the
        Hamiltonian's backward into layer one)."""
        for j in range(self.attack_steps() if steps is None else steps):
            out, f0 = self._outer(runner, batch, deltas)
            self.record(j, out.loss, deltas)
            if losses is not None:
                losses.append(float(out.loss.detach()))
            p = gradient(out.loss, f0) if gradient else torch.autograd.grad(out.loss, [f0])[0]
            deltas = self._inner(runner, batch, deltas, p)
            if after is not None:
                after(deltas, p)
        return deltas

    def __call__(self, ctx, batch) -> torch.Tensor:
        total, weight = [], 1.0 if self.sum_passes else 1.0 / self.outer
        site, model = self.sites[0], ctx.model

        def costate(loss, f0):
            ctx.backward(loss * weight)                             # θ-grads accumulate over m passes
            total.append(loss.detach() / self.outer)
            p = f0.grad.detach() * ctx.micros                       # co-state ∂(weight · L)/∂f₀ (ctx.backward
            return p / ctx.scaler.get_scale() if ctx.scaler is not None else p   # divided it by micro-batches)

        def hamiltonian(deltas, p):                                 # ∇_θ₀ ⟨f₀(x + δ_new), p⟩ into layer one
            with perturbed(model, {k: d.detach() for k, d in deltas.items()}, batch), ctx.autocast():
                f0 = run_layer_one(model, site, batch)
            ctx.backward((f0.float() * p.float()).sum())

        self.last_trace = []
        self.maximize(ctx, batch, self.start(model, batch), gradient=costate,
                      after=hamiltonian if self.layer_one_update else None)
        loss = sum(total)
        ctx.optimizer_step(loss)
        return loss
