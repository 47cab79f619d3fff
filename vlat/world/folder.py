"""Image-text pairs on disk: a folder of PNG/JPEG images plus one ``captions.jsonl``.

Format (the one ``data_samples/pairs/`` ships in, and the one your own data can use)::

    my_pairs/
      captions.jsonl        # one JSON object per line
      images/00000.png      # any RGB-convertible image; paths are relative to the folder

    {"image": "images/00000.png", "captions": ["a small red circle", "one objects"],
     "split": "test", "shift": null, "objects": [{"shape": "circle", "colour": "red", ...}]}

Only ``image`` and ``captions`` (a non-empty list of non-empty strings) are required; ``split``,
``shift`` and ``objects`` are metadata that toy-world exports carry. Images of every common kind are
converted to RGB: greyscale, palette, CMYK, alpha (composited on white), 16-bit and 32-bit integer
(scaled from their own range) and float (read as [0, 1], or [0, 255] when larger); other sizes are
resized to ``image_size`` with a bicubic filter, so a photo of your own works. An image path must stay
inside the folder (no ``..``, no absolute paths) and name a regular file (a FIFO or a device is
refused, never opened); an unreadable file or a malformed line raises an error naming the file and
line.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from vlat.world.scenes import Obj


def load_image(path: str | Path, image_size: int = 64) -> torch.Tensor:
    """Read an image file as a float tensor ``[3, image_size, image_size]`` in [0, 1]."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: image not found")
    if not path.is_file():                      # a folder, a FIFO, a device: never opened (a FIFO would hang)
        raise ValueError(f"{path}: not a regular file, so not an image")
    try:
        with Image.open(path) as im:
            im.load()
            return image_to_tensor(im, image_size)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path}: not a readable image ({e})") from None


