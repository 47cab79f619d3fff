"""The contract between models and methods.

A method (FGM, PGD, FreeLB, VILLA, ...) never knows which model it trains. It asks the model for its
**perturbation sites**, creates a δ per site with :meth:`PerturbationSite.shape`, multiplies it by
:meth:`PerturbationSite.mask` (so padding is never perturbed), and runs the task with
:func:`perturbed`, which adds δ to the site module's output through a forward hook. The task's
``loss`` and ``logits`` come back in a :class:`TaskOutput`; the gradient w.r.t. δ is then ordinary
autograd. Hooks work on third-party Hugging Face modules too, which is why sites are modules.

Sites (docs/methods.md#where-perturbations-live):

- ``text``: output of the word (token) embedding, before position embeddings, ``[B, L, D]``;
- ``image``: region/patch features before the image projection (single-stream), or the ViT patch
  embedding output (CLIP) ``[B, D, h, w]``;
- ``pixels``: pixel values in [0, 1] before normalisation, ``[B, 3, H, W]``; ``x + δ`` is clamped to [0, 1].
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn


@dataclass
class TaskOutput:
    """What a model returns for a batch and a task.

    ``logits`` ``[B, C]`` (or ``[B, L, V]`` for MLM); ``loss`` a scalar, averaged over the batch;
    ``labels`` the targets the loss used; ``losses`` each example's loss ``[B]`` where the loss splits
    into examples (:func:`per_example_ce`). ``attentions`` (when requested with ``output_attentions=True``,
    ``None`` otherwise), the same format for every model: a dict from each attention stream to a tuple,
    one ``[B', heads, queries, keys]`` tensor of attention probabilities per layer (rows sum to 1):
    ``"joint"`` (a single-stream encoder over words and regions), ``"image"`` and ``"text"`` (the
    towers of a dual encoder), ``"cross"`` (a fusion encoder's text-to-image cross-attention; ``B'``
    counts the pairs it fused, the rows of ``logits``).
    """

    loss: torch.Tensor
    logits: torch.Tensor
    labels: torch.Tensor | None = None
    attentions: dict | None = None
    extras: dict = field(default_factory=dict)
    losses: torch.Tensor | None = None   # [B] each example's loss (LLR's local linearity is per example); loss
    #                                      is their mean for classification and contrastive tasks, MLM averages
    #                                      over all masked tokens instead; None where a loss does not split so


@dataclass(frozen=True)
class PerturbationSite:
    """A named place where δ is added.

    Attributes:
        name: ``text`` / ``image`` / ``pixels``.
        modality: ``text`` or ``image`` (VILLA chooses sites by modality).
        module: the module whose output receives δ (hooked by :func:`perturbed`).
        shape: ``batch -> shape of δ`` (the module's output shape for that batch).
        mask: ``batch -> tensor`` broadcastable to δ, 1 where perturbing is allowed, 0 on padding.
        token_axes: how to view δ as ``[B, N, D]`` tokens: ``"BND"`` (already) or ``"BDHW"``
            (a conv feature map whose ``h*w`` positions are the tokens) or ``"BCHW"`` (pixels: each pixel
            a token with C channels).
        clamp: value range of ``x + δ`` (pixels: ``(0, 1)``), or ``None``.
    """

    name: str
    modality: str
    module: nn.Module
    shape: Callable[[dict], tuple]
    mask: Callable[[dict], torch.Tensor]
    token_axes: str = "BND"
    clamp: tuple[float, float] | None = None

    def tokens(self, t: torch.Tensor) -> torch.Tensor:
        """View a δ-shaped tensor as ``[B, N, D]`` (tokens first) for per-token norms and plots."""
        if self.token_axes == "BND":
            return t
        return t.flatten(2).transpose(1, 2)  # [B, D, h, w] -> [B, h*w, D]


def _add_delta(site: PerturbationSite, delta: torch.Tensor, mask: torch.Tensor):
    def hook(module, args, output):
        d = (delta * mask).to(output.dtype)  # δ stays fp32 for the method; the sum follows autocast
        out = output + d
        if site.clamp is not None:
            out = out.clamp(*site.clamp)
        return out

    return hook


@contextlib.contextmanager
def perturbed(model: "VLModel", deltas: dict[str, torch.Tensor] | None, batch: dict) -> Iterator[None]:
    """Within the block, every forward of ``model`` adds ``deltas[name] * mask`` at each named site.

    >>> with perturbed(model, {"text": delta}, batch):   # doctest: +SKIP
    ...     out = model(batch, "itm")
    """
    handles = []
    try:
        for name, delta in (deltas or {}).items():
            site = model.perturbation_sites()[name]
            expected = tuple(site.shape(batch))
            if tuple(delta.shape) != expected:
                raise ValueError(f"delta for site {name!r} has shape {tuple(delta.shape)}, expected {expected}")
            mask = site.mask(batch).to(delta.device)
            handles.append(site.module.register_forward_hook(_add_delta(site, delta, mask)))
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def evaluating(model: nn.Module):
    """Eval mode inside the block, the model's previous mode restored after it."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


class FollowsOptimizer(nn.Module):
    """A submodule with state that follows the weights (an EMA): :meth:`VLModel.after_optimizer_step`
    calls its ``after_optimizer_step`` once per applied update, whichever model it was added to."""

    def after_optimizer_step(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


class VLModel(nn.Module):
    """Base class of vlat's models: one ``forward(batch, task)`` and named perturbation sites.

    Subclasses set ``tasks`` and implement :meth:`forward` and :meth:`perturbation_sites`; they may
    implement :meth:`layer_one` (the first block, used by YOPO).
    """

    tasks: tuple[str, ...] = ()
    kind: str = ""
    default_task: str = ""          # what `vlat train` trains when no --task is given
    primary_task: str = ""          # what `vlat eval` scores when no --task is given
    full_batches: bool = False      # every training batch must have the same size (ALBEF's queues)
    feature_scores: bool = False    # retrieval scores by cosine of image_features / text_features (CLIP, ALBEF)
    hard_negatives: bool = False    # its itc loss uses a batch's hard-negative captions (neg_input_ids; CLIP)
    retired_config: tuple[str, ...] = ()   # config fields older checkpoints carry that no longer exist

    def score_task(self, task: str) -> str:
        """The task that measures a model trained on ``task`` (pre-training is scored on the primary task)."""
        return self.primary_task if task == "pretrain" else task

    @classmethod
    def pretrained(cls, name_or_path: str, preset: str = "tiny", **overrides) -> "VLModel":
        """This model around a real pretrained checkpoint (``vlat train --pretrained``): by default a BERT
        for the text side (``from_bert``); a model family with its own checkpoints overrides this."""
        return cls.from_bert(name_or_path, preset, **overrides)

    def prepare_training(self, steps_per_epoch: int) -> None:
        """Called once before training with the number of optimiser steps per epoch (ALBEF ramps its
        distillation weight over the first epoch); most models need nothing."""

    def perturbation_sites(self) -> dict[str, PerturbationSite]:  # pragma: no cover - abstract
        raise NotImplementedError

    def layer_one(self, site: str) -> tuple[nn.Module, Callable[[dict], object]]:
        """YOPO's "layer one" for a site: ``(block, run)`` where ``block`` is the first transformer block
        after the site and ``run(batch)`` performs a forward that passes through it (it is stopped right
        after ``block`` by :func:`run_layer_one`, so nothing after layer one is computed)."""
        raise NotImplementedError(f"{type(self).__name__} declares no layer one")

    def image_attention(self, batch: dict) -> torch.Tensor:
        """Where the model looks in the image: ``[B, h, w]`` attention over image patches (rows sum to
        at most 1), for the explorer. Single-stream and CLIP models use the rollout of their [CLS]
        token; a fusion model uses its text-to-image cross-attention. Runs under any active δ hooks."""
        raise NotImplementedError(f"{type(self).__name__} shows no image attention")

    def after_optimizer_step(self) -> None:
        """Called by the training loop after every applied optimiser step (not after skipped ones, and
        not per forward: an adversarial method may run many forwards per step). Models with state that
        follows the weights (ALBEF's momentum encoders and queues) update it here; submodules that
        follow the optimiser (:class:`FollowsOptimizer`, e.g. R-Adapters with a weight EMA) are called."""
        for m in self.modules():
            if isinstance(m, FollowsOptimizer):
                m.after_optimizer_step()

    def match_scores(self, batch: dict) -> torch.Tensor:
        """ITM log-odds of "match" for each (image, caption) row: the retrieval score of models with an
        ``itm`` head (single-stream, ALBEF's fusion encoder)."""
        logits = self.forward(batch, "itm").logits.float()
        return logits[:, 1] - logits[:, 0]

    def inference_state(self) -> dict:
        """What a shipped, inference-only checkpoint holds; models with training-only state (ALBEF's
        momentum copies) leave it out."""
        return self.state_dict()

    takes_objective: bool = False  # trains with another objective than its task loss (contrastive models)

    def check_objective(self, objective) -> None:
        """Refuse a training objective (``TrainConfig.objective``) this model cannot use."""
        if objective is not None and not self.takes_objective:
            raise ValueError(f"{type(self).__name__} trains with its task's own loss; the {type(objective).__name__} "
                             "objective needs image and text features of a dual encoder (clip)")

    def check_task(self, task: str) -> None:
        if task not in self.tasks:
            raise ValueError(f"{type(self).__name__} has no task {task!r}; it supports {', '.join(self.tasks)}")

    def check_pixels(self, pixels: torch.Tensor) -> None:
        """Refuse images of the wrong mode or size with a message that says what was expected."""
        size = self.config.image_size
        if pixels.dim() != 4 or pixels.shape[1] != 3:
            got = tuple(pixels.shape)
            hint = " (grayscale? convert to RGB)" if pixels.dim() == 4 and pixels.shape[1] == 1 else \
                " (RGBA? drop or composite the alpha channel)" if pixels.dim() == 4 and pixels.shape[1] == 4 else ""
            raise ValueError(f"pixel_values must be [B, 3, {size}, {size}] RGB in [0, 1]; got shape {got}{hint}")
        if tuple(pixels.shape[2:]) != (size, size):
            raise ValueError(f"pixel_values must be {size}x{size}; got {pixels.shape[2]}x{pixels.shape[3]} "
                             f"(resize with vlat.world.folder.image_to_tensor)")

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def checkpoint_activations(self, enable: bool = True) -> "VLModel":
        """Recompute each transformer block's activations in the backward instead of keeping them (less
        memory, about one more forward of time). Sets every Hugging Face block of the model (both towers,
        ALBEF's fusion layers) to non-reentrant ``torch.utils.checkpoint``; it acts in training mode only.
        Gradients are unchanged (dropout replays its random state). Returns ``self``."""
        import functools

        import torch.utils.checkpoint

        blocks = [m for m in self.modules() if isinstance(getattr(m, "gradient_checkpointing", None), bool)]
        if not blocks:
            raise ValueError(f"{type(self).__name__} has no transformer blocks that support gradient checkpointing")
        func = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
        for m in blocks:
            m._gradient_checkpointing_func = func
            m.gradient_checkpointing = enable
        return self

    def on_device(self, batch: dict) -> dict:
        """``batch`` with every tensor on this model's device (a no-op copy of the dict when they are)."""
        return to_device(batch, self.device)

    def __call__(self, batch: dict, *args, **kwargs):
        # every forward takes the batch where the model is: a notebook on a GPU runtime may hand a
        # method, an attack, calibrate or the explorer a batch straight from the (CPU) collator
        return super().__call__(self.on_device(batch) if isinstance(batch, dict) else batch, *args, **kwargs)


def device_of(model: nn.Module, batch: dict) -> torch.device:
    """Where ``model``'s parameters are (any module that follows the model contract), else the batch's."""
    p = next(model.parameters(), None)
    return p.device if p is not None else batch["pixel_values"].device


def to_device(batch: dict, device) -> dict:
    """The batch with every tensor moved to ``device`` (asynchronously from pinned memory); other values kept."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


class _StopForward(Exception):
    pass


def run_layer_one(model: "VLModel", site: str, batch: dict) -> torch.Tensor:
    """Run embeddings + the first block only and return the block's output (``f₀(x + δ)``)."""
    block, run = model.layer_one(site)
    box = {}

    def stop(module, args, output):
        box["out"] = output[0] if isinstance(output, tuple) else output
        raise _StopForward

    h = block.register_forward_hook(stop)
    try:
        run(model.on_device(batch))
    except _StopForward:
        pass
    finally:
        h.remove()
    return box["out"]


def per_example_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per example ``[B]``: rows of ``[B, C]`` logits, or the mean over the labelled positions
    (``labels != -100``) of ``[B, L, V]`` token logits (an example with no label scores 0)."""
    if logits.dim() == 2:
        return torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none")
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                                           reduction="none").view(labels.shape)
    return ce.sum(1) / (labels != -100).sum(1).clamp_min(1)


_HASH = torch.randint(1, 2**31, (4096,), generator=torch.Generator().manual_seed(0))


def caption_ids(input_ids: torch.Tensor) -> torch.Tensor:
    """An integer id per caption ``[B]``, equal for identical token sequences (a fixed random hash; a
    collision between two different captions is vanishingly unlikely). Groups of identical captions
    are positives of each other in ALBEF's ITC (its ``idx`` queue) and in MPM-NCE."""
    w = _HASH[:input_ids.shape[1]].to(input_ids.device)
    return (input_ids.long() * w).sum(1)


def attention_rollout(attentions, residual: float = 0.5) -> torch.Tensor:
    """Abnar & Zuidema (2020): multiply the layers' head-averaged attention ``[B, T, T]``, each mixed
    with the identity for the residual path (``A' = r I + (1 - r) A``, rows renormalised); returns
    ``[B, T, T]``, row i = how much of token i's final state flows from each input token."""
    out = None
    for a in attentions:
        a = a.float().mean(1)                                                 # [B, T, T] over heads
        eye = torch.eye(a.shape[-1], device=a.device).expand_as(a)
        a = residual * eye + (1 - residual) * a
        a = a / a.sum(-1, keepdim=True)
        out = a if out is None else a @ out
    return out


def text_mask(key: str = "attention_mask") -> Callable[[dict], torch.Tensor]:
    """Mask of a token site: the batch's attention mask as ``[B, L, 1]`` floats."""
    return lambda batch: batch[key].unsqueeze(-1).float()


def full_mask(ndim: int, batch_key: str = "pixel_values") -> Callable[[dict], torch.Tensor]:
    """Mask of a site with no padding: ones ``[B, 1, ..., 1]`` with ``ndim`` axes, broadcasting over δ."""
    return lambda batch: torch.ones((batch[batch_key].shape[0],) + (1,) * (ndim - 1), device=batch[batch_key].device)
