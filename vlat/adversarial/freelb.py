"""FreeLB — Zhu, Cheng, Gan, Sun, Goldstein & Liu, *FreeLB: Enhanced Adversarial Training for Natural
Language Understanding*, ICLR 2020.

K ascent steps whose parameter gradients are **all kept**: each step's backward of ``L(x + δ_t) / K``
accumulates onto the parameters (a "virtual K× batch" of adversarial examples), and δ moves between
steps; one optimiser step per batch (after clipping, by the loop). METHODS.md §6:

    δ₀ = U(-1,1) ⊙ m · init_mag / sqrt(len_i · D)     (L2)   or   U(-init_mag, init_mag) ⊙ m   (L-inf)
    for t = 1..K:   g_t = ∇_δ L(x + δ_{t-1}) / K;   θ-grads += ∇_θ L(x + δ_{t-1}) / K
                    δ_t = Π_ε(δ_{t-1} + η · g_t / ||g_t||)        (not after the last step)

**Dropout.** The same dropout masks are used in all K steps: the RNG state is captured before step 1
and restored before every step, so δ chases one network, not K (FreeLB's reference reuses masks).
``tests/test_methods.py`` checks the masks are identical.

Reference settings (ALBERT GLUE): ``η ∈ [0.03, 0.2]``, ``init_mag ∈ [0, 0.6]``, ``K ∈ {2, 3, 4}``,
mostly ``max_norm = 0`` (``eps = 0``: no projection). Cost: K passes.

>>> step = FreeLB(sites=("text",), steps=3, step_size=0.1, init_mag=0.2, eps=0.0)   # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlat.adversarial.base import Adversary, check_number, forward_with


class SameDropout:
    """Context manager: every ``replay()`` restores the RNG state captured on entry (CPU and CUDA)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        self.cpu_state = torch.get_rng_state()
        self.cuda_state = torch.cuda.get_rng_state() if self.cuda else None
        return self

    def replay(self):
        torch.set_rng_state(self.cpu_state)
        if self.cuda:
            torch.cuda.set_rng_state(self.cuda_state)

    def __exit__(self, *exc):
        return False


@dataclass
class FreeLB(Adversary):
    sites: tuple[str, ...] = ("text",)
    norm: str = "l2"
    eps: float = 0.0               # max_norm; 0 = no projection (the reference's usual choice)
    step_size: float = 0.1         # adv_lr η
    steps: int = 3                 # K
    init_mag: float = 0.2          # δ₀ magnitude (0: start at zero)

    def __post_init__(self):
        super().__post_init__()
        check_number("steps", self.steps, 1, 1000, integer=True)
        check_number("init_mag", self.init_mag, 0.0)

    def attack_start(self, random_start: bool) -> tuple[str, float]:
        return "uniform", self.init_mag

    def attack_steps(self) -> int:
        """On a fixed model: δ₀ then K-1 ascents, i.e. the last δ a training step back-propagates."""
        return self.steps - 1

    # -- the pieces of one training step a variant may replace (VILLA: a clean forward, a KL term, fp16 care) --
    def clean_logits(self, ctx, batch, same: SameDropout):
        """Logits the step losses compare against, computed once per batch (FreeLB: none)."""
        return None

    def step_loss(self, ctx, batch, deltas, same: SameDropout, clean=None) -> tuple[torch.Tensor, dict]:
        """The loss of one ascent step at ``deltas`` (under the replayed dropout masks) and any extra
        per-step values for the trace."""
        same.replay()
        return forward_with(ctx, batch, deltas).loss, {}

    def delta_grads(self, ctx, deltas) -> dict | None:
        """The δ-gradients the next ascent follows (``None``: stop ascending for this batch)."""
        return {k: d.grad for k, d in deltas.items()}

    def accumulate(self, ctx, batch) -> tuple[torch.Tensor, dict]:
        """Run the K steps, leaving (1/K)-weighted parameter gradients in ``.grad``; returns the mean loss
        and the final δ."""
        deltas = self.new_deltas(ctx.model, batch, "uniform", self.init_mag)
        self.last_trace = []
        total = 0.0
        with SameDropout(ctx.device) as same:
            clean = self.clean_logits(ctx, batch, same)
            for t in range(self.steps):
                loss, extra = self.step_loss(ctx, batch, deltas, same, clean)
                self.record(t, loss, deltas)
                if self.trace:
                    self.last_trace[-1].update({k: float(v) for k, v in extra.items()})
                last = t == self.steps - 1
                loss = loss / self.steps
                # θ-grads accumulate over the K steps; a clean graph shared by the steps is kept until the last
                ctx.backward(loss, retain_graph=clean is not None and not last)
                total = total + loss.detach()
                if last:
                    break
                grads = self.delta_grads(ctx, deltas)
                if grads is None:
                    break
                deltas = self.ascend(ctx.model, batch, deltas, grads)
        return total, deltas

    def __call__(self, ctx, batch) -> torch.Tensor:
        loss, _ = self.accumulate(ctx, batch)
        ctx.optimizer_step(loss)
        return loss
