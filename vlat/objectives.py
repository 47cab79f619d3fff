"""Losses and the masking that feeds them.

This module grows with the methods (ITC, ITM with hard negatives, distillation, MPM-NCE). MLM
masking lives with the tokenizer in :mod:`vlat.world.masking` (the collate function applies it, so
every inner step of a method sees the same masked batch) and is re-exported here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlat.world.masking import mask_tokens


def kl_logits(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """``KL(p ‖ q)`` between the softmax distributions of two logit tensors ``[..., C]``, averaged over
    all leading positions (batch, and tokens for MLM). Computed in fp32 with log-softmax for stability."""
    p_log = F.log_softmax(p_logits.float().flatten(0, -2), dim=-1)
    q_log = F.log_softmax(q_logits.float().flatten(0, -2), dim=-1)
    return (p_log.exp() * (p_log - q_log)).sum(-1).mean()


def symmetric_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """``KL(p ‖ q) + KL(q ‖ p)``: zero iff the distributions agree, symmetric in its arguments."""
    return kl_logits(p_logits, q_logits) + kl_logits(q_logits, p_logits)


__all__ = ["kl_logits", "mask_tokens", "symmetric_kl"]
