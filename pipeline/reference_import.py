"""`deco model import-reference`: the authors' released Lightning checkpoints as our safetensors.

Their T2I checkpoint (PixNerDiT in src/models/transformer/dit_t2i_DeCo.py of the reference code)
holds, under `state_dict`, the denoiser twice (`denoiser.`, `ema_denoiser.`) and the REPA projector
under the diffusion trainer (`diffusion_trainer.proj.0.`). Our modules compute the same function with
the same parameter layout (fused SwiGLU w12 as `gate_up`, the patch embed's channel-major columns,
two stacked decoder input Linears, affine LayerNorms in the decoder blocks), so every tensor is
copied unchanged under our name; the one conversion is `y_pos_embedding` (1, L, D) -> `text_pos`
(L, D), a reshape. The model config is read off the tensor shapes with the reference variant options
(their RoPE positions, cosine position code, no padding mask, no SwiGLU biases) and travels in the
written file, so `deco sample`, `deco geneval generate` and a training stage's `init_from` build
the right model from it.

The checkpoint is read with torch.load(weights_only=True): tensors and plain containers only, plus
the few harmless classes in ALLOWED_GLOBALS; anything else is refused, named, before it is built.
"""
from __future__ import annotations

import argparse
import collections
import math
import pathlib
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from deco.model.config import ModelConfig
from deco.model.text_encoder import TextEncoderConfig
from deco.pipeline.config import ConfigError, apply_overrides, from_dict
from deco.pipeline.weights import write_weights

DENOISER_PREFIXES = {False: "denoiser.", True: "ema_denoiser."}   # keyed by --ema
PROJECTOR_PREFIX = "diffusion_trainer.proj.0."                      # nn.Sequential(nn.Sequential(MLP))
# Harmless plain-data classes a Lightning checkpoint may hold beside the tensors (loop and
# hyper-parameter containers); torch's weights_only unpickler already allows tensors, dicts,
# OrderedDict, lists, tuples, sets and numbers.
ALLOWED_GLOBALS = [collections.defaultdict, argparse.Namespace, pathlib.PurePosixPath, pathlib.PosixPath]

# Reference name (after the denoiser prefix) -> ours. `{i}` stands for a block index.
_BLOCK_COMMON = {
    "norm1.weight": "norm_attn.weight",
    "attn.q_norm.weight": "q_norm.weight",
    "attn.k_norm.weight": "k_norm.weight",
    "attn.proj.weight": "attn_out.weight",
    "attn.proj.bias": "attn_out.bias",
    "norm2.weight": "norm_mlp.weight",
    "mlp.w12.weight": "mlp.gate_up.weight",        # [gate; up] = their chunk(2) order
    "mlp.w3.weight": "mlp.down.weight",
    "adaLN_modulation.0.weight": "adaln.weight",
    "adaLN_modulation.0.bias": "adaln.bias",
}
_NAME_MAP = {
    "s_embedder.proj.weight": "dit.patch_embed.weight",   # columns in F.unfold order, as ours
    "s_embedder.proj.bias": "dit.patch_embed.bias",
    "t_embedder.mlp.0.weight": "dit.time_embed.mlp.0.weight",
    "t_embedder.mlp.0.bias": "dit.time_embed.mlp.0.bias",
    "t_embedder.mlp.2.weight": "dit.time_embed.mlp.2.weight",
    "t_embedder.mlp.2.bias": "dit.time_embed.mlp.2.bias",
    "y_embedder.proj.weight": "dit.text_proj.weight",
    "y_embedder.proj.bias": "dit.text_proj.bias",
    "y_embedder.norm.weight": "dit.text_norm.weight",
    "y_pos_embedding": "dit.text_pos",                    # (1, L, D) -> (L, D)
    "x_embedder.embedder.0.weight": "decoder.pixel_in.weight",
    "x_embedder.embedder.0.bias": "decoder.pixel_in.bias",
    "dec_net.input_proj.weight": "decoder.input_proj.weight",
    "dec_net.input_proj.bias": "decoder.input_proj.bias",
    "dec_net.cond_embed.weight": "decoder.cond_proj.weight",
    "dec_net.cond_embed.bias": "decoder.cond_proj.bias",
    "dec_net.final_layer.linear.weight": "decoder.out.weight",
    "dec_net.final_layer.linear.bias": "decoder.out.bias",
    **{f"blocks.{{i}}.{k}": f"dit.blocks.{{i}}.{v}" for k, v in _BLOCK_COMMON.items()},
    "blocks.{i}.attn.qkv_x.weight": "dit.blocks.{i}.qkv.weight",
    "blocks.{i}.attn.kv_y.weight": "dit.blocks.{i}.text_kv.weight",
    **{f"text_refine_blocks.{{i}}.{k}": f"dit.text_blocks.{{i}}.{v}" for k, v in _BLOCK_COMMON.items()},
    "text_refine_blocks.{i}.attn.qkv.weight": "dit.text_blocks.{i}.qkv.weight",
    "dec_net.res_blocks.{i}.in_ln.weight": "decoder.blocks.{i}.norm.weight",
    "dec_net.res_blocks.{i}.in_ln.bias": "decoder.blocks.{i}.norm.bias",
    "dec_net.res_blocks.{i}.mlp.0.weight": "decoder.blocks.{i}.mlp.0.weight",
    "dec_net.res_blocks.{i}.mlp.0.bias": "decoder.blocks.{i}.mlp.0.bias",
    "dec_net.res_blocks.{i}.mlp.2.weight": "decoder.blocks.{i}.mlp.2.weight",
    "dec_net.res_blocks.{i}.mlp.2.bias": "decoder.blocks.{i}.mlp.2.bias",
    "dec_net.res_blocks.{i}.adaLN_modulation.1.weight": "decoder.blocks.{i}.adaln.weight",
    "dec_net.res_blocks.{i}.adaLN_modulation.1.bias": "decoder.blocks.{i}.adaln.bias",
}
# The trainer's projector, after PROJECTOR_PREFIX: Linear, SiLU, Linear, SiLU, Linear as ours.
_PROJECTOR_MAP = {f"{index}.{kind}": f"repa_projector.{index}.{kind}" for index in (0, 2, 4) for kind in ("weight", "bias")}
_BLOCK_INDEX = re.compile(r"^(blocks|text_refine_blocks|dec_net\.res_blocks)\.(\d+)\.")

