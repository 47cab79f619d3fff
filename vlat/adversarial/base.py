"""Plumbing shared by every method: δ creation, per-example norms, gradient normalisation, projection.

Conventions (docs/methods.md#conventions): norms of δ and of its gradient are taken **per example over all of its
unmasked entries** (``L x D`` for a token site); every δ is multiplied by the site's mask, so padding
is never perturbed; ``eps <= 0`` means "no projection" (FreeLB's ``max_norm = 0``).

Shapes: a δ has the shape of its site's module output, ``[B, ...]``; per-example scalars are ``[B]``
and are broadcast back with :func:`bview`.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Sequence

import torch

from vlat.distributed import rows_of_global_draw
from vlat.models.base import VLModel, device_of, perturbed

NORMS = ("l2", "linf")
INITS = ("zero", "uniform", "normal")


def bview(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``[B]`` -> ``[B, 1, ..., 1]`` broadcastable against ``like``."""
    return x.view(-1, *([1] * (like.dim() - 1)))


def per_example_norm(t: torch.Tensor, norm: str = "l2") -> torch.Tensor:
    """``||t_i||`` over all non-batch axes, ``[B]``."""
    flat = t.flatten(1)
    return flat.norm(dim=1) if norm == "l2" else flat.abs().amax(dim=1)


def normalize_grad(g: torch.Tensor, norm: str = "l2", eps: float = 1e-8) -> torch.Tensor:
    """The ascent direction: ``g / ||g||_2`` per example (L2) or ``sign(g)`` (L-inf)."""
    if norm == "l2":
        return g / bview(per_example_norm(g, "l2").clamp_min(eps), g)
    return g.sign()


def project(delta: torch.Tensor, eps: float, norm: str = "l2") -> torch.Tensor:
    """``Π_ε``: rescale each example back onto the L2 ball, or clip entries to [-ε, ε]; ``eps <= 0``: identity."""
    if eps <= 0:
        return delta
    if norm == "l2":
        n = per_example_norm(delta, "l2")
        return delta * bview(torch.where(n > eps, eps / n.clamp_min(1e-12), torch.ones_like(n)), delta)
    return delta.clamp(-eps, eps)


