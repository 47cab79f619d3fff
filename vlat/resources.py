"""The files that ship with vlat: the sample image-caption pairs, the trained tiny checkpoints and the
saved benchmark rows the notebooks plot.

In the repository they sit in ``data_samples/`` and ``benchmarks/results/`` (and the explorer in
``apps/``); the build installs them inside the package as ``vlat.samples`` and ``vlat.results`` (and
``vlat.apps``). They are found through
:mod:`importlib.resources`, so a clone, an editable install and a wheel in Colab all find the same
files, whatever the current directory is.

>>> from vlat.resources import checkpoint, sample_pairs
>>> model = load_model(checkpoint("single_stream_tiny_itm"))          # doctest: +SKIP
>>> pairs = FolderDataset(sample_pairs())                             # doctest: +SKIP
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

CHECKPOINTS = {
    "single_stream_tiny_itm": "single-stream, image-text matching (MLM + ITM pre-training)",
    "single_stream_tiny_tf": "single-stream, true/false statements (the NLVR2 analogue)",
    "single_stream_tiny_qa": "single-stream, question answering (the VQA analogue)",
    "clip_tiny_itc": "CLIP dual encoder, contrastive pre-training",
    "albef_tiny_pretrain": "ALBEF, ITC + ITM + MLM pre-training",
}


def samples_dir() -> Path:
    """The installed ``data_samples`` folder (``vlat.samples``)."""
    root = Path(str(files("vlat.samples")))
    if not (root / "checkpoints").is_dir():
        raise FileNotFoundError(f"vlat's sample data is not installed beside the package (looked in {root}); "
                                "reinstall vlat (`pip install --force-reinstall vlat`)")
    return root


def checkpoint(name: str) -> Path:
    """The path of a shipped checkpoint, by name (see :data:`CHECKPOINTS`), e.g. ``"clip_tiny_itc"``."""
    name = name.removesuffix(".safetensors")
    if name not in CHECKPOINTS:
        raise ValueError(f"no shipped checkpoint {name!r}; vlat ships {', '.join(CHECKPOINTS)}")
    path = samples_dir() / "checkpoints" / f"{name}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"the shipped checkpoint {path} is missing; reinstall vlat")
    return path


def benchmark_results() -> Path:
    """The folder of saved benchmark rows (``benchmarks/results/`` in the repository, ``vlat.results``)."""
    return Path(str(files("vlat.results")))


def sample_pairs() -> Path:
    """The folder of sample image-caption pairs (the :class:`vlat.world.FolderDataset` format)."""
    return samples_dir() / "pairs"


__all__ = ["CHECKPOINTS", "benchmark_results", "checkpoint", "sample_pairs", "samples_dir"]
