"""FreeLB — Zhu, Cheng, Gan, Sun, Goldstein & Liu, *FreeLB: Enhanced Adversarial Training for Natural
Language Understanding*, ICLR 2020. https://arxiv.org/abs/1909.11764 · method sheet: docs/methods.md#freelb

K ascent steps whose parameter gradients are **all kept**: each step's backward of ``L(x + δ_t) / K``
accumulates onto the parameters (a "virtual K× batch" of adversarial examples), and δ moves between
steps; one optimiser step per batch (after clipping, by the loop):

    δ₀ = U(-1,1) ⊙ m · init_mag / sqrt(len_i · D)     (L2)   or   U(-init_mag, init_mag) ⊙ m   (L-inf)
    for t = 1..K:   g_t = ∇_δ L(x + δ_{t-1}) / K;   θ-grads += ∇_θ L(x + δ_{t-1}) / K
                    δ_t = Π_ε(δ_{t-1} + η · g_t / ||g_t||)        (not after the last step)

(``||g||`` per example in the method's norm: L2, or L-inf, where the step is ``g / max |g|``, not ``sign(g)``.)
This is the authors' loop (``zhuchen03/FreeLB``, ``huggingface-transformers/examples/run_glue_freelb.py``,
commit 2100e74); ``tests/test_fidelity.py`` re-computes it and compares δ and the gradients.

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

from vlat.adversarial.base import Adversary, bview, check_number, normalize_grad, per_example_norm
from vlat.adversarial.registry import INIT_MAG, STEPS, Paper, register


class SameDropout:
    """Context manager: every ``replay()`` restores the RNG state captured on entry (CPU and CUDA);
    :meth:`runner` wraps a runner so that every forward through it replays first."""

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

    def runner(self, runner) -> "Replaying":
        return Replaying(runner, self)

    def __exit__(self, *exc):
        return False


class Replaying:
    """A runner (:class:`vlat.train.StepContext` or :class:`~vlat.adversarial.base.Frozen`) whose every
    forward runs under the same dropout masks."""

    def __init__(self, runner, same: SameDropout):
        self.inner, self.same = runner, same
        self.model, self.task, self.scaler = runner.model, runner.task, runner.scaler

    def forward(self, batch: dict, task: str | None = None, **kw):
        self.same.replay()
        return self.inner.forward(batch, task, **kw)

    def autocast(self):
        return self.inner.autocast()


@register(
    name="freelb", label="FreeLB",
    paper=Paper("FreeLB: Enhanced Adversarial Training for Natural Language Understanding",
                "Zhu, Cheng, Gan, Sun, Goldstein & Liu", "ICLR", 2020, "https://arxiv.org/abs/1909.11764"),
    summary="K ascent steps whose parameter gradients are all kept: a virtual K-times batch",
    reference={"adv_lr": "0.03-0.2", "init_mag": "0-0.6", "K": "2-4", "max_norm": "mostly 0 (no projection)",
               "setting": "ALBERT-xxlarge on GLUE"},
    options=(STEPS,
             INIT_MAG),
    preset=lambda sites, eps, steps, eta: FreeLB(sites=sites, eps=eps, step_size=eta, steps=steps, init_mag=eps / 2),
    passes=lambda m, layer_one: m.steps)
@dataclass
class FreeLB(Adversary):
    sites: tuple[str, ...] = ("text",)
    norm: str = "l2"
    eps: float = 0.0               # max_norm; 0 = no projection (the reference's usual choice)
    step_size: float = 0.1         # adv_lr η
    steps: int = 3                 # K
    init_mag: float = 0.2          # δ₀ magnitude (0: start at zero)
    same_dropout: bool = True      # one set of dropout masks for every forward of a step (FreeLB's code)

    def __post_init__(self):
        super().__post_init__()
        check_number("steps", self.steps, 1, 1000, integer=True)
        check_number("init_mag", self.init_mag, 0.0)

    def attack_start(self, random_start: bool) -> tuple[str, float]:
        return "uniform", self.init_mag

    def attack_steps(self) -> int:
        """δ₀ then K-1 ascents: the last δ a training step back-propagates."""
        return self.steps - 1

    def direction(self, site, g: torch.Tensor) -> torch.Tensor:
        """The authors' step direction, per example: ``g / ||g||₂`` (L2) or ``g / ||g||_∞`` (L-inf; not
        ``sign(g)``: FreeLB's and VILLA's code scale the step by the gradient's largest entry)."""
        if self.norm == "linf":
            return g / bview(per_example_norm(g, "linf").clamp_min(1e-8), g)
        return normalize_grad(g, "l2")

    # -- the pieces a variant may replace (VILLA: a clean forward, a KL term, fp16 care) -----------------
    def clean_logits(self, runner, batch):
        """Logits the step losses compare against, computed once per batch with gradient (FreeLB: none)."""
        return None

    def delta_grads(self, ctx, deltas) -> dict | None:
        """The δ-gradients the next ascent follows (``None``: stop ascending for this batch)."""
        return {k: d.grad for k, d in deltas.items()}

    def accumulate(self, ctx, batch) -> tuple[torch.Tensor, dict]:
        """Run the K steps, leaving (1/K)-weighted parameter gradients in ``.grad``; returns the mean loss
        and the final δ. The K-1 ascents are :meth:`maximize` (the attack's loop) with a gradient that also
        back-propagates each step's loss into the parameters; the K-th forward only trains."""
        self.last_trace = []
        total, stopped = [], []
        deltas = self.start(ctx.model, batch)            # drawn before the dropout state is captured
        with SameDropout(ctx.device) as same:
            run = same.runner(ctx) if self.same_dropout else ctx
            clean = self.clean_logits(run, batch)

            def learn(loss, deltas):                     # θ-grads accumulate over the K steps
                loss = loss / self.steps                 # a clean graph shared by the steps is kept until the last
                ctx.backward(loss, retain_graph=clean is not None)
                total.append(loss.detach())
                grads = self.delta_grads(ctx, deltas)
                if grads is None:
                    stopped.append(True)
                return grads

            deltas = self.maximize(run, batch, deltas, clean, gradient=learn)
            if not stopped:                              # step K: train on the final δ
                loss = self.objective(run, batch, deltas, clean)
                self.record(self.steps - 1, loss, deltas)
                loss = loss / self.steps
                ctx.backward(loss)
                total.append(loss.detach())
        return sum(total), deltas

    def __call__(self, ctx, batch) -> torch.Tensor:
        loss, _ = self.accumulate(ctx, batch)
        ctx.optimizer_step(loss)
        return loss
