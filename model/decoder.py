"""The pixel decoder: attention-free, one query per pixel, conditioned per pixel on its DiT token."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from deco.model.config import DecoderConfig
from deco.model.dit import patchify, unpatchify
from deco.model.layers import modulate, rope_angles, xavier_init, zero_init

# The base of the rotary table whose cosines are the "rope_cos" code (the reference helper's default).
ROPE_CODE_THETA = 10000.0


def rope_cos_position_code(patch: int, freqs: int) -> torch.Tensor:
    """(patch*patch, freqs^2) float64: the reference T2I decoder's in-patch position code.

    Their code builds a 2D rotary table of width 2 * freqs^2 over a patch x patch grid at positions
    linspace(0, patch, patch) on both axes and casts the complex table to real, which keeps the real
    parts: value 2k is cos(x * f_k), value 2k + 1 is cos(y * f_k), f_k = 10000^(-2k / freqs^2).
    """
    positions = torch.linspace(0, patch, patch, dtype=torch.float64)
    return rope_angles(positions, positions, 2 * freqs**2, ROPE_CODE_THETA).cos()


def dct_position_code(patch: int, freqs: int) -> torch.Tensor:
    """(patch*patch, f*f) float64 orthonormal 2D DCT-II basis sampled at each in-patch pixel,
    f = min(freqs, patch): a smooth, bounded code of where a pixel sits in its patch, low frequencies first.
    (Not the C2I reference's code, which is cos(pi * pos * freq) / (1 + fx * fy) on linspace(0, 1).)
    """
    f = min(freqs, patch)
    n = torch.arange(patch, dtype=torch.float64)
    k = torch.arange(f, dtype=torch.float64)
    basis_1d = torch.cos(math.pi * (2 * n[:, None] + 1) * k[None, :] / (2 * patch))     # (patch, f)
    basis_1d[:, 0] *= math.sqrt(1.0 / patch)
    basis_1d[:, 1:] *= math.sqrt(2.0 / patch)
    basis_2d = basis_1d[:, None, :, None] * basis_1d[None, :, None, :]                   # (y, x, u, v)
    # Scale so entries are O(1) like pixel values rather than O(1/patch).
    return basis_2d.reshape(patch * patch, f * f) * patch


def position_code(cfg: DecoderConfig, patch: int) -> torch.Tensor:
    """The configured in-patch position code, (patch*patch, cfg.code_width(patch)) float64."""
    if cfg.position_code == "rope_cos":
        return rope_cos_position_code(patch, cfg.pos_freqs)
    return dct_position_code(patch, cfg.pos_freqs)


class DecoderBlock(nn.Module):
    """The reference's ResBlock: LayerNorm (with affine parameters, as theirs), AdaLN-modulated MLP."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaln = nn.Linear(width, 3 * width)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaln(F.silu(cond)).chunk(3, dim=-1)
        return x + gate * self.mlp(modulate(self.norm(x), shift, scale))


class PixelDecoder(nn.Module):
    def __init__(self, cfg: DecoderConfig, dit_hidden: int, patch: int):
        super().__init__()
        self.cfg, self.patch, self.width = cfg, patch, cfg.width
        self.register_buffer("position_code", position_code(cfg, patch).float(), persistent=False)
        # Two stacked Linears, as the reference (its NerfEmbedder, then its MLP's input_proj): the
        # same function class as one, but another parametrisation, so kept for the same training.
        self.pixel_in = nn.Linear(3 + self.position_code.shape[1], cfg.width)
        self.input_proj = nn.Linear(cfg.width, cfg.width)
        # The paper's "upsampling": a learned projection of each token to a condition per pixel.
        self.cond_proj = nn.Linear(dit_hidden, patch * patch * cfg.width)
        self.blocks = nn.ModuleList(DecoderBlock(cfg.width) for _ in range(cfg.depth))
        self.norm_out = nn.LayerNorm(cfg.width, elementwise_affine=False, eps=1e-6)
        self.out = nn.Linear(cfg.width, 3)
        # The reference's initialisation: xavier uniform with zero biases for its MLP's Linears,
        # AdaLN-Zero (each block starts as the identity) and a zero output layer; pixel_in (their
        # NerfEmbedder, outside that MLP) keeps PyTorch's default. Module.apply: see layers.xavier_init.
        for module in (self.input_proj, self.cond_proj, *(block.mlp for block in self.blocks)):
            module.apply(xavier_init)
        for module in (*(block.adaln for block in self.blocks), self.out):
            module.apply(zero_init)

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Recompute the position code in full precision (a builder that creates tensors in bf16,
        like ZeRO-3's partitioned init, would otherwise leave a coarser code than export loads;
        after .double() this restores the float64 code)."""
        self.position_code.copy_(position_code(self.cfg, self.patch))

    def forward(self, x_t: torch.Tensor, token_cond: torch.Tensor) -> torch.Tensor:
        """x_t (B, 3, H, W) and per-token condition (B, N, D) -> predicted velocity (B, 3, H, W)."""
        batch, _, height, width = x_t.shape
        dtype = self.pixel_in.weight.dtype
        pixels = patchify(x_t.to(dtype), self.patch)                                    # (B, N, p*p, 3)
        code = self.position_code.to(dtype).expand(*pixels.shape[:2], -1, -1)
        h = self.input_proj(self.pixel_in(torch.cat([pixels, code], dim=-1)))           # (B, N, p*p, w)
        cond = self.cond_proj(token_cond.to(dtype)).unflatten(-1, (self.patch * self.patch, self.width))
        for block in self.blocks:
            h = block(h, cond)
        velocity = self.out(self.norm_out(h))                                           # (B, N, p*p, 3)
        return unpatchify(velocity, self.patch, height, width)
