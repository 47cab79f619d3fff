"""Models behind one contract (:mod:`vlat.models.base`), built by name and preset, saved without pickle.

>>> model = build_model("clip", "tiny")                     # doctest: +SKIP
>>> save_model(model, "clip.safetensors"); load_model("clip.safetensors")   # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict
from pathlib import Path

from vlat.models.albef import PRESETS as ALBEF_PRESETS
from vlat.models.albef import AlbefConfig, AlbefModel
from vlat.models.base import PerturbationSite, TaskOutput, VLModel, perturbed
from vlat.models.clip import PRESETS as CLIP_PRESETS
from vlat.models.clip import ClipConfig, ClipDualEncoder
from vlat.models.single_stream import PRESETS as SINGLE_PRESETS
from vlat.models.single_stream import SingleStreamConfig, SingleStreamModel

MODELS = {
    "single_stream": (SingleStreamModel, SingleStreamConfig, SINGLE_PRESETS),
    "clip": (ClipDualEncoder, ClipConfig, CLIP_PRESETS),
    "albef": (AlbefModel, AlbefConfig, ALBEF_PRESETS),
}


MAX_LAYERS = 64                 # per stack: deeper configs are refused before anything is built
MAX_INT = 10_000_000            # any other integer setting (widths, vocabulary, image size, queue)
MAX_GB = 8.0                    # parameters and buffers of a model, fp32


def check_config(name: str, cfg: dict) -> tuple[dict, VLModel]:
    """A model family's config fields, checked before anything is allocated: known fields, each of its
    default's type, integers in [0, MAX_INT] (depths up to MAX_LAYERS), floats finite; then the model is
    built on the meta device (no memory) and refused if it would exceed MAX_GB. Returns the fields and
    that meta-device model (its shapes, without weights)."""
    if not isinstance(cfg, dict):
        raise ValueError(f"a {name} config must be an object of fields, got {type(cfg).__name__}")
    cls, cfg_cls, presets = MODELS[name]
    defaults = asdict(next(iter(presets.values())))
    unknown = set(cfg) - set(cfg_cls.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown config field(s) {sorted(unknown)} for {name}")
    for k, v in cfg.items():
        d = defaults[k]
        if isinstance(d, bool):
            ok = isinstance(v, bool)
        elif isinstance(d, int):
            ok = isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= (MAX_LAYERS if "layers" in k else MAX_INT)
        elif isinstance(d, float):
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        elif isinstance(d, (tuple, list)):
            ok = isinstance(v, (tuple, list)) and len(v) == len(d) and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)
        else:                                   # strings and None (tokenizer, checkpoint names)
            ok = v is None or isinstance(v, str)
        if not ok:
            integer = isinstance(d, int) and not isinstance(d, bool)
            bound = f" in [0, {MAX_LAYERS if 'layers' in k else MAX_INT}]" if integer else ""
            raise ValueError(f"config field {k} = {v!r} is not a valid {type(d).__name__}{bound}")
    cfg = {**cfg, **{k: tuple(v) for k, v in cfg.items() if isinstance(defaults[k], tuple)}}
    import torch

    try:
        with torch.device("meta"):
            probe = cls(cfg_cls(**cfg))
    except (ValueError, TypeError, RuntimeError, ZeroDivisionError) as e:
        raise ValueError(f"this {name} configuration cannot be built: {e}") from None
    n = sum(t.numel() for t in probe.parameters()) + sum(t.numel() for t in probe.buffers())
    if n * 4 / 1e9 > MAX_GB:
        raise ValueError(f"this {name} configuration asks for {n * 4 / 1e9:.1f} GB of weights (at most "
                         f"{MAX_GB:.0f} GB); refused before allocating anything")
    return cfg, probe


def build_model(name: str, preset: str = "tiny", **overrides) -> VLModel:
    """A freshly initialised model by family name and preset; ``overrides`` replace config fields."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    cls, cfg_cls, presets = MODELS[name]
    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r} for {name}; choose one of {', '.join(presets)}")
    cfg, _ = check_config(name, {**asdict(presets[preset]), **overrides})
    return cls(cfg_cls(**cfg))


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?")


