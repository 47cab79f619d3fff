"""Image-caption pairs from a Hugging Face ``datasets`` source: ``vlat train --data hf:NAME[:SPLIT]``.

``NAME`` is a dataset on the Hub (``datasets.load_dataset``, online) or a folder written by
``save_to_disk`` (offline). The image column is the one of feature type ``Image`` (or named ``image``/
``img``), the caption column one named ``caption``, ``captions``, ``text``, ``sentences`` or
``sentence`` (a string or a list of strings per row); ``--image-column`` / ``--caption-column`` name
others. A ``DatasetDict`` with ``train`` and ``test`` splits is used so; otherwise a seeded 10 % of the
pairs is held out, as for a folder. At most ``limit`` training pairs are read (the first ones), so a
large dataset does not fill the memory: images are kept at the model's size.

Needs the optional ``datasets`` library: ``pip install 'vlat[data]'``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vlat.world.folder import FolderDataset, held_out, image_to_tensor

CAPTION_COLUMNS = ("caption", "captions", "text", "sentences", "sentence")
IMAGE_COLUMNS = ("image", "img")


def _columns(ds, image_column: str | None, caption_column: str | None) -> tuple[str, str]:
    import datasets

    names = list(ds.column_names)
    if image_column is None:
        typed = [k for k, f in ds.features.items() if isinstance(f, datasets.Image)]
        image_column = (typed or [k for k in names if k in IMAGE_COLUMNS] or [None])[0]
    if caption_column is None:
        caption_column = next((k for k in CAPTION_COLUMNS if k in names), None)
    for flag, col in (("--image-column", image_column), ("--caption-column", caption_column)):
        if col is None or col not in names:
            raise ValueError(f"the dataset has no {flag[2:].replace('-', ' ')} {col or ''} (columns: "
                             f"{', '.join(names)}); name it with {flag}")
    return image_column, caption_column


def _pairs(ds, image_column: str, caption_column: str, image_size: int, limit: int, name: str) -> FolderDataset:
    from PIL import Image

    images, captions = [], []
    for i, row in enumerate(ds.select(range(min(limit, len(ds))))):
        im, cap = row[image_column], row[caption_column]
        if isinstance(im, dict) and ("bytes" in im or "path" in im):   # an undecoded Image feature
            import io

            im = Image.open(io.BytesIO(im["bytes"])) if im.get("bytes") else Image.open(im["path"])
        elif isinstance(im, (str, Path)):
            im = Image.open(im)
        if not isinstance(im, Image.Image):
            raise ValueError(f"{name} row {i}: the image column holds {type(im).__name__}, not an image")
        caps = [cap] if isinstance(cap, str) else list(cap) if isinstance(cap, (list, tuple)) else []
        if not caps or not all(isinstance(c, str) and c.strip() for c in caps):
            raise ValueError(f"{name} row {i}: the caption column needs a non-empty string or list of strings")
        images.append(image_to_tensor(im, image_size))
        captions.append(caps)
    return FolderDataset.from_pairs(torch.stack(images), captions, root=f"hf:{name}")


def hub_pairs(spec: str, image_size: int = 64, image_column: str | None = None, caption_column: str | None = None,
              limit: int = 4000, holdout: float = 0.1, seed: int = 0) -> tuple[FolderDataset, FolderDataset | None]:
    """``(train, test)`` pairs of ``spec`` = ``NAME[:SPLIT]`` (a Hub dataset or a ``save_to_disk`` folder)."""
    try:
        import datasets
    except ImportError:
        raise ValueError("--data hf:... needs the datasets library: pip install 'vlat[data]'") from None
    name, _, split = spec.partition(":") if not Path(spec).is_dir() else (spec, "", "")
    try:
        ds = datasets.load_from_disk(name) if Path(name).is_dir() else datasets.load_dataset(name, split=split or None)
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as e:
        raise ValueError(f"could not load the dataset {name!r} ({type(e).__name__}: {str(e)[:200]})") from None
    test = None
    if isinstance(ds, datasets.DatasetDict):
        want = split or "train"
        if want not in ds:
            raise ValueError(f"the dataset {name!r} has the splits {', '.join(ds)}; name one: hf:{name}:SPLIT")
        test = ds["test"] if want == "train" and "test" in ds else None
        ds = ds[want]
    cols = _columns(ds, image_column, caption_column)
    train = _pairs(ds, *cols, image_size, limit, name)
    if test is not None:
        return train, _pairs(test, *cols, image_size, max(2, limit // 10), name)
    return held_out(train, holdout, seed)


__all__ = ["hub_pairs"]
