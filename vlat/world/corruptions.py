"""Common image corruptions at 64 x 64: an OOD test nobody tuned this project for.

The semantic shifts of :data:`vlat.world.scenes.SHIFTS` were designed together with the world, so a method
could, in principle, be good at exactly them. These are the corruptions of Hendrycks & Dietterich,
*Benchmarking Neural Network Robustness to Common Corruptions and Perturbations*, ICLR 2019
(ImageNet-C; https://arxiv.org/abs/1903.12261), the ones that make sense on a 64 x 64 rendering: noise
(gaussian, shot, impulse), blur (gaussian, defocus, motion), digital (contrast, brightness, pixelate,
JPEG) and a weather-like fog. Five severities each; the constants follow CIFAR-10-C's (32 px) and
Tiny-ImageNet-C's (64 px) where those exist, and grow monotonically with severity.

>>> from vlat.world import WorldDataset
>>> images = WorldDataset("itm", "test", 4).images
>>> corrupt(images, "fog", 3).shape == images.shape
True

Every corruption is a pure function of ``(images, name, severity, seed)``: the same call gives the same
pixels, so a table is reproducible. ``vlat eval --shifts corruptions`` scores a model on all of them
(:func:`vlat.evaluate.corruption_table`).
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
import torch.nn.functional as F

CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "gaussian_blur", "defocus_blur", "motion_blur",
               "contrast", "brightness", "pixelate", "jpeg", "fog")
SEVERITIES = (1, 2, 3, 4, 5)

# severity 1..5 -> the corruption's parameter (CIFAR-10-C / Tiny-ImageNet-C values where they exist)
PARAMS = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),      # std of N(0, c²) added to [0, 1] pixels
    "shot_noise": (500, 250, 100, 75, 50),                 # photons per unit intensity: Poisson(x c) / c
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),       # share of pixels set to 0 or 1 (salt and pepper)
    "gaussian_blur": (0.5, 0.75, 1.0, 1.25, 1.5),          # σ in pixels
    "defocus_blur": (1.0, 1.5, 2.0, 2.5, 3.0),             # disk radius in pixels
    "motion_blur": (3, 5, 7, 9, 11),                       # length of the line kernel in pixels
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),               # (x - mean) c + mean
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),             # added to every channel
    "pixelate": (2, 3, 4, 5, 6),                           # every k x k block of pixels becomes its mean
    "jpeg": (90, 60, 30, 15, 8),                           # JPEG quality (CIFAR-10-C's 80-40 do not degrade
                                                           # these flat renderings in order; these do)
    "fog": (0.2, 0.5, 0.75, 1.0, 1.5),                     # strength of a low-frequency haze
}


def check_corruption(name: str, severity: int) -> None:
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; choose from {', '.join(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"corruption severity must be one of 1-5, got {severity!r}")


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] as uint8 (rounded; out-of-range values clipped); uint8 images as they are."""
    return images if images.dtype == torch.uint8 else (images.clamp(0, 1) * 255).round().to(torch.uint8)


def corrupt(images: torch.Tensor, name: str, severity: int, seed: int = 0) -> torch.Tensor:
    """``images`` (``[N, 3, H, W]`` uint8) with corruption ``name`` at ``severity`` (1-5), as uint8."""
    check_corruption(name, severity)
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"corrupt() takes [N, 3, H, W] uint8 images, got {tuple(images.shape)} {images.dtype}")
    c = PARAMS[name][severity - 1]
    g = torch.Generator().manual_seed(hash_seed(seed, name, severity))
    x = images.float() / 255.0
    if name == "jpeg":
        return _jpeg(images, int(c))
    out = {
        "gaussian_noise": lambda: x + torch.randn(x.shape, generator=g) * c,
        "shot_noise": lambda: torch.poisson(x * c, generator=g) / c,
        "impulse_noise": lambda: _impulse(x, c, g),
        "gaussian_blur": lambda: _filter(x, _gaussian_kernel(c)),
        "defocus_blur": lambda: _filter(x, _disk_kernel(c)),
        "motion_blur": lambda: _motion(x, int(c), g),
        "contrast": lambda: (x - x.mean(dim=(1, 2, 3), keepdim=True)) * c + x.mean(dim=(1, 2, 3), keepdim=True),
        "brightness": lambda: x + c,
        "pixelate": lambda: _pixelate(x, int(c)),
        "fog": lambda: _fog(x, c, g),
    }[name]()
    return to_uint8(out)


