"""The pixel decoder: attention-free, one query per pixel, conditioned per pixel on its DiT token."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from deco.model.config import DecoderConfig
from deco.model.dit import patchify, unpatchify
from deco.model.layers import modulate


def dct_position_code(patch: int, freqs: int) -> torch.Tensor:
    """(patch*patch, f*f) orthonormal 2D DCT-II basis sampled at each in-patch pixel, f = min(freqs, patch).

    A smooth, bounded code of where a pixel sits inside its patch; low frequencies first.
    """
    f = min(freqs, patch)
    n = torch.arange(patch, dtype=torch.float64)
    k = torch.arange(f, dtype=torch.float64)
    basis_1d = torch.cos(math.pi * (2 * n[:, None] + 1) * k[None, :] / (2 * patch))     # (patch, f)
    basis_1d[:, 0] *= math.sqrt(1.0 / patch)
    basis_1d[:, 1:] *= math.sqrt(2.0 / patch)
    basis_2d = basis_1d[:, None, :, None] * basis_1d[None, :, None, :]                   # (y, x, u, v)
    # Scale so entries are O(1) like pixel values rather than O(1/patch).
    return (basis_2d.reshape(patch * patch, f * f) * patch).float()


class DecoderBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaln = nn.Linear(width, 3 * width)
        nn.init.zeros_(self.adaln.weight)  # AdaLN-Zero: each block starts as the identity
        nn.init.zeros_(self.adaln.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaln(F.silu(cond)).chunk(3, dim=-1)
        return x + gate * self.mlp(modulate(self.norm(x), shift, scale))


class PixelDecoder(nn.Module):
    def __init__(self, cfg: DecoderConfig, dit_hidden: int, patch: int):
        super().__init__()
        self.patch, self.width, self.pos_freqs = patch, cfg.width, cfg.pos_freqs
        self.register_buffer("position_code", dct_position_code(patch, cfg.pos_freqs), persistent=False)
        self.pixel_in = nn.Linear(3 + self.position_code.shape[1], cfg.width)
        # The paper's "upsampling": a learned projection of each token to a condition per pixel.
        self.cond_proj = nn.Linear(dit_hidden, patch * patch * cfg.width)
        self.blocks = nn.ModuleList(DecoderBlock(cfg.width) for _ in range(cfg.depth))
        self.norm_out = nn.LayerNorm(cfg.width, elementwise_affine=False, eps=1e-6)
        self.out = nn.Linear(cfg.width, 3)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Recompute the position code in full precision (a builder that creates tensors in bf16,
        like ZeRO-3's partitioned init, would otherwise leave a coarser code than export loads)."""
        self.position_code.copy_(dct_position_code(self.patch, self.pos_freqs))

    def forward(self, x_t: torch.Tensor, token_cond: torch.Tensor) -> torch.Tensor:
        """x_t (B, 3, H, W) and per-token condition (B, N, D) -> predicted velocity (B, 3, H, W)."""
        batch, _, height, width = x_t.shape
        dtype = self.pixel_in.weight.dtype
        pixels = patchify(x_t.to(dtype), self.patch)                                    # (B, N, p*p, 3)
        code = self.position_code.to(dtype).expand(*pixels.shape[:2], -1, -1)
        h = self.pixel_in(torch.cat([pixels, code], dim=-1))                            # (B, N, p*p, w)
        cond = self.cond_proj(token_cond.to(dtype)).unflatten(-1, (self.patch * self.patch, self.width))
        for block in self.blocks:
            h = block(h, cond)
        velocity = self.out(self.norm_out(h))                                           # (B, N, p*p, 3)
        return unpatchify(velocity, self.patch, height, width)
