"""Portable generator weights: one safetensors file that carries its own configs as metadata.

`deco sample` and GenEval generation need only this file: the model config and the text-encoder
config travel in the safetensors header, so there is nothing to keep in sync by hand.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from deco.model.config import ModelConfig
from deco.model.deco import DeCo
from deco.model.text_encoder import TextEncoderConfig
from deco.pipeline.config import ConfigError, from_dict, to_dict

MODEL_KEY = "deco.model_config"
TEXT_KEY = "deco.text_encoder"


def save_weights(path: str | Path, model: DeCo, text_encoder: TextEncoderConfig, extra: dict | None = None) -> Path:
    """Write the generator (no REPA projector) as float32 safetensors with its configs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in model.generator_state_dict().items()}
    metadata = {MODEL_KEY: json.dumps(to_dict(model.cfg)), TEXT_KEY: json.dumps(to_dict(text_encoder))}
    metadata.update({f"deco.{k}": json.dumps(v) for k, v in (extra or {}).items()})
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)  # a reader never sees a half-written file
    return path


def read_metadata(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if MODEL_KEY not in metadata:
        raise ConfigError(f"{path} has no {MODEL_KEY} metadata: it was not written by `deco export` or save_weights")
    return metadata


def load_weights(path: str | Path, device: str | torch.device = "cpu") -> tuple[DeCo, TextEncoderConfig]:
    """Build the model from the file's own config and load its weights (strict, REPA projector off)."""
    metadata = read_metadata(path)
    model_cfg = from_dict(ModelConfig, json.loads(metadata[MODEL_KEY]), source=f"{path} metadata")
    model_cfg.repa.enabled = False  # sampling never needs the training-only projector
    text_cfg = from_dict(TextEncoderConfig, json.loads(metadata[TEXT_KEY]), source=f"{path} metadata")
    model = model_cfg.build()
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the config (missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model.to(device).eval(), text_cfg
