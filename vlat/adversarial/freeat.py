"""FreeAT — Shafahi, Najibi, Ghiasi, Xu, Dickerson, Studer, Davis, Taylor & Goldstein, *Adversarial
Training for Free!*, NeurIPS 2019. https://arxiv.org/abs/1904.12843 · method sheet: docs/methods.md#freeat

Each minibatch is **replayed m times**; every replay is one forward/backward that yields both the
parameter gradient (an optimiser step per replay) and the input gradient (used to move δ):

    for r = 1..m:   L = L(x + δ);  θ ← optimizer_step(∇_θ L);  δ ← Π_ε(δ + ε_step · normalize(∇_δ L))

Run ``epochs / m`` epochs so the total cost equals clean training (the CLI's FreeAT
divides ``--epochs`` by ``m`` for you, rounding up).

**δ is reset per batch** (the FreeLB repository's NLP port), not carried across minibatches as in the
image reference: text batches have different lengths, so a carried δ would not fit the next batch, and
one rule for every site keeps the method model-agnostic. The first replay therefore trains on the
clean input, as in the reference's very first batch.

Reference defaults (images): ``m = 4``, L-inf ``ε = ε_step = 4/255`` on pixels.

>>> step = FreeAT(sites=("pixels",), norm="linf", eps=4/255, step_size=4/255, replays=4)   # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlat.adversarial.base import Adversary, check_number
from vlat.adversarial.registry import Option, Paper, register


@register(
    name="freeat", label="FreeAT",
    paper=Paper("Adversarial Training for Free!", "Shafahi, Najibi, Ghiasi, Xu, Dickerson, Studer, Davis, Taylor "
                "& Goldstein", "NeurIPS", 2019, "https://arxiv.org/abs/1904.12843"),
    summary="replay each batch m times; every backward updates both the weights and δ (epochs / m)",
    reference={"replays m": 4, "eps = step": "4/255 on pixels, L-inf", "δ": "carried across minibatches"},
    options=(Option("replays", "FreeAT replays m per batch (epochs are divided by m)", int, 1, 100),),
    preset=lambda sites, eps, steps, eta: FreeAT(sites=sites, eps=eps, step_size=min(2 * eta, eps), replays=steps),
    steps_mean="replays m",
    passes=lambda m, layer_one: m.replays)
@dataclass
class FreeAT(Adversary):
    sites: tuple[str, ...] = ("text",)
    norm: str = "l2"
    eps: float = 1.0
    step_size: float = 1.0         # ε_step; the reference sets it equal to ε
    replays: int = 4               # m

    def __post_init__(self):
        super().__post_init__()
        check_number("replays", self.replays, 1, 100, integer=True)

    def attack_steps(self) -> int:
        """On a fixed model FreeAT's δ makes ``m`` steps of ``ε_step`` from zero, one per replay."""
        return self.replays

    def epochs_for(self, epochs: int) -> int:
        """Epochs that make m replays cost what ``epochs`` of clean training cost (rounded up)."""
        return max(1, -(-epochs // self.replays))

    def __call__(self, ctx, batch) -> torch.Tensor:
        losses = []

        def replay(loss, deltas):                                # one replay: θ-grads and δ-grad in one pass
            ctx.backward(loss)
            losses.append(loss.detach())
            grads = {k: d.grad for k, d in deltas.items()}
            ctx.optimizer_step(loss)
            return grads

        self.last_trace = []
        self.maximize(ctx, batch, self.start(ctx.model, batch), gradient=replay)   # the attack's loop, m replays
        return losses[0]
