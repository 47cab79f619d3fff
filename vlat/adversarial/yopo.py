"""YOPO — Zhang, Zhang, Lu, Zhu & Dong, *You Only Propagate Once: Accelerating Adversarial Training via
Maximal Principle*, NeurIPS 2019.

Split the network as ``f = g ∘ f₀`` with ``f₀`` = embeddings + the first block ("layer one", declared by
the model through :meth:`VLModel.layer_one`). For ``j = 1..m`` outer steps:

1. one full forward/backward at ``x + δ`` accumulates the parameter gradients (``1/m`` each) and gives
   the co-state ``p = ∂L/∂f₀(x + δ)``, then held fixed;
2. ``n`` inner steps move δ through layer one only:
   ``δ ← Π_ε(δ + σ · sign(∇_δ ⟨f₀(x + δ), p⟩))`` (L-inf; L2 uses ``g/||g||``).

One optimiser step per batch. m full passes buy m·n updates of δ; ``tests/test_methods.py`` counts the
calls of the last block to check that inner steps never run past layer one.

*Sign convention*: METHODS.md writes ``p = -∂L/∂f₀`` (the paper's Hamiltonian form); ascending
``⟨f₀, p⟩`` with that sign would lower the loss. The authors' code negates twice (``H = -⟨f₀, p⟩`` and a
descent step on ``-H``), which is an ascent on ``⟨f₀, ∂L/∂f₀⟩``; that is what is implemented, with ``p``
named for the plain gradient.

Reference (images): ``m = 5, n = 3, σ = 2/255, ε = 8/255``. Cost: m full + m·n layer-one passes.

>>> step = YOPO(sites=("pixels",), outer=5, inner=3, step_size=2/255, eps=8/255)   # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from vlat.adversarial.base import Adversary, check_number, forward_with
from vlat.models.base import perturbed, run_layer_one


@dataclass
class YOPO(Adversary):
    sites: tuple[str, ...] = ("text",)
    norm: str = "linf"
    eps: float = 0.1
    step_size: float = 0.03       # σ
    outer: int = 5                # m: full passes
    inner: int = 3                # n: layer-one steps per full pass

    def __post_init__(self):
        super().__post_init__()
        check_number("outer", self.outer, 1, 100, integer=True)
        check_number("inner", self.inner, 0, 100, integer=True)
        if len(self.sites) != 1:
            raise ValueError("YOPO perturbs one site at a time (its layer one is per site)")

    def _outer(self, ctx_or_model, batch, deltas, task=None):
        """One full pass at ``x + δ`` that keeps layer one's output ``f₀`` (for the co-state)."""
        model = getattr(ctx_or_model, "model", ctx_or_model)
        block, _ = model.layer_one(self.sites[0])
        box = {}

        def keep(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            if out.requires_grad:
                out.retain_grad()
            box["f0"] = out

        h = block.register_forward_hook(keep)
        try:
            out = forward_with(ctx_or_model, batch, deltas, task)
        finally:
            h.remove()
        return out, box["f0"]

    def _inner(self, model, batch, deltas, p, autocast):
        """``n`` steps of δ through layer one only, with the co-state ``p`` held fixed."""
        site = self.sites[0]
        for _ in range(self.inner):
            with perturbed(model, deltas, batch), autocast():
                f0 = run_layer_one(model, site, batch)
            g = torch.autograd.grad((f0.float() * p.float()).sum(), [deltas[site]])[0]
            deltas = self.ascend(model, batch, deltas, {site: g})
        return {k: d.detach().requires_grad_(True) for k, d in deltas.items()}

    def attack(self, model, batch, task, generator=None, random_start: bool = False, return_losses: bool = False):
        """YOPO's inner maximisation on a fixed model: m full passes, each followed by n layer-one steps."""
        deltas = self.new_deltas(model, batch, *self.attack_start(random_start), generator=generator)
        losses = []
        self.last_trace = []
        for j in range(self.outer):
            out, f0 = self._outer(model, batch, deltas, task)
            losses.append(float(out.loss.detach()))
            self.record(j, out.loss, deltas)
            p = torch.autograd.grad(out.loss, [f0])[0]
            deltas = self._inner(model, batch, deltas, p, contextlib.nullcontext)
        deltas = {k: d.detach() for k, d in deltas.items()}
        return (deltas, losses) if return_losses else deltas

    def __call__(self, ctx, batch) -> torch.Tensor:
        deltas = self.new_deltas(ctx.model, batch)
        total = 0.0
        self.last_trace = []
        for j in range(self.outer):
            out, f0 = self._outer(ctx, batch, deltas)
            self.record(j, out.loss, deltas)
            loss = out.loss / self.outer
            ctx.backward(loss)                                      # θ-grads accumulate over m passes
            total = total + loss.detach()
            deltas = self._inner(ctx.model, batch, deltas, f0.grad.detach(), ctx.autocast)  # co-state ∂L/∂f₀
        ctx.optimizer_step(total)
        return total
