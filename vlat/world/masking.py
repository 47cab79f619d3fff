"""BERT-style token masking for the masked-language-model task (applied when a batch is collated)."""

from __future__ import annotations

import torch


def mask_tokens(input_ids: torch.Tensor, *, pad_id: int, cls_id: int, mask_id: int, vocab_size: int,
                prob: float = 0.15, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: choose ``prob`` of the tokens (never PAD or CLS); of those 80 % become [MASK],
    10 % a random token, 10 % stay. Returns ``(masked_ids, labels)`` with ``labels = -100`` where not chosen.

    Shapes: ``input_ids`` ``[B, L]`` -> both outputs ``[B, L]``.
    """
    ids = input_ids.clone()
    labels = input_ids.clone()
    device = input_ids.device
    u = torch.rand(ids.shape, generator=generator).to(device)
    chosen = (u < prob) & (input_ids != pad_id) & (input_ids != cls_id)          # [B, L]
    labels[~chosen] = -100
    v = torch.rand(ids.shape, generator=generator).to(device)
    ids[chosen & (v < 0.8)] = mask_id                                               # 80 %: [MASK]
    rand = chosen & (v >= 0.8) & (v < 0.9)                                          # 10 %: random token
    ids[rand] = torch.randint(vocab_size, ids.shape, generator=generator).to(device)[rand]
    return ids, labels                                                              # 10 %: unchanged
