"""Models behind one contract (:mod:`vlat.models.base`), built by name and preset, saved without pickle.

>>> model = build_model("clip", "tiny")                     # doctest: +SKIP
>>> save_model(model, "clip.safetensors"); load_model("clip.safetensors")   # doctest: +SKIP
"""

from __future__ import annotations

import json
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


def build_model(name: str, preset: str = "tiny", **overrides) -> VLModel:
    """A freshly initialised model by family name and preset; ``overrides`` replace config fields."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    cls, cfg_cls, presets = MODELS[name]
    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r} for {name}; choose one of {', '.join(presets)}")
    unknown = set(overrides) - set(cfg_cls.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown config field(s) {sorted(unknown)} for {name}")
    return cls(cfg_cls(**{**asdict(presets[preset]), **overrides}))


def model_tokenizer(model: VLModel):
    """The tokenizer a model was built for (the toy world's unless it came from a checkpoint)."""
    from vlat.world.tokenizer import load_tokenizer

    if model.config.tokenizer is None:
        return load_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model.config.tokenizer)


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
    return json.loads(meta["vlat"])


def load_model(path: str | Path, map_location: str = "cpu") -> VLModel:
    """Rebuild a model from a :func:`save_model` file or a training checkpoint (no pickle), with a clear
    error if the file is damaged."""
    from vlat.checkpoint import load_tensors

    info = read_metadata(path)
    if info["kind"] not in MODELS:
        raise ValueError(f"{path}: unknown model kind {info['kind']!r}")
    cls, cfg_cls, _ = MODELS[info["kind"]]
    cfg = info["config"]
    for k in ("image_mean", "image_std"):  # JSON turns tuples into lists
        if k in cfg:
            cfg[k] = tuple(cfg[k])
    for k in cls.retired_config:           # fields older vlat versions wrote (CLIP's training loss)
        cfg.pop(k, None)
    model = cls(cfg_cls(**cfg))
    state = load_tensors(path, map_location)
    if any(k.startswith("model.") for k in state):  # a resumable training checkpoint: take the weights
        state = {k[6:]: v for k, v in state.items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not fit a {info['kind']} model "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.checkpoint_info = info
    return model.eval()


__all__ = ["MODELS", "AlbefConfig", "AlbefModel", "ClipConfig", "ClipDualEncoder", "PerturbationSite", "SingleStreamConfig",
           "SingleStreamModel", "TaskOutput", "VLModel", "build_model", "load_model", "model_tokenizer",
           "perturbed", "read_metadata", "save_model"]
