"""VILLA — Gan, Chen, Li, Zhu, Cheng & Liu, *Large-Scale Adversarial Training for Vision-and-Language
Representation Learning*, NeurIPS 2020. https://arxiv.org/abs/2006.06195 · method sheet:
docs/methods.md#villa

Adversarial training in the *embedding* space of both modalities, with FreeLB's "free" inner loop:

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
  one with the image δ only, their losses averaged ("perturb one modality at a time"; the authors'
  code divides their sum by 2K); twice the passes.

``text_site`` / ``image_site`` name the sites (``image_site="pixels"`` perturbs pixels instead of the
patch/region embeddings).

**The authors' loop** (``zhegan27/VILLA``, ``train_vqa_adv.py``, commit 8aa6ac2) is what the training
step computes; ``tests/test_fidelity.py`` re-computes it and compares δ and every gradient. One deviation,
with the option that removes it: vlat uses the same dropout masks in every forward of a step
(``SameDropout``, as FreeLB's code), so that step 1 is exactly the clean loss and the KL measures δ, not
dropout noise; the authors' VILLA draws fresh masks in each forward (``same_dropout=False``).

**Which logits the KL compares.** The task output's ``logits``: class scores for ``itm``/``qa``/``tf``;
for ``mlm``, the masked positions only (``labels != -100``); for the ``pretrain`` tasks, the ITM head
(single-stream: its in-batch pairs; ALBEF: the positives and the hard negatives drawn in that
forward, which δ can change — a small deviation from a fixed-pair KL).

**Mixed precision.** δ is fp32; under fp16 the δ-gradients are divided by the loss scale before they
are normalised, and a non-finite δ-gradient ends the ascent for that batch (the scaler then skips the
update, as for any overflow).

Reference settings: VQA (UNITER-base, text) ``η = 1e-3, K = 3, max_norm = 0 (no projection), w = 1.5``;
VCR (image + text) ``η = 0.01``. Defaults here follow the VQA config. Cost: ``K + 1`` forwards and
``K`` backwards per batch (``2K + 1`` forwards with ``"alternating"``), and each backward also runs
through the retained clean graph: about ``K + (1 + 2K)/3`` clean passes for one modality (measured
4.9 for K = 3 on the CPU, against 5.3). With ``kl_weight = 0`` the clean forward is skipped and VILLA
*is* FreeLB (tested step for step).

>>> step = VILLA(modality="both", kl_weight=1.5, steps=3, step_size=1e-3)     # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlat.adversarial.base import check_number, forward_with
from vlat.adversarial.freelb import FreeLB
from vlat.adversarial.registry import INIT_MAG, STEPS, Option, Paper, register
from vlat.objectives import symmetric_kl

MODALITIES = ("text", "image", "both", "alternating")


def task_kl(adv_logits: torch.Tensor, clean_logits: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """``KL(adv ‖ clean) + KL(clean ‖ adv)`` of attacked and clean task logits, gradients on both sides.

    Token logits ``[B, L, V]`` (MLM) are compared at the positions that carry a label only."""
    if adv_logits.dim() == 3 and labels is not None and labels.dim() == 2:
        keep = labels != -100
        adv_logits, clean_logits = adv_logits[keep], clean_logits[keep]
    if adv_logits.numel() == 0:
        return adv_logits.float().sum()
    return symmetric_kl(adv_logits, clean_logits)


@register(
    name="villa", label="VILLA",
    paper=Paper("Large-Scale Adversarial Training for Vision-and-Language Representation Learning",
                "Gan, Chen, Li, Zhu, Cheng & Liu", "NeurIPS", 2020, "https://arxiv.org/abs/2006.06195"),
    summary="FreeLB's free loop on image and text embeddings plus a symmetric-KL smoothness term",
    reference={"VQA (text)": "adv_lr 1e-3, K 3, max_norm 0, w 1.5", "VCR (image + text)": "adv_lr 0.01",
               "δ₀": "zero; clean logits kept with gradient"},
    options=(STEPS,
             INIT_MAG,
             Option("modality", "VILLA: which embeddings to perturb (alternating: text and image in separate "
                    "forwards)", str, choices=MODALITIES),
             Option("kl_weight", "VILLA: weight w of the symmetric-KL term (0 = FreeLB)", float, 0.0)),
    # the explorer's VILLA: FreeLB's ascent from δ = 0 on the task loss + 1.5 x the symmetric KL to the clean prediction
    preset=lambda sites, eps, steps, eta: VILLA(
        modality="both" if len(sites) > 1 else "text" if sites == ("text",) else "image",
        image_site=sites[-1] if sites[-1] != "text" else "image", eps=eps, step_size=eta, steps=steps),
    sites_hint="--modality text|image|both|alternating",
    # K passes per site group; with the KL, one clean forward (~1/3 pass) whose graph each of the K backwards
    # goes through again (~2/3 pass each: the retained clean side is what makes the KL two-sided)
    passes=lambda m, layer_one: m.steps * len(m.groups) + (m.kl_weight > 0) * (1 + 2 * m.steps) / 3)
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
        self._kl = None

    def resolve_sites(self, model) -> dict:
        """The sites, checked against their modality: ``text_site`` must be a text site of the model and
        ``image_site`` an image one (the site's :attr:`~vlat.models.base.PerturbationSite.modality`)."""
        sites = super().resolve_sites(model)
        for name, want in ((self.text_site, "text"), (self.image_site, "image")):
            if name in sites and sites[name].modality != want:
                raise ValueError(f"VILLA's {want}_site {name!r} is a {sites[name].modality} site of this model; "
                                 f"pick a {want} site")
        return sites

    @property
    def groups(self) -> list[tuple[str, ...]]:
        """The site groups perturbed in separate forwards within one ascent step."""
        return [(s,) for s in self.sites] if self.modality == "alternating" else [self.sites]

    @property
    def needs_clean_logits(self) -> bool:
        return self.kl_weight > 0

    def objective(self, runner, batch, deltas, clean=None) -> torch.Tensor:
        """Adversarial loss (one forward per site group) + w · symmetric KL to the clean prediction; the
        same objective in training (clean logits with gradient) and in ``attack()`` (without)."""
        loss, kl, n = 0.0, 0.0, len(self.groups)
        for group in self.groups:                       # alternating: the mean of the two forwards, as the
            out = forward_with(runner, batch, {k: deltas[k] for k in group})   # authors divide by 2K
            loss = loss + out.loss / n
            if clean is not None:
                kl = kl + task_kl(out.logits, clean, out.labels) / n
        if clean is None:
            self._kl = None
            return loss
        self._kl = kl.detach()
        return loss + self.kl_weight * kl

    def record(self, step, loss, deltas) -> None:
        super().record(step, loss, deltas)
        if self.trace and self._kl is not None:
            self.last_trace[-1]["kl"] = float(self._kl)

    # -- the training step: FreeLB's loop (FreeLB.accumulate) with these two pieces ------------------------
    def clean_logits(self, runner, batch):
        """The clean prediction, once per batch and **with** gradient (as the reference); none when w = 0."""
        if self.kl_weight == 0:
            return None
        return runner.forward(batch).logits

    def delta_grads(self, ctx, deltas):
        """δ-gradients at true scale (fp16: divided by the loss scale); ``None`` if any is non-finite."""
        grads = {k: d.grad.float() for k, d in deltas.items()}
        if ctx.scaler is not None:
            scale = ctx.scaler.get_scale()
            grads = {k: g / scale for k, g in grads.items()}
        if not all(bool(torch.isfinite(g).all()) for g in grads.values()):
            return None                                               # overflow: the scaler skips this update
        return grads
