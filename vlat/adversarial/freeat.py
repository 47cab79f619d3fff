"""FreeAT — Shafahi, Najibi, Ghiasi, Xu, Dickerson, Studer, Davis, Taylor & Goldstein, *Adversarial
Training for Free!*, NeurIPS 2019.

Each minibatch is **replayed m times**; every replay is one forward/backward that yields both the
parameter gradient (an optimiser step per replay) and the input gradient (used to move δ):

    for r = 1..m:   L = L(x + δ);  θ ← optimizer_step(∇_θ L);  δ ← Π_ε(δ + ε_step · normalize(∇_δ L))

Run ``epochs / m`` epochs so the total cost equals clean training (METHODS.md §4; the CLI's FreeAT
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

from vlat.adversarial.base import Adversary, check_number, forward_with


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

    def equal_cost_epochs(self, epochs: int) -> int:
        """Epochs that make m replays cost what ``epochs`` of clean training cost (rounded up)."""
        return max(1, -(-epochs // self.replays))

    def __call__(self, ctx, batch) -> torch.Tensor:
        deltas = self.new_deltas(ctx.model, batch)
        first = None
        self.last_trace = []
        for r in range(self.replays):
            out = forward_with(ctx, batch, deltas)
            self.record(r, out.loss, deltas)
            ctx.backward(out.loss)                                   # θ-grads and δ-grad in one pass
            grads = {k: d.grad for k, d in deltas.items()}
            ctx.optimizer_step(out.loss)
            deltas = self.ascend(ctx.model, batch, deltas, grads)
            first = out.loss.detach() if first is None else first
        return first
