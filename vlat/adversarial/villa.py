"""VILLA — Gan, Chen, Li, Zhu, Cheng & Liu, *Large-Scale Adversarial Training for Vision-and-Language
Representation Learning*, NeurIPS 2020.

Adversarial training in the *embedding* space of both modalities, with FreeLB's "free" inner loop
(METHODS.md §8):

    min_θ  E[ L_std(θ) + R_at(θ) + w · R_kl(θ) ]
    R_at = max_{‖δ_img‖≤ε} L(f(x_img + δ_img, x_txt), y) + max_{‖δ_txt‖≤ε} L(f(x_img, x_txt + δ_txt), y)
    R_kl = max_δ  KL(f(x+δ) ‖ f(x)) + KL(f(x) ‖ f(x+δ))

One training step, as in the authors' code:

    clean = f(x)                                   once per batch, WITH gradient (unlike SMART's detached side)
    δ₀ = 0  (init_mag > 0: FreeLB's uniform start)
    for t = 1..K:  L_t = L(f(x + δ_{t-1}), y) + w · (KL(adv ‖ clean) + KL(clean ‖ adv))
                   θ-grads += ∇_θ L_t / K              (every step's gradient is kept: "free")
                   δ_t = Π_ε(δ_{t-1} + η · g / ‖g‖)     (not after the last step)
    one optimiser step

No separate clean loss is added: step 1 runs at δ = 0, where the KL term is exactly zero, and plays
the part of ``L_std``. The clean logits' graph is kept across the K backwards (``retain_graph``), so
the KL pulls the clean prediction towards the adversarial one as well as the reverse.

**Modality** (``modality=``):

- ``"text"`` / ``"image"``: one δ, on the word embeddings or on the image tokens (the other modality
  is never touched — tested);
- ``"both"``: one forward per step with both δ attached (a joint perturbation);
- ``"alternating"``: the paper's ``R_at`` written out: per step, one forward with the text δ only and
  one with the image δ only, their losses summed ("perturb one modality at a time"); twice the passes.

``text_site`` / ``image_site`` name the sites (``image_site="pixels"`` perturbs pixels instead of the
patch/region embeddings). Same dropout masks in every forward of a step (``SameDropout``), as FreeLB.

**Which logits the KL compares.** The task output's ``logits``: class scores for ``itm``/``qa``/``tf``;
for ``mlm``, the masked positions only (``labels != -100``); for the ``pretrain`` tasks, the ITM head
(single-stream: its in-batch pairs; ALBEF: the positives and the hard negatives drawn in that
forward, which δ can change — a small deviation from a fixed-pair KL).

**Mixed precision.** δ is fp32; under fp16 the δ-gradients are divided by the loss scale before they
are normalised, and a non-finite δ-gradient ends the ascent for that batch (the scaler then skips the
update, as for any overflow).

Reference settings: VQA (UNITER-base, text) ``η = 1e-3, K = 3, max_norm = 0 (no projection), w = 1.5``;
VCR (image + text) ``η = 0.01``. Defaults here follow the VQA config. Cost: ``K + 1`` forwards and
``K`` backwards per batch (``2K + 1`` forwards with ``"alternating"``); with ``kl_weight = 0`` the
clean forward is skipped and VILLA *is* FreeLB (tested step for step).

>>> step = VILLA(modality="both", kl_weight=1.5, steps=3, step_size=1e-3)     # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlat.adversarial.base import check_number, forward_with
from vlat.adversarial.freelb import FreeLB
from vlat.objectives import symmetric_kl

MODALITIES = ("text", "image", "both", "alternating")


def task_kl(adv, clean_logits: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """``KL(adv ‖ clean) + KL(clean ‖ adv)`` of two task outputs' logits, gradients on both sides.

    Token logits ``[B, L, V]`` (MLM) are compared at the positions that carry a label only."""
    adv_logits = adv.logits if hasattr(adv, "logits") else adv
    if adv_logits.dim() == 3 and labels is not None and labels.dim() == 2:
        keep = labels != -100
        adv_logits, clean_logits = adv_logits[keep], clean_logits[keep]
    if adv_logits.numel() == 0:
        return adv_logits.float().sum()
    return symmetric_kl(adv_logits, clean_logits)


@dataclass
class VILLA(FreeLB):
    sites: tuple[str, ...] = ()    # derived from modality (text_site, image_site); leave empty
    norm: str = "l2"
    eps: float = 0.0               # max_norm; 0 = no projection (the reference's VQA config)
    step_size: float = 1e-3        # adv_lr η (VQA text); VCR used 0.01 for image + text
    steps: int = 3                 # K
    init_mag: float = 0.0          # the reference starts δ at zero
    modality: str = "text"         # text, image, both or alternating
    kl_weight: float = 1.5         # w, the weight of the fine-grained symmetric-KL term (0: FreeLB)
    text_site: str = "text"
    image_site: str = "image"

    def __post_init__(self):
        if self.modality not in MODALITIES:
            raise ValueError(f"unknown modality {self.modality!r}; choose one of {', '.join(MODALITIES)}")
        derived = {"text": (self.text_site,), "image": (self.image_site,)}.get(self.modality,
                                                                                (self.text_site, self.image_site))
        given = (self.sites,) if isinstance(self.sites, str) else tuple(self.sites)
        if given and set(given) != set(derived):
            raise ValueError(f"VILLA chooses its sites by modality ({self.modality!r} perturbs {', '.join(derived)}); "
                             f"set modality (text, image, both, alternating) and text_site / image_site instead of sites")
        self.sites = derived
        super().__post_init__()
        check_number("kl_weight", self.kl_weight, 0.0)

    @property
    def groups(self) -> list[tuple[str, ...]]:
        """The site groups perturbed in separate forwards within one ascent step."""
        return [(s,) for s in self.sites] if self.modality == "alternating" else [self.sites]

    # -- on a fixed model (explorer, robust accuracy): the same objective, both sites at once -------------
    @property
    def needs_clean_logits(self) -> bool:
        return self.kl_weight > 0

    def attack_objective(self, model, batch, task, deltas, clean_logits) -> torch.Tensor:
        out = forward_with(model, batch, deltas, task)
        if clean_logits is None:
            return out.loss
        return out.loss + self.kl_weight * task_kl(out, clean_logits, out.labels)

    # -- the training step: FreeLB's loop (FreeLB.accumulate) with these three pieces -----------------------
    def clean_logits(self, ctx, batch, same):
        """The clean prediction, once per batch and **with** gradient (as the reference); none when w = 0."""
        if self.kl_weight == 0:
            return None
        same.replay()
        return ctx.forward(batch).logits

    def step_loss(self, ctx, batch, deltas, same, clean=None):
        """Adversarial loss (one forward per site group) + w · symmetric KL to the clean prediction."""
        loss, kl = 0.0, 0.0
        for group in self.groups:
            same.replay()
            out = forward_with(ctx, batch, {k: deltas[k] for k in group})
            loss = loss + out.loss
            if clean is not None:
                kl = kl + task_kl(out, clean, out.labels)
        if clean is None:
            return loss, {}
        return loss + self.kl_weight * kl, {"kl": kl.detach()}

    def delta_grads(self, ctx, deltas):
        """δ-gradients at true scale (fp16: divided by the loss scale); ``None`` if any is non-finite."""
        grads = {k: d.grad.float() for k, d in deltas.items()}
        if ctx.scaler is not None:
            scale = ctx.scaler.get_scale()
            grads = {k: g / scale for k, g in grads.items()}
        if not all(bool(torch.isfinite(g).all()) for g in grads.values()):
            return None                                               # overflow: the scaler skips this update
        return grads
