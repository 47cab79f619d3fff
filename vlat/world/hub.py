"""Image-caption pairs and image classes from a Hugging Face ``datasets`` source: ``vlat train --data hf:NAME[:SPLIT]``.

``NAME`` is a dataset on the Hub (``datasets.load_dataset``, online) or a folder written by
``save_to_disk`` (offline). The image column is the one of feature type ``Image`` (or named ``image``/
``img``), the caption column one named ``caption``, ``captions``, ``text``, ``sentences`` or
``sentence`` (a string or a list of strings per row); ``--image-column`` / ``--caption-column`` name
others. A ``DatasetDict`` with ``train`` and ``test`` splits is used so; otherwise a seeded 10 % of the
pairs is held out, as for a folder. At most ``limit`` training pairs are read (the first ones), so a
large dataset does not fill the memory: images are kept at the model's size.

For classification (``--task classify``, :func:`hub_classes`) the label column is the one of feature
type ``ClassLabel`` (or named ``label``, ``labels``, ``fine_label``), its class names the prompts'
words; ``--label-column`` names another. The first ``limit / classes`` images of each class are read.

Needs the optional ``datasets`` library: ``pip install 'vlat[data]'``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vlat.world.corruptions import to_uint8
from vlat.world.folder import ClassFolderDataset, FolderDataset, held_out, image_to_tensor

CAPTION_COLUMNS = ("caption", "captions", "text", "sentences", "sentence")
IMAGE_COLUMNS = ("image", "img")
LABEL_COLUMNS = ("label", "labels", "fine_label")


def _column(ds, flag: str, col: str | None, feature_type, names_it: tuple[str, ...]) -> str:
    """The column ``flag`` names, else the first of feature type ``feature_type``, else the first named one of
    ``names_it``; a clear error when there is none."""
    names = list(ds.column_names)
    if col is None:
        typed = [k for k, f in ds.features.items() if feature_type is not None and isinstance(f, feature_type)]
        col = (typed or [k for k in names if k in names_it] or [None])[0]
    if col is None or col not in names:
        raise ValueError(f"the dataset has no {flag[2:].replace('-', ' ')} {col or ''} (columns: "
                         f"{', '.join(names)}); name it with {flag}")
    return col


def _columns(ds, image_column: str | None, caption_column: str | None) -> tuple[str, str]:
    import datasets

    return (_column(ds, "--image-column", image_column, datasets.Image, IMAGE_COLUMNS),
            _column(ds, "--caption-column", caption_column, None, CAPTION_COLUMNS))


def _image(im, name: str, i: int):
    """A row's image cell as a PIL image (decoded, undecoded bytes or a path), or a clear error."""
    from PIL import Image

    if isinstance(im, dict) and ("bytes" in im or "path" in im):   # an undecoded Image feature
        import io

        im = Image.open(io.BytesIO(im["bytes"])) if im.get("bytes") else Image.open(im["path"])
    elif isinstance(im, (str, Path)):
        im = Image.open(im)
    if not isinstance(im, Image.Image):
        raise ValueError(f"{name} row {i}: the image column holds {type(im).__name__}, not an image")
    return im


def _pairs(ds, image_column: str, caption_column: str, image_size: int, limit: int, name: str) -> FolderDataset:
    images, captions = [], []
    for i, row in enumerate(ds.select(range(min(limit, len(ds))))):
        im, cap = _image(row[image_column], name, i), row[caption_column]
        caps = [cap] if isinstance(cap, str) else list(cap) if isinstance(cap, (list, tuple)) else []
        if not caps or not all(isinstance(c, str) and c.strip() for c in caps):
            raise ValueError(f"{name} row {i}: the caption column needs a non-empty string or list of strings")
        images.append(image_to_tensor(im, image_size))
        captions.append(caps)
    return FolderDataset.from_pairs(torch.stack(images), captions, root=f"hf:{name}")


def _load(spec: str):
    """``(name, split, dataset, test dataset or None)`` of ``NAME[:SPLIT]``: a ``DatasetDict``'s ``train``
    split comes with its ``test`` split."""
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
    return name, split, ds, test


def hub_pairs(spec: str, image_size: int = 64, image_column: str | None = None, caption_column: str | None = None,
              limit: int = 4000, holdout: float = 0.1, seed: int = 0) -> tuple[FolderDataset, FolderDataset | None]:
    """``(train, test)`` pairs of ``spec`` = ``NAME[:SPLIT]`` (a Hub dataset or a ``save_to_disk`` folder)."""
    name, _, ds, test = _load(spec)
    cols = _columns(ds, image_column, caption_column)
    train = _pairs(ds, *cols, image_size, limit, name)
    if test is not None:
        return train, _pairs(test, *cols, image_size, max(2, limit // 10), name)
    return held_out(train, holdout, seed)


def _classes(ds, image_column: str, label_column: str, image_size: int, per_class: int, name: str, template: str,
             class_names: list[str]) -> ClassFolderDataset:
    labels = list(ds[label_column])
    rows: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        if not isinstance(y, int) or not 0 <= y < len(class_names):
            raise ValueError(f"{name} row {i}: the label column holds {y!r}, not a class index below "
                             f"{len(class_names)}")
        if len(rows.setdefault(y, [])) < per_class:
            rows[y].append(i)
    keep = sorted(i for idx in rows.values() for i in idx)
    images = torch.stack([to_uint8(image_to_tensor(_image(ds[i][image_column], name, i), image_size))
                          for i in keep])                   # 8 bits a channel: a quarter of the memory of floats
    return ClassFolderDataset.from_images(images, [labels[i] for i in keep], class_names, template, root=f"hf:{name}")


def hub_classes(spec: str, image_size: int = 64, image_column: str | None = None, label_column: str | None = None,
                limit: int = 4000, holdout: float = 0.1, seed: int = 0, template: str = "a photo of a {}"
                ) -> tuple[ClassFolderDataset, ClassFolderDataset | None]:
    """``(train, test)`` image classes of ``spec`` = ``NAME[:SPLIT]``: the first ``limit / classes`` images of
    every class (a tenth as many per class from a ``test`` split, else a seeded ``holdout`` share held out).

    >>> train, test = hub_classes("uoft-cs/cifar10", 224, limit=2000)    # doctest: +SKIP
    >>> train.class_texts[:2]                                             # doctest: +SKIP
    ['a photo of a airplane', 'a photo of a automobile']
    """
    import datasets

    name, _, ds, test = _load(spec)
    image_column = _column(ds, "--image-column", image_column, datasets.Image, IMAGE_COLUMNS)
    label_column = _column(ds, "--label-column", label_column, datasets.ClassLabel, LABEL_COLUMNS)
    feature = ds.features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        class_names = list(feature.names)
    else:
        class_names = [str(k) for k in range(max(list(ds[label_column])) + 1)]
    if len(class_names) < 2:
        raise ValueError(f"{name}: the label column {label_column} has fewer than two classes")
    per_class = max(1, limit // len(class_names))
    train = _classes(ds, image_column, label_column, image_size, per_class, name, template, class_names)
    if test is not None:
        return train, _classes(test, image_column, label_column, image_size, max(1, per_class // 10), name, template,
                               class_names)
    return held_out(train, holdout, seed)


__all__ = ["hub_classes", "hub_pairs"]
