"""Portable generator weights: one safetensors file that carries its own configs as metadata.

`deco sample` and GenEval generation need only this file: the model config and the text-encoder
config travel in the safetensors header, so there is nothing to keep in sync by hand.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from deco.model.config import ModelConfig, missing_variant_fields
from deco.model.deco import DeCo
from deco.model.text_encoder import TextEncoderConfig
from deco.pipeline.config import ConfigError, from_dict, to_dict

MODEL_KEY = "deco.model_config"
TEXT_KEY = "deco.text_encoder"


def save_weights(path: str | Path, model: DeCo, text_encoder: TextEncoderConfig, extra: dict | None = None) -> Path:
    """Write the generator (no REPA projector) as float32 safetensors with its configs."""
    return write_weights(path, model.generator_state_dict(), model.cfg, text_encoder, extra)


def write_weights(path: str | Path, tensors: dict[str, torch.Tensor], model_cfg: ModelConfig,
                  text_encoder: TextEncoderConfig, extra: dict | None = None) -> Path:
    """Write `tensors` (our parameter names) as float32 safetensors with the configs as metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
    metadata = {MODEL_KEY: json.dumps(to_dict(model_cfg)), TEXT_KEY: json.dumps(to_dict(text_encoder))}
    metadata.update({f"deco.{k}": json.dumps(v) for k, v in (extra or {}).items()})
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)  # a reader never sees a half-written file
    return path


def read_metadata(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except SafetensorError as err:  # truncated, or not a weights file at all
        raise ConfigError(f"{path} is not a readable .safetensors file: {err}") from None
    if MODEL_KEY not in metadata:
        raise ConfigError(f"{path} has no {MODEL_KEY} metadata: it was not written by `deco export` or save_weights")
    return metadata


def model_config_tree(path: str | Path, metadata: dict | None = None) -> dict:
    """The model config a weights file carries, as a plain tree; refuses the files of an architecture
    variant this version does not build (written before the variant fields existed)."""
    tree = json.loads((metadata or read_metadata(path))[MODEL_KEY])
    missing = missing_variant_fields(tree)
    if missing:
        raise ConfigError(f"{path} predates the variant fields {', '.join(missing)}: its weights are of the earlier "
                          f"architecture (SwiGLU biases, arange RoPE, DCT code, one decoder input Linear), "
                          f"which this version does not build")
    return tree


def load_weights(path: str | Path, device: str | torch.device = "cpu") -> tuple[DeCo, TextEncoderConfig]:
    """Build the model from the file's own config, so the variant it was trained as (RoPE positions,
    position code, masking, ...), and load its weights (strict, REPA projector off)."""
    metadata = read_metadata(path)
    model_cfg = from_dict(ModelConfig, model_config_tree(path, metadata), source=f"{path} metadata")
    model_cfg.repa.enabled = False  # sampling never needs the training-only projector
    text_cfg = from_dict(TextEncoderConfig, json.loads(metadata[TEXT_KEY]), source=f"{path} metadata")
    model = model_cfg.build()
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        # A file may carry the training-only REPA projector (an imported reference checkpoint does,
        # for init_from); sampling leaves it out.
        state = {k: f.get_tensor(k) for k in f.keys() if not k.startswith("repa_projector.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(f"{path}: weights do not match the config (missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model.to(device).eval(), text_cfg
