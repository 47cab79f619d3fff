"""Safetensors files written atomically and read with errors that name the problem.

Nothing here unpickles: a checkpoint is tensors plus string metadata, so loading a file from a
stranger cannot run code (and :func:`vlat.models.load_model` checks the model a header asks for against
bounds and against the tensors' shapes before allocating anything; a tokenizer named in a header is
loaded with ``trust_remote_code=False`` and refused if it asks for its own code). A write goes to
``<name>.tmp`` in the same folder and is renamed over the target only when complete, so a crash
mid-write never leaves a half checkpoint under the real name.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    # safetensors refuses shared storage and non-contiguous tensors: store independent copies
    flat = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    save_file(flat, str(tmp), metadata=metadata)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_full_header(path: str | Path) -> dict:
    """The whole JSON header of a safetensors file (tensor entries and ``__metadata__``), or
    ``ValueError`` if the file is not a valid one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100_000_000 or n > path.stat().st_size - 8:
                raise ValueError("header length out of range")
            header = json.loads(f.read(n))
    except RecursionError:
        raise ValueError(f"{path}: corrupt or not a safetensors checkpoint (its header nests too deeply)") from None
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: corrupt or not a safetensors checkpoint ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupt or not a safetensors checkpoint (its header is not an object)")
    return header


def read_header(path: str | Path) -> dict[str, str]:
    """The metadata of a safetensors file, or ``ValueError`` if the file is not a valid one."""
    meta = read_full_header(path).get("__metadata__", {}) or {}
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: corrupt or not a safetensors checkpoint (its metadata is not an object)")
    return meta


def tensor_shapes(path: str | Path) -> dict[str, tuple]:
    """``{name: shape}`` of the tensors a safetensors file holds, from its header (nothing is read)."""
    header = read_full_header(path)
    out = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        if not isinstance(v, dict) or not isinstance(v.get("shape"), list):
            raise ValueError(f"{path}: corrupt checkpoint (entry {k[:60]!r} has no shape)")
        out[k] = tuple(v["shape"])
    return out


def load_tensors(path: str | Path, map_location: str = "cpu") -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    read_header(path)
    try:
        return load_file(str(path), device=str(map_location))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"{path}: corrupt checkpoint ({e})") from None