def corrupted(dataset, name: str, severity: int, seed: int = 0):
    """A shallow copy of a dataset with an ``images`` tensor (a :class:`~vlat.world.WorldDataset`, a class
    folder) whose images carry the corruption (scenes, captions and labels shared with ``dataset``). Float
    images in [0, 1] are corrupted at 8 bits and come back as floats."""
    import copy

    out = copy.copy(dataset)
    images = corrupt(to_uint8(dataset.images), name, severity, seed)
    out.images = images if dataset.images.dtype == torch.uint8 else images.float() / 255.0
    return out


def hash_seed(seed: int, name: str, severity: int) -> int:
    """A stable seed per (seed, corruption, severity) (Python's ``hash`` of a str changes between runs)."""
    return (int(seed) * 1_000_003 + CORRUPTIONS.index(name) * 101 + severity) % (2**31)


def _impulse(x: torch.Tensor, amount: float, g: torch.Generator) -> torch.Tensor:
    u = torch.rand(x.shape, generator=g)
    salt = torch.rand(x.shape, generator=g) < 0.5
    hit = u < amount
    return torch.where(hit, salt.float(), x)


def _filter(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Convolve every channel with the 2-D kernel ``k`` (edge pixels repeated, so edges do not darken)."""
    kh, kw = k.shape
    pad = (kw // 2, kw - 1 - kw // 2, kh // 2, kh - 1 - kh // 2)
    y = F.pad(x, pad, mode="replicate")
    return F.conv2d(y, k.expand(3, 1, kh, kw), groups=3)


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    r = max(1, math.ceil(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-(t[:, None] ** 2 + t[None, :] ** 2) / (2 * sigma ** 2))
    return k / k.sum()


def _disk_kernel(radius: float) -> torch.Tensor:
    r = math.ceil(radius)
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = ((t[:, None] ** 2 + t[None, :] ** 2) <= radius ** 2).float()
    return k / k.sum()


def _motion(x: torch.Tensor, length: int, g: torch.Generator) -> torch.Tensor:
    """A line kernel of ``length`` pixels at one random angle per image."""
    out = torch.empty_like(x)
    angles = torch.rand(len(x), generator=g) * math.pi
    r = length // 2
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    for i, a in enumerate(angles):
        k = torch.zeros(2 * r + 1, 2 * r + 1)
        xs = (t * math.cos(a)).round().long() + r
        ys = (t * math.sin(a)).round().long() + r
        k[ys, xs] = 1.0
        out[i:i + 1] = _filter(x[i:i + 1], k / k.sum())
    return out


def _pixelate(x: torch.Tensor, block: int) -> torch.Tensor:
    """Blocks of ``block`` x ``block`` pixels, each its mean. (ImageNet-C resizes by a fraction; at 64 px a
    fractional resize aliases, and the damage then does not grow with severity.)"""
    h, w = x.shape[-2:]
    means = F.avg_pool2d(x, block, ceil_mode=True)
    return means.repeat_interleave(block, -2).repeat_interleave(block, -1)[..., :h, :w]


def _fog(x: torch.Tensor, strength: float, g: torch.Generator) -> torch.Tensor:
    """Add a haze of smooth noise (octaves at 4, 8 and 16 cells, halving in weight), then rescale so the
    brightest pixel keeps its value, as ImageNet-C's fog does with its plasma fractal."""
    n, _, h, w = x.shape
    haze = torch.zeros(n, 1, h, w)
    for k, cells in enumerate((4, 8, 16)):
        coarse = torch.rand(n, 1, cells, cells, generator=g)
        haze += 0.5 ** k * F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    haze = (haze - haze.amin(dim=(2, 3), keepdim=True)) / (haze.amax(dim=(2, 3), keepdim=True)
                                                          - haze.amin(dim=(2, 3), keepdim=True)).clamp_min(1e-6)
    top = x.amax(dim=(1, 2, 3), keepdim=True)
    return (x + strength * haze) * top / (top + strength)


def _jpeg(images: torch.Tensor, quality: int) -> torch.Tensor:
    from PIL import Image

    out = torch.empty_like(images)
    for i, img in enumerate(images):
        buf = io.BytesIO()
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        out[i] = torch.from_numpy(np.array(Image.open(buf).convert("RGB"))).permute(2, 0, 1)
    return out
