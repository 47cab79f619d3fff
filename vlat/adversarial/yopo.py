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

    def __call__(self, ctx, batch) -> torch.Tensor:
        model, site = ctx.model, self.sites[0]
        block, _ = model.layer_one(site)
        deltas = self.new_deltas(model, batch)
        total = 0.0
        self.last_trace = []
        for j in range(self.outer):
            box = {}

            def keep(module, args, output):
                out = output[0] if isinstance(output, tuple) else output
                out.retain_grad()
                box["f0"] = out

            h = block.register_forward_hook(keep)
            try:
                out = forward_with(ctx, batch, deltas)
            finally:
                h.remove()
            self.record(j, out.loss, deltas)
            loss = out.loss / self.outer
            ctx.backward(loss)                                      # θ-grads accumulate over m passes
            total = total + loss.detach()
            p = box["f0"].grad.detach()                             # co-state ∂L/∂f₀, fixed below
            for _ in range(self.inner):                             # layer one only
                with perturbed(model, deltas, batch), ctx.autocast():
                    f0 = run_layer_one(model, site, batch)
                g = torch.autograd.grad((f0.float() * p.float()).sum(), [deltas[site]])[0]
                deltas = self.ascend(model, batch, deltas, {site: g})
            deltas = {k: d.detach().requires_grad_(True) for k, d in deltas.items()}
        ctx.optimizer_step(total)
        return total
