"""R-Adapter — Kim et al., *Efficient and Versatile Robust Fine-Tuning of Zero-shot Models*, ECCV 2024.

A linear adapter after a linear layer, ``y = W x + b``,  ``z = y + s · W_adp y`` (docs/methods.md#r-adapter):

- no bias and no non-linearity, so it can be **merged** into the layer it follows:
  ``z = (I + s W_adp)(W x + b)``, i.e. ``W_rep = (I + s W_adp) W`` and ``b_rep = (I + s W_adp) b``
  (PyTorch's ``nn.Linear`` stores ``W`` as ``[out, in]`` and computes ``x Wᵀ``, so the product is
  ``(I + s W_adp) @ W`` on the stored matrices) — zero extra cost at inference;
- ``W_adp`` full-rank ``d × d`` or low-rank ``B A`` (rank ``r``), zero-initialised (so the adapted model
  starts as the zero-shot model), learnable scale ``s`` starting at 0.1;
- **adapter dropping**: in training, each sample's adapter branch is switched off with probability
  ``p`` (a Bernoulli(1 - p) gate per sample, as the paper describes; the reference code gates per
  token position because its tensors are sequence-first) and a kept branch is divided by ``1 - p``
  (``rescale``, on by default: the reference's timm ``DropPath(scale_by_keep=True)``, so the branch's
  expected value in training is the branch at inference); never in eval mode;
- **temporal ensemble**: an EMA of the adapter (``W̃ ← m W̃ + (1 - m) W``, ``s̃`` likewise,
  ``m = 0.999``), used at inference (``use_ema``);
- **weight-space ensemble by rescaling**: ``W_ens = (I + α s̃ W̃_adp) W``; ``α = 0`` is the zero-shot
  layer, ``α = 1`` the fine-tuned one (WiSE-FT without a second model). The reference evaluates at
  ``α = 0.5`` (its ``eval_scale``; 0.8 for retrieval): set it with :func:`set_alpha`.

``α`` and ``use_ema`` are inference settings: in training mode the branch is always the live ``s W``,
as in the reference (``StochasticAdapter.forward`` scales by ``eval_scale`` and reads the EMA cache only
when not training). Deviations from the authors' code (``tjddus9597/R-Adapter-ECCV2024``), on purpose:
dropping gates per sample as the paper says (``gate="position"`` gives the reference's per-position
gate); in low rank the EMA averages the product ``B A`` and ``A`` starts from N(0, 1/d) (the reference
averages the two factors and starts ``A`` Xavier-uniform, but builds its low-rank branch only when the
rank exceeds the width, and its merge reads the other branch: it has no low-rank path that runs end to
end to match). The EMA averages ``s`` too (``ema_scale``, the reference's). tests/test_fidelity.py checks
these against the reference.

The wrapped linear layer is frozen; only ``W_adp`` (``A``, ``B`` in low rank) and ``s`` train.
"""

from __future__ import annotations

import torch
from torch import nn

from vlat.models.base import FollowsOptimizer


