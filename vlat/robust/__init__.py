"""Robust fine-tuning of zero-shot models: R-Adapter (adapters with dropping, EMA, re-parameterisation and
rescaling) and WiSE-FT. The MPM-NCE loss lives in :mod:`vlat.objectives`."""

from vlat.robust.adapter import (RAdapter, adapters_of, add_adapters, bake_adapters, clip_linear_sites, merge_adapters,
                                 set_alpha, unmerge_adapters, wise_ft)

__all__ = ["RAdapter", "adapters_of", "add_adapters", "bake_adapters", "clip_linear_sites", "merge_adapters",
           "set_alpha", "unmerge_adapters", "wise_ft"]
