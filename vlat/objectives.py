"""Losses and the masking that feeds them.

KL terms (SMART, VILLA), and ALBEF's losses (docs/methods.md#albef): image-text contrastive loss against the
batch and a queue with momentum-distilled soft targets, hard-negative sampling for ITM, MLM with soft
targets, and the EMA that drives the momentum encoders. MLM masking lives with the tokenizer in
:mod:`vlat.world.masking` (the collate function applies it, so every inner step of a method sees the
same masked batch) and is re-exported here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F

from vlat.world.masking import mask_tokens


def kl_logits(p_logits: torch.Tensor, q_logits: torch.Tensor, reduce: bool = True) -> torch.Tensor:
    """``KL(p ‖ q)`` between the softmax distributions of two logit tensors ``[..., C]``, averaged over
    all leading positions (batch, and tokens for MLM); ``reduce=False``: one value per position, shaped
    like the leading axes. Computed in fp32 with log-softmax for stability."""
    p_log = F.log_softmax(p_logits.float(), dim=-1)
    q_log = F.log_softmax(q_logits.float(), dim=-1)
    kl = (p_log.exp() * (p_log - q_log)).sum(-1)
    return kl.mean() if reduce else kl


def symmetric_kl(p_logits: torch.Tensor, q_logits: torch.Tensor, reduce: bool = True) -> torch.Tensor:
    """``KL(p ‖ q) + KL(q ‖ p)``: zero iff the distributions agree, symmetric in its arguments."""
    return kl_logits(p_logits, q_logits, reduce) + kl_logits(q_logits, p_logits, reduce)


def stable_kl(logits: torch.Tensor, target: torch.Tensor, guard: float = 1e-6, reduce: bool = True) -> torch.Tensor:
    """SMART's ascent objective as the authors' code computes it (mt-dnn ``loss.py``, ``stable_kl``):
    ``2 Σ_c p_c (r(p_c) - r(q_c))`` with ``p = softmax(logits)``, ``q = softmax(target)`` and the
    log-odds ``r(p) = -log(1 / (p + g) - 1 + g)`` held constant (detached), so the gradient flows through
    ``p`` alone. Close to ``2 KL(p ‖ q)``'s gradient, with log-odds in place of log-probabilities.
    Rows are the leading positions; ``reduce``: divided by their number (the authors' ascent uses the
    sum, ``reduce=False``)."""
    p = F.softmax(logits.float().reshape(-1, logits.shape[-1]), dim=-1)
    q = F.softmax(target.float().reshape(-1, target.shape[-1]), dim=-1)

    def log_odds(x):
        return -(1.0 / (x.detach() + guard) - 1 + guard).log()

    total = (p * (log_odds(p) - log_odds(q)) * 2).sum()
    return total / p.shape[0] if reduce else total


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``-Σ_c q_c log softmax(logits)_c`` per row, averaged over rows; ``targets`` rows are
    distributions ``[N, C]`` (one-hot rows give ordinary cross-entropy)."""
    return -(targets * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


def distilled_targets(onehot: torch.Tensor, teacher_logits: torch.Tensor | None, alpha: float | torch.Tensor) -> torch.Tensor:
    """ALBEF's momentum-distillation targets ``α · softmax(teacher) + (1 - α) · onehot``.

    With ``α = 0`` (or no teacher) they are the one-hot labels, and the loss is plain InfoNCE / MLM."""
    if teacher_logits is None:
        return onehot
    return alpha * F.softmax(teacher_logits.float(), dim=-1) + (1 - alpha) * onehot


def itc_loss(image: torch.Tensor, text: torch.Tensor, image_all: torch.Tensor, text_all: torch.Tensor,
             temp: torch.Tensor | float, alpha: float | torch.Tensor = 0.0, image_m: torch.Tensor | None = None,
             text_m: torch.Tensor | None = None, positives: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ALBEF's image-text contrastive loss against the batch **and a queue**.

    Args:
        image, text: L2-normalised features of this batch from the trained encoders, ``[B, P]``.
        image_all, text_all: the momentum encoders' features of this batch followed by the queue,
            ``[B + Q, P]`` (row ``i < B`` is the positive of row ``i`` of the batch).
        temp: the temperature (ALBEF: learnable, clamped to [0.001, 0.5]).
        alpha: weight of the momentum teacher's soft targets; ``image_m``/``text_m`` (``[B, P]``, the
            momentum features of the batch) are needed when ``alpha > 0``.
        positives: optional ``[B, B + Q]`` bool, every column that is a positive of row ``i`` (it must
            include column ``i``). The hard targets then spread evenly over them, as ALBEF's retrieval
            fine-tuning does with its ``idx`` queue; ``None``: column ``i`` only (pre-training).

    Returns ``(loss, sim_i2t, sim_t2i)``; the similarities ``[B, B + Q]`` (already divided by ``temp``)
    feed hard-negative sampling. ``loss = (CE(sim_i2t, q_i2t) + CE(sim_t2i, q_t2i)) / 2``.
    """
    B = image.shape[0]
    sim_i2t = image.float() @ text_all.float().t() / temp                 # [B, B + Q]
    sim_t2i = text.float() @ image_all.float().t() / temp                 # [B, B + Q]
    if positives is None:
        onehot = torch.zeros_like(sim_i2t)
        onehot[:, :B] = torch.eye(B, device=sim_i2t.device)
    else:
        onehot = positives.float() / positives.float().sum(1, keepdim=True)
    with torch.no_grad():
        teach_i2t = image_m.float() @ text_all.float().t() / temp if image_m is not None else None
        teach_t2i = text_m.float() @ image_all.float().t() / temp if text_m is not None else None
        q_i2t = distilled_targets(onehot, teach_i2t, alpha)
        q_t2i = distilled_targets(onehot, teach_t2i, alpha)
    loss = 0.5 * (soft_cross_entropy(sim_i2t, q_i2t) + soft_cross_entropy(sim_t2i, q_t2i))
    return loss, sim_i2t, sim_t2i


def hard_negatives(sim: torch.Tensor, generator: torch.Generator | None = None,
                   exclude: torch.Tensor | None = None) -> torch.Tensor:
    """For each row ``i`` of an in-batch similarity ``[B, B]``, draw one column ``j != i`` with
    probability ``softmax(sim_i)_j`` renormalised over ``j != i`` (ALBEF's hard negatives; the positive
    is excluded exactly, not by a small weight). ``exclude`` ``[B, B]`` bool removes more columns (pairs
    that are positives too, e.g. the same caption); a row with nothing left falls back to ``j != i``.
    Returns indices ``[B]``. Needs ``B >= 2``."""
    B = sim.shape[0]
    if B < 2:
        raise ValueError("hard negatives need at least 2 pairs in a batch")
    with torch.no_grad():
        eye = torch.eye(B, dtype=torch.bool, device=sim.device)
        mask = eye
        if exclude is not None:
            mask = eye | exclude
            mask = torch.where(mask.all(1, keepdim=True), eye, mask)
        # a non-finite similarity (fp16 overflow under an attack: the loss is then non-finite and the update
        # skipped) must still give valid draws; CUDA's multinomial asserts on NaN and kills the context
        finite = torch.nan_to_num(sim.float(), nan=0.0, posinf=1e4, neginf=-1e4)
        weights = F.softmax(finite.masked_fill(mask, float("-inf")), dim=1)
        return torch.multinomial(weights, 1, generator=generator).squeeze(1)


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None = None,
             alpha: float | torch.Tensor = 0.0) -> torch.Tensor:
    """Masked-token cross-entropy over positions with ``labels != -100``; with a teacher,
    ``(1 - α) · CE(y) + α · CE(softmax(teacher))`` (ALBEF's distilled MLM)."""
    chosen = labels != -100                                               # [B, L]
    pred = logits[chosen].float()                                         # [M, V]
    if pred.shape[0] == 0:
        return logits.sum() * 0.0
    hard = F.cross_entropy(pred, labels[chosen])
    if teacher_logits is None:
        return hard
    soft = soft_cross_entropy(pred, F.softmax(teacher_logits[chosen].float(), dim=-1))
    return (1 - alpha) * hard + alpha * soft


def mpm_targets(groups: torch.Tensor, eps: float = 0.02) -> torch.Tensor:
    """MPM-NCE's soft targets ``[B, B]``: ``(1 - ε)/|P(i)|`` on row ``i``'s positives (same group, itself
    included), ``ε/(B - |P(i)|)`` on the rest; a row with no negatives keeps all its mass on the positives."""
    pos = groups[:, None] == groups[None, :]
    n_pos = pos.sum(1, keepdim=True).float()
    n_neg = (~pos).sum(1, keepdim=True).float()
    smooth = torch.where(n_neg > 0, torch.full_like(n_pos, eps), torch.zeros_like(n_pos))
    return torch.where(pos, (1 - smooth) / n_pos, smooth / n_neg.clamp_min(1))


def mpm_nce(image: torch.Tensor, text: torch.Tensor, groups: torch.Tensor, temp: float = 0.01, eps: float = 0.02,
            margin: float = 0.05) -> torch.Tensor:
    """R-Adapter's multi-positive margin NCE (docs/methods.md#r-adapter) over a batch of ``B`` image-text pairs.

    Args:
        image, text: L2-normalised features ``[B, P]`` (row ``i`` of each belongs to pair ``i``).
        groups: ``[B]`` ints; pairs with the same value are positives of each other (same class or
            same caption group), each row its own positive.
        temp: the fixed temperature τ (reference 0.01).
        eps: label smoothing: the positives share ``1 - ε``, the negatives ``ε`` (reference 0.02).
        margin: δ added to the negatives' cosine (reference 0.05), so positives must win by a margin.

    ``q_ij = (1 - ε)/|P(i)|`` for ``j ∈ P(i)``, ``ε/(B - |P(i)|)`` otherwise; logits
    ``(cos_ij + δ·[j ∉ P(i)]) / τ``; the loss is the mean of the image→text and text→image soft
    cross-entropies. With one positive per row, ``ε = 0`` and ``δ = 0`` it is symmetric InfoNCE.
    A row whose group covers the whole batch has no negatives; its ``ε`` mass then stays on the positives.
    """
    pos = groups[:, None] == groups[None, :]                                  # [B, B], diagonal set
    q = mpm_targets(groups, eps)
    cos = image.float() @ text.float().t()
    logits = (cos + margin * (~pos).float()) / temp
    logits_t = (cos.t() + margin * (~pos).float()) / temp                    # pos is symmetric
    return 0.5 * (soft_cross_entropy(logits, q) + soft_cross_entropy(logits_t, q))


@dataclass(frozen=True)
class MPMNCE:
    """MPM-NCE as a *training objective* (:attr:`vlat.train.TrainConfig.objective` = ``"mpm_nce"``):
    a contrastive model trains with :func:`mpm_nce` instead of its own task loss. The model says which
    pairs are positives (identical captions for ``itc``, one class for ``classify``); these are the
    loss's settings (R-Adapter's reference values)."""

    temp: float = 0.01          # fixed temperature τ
    eps: float = 0.02           # label smoothing ε
    margin: float = 0.05        # margin δ on the negatives

    def __call__(self, image: torch.Tensor, text: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        return mpm_nce(image, text, groups, self.temp, self.eps, self.margin)


OBJECTIVES = {"task": None, "mpm_nce": MPMNCE}     # "task": the model's own loss for the task


def make_objective(name: str, **options):
    """The training objective named by :attr:`vlat.train.TrainConfig.objective` (``None``: the task's own loss)."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}")
    cls = OBJECTIVES[name]
    if cls is None:
        if options:
            raise ValueError(f"the task objective takes no options; got {sorted(options)}")
        return None
    unknown = set(options) - set(cls.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)} for {name}; it takes {', '.join(cls.__dataclass_fields__)}")
    return cls(**options)


@torch.no_grad()
def ema_(target: Iterable[torch.Tensor], source: Iterable[torch.Tensor], momentum: float) -> None:
    """``θ̃ ← m · θ̃ + (1 - m) · θ`` in place, for matching parameter lists (ALBEF's momentum encoders)."""
    target, source = list(target), list(source)
    torch._foreach_mul_(target, momentum)
    torch._foreach_add_(target, source, alpha=1.0 - momentum)


__all__ = ["MPMNCE", "OBJECTIVES", "distilled_targets", "make_objective", "ema_", "hard_negatives", "itc_loss", "kl_logits", "mask_tokens", "mlm_loss",
           "mpm_nce", "mpm_targets", "soft_cross_entropy", "symmetric_kl"]