class RAdapter(FollowsOptimizer):
    """``Linear`` followed by a re-parameterisable linear adapter (see the module docstring).

    Args:
        linear: the layer the adapter follows (frozen here).
        rank: ``None`` for a full-rank ``d × d`` adapter, else the rank of ``B A``.
        drop: per-sample probability of switching the adapter off in training (0: never).
        scale: initial value of the learnable scale ``s``.
        ema: EMA momentum ``m`` of the adapter weights (0 disables the temporal ensemble).
        rescale: divide a kept branch by ``1 - drop`` in training (the reference's DropPath); ``False``
            leaves it as is (vlat before 0.2: the branch then averages ``(1 - p) s W y`` in training).
        gate: ``"sample"``: one drop gate per sample (the paper); ``"position"``: one per token position,
            shared by the batch (what the reference's DropPath does on its sequence-first tensors).
        ema_scale: the temporal ensemble averages ``s`` too and reads ``s̃`` at inference (the reference
            averages every adapter parameter); ``False``: the live ``s`` with ``W̃`` (vlat before 0.2).
    """

    def __init__(self, linear: nn.Linear, rank: int | None = None, drop: float = 0.2, scale: float = 0.1,
                 ema: float = 0.999, rescale: bool = True, gate: str = "sample", ema_scale: bool = True):
        super().__init__()
        if not 0.0 <= drop < 1.0:
            raise ValueError(f"drop must lie in [0, 1), got {drop}")
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"ema must lie in [0, 1), got {ema}")
        d = linear.out_features
        if gate not in ("sample", "position"):
            raise ValueError(f"gate must be 'sample' or 'position', got {gate!r}")
        if rank is not None and not 1 <= rank <= d:
            raise ValueError(f"rank must lie in [1, {d}] (or None for full rank), got {rank}")
        self.linear = linear.requires_grad_(False)
        self.rank, self.drop, self.ema_momentum, self.rescale = rank, drop, ema, rescale
        self.gate, self.ema_scale_on = gate, ema_scale
        if rank is None:
            self.weight = nn.Parameter(torch.zeros(d, d))
        else:  # B A with B zero-initialised: the product starts at zero, A still gets gradients
            self.down = nn.Parameter(torch.randn(rank, d) / d ** 0.5)
            self.up = nn.Parameter(torch.zeros(d, rank))
        self.scale = nn.Parameter(torch.tensor(float(scale)))
        self.register_buffer("ema_weight", torch.zeros(d, d))
        self.register_buffer("ema_scale", torch.tensor(float(scale)))    # s̃, used when ema_scale is on
        self.alpha = 1.0          # the rescaling α of the weight-space ensemble (1: the fine-tuned adapter)
        self.use_ema = False      # read W̃ instead of W (inference after training with the EMA)
        self.merged = False
        self._saved = None

    def adapter_weight(self) -> torch.Tensor:
        """``W_adp`` as a ``d × d`` matrix (``B A`` in low rank)."""
        return self.weight if self.rank is None else self.up @ self.down

    def effective(self, inference: bool | None = None) -> torch.Tensor:
        """What multiplies ``y`` in the branch: ``s · W`` in training; at inference (eval mode, or
        ``inference=True``) ``α · s · W`` with ``W`` the EMA copy when ``use_ema``."""
        if not (inference if inference is not None else not self.training):
            return self.scale * self.adapter_weight()
        if not self.use_ema:
            return self.alpha * self.scale * self.adapter_weight()
        return self.alpha * (self.ema_scale if self.ema_scale_on else self.scale) * self.ema_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        if self.merged:
            return y
        branch = y @ self.effective().to(y.dtype).t()
        if self.training and self.drop > 0:   # one gate per sample, broadcast over the other axes
            keep = 1 - self.drop
            axis = 1 if self.gate == "position" and y.dim() >= 3 else 0        # [B, L, D]: L; else B
            shape = [1] * y.dim()
            shape[axis] = y.shape[axis]
            gate = torch.bernoulli(torch.full(shape, keep, device=y.device))
            branch = branch * (gate / keep if self.rescale else gate).to(y.dtype)
        return y + branch

    def after_optimizer_step(self) -> None:
        """The training loop's call after every applied update (via the model it sits in)."""
        self.update_ema()

    @torch.no_grad()
    def update_ema(self) -> None:
        """``W̃ ← m W̃ + (1 - m) W`` and ``s̃ ← m s̃ + (1 - m) s`` (call once per optimiser step)."""
        self.ema_weight.mul_(self.ema_momentum).add_(self.adapter_weight().detach(), alpha=1 - self.ema_momentum)
        self.ema_scale.mul_(self.ema_momentum).add_(self.scale.detach(), alpha=1 - self.ema_momentum)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "ema_weight" in state_dict and prefix + "ema_scale" not in state_dict:   # saved before s̃ existed
            state_dict[prefix + "ema_scale"] = state_dict[prefix + "scale"].detach().clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the linear layer: ``W ← (I + M) W``, ``b ← (I + M) b`` with
        ``M = α s W_adp`` (what :meth:`effective` gives at inference, in either mode); the branch then
        costs nothing."""
        if self.merged:
            return
        m = torch.eye(self.linear.out_features, device=self.linear.weight.device) + self.effective(True).float()
        w, b = self.linear.weight, self.linear.bias
        self._saved = (w.detach().clone(), None if b is None else b.detach().clone())
        w.copy_((m @ w.float()).to(w.dtype))
        if b is not None:
            b.copy_((m @ b.float()).to(b.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the linear layer's own weights (exactly: they were kept when merging)."""
        if not self.merged:
            return
        w, b = self._saved
        self.linear.weight.copy_(w)
        if b is not None:
            self.linear.bias.copy_(b)
        self._saved, self.merged = None, False