def init_delta(shape: Sequence[int], mask: torch.Tensor, init: str = "zero", magnitude: float = 0.0,
               norm: str = "l2", device=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """A fresh fp32 δ (masked, ``requires_grad``).

    - ``zero``;
    - ``uniform``: FreeLB's init. L2: ``U(-1, 1) ⊙ m · mag / sqrt(n_i)`` with ``n_i`` the number of
      unmasked entries of example i (``len_i · D`` for tokens); L-inf: ``U(-mag, mag) ⊙ m``;
    - ``normal``: ``N(0, mag²) ⊙ m`` (SMART's ``σ``).
    """
    mask = mask.to(device=device, dtype=torch.float32)
    if init == "zero" or magnitude == 0:
        d = torch.zeros(shape, device=device)
    elif init == "uniform":
        d = rows_of_global_draw(shape, lambda s: torch.rand(s, generator=generator, device="cpu")).to(device) * 2 - 1
        d = d * mask
        if norm == "l2":
            n = mask.expand(shape).flatten(1).sum(1).clamp_min(1)             # [B] unmasked entries
            d = d * bview(magnitude / n.sqrt(), d)
        else:
            d = d * magnitude
    elif init == "normal":
        d = rows_of_global_draw(shape, lambda s: torch.randn(s, generator=generator, device="cpu")).to(device)
        d = d * magnitude
    else:
        raise ValueError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
    return (d * mask).requires_grad_(True)


def check_number(name: str, value: float, low: float = 0.0, high: float = math.inf, integer: bool = False) -> None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if integer and int(value) != value:
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must lie in [{low}, {high}], got {value!r}")


@dataclass
class Adversary:
    """Common settings of a method: which sites, which norm, the radius and the step size.

    Subclasses implement ``__call__(ctx, batch) -> loss`` (a training step for :func:`vlat.train.train`).
    """

    sites: tuple[str, ...] = ("text",)   # perturbation sites to attack (see VLModel.perturbation_sites)
    norm: str = "l2"                      # "l2" or "linf"
    eps: float = 1.0                      # radius of the ball; <= 0 means unbounded where allowed
    step_size: float = 0.1                # ascent step η (adv_lr)
    trace: bool = False                   # record (loss, ‖δ‖) of every inner step in self.last_trace
    scales: dict | None = None            # per-site multiplier of eps, step size and init magnitude

    def __post_init__(self):
        self.last_trace: list[dict] = []
        if isinstance(self.sites, str):
            self.sites = (self.sites,)
        self.sites = tuple(self.sites)
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}; choose l2 or linf")
        check_number("eps", self.eps, 0.0)
        check_number("step_size", self.step_size, 0.0)

    def scale(self, site: str) -> float:
        """The multiplier of ε, η and the init magnitude at ``site`` (1 unless :meth:`calibrate` set it)."""
        return 1.0 if self.scales is None else float(self.scales.get(site, 1.0))

    def calibrate(self, model: VLModel, batch: dict, task: str, weights: dict | None = None) -> "Adversary":
        """Make ``eps``, ``step_size`` and the init magnitude fractions of each site's input norm.

        Sites live on very different scales (a caption's word embeddings have an L2 norm near 1, a
        scene's raw region features near 200), so one absolute ε is a different threat at each; after
        ``calibrate``, ``eps=0.1`` means "10 % of this site's mean clean norm" (measured on ``batch``
        with :func:`site_norms`, in this method's norm) at every site. ``weights`` multiplies a site's
        scale further (``{"text": 0.2}``: the text gets a fifth of the image's relative radius). Returns
        ``self``.
        """
        norms = site_norms(model, batch, task, self.sites, self.norm)
        self.scales = {k: v * (weights or {}).get(k, 1.0) for k, v in norms.items()}
        return self

    # -- helpers for subclasses -----------------------------------------------------------------
    def record(self, step: int, loss: torch.Tensor, deltas: dict) -> None:
        """Keep one inner step's loss and per-site mean ‖δ‖ when ``trace`` is on (a sync; off by default)."""
        if self.trace:
            row = {"step": step, "loss": float(loss.detach())}
            row.update({f"|δ| {k}": float(per_example_norm(d.detach(), self.norm).mean()) for k, d in deltas.items()})
            self.last_trace.append(row)

    def resolve_sites(self, model: VLModel) -> dict:
        sites = model.perturbation_sites()
        unknown = [s for s in self.sites if s not in sites]
        if unknown:
            raise ValueError(f"unknown site(s) {unknown}; this model has {', '.join(sites)}")
        return {s: sites[s] for s in self.sites}

    def new_deltas(self, model: VLModel, batch: dict, init: str = "zero", magnitude: float = 0.0,
                   generator=None) -> dict[str, torch.Tensor]:
        dev = device_of(model, batch)
        out = {}
        for name, site in self.resolve_sites(model).items():
            shape, mask, mag = site.shape(batch), site.mask(batch), magnitude * self.scale(name)
            if init == "normal" and self.norm == "l2" and self.scales is not None:
                # σ is a per-entry std: an L2 scale (a whole example's norm) becomes the RMS entry
                mag /= math.sqrt(float(mask.expand(shape).flatten(1).sum(1).float().mean().clamp_min(1)))
            out[name] = init_delta(shape, mask, init, mag, self.norm, dev, generator)
        return out

    # -- the inner maximisation: one loop for the training step and for attack() -----------------
    def start(self, model: VLModel, batch: dict, random_start: bool = False, generator=None) -> dict:
        """δ₀ per site, as the method's own initialisation (:meth:`attack_start`) draws it (inside a clamped
        site's range, see :meth:`feasible`)."""
        deltas = self.new_deltas(model, batch, *self.attack_start(random_start), generator=generator)
        sites = self.resolve_sites(model)
        return {k: self.feasible(sites[k], batch, d.detach()).requires_grad_(True) for k, d in deltas.items()}

    def attack_start(self, random_start: bool) -> tuple[str, float]:
        """``(init, magnitude)`` of δ₀ (a method's own initialisation; uniform in the ball on request)."""
        return ("uniform", self.eps) if random_start else ("zero", 0.0)

    def attack_steps(self) -> int:
        """How many ascent steps the method's inner maximisation takes."""
        return 1

    needs_clean_logits = False   # the objective compares with the clean prediction (SMART, VILLA, TRADES)
    # keep x + δ inside a clamped site's range by clamping δ itself (torchattacks' PGD, YOPO's code); False:
    # only the perturbed input is clamped (FreeAT's code), and δ may hold a part the clamp discards
    feasible_delta = True

    def feasible(self, site, batch: dict, delta: torch.Tensor) -> torch.Tensor:
        """``clamp(x + δ) - x`` at a clamped site (pixels: x = ``batch["pixel_values"]``, range [0, 1]),
        so that every part of δ reaches the input; ``δ`` elsewhere, or when ``feasible_delta`` is off."""
        if site.clamp is None or not self.feasible_delta:
            return delta
        x = batch["pixel_values"].to(delta.device, torch.float32)
        return (x + delta).clamp(*site.clamp) - x

    def clean_reference(self, runner, batch: dict):
        """What :meth:`objective` compares against on a fixed model: the clean logits, without gradient
        (``None`` for methods whose objective is the task loss)."""
        if not self.needs_clean_logits:
            return None
        with torch.no_grad():
            return runner.forward(batch).logits.float()

    def objective(self, runner, batch: dict, deltas: dict, clean=None) -> torch.Tensor:
        """What the inner maximisation ascends: the task loss at ``x + δ`` (SMART: the KL to the clean
        prediction; VILLA: the loss plus the symmetric KL)."""
        return forward_with(runner, batch, deltas).loss

    def maximize(self, runner, batch: dict, deltas: dict, clean=None, grads: dict | None = None,
                 steps: int | None = None, gradient=None, losses: list | None = None) -> dict:
        """The method's inner maximisation: ``steps`` (default :meth:`attack_steps`) projected ascent
        steps on :meth:`objective` from ``deltas``; returns the new δ (leaves that take gradients).

        The training step and :meth:`attack` both run this loop. ``grads``: the objective's gradient at
        ``deltas`` when the caller already has it (a training step's clean backward yields it for free).
        ``gradient(loss, deltas)`` turns each step's objective into δ-gradients: by default
        ``autograd.grad`` w.r.t. δ alone (parameters untouched); a training step that also learns from
        every step's loss (FreeAT, FreeLB) passes its own backward. A ``None`` from it ends the ascent.
        ``losses`` collects the objective before each step (a host sync each; off in training).
        """
        gradient = gradient or delta_gradients
        for t in range(self.attack_steps() if steps is None else steps):
            if grads is None:
                loss = self.objective(runner, batch, deltas, clean)
                self.record(t, loss, deltas)
                if losses is not None:
                    losses.append(float(loss.detach()))
                grads = gradient(loss, deltas)
                if grads is None:
                    break
            deltas = self.ascend(runner.model, batch, deltas, grads)
            grads = None
        return deltas

    def attack(self, model: VLModel, batch: dict, task: str, generator=None, random_start: bool = False,
               return_losses: bool = False):
        """The method's inner maximisation on a fixed model: ``{site: δ}`` after :meth:`maximize` from
        :meth:`start`. Parameters are never changed and receive no gradient. With ``return_losses``
        also the objective before each step."""
        runner = Frozen(model, task)
        deltas = self.start(model, batch, random_start, generator)
        self.last_trace = []
        losses: list[float] = []
        deltas = self.maximize(runner, batch, deltas, self.clean_reference(runner, batch), losses=losses)
        deltas = {k: d.detach() for k, d in deltas.items()}
        return (deltas, losses) if return_losses else deltas

    def epochs_for(self, epochs: int) -> int:
        """Epochs to train for a budget of ``epochs`` clean epochs (FreeAT divides by its replays)."""
        return epochs

    def step_length(self, site: str) -> float:
        """The ascent step η at ``site`` (FGM/FGSM: their one step is ε itself)."""
        return self.scale(site) * self.step_size

    def direction(self, site, g: torch.Tensor) -> torch.Tensor:
        """The ascent direction for a site's gradient: ``g/||g||₂`` per example or ``sign(g)``.
        SMART overrides this with its per-token L-inf normalisation."""
        return normalize_grad(g, self.norm)

    def ascend(self, model: VLModel, batch: dict, deltas: dict, grads: dict) -> dict[str, torch.Tensor]:
        """One projected ascent step on every δ: ``δ ← Π_ε(δ + η · direction(g ⊙ m) ⊙ m) ⊙ m`` (new leaf
        tensors), then kept inside a clamped site's range (:meth:`feasible`); the gradient is masked before
        it is normalised, so padding never sets the step."""
        sites = self.resolve_sites(model)
        out = {}
        for name, d in deltas.items():
            m = sites[name].mask(batch).to(d.device)
            step = self.direction(sites[name], grads[name] * m)
            new = project(d.detach() + self.step_length(name) * step * m, self.scale(name) * self.eps, self.norm) * m
            out[name] = self.feasible(sites[name], batch, new).requires_grad_(True)
        return out


