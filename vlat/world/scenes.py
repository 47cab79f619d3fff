"""Procedural scenes: objects with shape, colour, size and position, rendered to small RGB images.

A scene is a tuple of :class:`Obj` records; generation is a pure function of a numpy ``Generator``
so that scene ``i`` of a split is the same on every machine. Rendering uses whole-image numpy masks
(no Python loop over pixels), which is what makes thousands of scenes per second possible
(``benchmarks/world_speed.py`` measures it).

Distribution shifts (the ImageNet-Sketch / -R / -V2 analogues used for OOD evaluation) act either
on rendering (``sketch``, ``texture``, ``palette``), on which objects may appear (``composition``),
or on the wording of the captions (``paraphrase``; see :mod:`vlat.world.captions`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SIZES = ("small", "large")

# RGB of each colour name in the ID rendering.
PALETTE = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 90, 214),
    "yellow": (235, 205, 30),
    "purple": (148, 70, 189),
    "orange": (250, 130, 20),
}
# The "palette" shift: the same names rendered in shifted shades (darker, desaturated, hue-rotated),
# the way a photo under other lighting still shows a "red" thing.
SHIFTED_PALETTE = {
    "red": (160, 60, 90),
    "green": (90, 150, 40),
    "blue": (60, 120, 160),
    "yellow": (190, 170, 80),
    "purple": (110, 70, 140),
    "orange": (200, 110, 70),
}
# Radius of each size as a fraction of the image side.
SIZE_RADIUS = {"small": 0.09, "large": 0.16}
BACKGROUND = (238, 238, 238)

# Colour-shape pairs that never appear in ID splits; the "composition" shift uses only these.
HELD_OUT_PAIRS = frozenset(
    {
        ("red", "triangle"),
        ("green", "square"),
        ("blue", "diamond"),
        ("yellow", "circle"),
        ("purple", "square"),
        ("orange", "triangle"),
    }
)
ALL_PAIRS = tuple((c, s) for c in COLOURS for s in SHAPES)
ID_PAIRS = tuple(p for p in ALL_PAIRS if p not in HELD_OUT_PAIRS)
HELD_PAIRS = tuple(p for p in ALL_PAIRS if p in HELD_OUT_PAIRS)

SHIFTS = ("sketch", "texture", "composition", "paraphrase", "palette")


@dataclass(frozen=True)
class Obj:
    """One object of a scene. ``x, y`` are the centre in [0, 1] image coordinates (y grows downwards)."""

    shape: str
    colour: str
    size: str
    x: float
    y: float


Scene = tuple  # tuple[Obj, ...]


def check_shift(shift: str | None) -> None:
    if shift is not None and shift not in SHIFTS:
        raise ValueError(f"unknown shift {shift!r}; choose one of {', '.join(SHIFTS)} (or None for in-distribution)")


def make_scene(rng: np.random.Generator, n_objects: int | None = None, shift: str | None = None,
               main_object: bool = False) -> Scene:
    """Draw a scene of 1-3 objects with distinct colour-shape pairs and well-separated centres.

    ``main_object=True`` makes the first object large and every other one small (the classification
    task labels a scene by its main object). Under the ``composition`` shift every object's colour-shape
    pair comes from :data:`HELD_OUT_PAIRS`; otherwise none does.
    """
    pairs = HELD_PAIRS if shift == "composition" else ID_PAIRS
    n = int(rng.integers(1, 4)) if n_objects is None else n_objects
    chosen = rng.choice(len(pairs), size=n, replace=False)
    objs: list[Obj] = []
    centres: list[tuple[float, float]] = []
    for k, idx in enumerate(chosen):
        colour, shape = pairs[idx]
        if main_object:
            size = "large" if k == 0 else "small"
        else:
            size = SIZES[int(rng.integers(0, 2))]
        r = SIZE_RADIUS[size]
        for _ in range(100):  # rejection sampling keeps objects apart and relations unambiguous
            x, y = rng.uniform(r + 0.03, 1 - r - 0.03, size=2)
            if all(max(abs(x - cx), abs(y - cy)) > 0.34 for cx, cy in centres):
                break
        centres.append((float(x), float(y)))
        objs.append(Obj(shape, colour, size, float(x), float(y)))
    return tuple(objs)


def relation(a: Obj, b: Obj) -> str:
    """Spatial relation of ``a`` with respect to ``b``: the dominant axis of their offset decides."""
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


_GRID_CACHE: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    if size not in _GRID_CACHE:
        c = (np.arange(size, dtype=np.float32) + 0.5) / size
        _GRID_CACHE[size] = (c[None, :].repeat(size, 0), c[:, None].repeat(size, 1))
    return _GRID_CACHE[size]


def shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Boolean mask of a filled shape of radius ``r`` given offsets from its centre."""
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.82 * r
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.1 * r
    if shape == "triangle":  # apex up: below the two slanted edges and above the base
        return (dy <= 0.8 * r) & (2.0 * np.abs(dx) - dy <= 1.2 * r) & (dy >= -r)
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, size: int = 64, shift: str | None = None,
           rng: np.random.Generator | None = None) -> np.ndarray:
    """Render a scene to a ``uint8`` array ``[size, size, 3]``.

    ``sketch`` draws outlines only (about 2 px) on white; ``texture`` draws filled shapes on a random
    striped, noisy background (needs ``rng``); ``palette`` uses :data:`SHIFTED_PALETTE`.
    """
    xx, yy = _grid(size)
    if shift == "texture":
        if rng is None:
            raise ValueError("the texture shift needs an rng for its background")
        freq, phase, angle = rng.uniform(8, 30), rng.uniform(0, 6.3), rng.uniform(0, 3.14)
        base = rng.integers(60, 200, size=3).astype(np.float32)
        stripes = np.sin(freq * (np.cos(angle) * xx + np.sin(angle) * yy) + phase)[..., None]
        noise = rng.standard_normal((size, size, 3), dtype=np.float32) * 28.0
        img = base + 55.0 * stripes + noise
    elif shift == "sketch":
        img = np.full((size, size, 3), 255.0, dtype=np.float32)
    else:
        img = np.empty((size, size, 3), dtype=np.float32)
        img[:] = BACKGROUND
    palette = SHIFTED_PALETTE if shift == "palette" else PALETTE
    line = 2.2 / size
    for o in scene:
        dx, dy = xx - o.x, yy - o.y
        r = SIZE_RADIUS[o.size]
        mask = shape_mask(o.shape, dx, dy, r)
        if shift == "sketch":  # outline: the shape minus a slightly smaller copy of itself
            mask &= ~shape_mask(o.shape, dx, dy, r - line)
        img[mask] = palette[o.colour]
    return np.clip(img, 0, 255).astype(np.uint8)