def clip_linear_sites(clip) -> list[tuple[nn.Module, str]]:
    """``(parent, attribute)`` of every linear layer R-Adapter follows in a ``transformers.CLIPModel``:
    the attention output projection and the FFN's second layer, in every block of both towers."""
    sites = []
    for tower in (clip.vision_model, clip.text_model):
        for layer in tower.encoder.layers:
            sites += [(layer.self_attn, "out_proj"), (layer.mlp, "fc2")]
    return sites


def add_adapters(clip, rank: int | None = None, drop: float = 0.2, scale: float = 0.1, ema: float = 0.999,
                 freeze: bool = True, **options) -> list[RAdapter]:
    """Wrap R-Adapter's layers of a ``transformers.CLIPModel`` (vlat's tiny CLIP keeps one as ``.clip``)
    in :class:`RAdapter` and, with ``freeze``, leave only the adapters trainable; ``options`` go to each
    :class:`RAdapter` (``rescale``, ``gate``, ``ema_scale``). Returns the adapters."""
    clip = getattr(clip, "clip", clip)
    if freeze:
        clip.requires_grad_(False)
    adapters = []
    for parent, name in clip_linear_sites(clip):
        layer = getattr(parent, name)
        if isinstance(layer, RAdapter):
            raise ValueError("this model already has R-Adapters")
        ad = RAdapter(layer, rank, drop, scale, ema, **options)
        ad = ad.to(layer.weight.device).train(layer.training)               # keep eval mode
        setattr(parent, name, ad)
        adapters.append(ad)
    return adapters


def adapters_of(model) -> list[RAdapter]:
    return [m for m in model.modules() if isinstance(m, RAdapter)]


def set_alpha(model, alpha: float) -> None:
    """The weight-space ensemble's ``α`` on every adapter (0: zero-shot, 1: fine-tuned)."""
    for ad in adapters_of(model):
        ad.alpha = float(alpha)


def merge_adapters(model) -> None:
    for ad in adapters_of(model):
        ad.merge()


def unmerge_adapters(model) -> None:
    for ad in adapters_of(model):
        ad.unmerge()


@torch.no_grad()
def bake_adapters(model, use_ema: bool = True, alpha: float = 1.0) -> int:
    """Fold every R-Adapter into its layer and remove the wrapper: ``model`` becomes the plain architecture
    it was before :func:`add_adapters` (the same state-dict keys, loadable anywhere, no extra cost), with
    the inference weights of the adapted model (EMA copy when ``use_ema`` and the adapter kept one,
    weight-space ensemble ``alpha``). Parameters stay frozen as they were. Returns how many were baked."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, RAdapter):
                child.use_ema = use_ema and child.ema_momentum > 0
                child.alpha = alpha
                child.merge()
                setattr(parent, name, child.linear)
                count += 1
    if not count:
        raise ValueError("this model has no R-Adapters to bake (add_adapters adds them)")
    return count


@torch.no_grad()
def wise_ft(zero_shot: nn.Module, fine_tuned: nn.Module, alpha: float) -> dict[str, torch.Tensor]:
    """WiSE-FT: the state dict ``(1 - α) θ₀ + α θ₁`` of two models with the same architecture
    (floating tensors interpolated, integer buffers taken from the fine-tuned model), on the fine-tuned
    model's device whichever device the zero-shot model is on."""
    s0, s1 = zero_shot.state_dict(), fine_tuned.state_dict()
    if s0.keys() != s1.keys():
        raise ValueError("WiSE-FT needs two models with the same parameters")
    return {k: ((1 - alpha) * s0[k].to(v.device) + alpha * v) if v.is_floating_point() else v.clone() for k, v in s1.items()}
