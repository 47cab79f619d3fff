"""One image-text pair under a method's inner maximisation: everything the explorer shows, as data.

:func:`explore` takes an image (PIL, numpy array or path) and a caption, runs one method's inner
maximisation (:meth:`vlat.adversarial.Adversary.attack`) on that pair with a fixed model, and returns
an :class:`Exploration`: δ per site, its size per token and per patch, the prediction before and
after with ``KL(p‖p_adv)``, ``KL(p_adv‖p)`` and their sum, the image attention before and after,
and captum integrated-gradients attributions for tokens and patches. The figures in
:mod:`vlat.explain.views` draw it; the app and notebook 09 only glue.

What the model is asked:

- single-stream models: image-text matching, ``p = (no match, match)``;
- CLIP: which caption fits the image, a softmax over the user's caption and the 24 class prompts of
  the toy world (zero-shot, the model's ``classify`` task with the caption as candidate 0). The text
  δ then moves every candidate caption; the views show the user's caption.

The attack pushes away from the model's **own clean prediction** (there is no ground truth for an
uploaded pair). Radii are relative (:meth:`~vlat.adversarial.Adversary.calibrate`): ``eps = 0.1``
is 10 % of the site's norm on this pair.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from vlat.adversarial import registry
from vlat.adversarial.base import Frozen, forward_capturing
from vlat.models.base import VLModel, perturbed
from vlat.objectives import kl_logits
from vlat.world.captions import class_prompt
from vlat.world.datasets import encode_text
from vlat.world.scenes import ALL_PAIRS
from vlat.world.folder import image_to_tensor

MODALITIES = {"image": ("image",), "text": ("text",), "both": ("text", "image"), "pixels": ("pixels",)}
MAX_SIDE = 4096          # longer uploads are refused (they would only be shrunk to 64 px anyway)
MAX_EPS = 1.0            # relative radius: at most the site's own norm
MAX_STEPS = 50


def load_image(image, image_size: int) -> torch.Tensor:
    """An uploaded image -> ``[3, S, S]`` in [0, 1]. Grayscale, palette and RGBA images are converted
    (alpha over white); a non-image or one over ``MAX_SIDE`` pixels a side is refused with a message."""
    from PIL import Image, UnidentifiedImageError

    if image is None:
        raise ValueError("no image: pick one from the gallery or upload a PNG or JPEG")
    if isinstance(image, (str, Path)):
        try:
            with Image.open(image) as im:
                im.load()
                image = im.copy()
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{Path(image).name} is not an image this app can read (PNG, JPEG, ...)") from e
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
            raise ValueError(f"an image array must be H x W (grey) or H x W x 1/3/4; got shape {arr.shape}")
        if arr.dtype != np.uint8:
            arr = np.clip(arr.astype(np.float64) * (255 if arr.max() <= 1.0 else 1), 0, 255).astype(np.uint8)
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[..., 0]
        image = Image.fromarray(arr)
    if not isinstance(image, Image.Image):
        raise ValueError(f"expected an image, got {type(image).__name__}")
    w, h = image.size
    if max(w, h) > MAX_SIDE:
        raise ValueError(f"the image is {w}x{h} pixels; the largest accepted is {MAX_SIDE} a side "
                         f"(the model sees {image_size}x{image_size}, so shrink it first)")
    if min(w, h) < 1:
        raise ValueError("the image is empty")
    return image_to_tensor(image, image_size)


def check_caption(caption) -> str:
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError("the caption is empty: type the text to match against the image")
    if len(caption) > 300:
        raise ValueError(f"the caption has {len(caption)} characters; keep it under 300")
    return caption.strip()


@dataclass
class Probe:
    """The question put to the model for one pair: a batch, its task and the names of the outcomes."""

    batch: dict
    task: str
    names: list[str]
    tokens: list[str]                  # the caption's tokens, special tokens included, no padding
    logits: torch.Tensor               # the clean prediction [1, K] (fp32), whose argmax is the label
    text_row: int = 0                  # which row of the text site holds the caption


def probe(model: VLModel, tokenizer, image, caption: str, candidates: list[str] | None = None) -> Probe:
    """Build the one-pair batch for ``model`` (see the module docstring); labels = the clean prediction."""
    caption = check_caption(caption)
    pixels = load_image(image, model.config.image_size).unsqueeze(0).to(model.device)
    enc = encode_text(tokenizer, [caption], model.config.max_text_len)
    batch = {"pixel_values": pixels, **{k: v.to(model.device) for k, v in enc.items()}}
    tokens = tokenizer.convert_ids_to_tokens(enc["input_ids"][0][enc["attention_mask"][0].bool()].tolist())
    if "itm" in model.tasks:
        task, names = "itm", ["no match", "match"]
    elif "classify" in model.tasks:
        task = "classify"
        names = [caption] + list(candidates if candidates is not None else [class_prompt(c, s) for c, s in ALL_PAIRS])
        cand = encode_text(tokenizer, names, model.config.max_text_len)
        batch["class_input_ids"] = cand["input_ids"].to(model.device)
        batch["class_attention_mask"] = cand["attention_mask"].to(model.device)
    else:
        raise ValueError(f"{type(model).__name__} has neither an itm nor a classify task to explore")
    batch["labels"] = torch.zeros(1, dtype=torch.long, device=model.device)
    with torch.no_grad():
        logits = model(batch, task).logits.float()
    batch["labels"] = logits.argmax(-1)
    return Probe(batch, task, names, tokens, logits)


def explorer_methods() -> tuple[str, ...]:
    """The methods the explorer offers: every registered one, by display name (FGSM, FGM, PGD, ...)."""
    return tuple(s.label for s in registry.specs())


def steps_help() -> str:
    """What the explorer's "steps" control means for each method, from the registry."""
    groups: dict[str, list[str]] = {}
    for s in registry.specs():
        groups.setdefault(s.steps_mean, []).append(s.label)
    return "; ".join(f"{', '.join(labels)}: {meaning}" for meaning, labels in groups.items())