# What `--set` may change: what the checkpoint does not determine. Everything else is fixed by the
# tensor shapes or is a constant of the reference code.
SETTABLE = ("model.resolution", "model.repa.block", "model.dit.attention_backend", "text_encoder.")


@dataclass(kw_only=True)
class ImportConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)

    def validate(self) -> None:
        self.model.validate()


def our_name(reference_name: str) -> str | None:
    """Our parameter name for a reference denoiser name (prefix stripped); None if it has no place."""
    block = _BLOCK_INDEX.match(reference_name)
    pattern = _BLOCK_INDEX.sub(r"\1.{i}.", reference_name) if block else reference_name
    target = _NAME_MAP.get(pattern)
    return None if target is None else target.replace("{i}", block.group(2)) if block else target


def load_reference_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """`state_dict` of a Lightning checkpoint, read without running any code the file names."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(ALLOWED_GLOBALS):
            try:   # mmap: a 1 B model's checkpoint with two copies and Adam moments is ~18 GB
                checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as err:
                if "mmap" not in str(err):
                    raise
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ConfigError(f"{path}: refused to unpickle {_blocked_globals(path) or 'an object'}, which is neither a "
                          f"tensor nor on the importer's allow-list ({err.__class__.__name__})") from None
    except (RuntimeError, EOFError, ValueError) as err:
        raise ConfigError(f"{path} is not a readable torch checkpoint: {str(err).splitlines()[0]}") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise ConfigError(f"{path} has no `state_dict`: not a Lightning checkpoint of the reference code")
    return checkpoint["state_dict"]


def _blocked_globals(path: Path) -> str:
    try:
        blocked = [name for name in torch.serialization.get_unsafe_globals_in_checkpoint(path)
                   if name not in {f"{c.__module__}.{c.__qualname__}" for c in ALLOWED_GLOBALS}]
    except Exception:  # noqa: BLE001 - only an error message depends on it
        return ""
    return ", ".join(blocked)


def _count(state: dict, pattern: str) -> int:
    return sum(1 for name in state if re.fullmatch(pattern, name))


def reference_model_tree(denoiser: dict[str, torch.Tensor], projector: dict[str, torch.Tensor]) -> dict:
    """Our model config (a plain tree) read off the reference tensors' shapes, reference variant."""
    try:
        hidden, patch_values = denoiser["s_embedder.proj.weight"].shape
        head_dim = denoiser["blocks.0.attn.q_norm.weight"].shape[0]
        code_width = denoiser["x_embedder.embedder.0.weight"].shape[1] - 3
        tree = {
            "dit": {
                "patch_size": math.isqrt(patch_values // 3), "hidden": hidden, "heads": hidden // head_dim,
                "depth": _count(denoiser, r"blocks\.\d+\.norm1\.weight"),
                "text_refine_depth": _count(denoiser, r"text_refine_blocks\.\d+\.norm1\.weight"),
                "mlp_hidden": denoiser["blocks.0.mlp.w3.weight"].shape[1],
                "text_dim": denoiser["y_embedder.proj.weight"].shape[1],
                "text_len": denoiser["y_pos_embedding"].shape[1],
                "time_freq_dim": denoiser["t_embedder.mlp.0.weight"].shape[1],
                # Constants of their code and the reference variant (model/config.py).
                "rope_theta": 10000.0, "time_max_period": 10.0, "mask_text_padding": False,
                "rope_positions": "reference", "mlp_bias": False,
            },
            "decoder": {
                "width": denoiser["dec_net.input_proj.weight"].shape[0],
                "depth": _count(denoiser, r"dec_net\.res_blocks\.\d+\.in_ln\.weight"),
                "position_code": "rope_cos", "pos_freqs": math.isqrt(code_width),
            },
            "repa": {"enabled": bool(projector),
                     "teacher_dim": projector["4.weight"].shape[0] if "4.weight" in projector else 768},
            "resolution": 512,   # the released T2I checkpoint is the 512 px fine-tuned model
        }
    except KeyError as err:
        raise ConfigError(f"the checkpoint lacks {err.args[0]!r}: not the reference's T2I denoiser") from None
    return tree


def convert_reference(state: dict[str, torch.Tensor], ema: bool,
                      overrides: list[str] = ()) -> tuple[ImportConfig, dict[str, torch.Tensor]]:
    """(config, our state dict) from a reference Lightning `state_dict`; refuses leftovers and gaps."""
    prefix = DENOISER_PREFIXES[ema]
    denoiser = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not denoiser:
        raise ConfigError(f"the checkpoint has no `{prefix}` tensors" + ("" if ema else " (try --ema)"))
    projector = {k[len(PROJECTOR_PREFIX):]: v for k, v in state.items() if k.startswith(PROJECTOR_PREFIX)}
    known = tuple(DENOISER_PREFIXES.values()) + (PROJECTOR_PREFIX,)
    strangers = sorted(k for k in state if not k.startswith(known))
    if strangers:
        raise ConfigError(f"the checkpoint holds tensors outside the denoiser and REPA projector: {strangers[:5]}")

    for key in overrides:
        name = key.partition("=")[0].strip()
        if not any(name == s or (s.endswith(".") and name.startswith(s)) for s in SETTABLE):
            raise ConfigError(f"--set {name}: fixed by the reference checkpoint; settable: {', '.join(SETTABLE)}")
    tree = {"model": reference_model_tree(denoiser, projector),
            "text_encoder": {"kind": "causal_lm", "path": "Qwen/Qwen3-1.7B", "dtype": "bfloat16"}}
    tree["text_encoder"]["max_length"] = tree["model"]["dit"]["text_len"]
    apply_overrides(tree, {}, overrides)
    try:
        cfg = from_dict(ImportConfig, tree, source="the reference checkpoint")
    except ValueError as err:   # a --set value a config's own checks refuse
        raise ConfigError(str(err)) from None

    ours, leftover = {}, []
    for name, tensor in denoiser.items():
        target = our_name(name)
        if target is None:
            leftover.append(prefix + name)
        else:   # the one layout change: their (1, L, D) text positions are our (L, D) table
            ours[target] = tensor.reshape(tensor.shape[1:]) if name == "y_pos_embedding" else tensor
    for name, tensor in projector.items():
        if name in _PROJECTOR_MAP:
            ours[_PROJECTOR_MAP[name]] = tensor
        else:
            leftover.append(PROJECTOR_PREFIX + name)
    if leftover:
        raise ConfigError(f"reference tensors with no place in our model: {sorted(leftover)[:8]}")
    with torch.device("meta"):
        expected = {k: v.shape for k, v in cfg.model.build().state_dict().items()}
    missing = sorted(set(expected) - set(ours))
    unexpected = sorted(set(ours) - set(expected))
    wrong = [f"{k} {tuple(ours[k].shape)} vs {tuple(expected[k])}" for k in sorted(set(ours) & set(expected))
             if ours[k].shape != expected[k]]
    if missing or unexpected or wrong:
        raise ConfigError(f"the reference tensors do not fill our model: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}, wrong shapes {wrong[:5]}")
    return cfg, ours


def import_reference(checkpoint: str | Path, out: str | Path, ema: bool = False, overrides: list[str] = ()) -> Path:
    """Convert a reference checkpoint into our safetensors (float32, model config in the metadata),
    REPA projector included so that a training stage started from it continues the reference's."""
    cfg, ours = convert_reference(load_reference_state_dict(checkpoint), ema, list(overrides))
    return write_weights(out, ours, cfg.model, cfg.text_encoder,
                         extra={"imported_from": Path(checkpoint).name, "ema": ema})