def image_to_tensor(im, image_size: int = 64) -> torch.Tensor:
    """PIL image (any mode) -> ``[3, S, S]`` float in [0, 1]: RGBA over white, L/P/CMYK to RGB, resized."""
    from PIL import Image

    if im.mode.startswith("I") or im.mode == "F":   # 16/32-bit integer or float greyscale: scale, then 8 bits
        arr = np.asarray(im, dtype=np.float64)
        top = float(np.nanmax(arr)) if arr.size else 0.0
        if im.mode == "F":
            scale = 1.0 if top <= 1.0 else 255.0
        elif im.mode.startswith("I;16"):
            scale = 65535.0
        else:                                       # 32-bit integer: 8-bit or 16-bit values in practice
            scale = 255.0 if top <= 255 else 65535.0
        arr = np.nan_to_num(arr / scale, nan=0.0, posinf=1.0, neginf=0.0).clip(0.0, 1.0)
        im = Image.fromarray((arr * 255.0 + 0.5).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im)
    im = im.convert("RGB")
    if im.size != (image_size, image_size):
        im = im.resize((image_size, image_size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0


class FolderDataset(Dataset):
    """Pairs from a folder in the format above. Items follow :class:`WorldDataset`'s ``itc`` layout
    (``pixel_values``, ``text`` = the first caption, ``label`` = the image index) so the same collate
    and evaluation code serve both."""

    def __init__(self, root: str | Path, image_size: int = 64, split: str | None = None):
        self.root = Path(root)
        index = self.root / "captions.jsonl"
        if not index.is_file():
            raise FileNotFoundError(f"{index} not found: a pairs folder needs a captions.jsonl (see vlat.world.folder)")
        self.records = []
        for n, line in enumerate(index.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{index}:{n}: not valid JSON ({e.msg})") from None
            caps = rec.get("captions") if isinstance(rec, dict) else None
            if not isinstance(rec, dict) or not isinstance(rec.get("image"), str) or not isinstance(caps, list) or \
                    not caps or not all(isinstance(c, str) and c.strip() for c in caps):
                raise ValueError(f"{index}:{n}: each line needs \"image\" (a path) and a non-empty list of "
                                 "non-empty \"captions\"")
            inside = (self.root / rec["image"]).resolve()
            if not inside.is_relative_to(self.root.resolve()):
                raise ValueError(f"{index}:{n}: image {rec['image']!r} is outside the dataset folder; paths must "
                                 "be relative to it, without '..'")
            if split is None or rec.get("split") == split:
                self.records.append(rec)
        if not self.records:
            raise ValueError(f"{index}: no pairs" + (f" in split {split!r}" if split else ""))
        self.images = torch.stack([load_image(self.root / r["image"], image_size) for r in self.records])
        self.captions = [r["captions"] for r in self.records]
        self.scenes = [tuple(Obj(**o) for o in r["objects"]) if r.get("objects") else None for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    @classmethod
    def from_pairs(cls, images: torch.Tensor, captions: list[list[str]],
                   root: str | Path = "<memory>") -> "FolderDataset":
        """Pairs already in memory (``images`` ``[N, 3, S, S]`` in [0, 1], each with its captions), e.g. from a
        Hugging Face dataset (:func:`vlat.world.hub.hub_pairs`)."""
        if len(images) != len(captions) or not len(captions):
            raise ValueError(f"{root}: {len(images)} images for {len(captions)} caption lists")
        out = object.__new__(cls)
        out.root, out.images, out.captions = Path(str(root)), images, [list(c) for c in captions]
        out.records = [{"image": f"#{i}", "captions": c} for i, c in enumerate(out.captions)]
        out.scenes = [None] * len(captions)
        return out

    def unknown_characters(self, tokenizer) -> dict:
        """Characters of the captions that ``tokenizer`` turns into its unknown token:
        ``{"captions": how many captions hold one, "characters": sorted list}``."""
        unk = getattr(tokenizer, "unk_token", None)
        if unk is None:
            return {"captions": 0, "characters": []}
        chars = {ch for caps in self.captions for c in caps for ch in c if not ch.isspace()}
        bad = {ch for ch in chars if unk in tokenizer.tokenize(ch)}
        n = sum(any(ch in bad for c in caps for ch in c) for caps in self.captions)
        return {"captions": n, "characters": sorted(bad)}

    def subset(self, indices) -> "FolderDataset":
        """A copy holding only the pairs at ``indices`` (images are shared, not re-read)."""
        out = object.__new__(FolderDataset)
        idx = [int(i) for i in indices]
        out.root, out.records = self.root, [self.records[i] for i in idx]
        out.images, out.captions = self.images[idx], [self.captions[i] for i in idx]
        out.scenes = [self.scenes[i] for i in idx]
        return out

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.images[i], "text": self.captions[i][0], "label": i, "index": i}


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class ClassFolderDataset(Dataset):
    """Images sorted into one folder per class (``root/dog/1.jpg``, ``root/cat/2.png``, ...), for zero-shot
    and fine-tuned classification (``classify``) with the prompts ``template`` (default ``"a photo of a
    {}"``, underscores in folder names read as spaces). Items carry ``pixel_values`` and ``label`` (the
    class's index in sorted folder order); :attr:`class_texts` are the prompts, in the same order."""

    def __init__(self, root: str | Path, image_size: int = 64, template: str = "a photo of a {}"):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: no such folder")
        self.class_names = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        files = [(f, k) for k, c in enumerate(self.class_names) for f in sorted((self.root / c).iterdir())
                 if f.suffix.lower() in IMAGE_SUFFIXES]
        if len(self.class_names) < 2 or not files:
            raise ValueError(f"{self.root}: a class folder needs at least two sub-folders of images (one per class); "
                             f"found {len(self.class_names)} with {len(files)} images")
        self.class_texts = [template.format(c.replace("_", " ")) for c in self.class_names]
        self.images = torch.stack([load_image(f, image_size) for f, _ in files])
        self.labels = [k for _, k in files]
        self.files = [f for f, _ in files]

    @classmethod
    def from_images(cls, images: torch.Tensor, labels: list[int], class_names: list[str],
                    template: str = "a photo of a {}", root: str = "memory") -> "ClassFolderDataset":
        """Classes held in memory (``images`` ``[N, 3, H, W]``, uint8 or float in [0, 1], a label per image),
        e.g. from a Hugging Face dataset (:func:`vlat.world.hub.hub_classes`); items are float either way."""
        if len(images) != len(labels) or not len(labels):
            raise ValueError(f"{len(images)} images and {len(labels)} labels: one label per image, at least one")
        out = object.__new__(cls)
        out.root, out.class_names = Path(root), list(class_names)
        out.class_texts = [template.format(c.replace("_", " ")) for c in out.class_names]
        out.images, out.labels, out.files = images, [int(y) for y in labels], [f"{root}#{i}" for i in range(len(labels))]
        return out

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        x = self.images[i]
        return {"pixel_values": x.float() / 255.0 if x.dtype == torch.uint8 else x, "label": self.labels[i], "index": i}

    def subset(self, indices) -> "ClassFolderDataset":
        out = object.__new__(ClassFolderDataset)
        idx = [int(i) for i in indices]
        out.root, out.class_names, out.class_texts = self.root, self.class_names, self.class_texts
        out.images, out.labels = self.images[idx], [self.labels[i] for i in idx]
        out.files = [self.files[i] for i in idx]
        return out

    def split(self, holdout: float = 0.1, seed: int = 0) -> tuple["ClassFolderDataset", "ClassFolderDataset | None"]:
        """``(train, test)``: a seeded ``holdout`` fraction of the images kept out (``None`` below 2)."""
        return held_out(self, holdout, seed)


def held_out(dataset, holdout: float = 0.1, seed: int = 0):
    """``(train, test)`` subsets of ``dataset`` (anything with ``subset`` and a length): a seeded
    ``holdout`` fraction kept out for testing, both in their original order; ``test`` is ``None`` when
    that would be under 2 examples."""
    if not 0.0 <= holdout < 1.0:
        raise ValueError(f"holdout must lie in [0, 1), got {holdout}")
    n_test = int(len(dataset) * holdout)
    if n_test < 2:
        return dataset, None
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    return dataset.subset(sorted(order[n_test:])), dataset.subset(sorted(order[:n_test]))


def train_test_pairs(root: str | Path, image_size: int = 64, holdout: float = 0.1, seed: int = 0
                     ) -> tuple[FolderDataset, FolderDataset | None]:
    """``(train, test)`` pairs of a folder: its ``"split": "train"`` / ``"test"`` records where it marks
    them, else a seeded ``holdout`` fraction of all pairs kept out for testing (``None`` below 2 pairs)."""
    if not 0.0 <= holdout < 1.0:
        raise ValueError(f"holdout must lie in [0, 1), got {holdout}")
    every = FolderDataset(root, image_size)
    splits = [r.get("split") for r in every.records]
    if "train" in splits:
        test = [i for i, s in enumerate(splits) if s == "test"]
        return every.subset([i for i, s in enumerate(splits) if s == "train"]), (every.subset(test) if test else None)
    return held_out(every, holdout, seed)


def write_folder(root: str | Path, per_split: dict[str, int], seed: int = 1234, image_size: int = 64) -> int:
    """Export toy-world pairs (PNG + captions.jsonl) for ID and every shift; returns the pair count.

    ``per_split`` maps a shift name (or ``"id"``) to a number of scenes, e.g. ``{"id": 200, "sketch": 20}``.
    """
    from PIL import Image

    from vlat.world.datasets import WorldDataset

    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines, k = [], 0
    for name, n in per_split.items():
        shift = None if name == "id" else name
        ds = WorldDataset("itc", split="test", size=n, seed=seed, shift=shift, image_size=image_size)
        for i in range(n):
            rel = f"images/{k:05d}.png"
            Image.fromarray(ds.images[i].permute(1, 2, 0).numpy()).save(root / rel, optimize=True)
            lines.append(json.dumps({"image": rel, "captions": ds.captions[i], "split": "test", "shift": shift,
                                     "objects": [o.__dict__ for o in ds.scenes[i]]}))
            k += 1
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return k