def delta_gradients(loss: torch.Tensor, deltas: dict) -> dict:
    """``∇_δ loss`` for every δ, parameters untouched (``autograd.grad`` w.r.t. δ alone)."""
    return dict(zip(deltas, torch.autograd.grad(loss, list(deltas.values()))))


class Frozen:
    """A fixed model as a *runner*: the object every method's loop forwards through.

    A training step runs on a :class:`vlat.train.StepContext` (autocast, loss scaling, optimiser);
    :meth:`Adversary.attack` runs the same loop on this: the model and the task, plain forwards, no
    optimiser. Both offer ``model``, ``task``, ``scaler``, ``forward(batch)`` and ``autocast()``."""

    scaler = None

    def __init__(self, model: VLModel, task: str):
        self.model, self.task = model, task

    def forward(self, batch: dict, task: str | None = None, **kw):
        return self.model(batch, task or self.task, **kw)

    def autocast(self):
        return contextlib.nullcontext()


class SiteOutputs(dict):
    """``name -> the site's first output`` of a forward, plus ``calls[name]``: every output of that site.

    A site module can run more than once per forward (ALBEF's word embeddings embed the caption and the
    masked caption); δ is added at every call, so ``∇_δ L`` is the sum of the gradients at all of them."""

    def __init__(self):
        super().__init__()
        self.calls: dict[str, list[torch.Tensor]] = {}


