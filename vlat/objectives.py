"""Losses and the masking that feeds them.

This module grows with the methods (ITC, ITM with hard negatives, distillation, symmetric KL,
MPM-NCE). MLM masking lives with the tokenizer in :mod:`vlat.world.masking` (the collate function
applies it, so every inner step of a method sees the same masked batch) and is re-exported here.
"""

from __future__ import annotations

from vlat.world.masking import mask_tokens

__all__ = ["mask_tokens"]