def build_method(name: str, modality: str = "image", eps: float = 0.1, steps: int = 10,
                 step_size: float | None = None):
    """A method from the explorer's controls, through its registered preset
    (:meth:`vlat.adversarial.registry.MethodSpec.build`). ``eps`` is relative (a fraction of each site's
    norm); ``steps`` is what the method's ``steps_mean`` says (K, FreeAT's replays, YOPO's full passes);
    ``step_size`` defaults to :func:`~vlat.adversarial.registry.relative_step` (``2.5 eps / steps``)."""
    spec = registry.get(name)
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; choose one of {', '.join(MODALITIES)}")
    for label, v, lo, hi in (("ε", eps, 0.0, MAX_EPS), ("steps", steps, 1, MAX_STEPS)):
        if v is None or not isinstance(v, (int, float)) or math.isnan(v) or not lo <= v <= hi:
            raise ValueError(f"{label} must lie in [{lo}, {hi}]; got {v!r}")
    if eps == 0:
        raise ValueError("ε is 0: nothing to perturb; pick ε > 0")
    steps = int(steps)
    eta = registry.relative_step(eps, steps) if step_size in (None, 0) else float(step_size)
    if not 0 < eta <= 10 * MAX_EPS:
        raise ValueError(f"step size must lie in (0, {10 * MAX_EPS}]; got {step_size!r}")
    return spec.build(MODALITIES[modality], eps, steps, eta)


def integrated_gradients(model: VLModel, batch: dict, task: str, target: int, sites=("text", "image"),
                         n_steps: int = 16) -> dict[str, torch.Tensor]:
    """captum's integrated gradients of ``p(target)`` with respect to each site's input, from a zero
    baseline (no word, and the mean pixel after normalisation); ``{site: attribution}`` in the site's
    shape. Completeness: the attributions sum to about ``p(x) - p(baseline)``."""
    from captum.attr import IntegratedGradients

    with torch.no_grad():
        _, outs = forward_capturing(Frozen(model, task), batch, sites)
    x = {s: outs[s].detach().float() for s in sites}

    def f(*values):                                   # values[i]: [1, *site shape] (one IG step)
        deltas = {s: v[0] - x[s] for s, v in zip(sites, values)}
        with perturbed(model, deltas, batch):
            return model(batch, task).logits.float().softmax(-1)[:, target]

    ig = IntegratedGradients(f)
    inputs = tuple(x[s].unsqueeze(0) for s in sites)
    attrs = ig.attribute(inputs, baselines=tuple(torch.zeros_like(t) for t in inputs), n_steps=n_steps,
                         internal_batch_size=1)
    return {s: a[0].detach() for s, a in zip(sites, attrs)}