def forward_capturing(runner, batch: dict, site_names):
    """A clean forward that keeps each site's output (with ``retain_grad``), so the backward the step
    needs anyway also yields ``∇_x L`` at every site, with no zero δ to add. Returns ``(out, outputs)``;
    after ``backward``, :func:`site_grads` reads the site gradients (summed over repeated calls).
    ``runner``: a :class:`vlat.train.StepContext` or a :class:`Frozen` model."""
    sites = runner.model.perturbation_sites()
    outputs, handles = SiteOutputs(), []

    def keep(name):
        def hook(module, args, output):
            if not output.requires_grad:  # an input site (pixels, region features): make it a leaf
                output = output.detach().requires_grad_(True)
            else:
                output.retain_grad()
            outputs.setdefault(name, output)
            outputs.calls.setdefault(name, []).append(output)
            return output
        return hook

    try:
        for name in site_names:
            handles.append(sites[name].module.register_forward_hook(keep(name)))
        out = runner.forward(batch)
    finally:
        for h in handles:
            h.remove()
    return out, outputs


def site_norms(model: VLModel, batch: dict, task: str, sites=None, norm: str = "l2") -> dict[str, float]:
    """Mean per-example ``||x||`` of each site's clean input over a batch (masked entries only).

    The scale an ε means something against: a word-embedding site of a freshly initialised BERT has a
    per-caption L2 norm near ``0.02 sqrt(L D)`` (under 1), while raw region features are in the tens,
    so one absolute ε is a different threat at every site and changes as training grows the
    embeddings. ``eps = frac * site_norms(model, batch, task)[site]`` states a radius as a fraction of the input.
    """
    model_sites = model.perturbation_sites()
    names = tuple(model_sites) if sites is None else tuple(sites)
    _, outputs = forward_capturing(Frozen(model, task), batch, names)
    return {n: float(per_example_norm(outputs[n].detach().float() * model_sites[n].mask(batch).to(outputs[n].device), norm).mean())
            for n in names}


def site_grads(outputs: SiteOutputs) -> dict[str, torch.Tensor]:
    """``∇`` at each site :func:`forward_capturing` kept, summed over the site's calls in the forward
    (zeros where the graph did not reach, e.g. a frozen input)."""
    return {k: sum((o.grad if o.grad is not None else torch.zeros_like(o)).float() for o in outputs.calls[k])
            for k in outputs}


def forward_with(runner, batch: dict, deltas: dict | None):
    """Run the runner's task with δ attached (a :class:`vlat.train.StepContext` forwards under its
    autocast; a :class:`Frozen` model plainly)."""
    with perturbed(runner.model, deltas, batch):
        return runner.forward(batch)
