"""FreeAT — Shafahi, Najibi, Ghiasi, Xu, Dickerson, Studer, Davis, Taylor & Goldstein, *Adversarial
Training for Free!*, NeurIPS 2019. https://arxiv.org/abs/1904.12843 · method sheet: docs/methods.md#freeat

Each minibatch is **replayed m times**; every replay is one forward/backward that yields both the
parameter gradient (an optimiser step per replay) and the input gradient (used to move δ):

    for r = 1..m:   L = L(x + δ);  θ ← optimizer_step(∇_θ L);  δ ← Π_ε(δ + ε_step · normalize(∇_δ L))

Run ``epochs / m`` epochs so the total cost equals clean training (the CLI's FreeAT
divides ``--epochs`` by ``m`` for you, rounding up).

**The authors' loop** (``mahyarnajibi/FreeAdversarialTraining``, ``main_free.py``, commit d707740): per
replay, the loss at ``clamp(x + δ)``, one backward, ``δ ← clip_ε(δ + ε_step · sign(∇_δ L))``, then the
optimiser step; one global δ is **carried across minibatches** (sliced to the batch). ``carry=True`` does
exactly that; ``tests/test_fidelity.py`` re-computes their loop and compares.

Deviation (default): **δ is reset per batch** (the FreeLB repository's NLP port). Text batches have
different lengths, so a carried δ would not fit the next batch, and one rule for every site keeps the
method model-agnostic; the first replay of each batch then trains on the clean input, as in the
reference's very first batch. ``carry=True`` needs sites whose δ has the same per-example shape in every
batch (image regions, patches, pixels).

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
    reference={"replays m": 4, "eps = step": "4/255 on pixels, L-inf",
               "δ": "carried across minibatches (vlat: reset per batch; carry=True)"},
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
    carry: bool = False            # True: one δ carried across minibatches (the authors'); fixed-shape sites only
    feasible_delta = False         # the authors clamp the perturbed image only, not their noise

    def __post_init__(self):
        super().__post_init__()
        check_number("replays", self.replays, 1, 100, integer=True)
        if self.carry and "text" in self.sites:
            raise ValueError("FreeAT's carry=True needs sites whose δ has the same shape in every batch (image "
                             "regions, patches, pixels); a caption's δ changes length with the batch")
        self._carried: dict | None = None

    def carried_start(self, model, batch: dict) -> dict:
        """δ₀ for this batch: the δ the last batch ended with, sliced (or zero-padded) to this batch's size
        as the authors slice their global noise; a fresh start when nothing is carried yet."""
        fresh = self.start(model, batch)
        if not self.carry or self._carried is None:
            return fresh
        sites, out = self.resolve_sites(model), {}
        for name, d in fresh.items():
            old = self._carried[name].to(d.device)
            if old.shape[1:] != d.shape[1:]:
                raise ValueError(f"FreeAT carry: the {name} site's δ changed shape from {tuple(old.shape[1:])} to "
                                 f"{tuple(d.shape[1:])} between batches; carry needs a fixed-shape site")
            new = torch.zeros_like(d)
            n = min(len(old), len(d))
            new[:n] = old[:n]
            out[name] = (new * sites[name].mask(batch).to(d.device)).requires_grad_(True)
        return out

    def _keep(self, deltas: dict) -> None:
        """Write this batch's final δ into the carried buffer's first rows; rows past this batch keep what
        they held (the authors' global noise, when a short last batch is followed by a full one)."""
        for name, d in deltas.items():
            d = d.detach()
            old = (self._carried or {}).get(name)
            buf = d.clone() if old is None or len(old) <= len(d) else old.clone()
            buf[:len(d)] = d
            self._carried = {**(self._carried or {}), name: buf}

    def attack_steps(self) -> int:
        """On a fixed model FreeAT's δ makes ``m`` steps of ``ε_step`` from zero, one per replay."""
        return self.replays

    @property
    def updates_per_batch(self) -> int:
        """Optimiser steps per batch: one per replay (so no gradient accumulation over micro-batches)."""
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
        deltas = self.maximize(ctx, batch, self.carried_start(ctx.model, batch), gradient=replay)  # m replays
        if self.carry:
            self._keep(deltas)
        return losses[0]
