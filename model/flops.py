"""Analytic cost of DeCo per sample, from the config alone (spec section 10), for MFU.

Counts multiply-accumulates of every matmul (linear layers and attention) and reports FLOPs as
2 x MACs. Element-wise work (norms, activations, RoPE) is left out, as MFU conventions do.
"""
from __future__ import annotations

from dataclasses import dataclass

from deco.model.config import ModelConfig


@dataclass(frozen=True)
class FlopCount:
    forward: float        # FLOPs of one generator forward for one sample
    train: float          # forward + backward (x3) of generator and REPA projector for one sample


def deco_flops(cfg: ModelConfig, resolution: int | None = None, text_tokens: int | None = None) -> FlopCount:
    res = resolution or cfg.resolution
    dit, dec = cfg.dit, cfg.decoder
    d, p, m = dit.hidden, dit.patch_size, dit.mlp_hidden
    n = (res // p) ** 2
    l = text_tokens or dit.text_len
    pixels = res * res

    per_sample = dit.time_freq_dim * d + d * d + 6 * d * d * (dit.depth + dit.text_refine_depth)
    if dit.pooled_text:
        per_sample += dit.text_dim * d + d * d           # the pooled-caption MLP
    embed = n * 3 * p * p * d + l * dit.text_dim * d
    dense = 4 * d * d + 3 * d * m                       # qkv + out, SwiGLU
    text_block = l * dense + 2 * l * l * d
    image_block = n * dense + 2 * l * d * d + 2 * n * (n + l) * d
    f = dec.code_width(p)
    w = dec.width
    # Per pixel: pixel_in, input_proj, per block AdaLN (3w^2) + MLP (2w^2), output.
    decoder = n * d * p * p * w + pixels * ((3 + f) * w + w * w + dec.depth * (3 * w * w + 2 * w * w) + 3 * w)
    forward_macs = per_sample + embed + dit.text_refine_depth * text_block + dit.depth * image_block + decoder

    projector_macs = n * (2 * d * d + d * cfg.repa.teacher_dim) if cfg.repa.enabled else 0
    return FlopCount(forward=2.0 * forward_macs, train=3 * 2.0 * (forward_macs + projector_macs))