@dataclass
class Exploration:
    """What :func:`explore` found for one pair (tensors on the CPU)."""

    method: str
    modality: str
    task: str
    names: list[str]
    tokens: list[str]
    image: torch.Tensor                          # [3, S, S]
    deltas: dict[str, torch.Tensor]
    probs_clean: torch.Tensor                    # [K]
    probs_adv: torch.Tensor                      # [K]
    kl: dict[str, float]
    losses: list[float]
    token_delta: torch.Tensor | None = None      # [n_tokens] ‖δ‖ per caption token
    patch_delta: torch.Tensor | None = None      # [h, w] ‖δ‖ per patch / region
    pixel_delta: torch.Tensor | None = None      # [3, S, S] (pixel mode)
    attention_clean: torch.Tensor | None = None  # [h, w]
    attention_adv: torch.Tensor | None = None    # [h, w]
    ig_tokens: torch.Tensor | None = None        # [n_tokens]
    ig_patches: torch.Tensor | None = None       # [h, w]
    seconds: dict[str, float] = field(default_factory=dict)
    eps: float = 0.0                             # the radius, a fraction of each site's norm

    @property
    def prediction(self) -> tuple[str, str]:
        """The clean and the attacked top outcome."""
        return self.names[int(self.probs_clean.argmax())], self.names[int(self.probs_adv.argmax())]

    def summary(self) -> str:
        before, after = self.prediction
        flip = "the prediction flipped" if before != after else "the prediction held"
        return (f"{self.method} on {self.modality}: '{before}' ({float(self.probs_clean.max()):.2f}) -> "
                f"'{after}' ({float(self.probs_adv.max()):.2f}); {flip}. "
                f"KL(p‖p_adv) = {self.kl['KL(p||p_adv)']:.3f}, symmetric KL = {self.kl['symmetric KL']:.3f}")


def _grid(values: torch.Tensor, model: VLModel) -> torch.Tensor:
    n = model.config.image_size // model.config.patch_size
    return values.reshape(n, n)


def explore(model: VLModel, tokenizer, image, caption: str, method: str = "PGD", modality: str = "image",
            eps: float = 0.1, steps: int = 10, step_size: float | None = None, seed: int = 0,
            candidates: list[str] | None = None, attributions: bool = True, ig_steps: int = 16,
            on_phase: Callable[[str], None] | None = None) -> Exploration:
    """Run ``method``'s inner maximisation on one pair and measure everything the explorer shows.
    ``on_phase(name)`` is called as each phase starts: ``"attack"``, ``"attention"``, ``"attributions"``
    (the explorer shows them as progress)."""
    from vlat.explain.perturbation import patch_grid, token_magnitudes

    phase = on_phase or (lambda name: None)
    t0 = time.perf_counter()
    adv = build_method(method, modality, eps, steps, step_size)
    model.eval()                                                 # before the probe's clean prediction
    p = probe(model, tokenizer, image, caption, candidates)
    batch, task = p.batch, p.task
    adv.resolve_sites(model)
    adv.calibrate(model, batch, task)
    t1 = time.perf_counter()
    phase("attack")
    adv.trace = True
    deltas = adv.attack(model, batch, task, generator=torch.Generator().manual_seed(seed))
    losses = [row["loss"] for row in adv.last_trace]           # FGM/FGSM take no traced steps
    t2 = time.perf_counter()
    clean = p.logits
    with torch.no_grad(), perturbed(model, deltas, batch):
        attacked = model(batch, task).logits.float()
    kl = {"KL(p||p_adv)": float(kl_logits(clean, attacked)), "KL(p_adv||p)": float(kl_logits(attacked, clean))}
    kl["symmetric KL"] = kl["KL(p||p_adv)"] + kl["KL(p_adv||p)"]
    sites = model.perturbation_sites()
    ex = Exploration(method, modality, task, p.names, p.tokens, batch["pixel_values"][0].cpu(),
                     {k: d.cpu() for k, d in deltas.items()}, clean.softmax(-1)[0].cpu(), attacked.softmax(-1)[0].cpu(),
                     kl, losses, eps=float(eps))
    n_tok = len(p.tokens)
    for name, d in deltas.items():
        if name == "text":
            ex.token_delta = token_magnitudes(d[p.text_row:p.text_row + 1], sites[name])[0, :n_tok].cpu()
        else:
            ex.patch_delta = patch_grid(d, sites[name], model.config.image_size, model.config.patch_size)[0].cpu()
            if name == "pixels":
                ex.pixel_delta = d[0].cpu()
    t3 = time.perf_counter()
    phase("attention")
    ex.attention_clean = model.image_attention(batch)[0].cpu()
    with perturbed(model, deltas, batch):
        ex.attention_adv = model.image_attention(batch)[0].cpu()
    t4 = time.perf_counter()
    if attributions:
        phase("attributions")
        target = int(batch["labels"][0])
        ig = integrated_gradients(model, batch, task, target, ("text", "image"), ig_steps)
        ex.ig_tokens = sites["text"].tokens(ig["text"][p.text_row:p.text_row + 1])[0, :n_tok].sum(-1).cpu()
        ex.ig_patches = _grid(sites["image"].tokens(ig["image"])[0].sum(-1), model).cpu()
    t5 = time.perf_counter()
    ex.seconds = {"setup": t1 - t0, "attack": t2 - t1, "prediction": t3 - t2, "attention": t4 - t3,
                  "attributions": t5 - t4, "total": t5 - t0}
    return ex
