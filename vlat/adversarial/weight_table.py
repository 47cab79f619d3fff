"""The weight-table FGM/PGD: the widespread NLP snippet, kept as a documented contrast.

The snippet perturbs the **embedding matrix** instead of the embedding output: back up ``E``, add
``r = ε · ∇_E L / ||∇_E L||`` to it, run the adversarial pass, restore ``E``. Differences from vlat's
site-based methods (docs/methods.md#where-perturbations-live):

- every occurrence of a token in the batch moves the same way (δ is per vocabulary row, not per
  position), and rows of tokens absent from the batch get no gradient;
- the norm is one norm over the whole matrix gradient, not per example, so one long or confusing
  example sets the step for all;
- padding rows move too whenever ``[PAD]`` has a gradient (its embedding is used by masked positions).

Here it works on any model whose ``text`` site is an ``nn.Embedding``. Same pass counts as FGM (2) and
PGD-K (K + 1); ``benchmarks/methods_cost.py`` times it against ours.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _embedding(model) -> torch.nn.Embedding:
    module = model.perturbation_sites()["text"].module
    if not isinstance(module, torch.nn.Embedding):
        raise ValueError("the weight-table variant needs the text site to be an nn.Embedding")
    return module


@dataclass
class WeightTableFGM:
    eps: float = 1.0

    def __call__(self, ctx, batch) -> torch.Tensor:
        emb = _embedding(ctx.model).weight
        clean = ctx.forward(batch)
        ctx.backward(clean.loss)                                  # fills emb.grad too
        backup = emb.data.clone()
        g = emb.grad
        norm = g.norm()
        if torch.isfinite(norm) and norm > 0:
            emb.data.add_(self.eps * g / norm)
        adv = ctx.forward(batch)
        ctx.backward(adv.loss)
        emb.data.copy_(backup)                                    # restore before the update
        ctx.optimizer_step(clean.loss + adv.loss)
        return clean.loss.detach()


@dataclass
class WeightTablePGD:
    eps: float = 1.0
    step_size: float = 0.3
    steps: int = 3

    def __call__(self, ctx, batch) -> torch.Tensor:
        model = ctx.model
        emb = _embedding(model).weight
        params = [p for p in model.parameters() if p.requires_grad]
        clean = ctx.forward(batch)
        ctx.backward(clean.loss)
        backup_grads = [None if p.grad is None else p.grad.clone() for p in params]   # back up clean grads
        backup = emb.data.clone()
        for t in range(self.steps):
            g = emb.grad
            norm = g.norm()
            if torch.isfinite(norm) and norm > 0:
                emb.data.add_(self.step_size * g / norm)
                r = emb.data - backup
                if r.norm() > self.eps:
                    emb.data.copy_(backup + self.eps * r / r.norm())
            if t < self.steps - 1:
                model.zero_grad(set_to_none=False)
            else:                                                 # restore the clean grads, add the last
                for p, b in zip(params, backup_grads):
                    p.grad = b
            adv = ctx.forward(batch)
            ctx.backward(adv.loss)
        emb.data.copy_(backup)
        ctx.optimizer_step(clean.loss + adv.loss)
        return clean.loss.detach()