def check_tokenizer_source(name) -> None:
    """A tokenizer named by a config (a checkpoint's header) must be a local folder or a Hugging Face id,
    and a folder must not ask for code of its own (``auto_map``): loading a checkpoint never runs code."""
    if not isinstance(name, str) or not name.strip() or len(name) > 200:
        raise ValueError(f"tokenizer {str(name)[:60]!r}: not a folder or a Hugging Face id")
    path = Path(name)
    if path.is_dir():
        for f in ("tokenizer_config.json", "config.json"):
            try:
                text = (path / f).read_text() if (path / f).is_file() else "{}"
                asks = "auto_map" in json.loads(text)
            except (ValueError, RecursionError, OSError):
                raise ValueError(f"tokenizer folder {name}: {f} is not valid JSON") from None
            if asks:
                raise ValueError(f"tokenizer folder {name} asks to run its own code ({f} has auto_map); vlat loads "
                                 "tokenizers without remote code")
        return
    if ".." in name or not HUB_ID.fullmatch(name):
        raise ValueError(f"tokenizer {name[:60]!r} is neither a local folder nor a Hugging Face id (owner/name)")


def model_tokenizer(model: VLModel):
    """The tokenizer a model was built for (the toy world's unless it came from a checkpoint), loaded
    without remote code."""
    from vlat.world.tokenizer import load_tokenizer

    if model.config.tokenizer is None:
        return load_tokenizer()
    check_tokenizer_source(model.config.tokenizer)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model.config.tokenizer, trust_remote_code=False)


def checkpoint_metadata(model: VLModel, **info) -> dict[str, str]:
    cfg = asdict(model.config)
    return {"vlat": json.dumps({"kind": model.kind, "config": cfg, **info})}


def save_model(model: VLModel, path: str | Path, inference_only: bool = False, **info) -> None:
    """Write weights + config to one safetensors file, atomically (temporary file, then rename).

    ``inference_only`` leaves out what only training needs (:meth:`VLModel.inference_state`)."""
    from vlat.checkpoint import save_tensors

    state = dict(model.inference_state() if inference_only else model.state_dict())
    save_tensors(state, path, checkpoint_metadata(model, **info))


def read_metadata(path: str | Path) -> dict:
    from vlat.checkpoint import read_header

    meta = read_header(path)
    if "vlat" not in meta:
        raise ValueError(f"{path}: a safetensors file, but not a vlat model checkpoint (no 'vlat' metadata)")
    try:
        info = json.loads(meta["vlat"])
    except (ValueError, TypeError, RecursionError):
        raise ValueError(f"{path}: its vlat metadata is not valid JSON") from None
    if not isinstance(info, dict) or not isinstance(info.get("kind"), str) or "config" not in info:
        raise ValueError(f"{path}: its vlat metadata has no model kind and config")
    return info


def _model_weights(entries: dict) -> dict:
    """The model's entries of a file: all of a model file, the ``model.*`` ones of a resumable training
    checkpoint (prefix removed)."""
    if any(k.startswith("model.") for k in entries):
        return {k[6:]: v for k, v in entries.items() if k.startswith("model.")}
    return entries


def load_model(path: str | Path, map_location: str = "cpu") -> VLModel:
    """Rebuild a model from a :func:`save_model` file or a training checkpoint (no pickle), with a clear
    error if the file is damaged."""
    from vlat.checkpoint import load_tensors, tensor_shapes

    info = read_metadata(path)
    if info["kind"] not in MODELS:
        raise ValueError(f"{path}: unknown model kind {info['kind']!r}")
    cls, cfg_cls, _ = MODELS[info["kind"]]
    cfg = info["config"]
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: its model config is not an object of fields")
    for k in cls.retired_config:           # fields older vlat versions wrote (CLIP's training loss)
        cfg.pop(k, None)
    try:
        cfg, probe = check_config(info["kind"], cfg)   # bounds and size, before anything is allocated
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    want = {k: tuple(v.shape) for k, v in probe.state_dict().items()}   # meta device: shapes, no memory
    have = _model_weights(tensor_shapes(path))
    wrong = [k for k in have if k not in want or want[k] != have[k]]
    if wrong:
        k = wrong[0]
        raise ValueError(f"{path}: weights do not fit a {info['kind']} model of this config ({k!r}: "
                         f"{have[k]} in the file, {want.get(k, 'no such weight')} in the model)")
    model = cls(cfg_cls(**cfg))
    state = _model_weights(load_tensors(path, map_location))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not fit a {info['kind']} model "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.checkpoint_info = info
    return model.eval()


__all__ = ["MODELS", "AlbefConfig", "AlbefModel", "ClipConfig", "ClipDualEncoder", "PerturbationSite", "SingleStreamConfig",
           "SingleStreamModel", "TaskOutput", "VLModel", "build_model", "load_model", "model_tokenizer",
           "perturbed", "read_metadata", "save_model"]
