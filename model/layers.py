"""Layers shared by the DiT's text-refine and image blocks: RMSNorm, 2D RoPE, SwiGLU, the AdaLN block."""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 whatever the input dtype (bf16 sums of squares lose too much)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)


def rope_2d(grid_h: int, grid_w: int, head_dim: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (N, head_dim/2) for 2D rotary embedding over a grid of absolute token positions.

    Rotation pair j uses the x axis when j is even and the y axis when odd (axes alternate) with
    frequency theta^(-4k/head_dim), k = j // 2, so each axis gets head_dim/4 frequencies.
    Positions are absolute (0..n-1 per side): a larger image sees new positions rather than
    interpolated ones, as the T2I reference does.
    """
    k = torch.arange(head_dim // 4, device=device, dtype=torch.float32)
    freqs = theta ** (-4.0 * k / head_dim)                                  # (hd/4,)
    ys, xs = torch.meshgrid(
        torch.arange(grid_h, device=device, dtype=torch.float32),
        torch.arange(grid_w, device=device, dtype=torch.float32),
        indexing="ij",
    )
    angle_x = xs.reshape(-1, 1) * freqs                                     # (N, hd/4)
    angle_y = ys.reshape(-1, 1) * freqs
    angles = torch.stack([angle_x, angle_y], dim=-1).reshape(grid_h * grid_w, head_dim // 2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of x (B, N, heads, head_dim) by the per-position angles."""
    x32 = x.float().unflatten(-1, (-1, 2))
    x0, x1 = x32[..., 0], x32[..., 1]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    rotated = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return rotated.flatten(-2).to(x.dtype)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(dim, hidden)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


def timestep_sinusoid(t: torch.Tensor, dim: int, max_period: float) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


class TimeEmbedding(nn.Module):
    def __init__(self, hidden: int, freq_dim: int, max_period: float):
        super().__init__()
        self.freq_dim, self.max_period = freq_dim, max_period
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        weight_dtype = self.mlp[0].weight.dtype
        return self.mlp(timestep_sinusoid(t, self.freq_dim, self.max_period).to(weight_dtype))


@functools.cache
def _compiled_flex_attention():
    # flex_attention is fused only when torch.compile traces it; called eagerly it materialises the
    # full score matrix. dynamic=False: shapes change only with resolution or text length.
    return torch.compile(flex_attention, dynamic=False)


def attention(q, k, v, mask: torch.Tensor | BlockMask | None = None) -> torch.Tensor:
    """Attention over (B, heads, tokens, head_dim) q/k/v; the mask's type picks the kernel.

    None: plain SDPA (flash on GPU). Boolean tensor (True = may attend): SDPA with that mask, which
    rules out flash. BlockMask: FlexAttention, whose fused kernel keeps flash-like speed with padding.
    """
    if isinstance(mask, BlockMask):
        if q.is_cuda and not torch.compiler.is_compiling():
            # Uncompiled blocks on a GPU: use the fused kernel anyway. Inside a compiled block
            # (engine.compile, fullgraph) this branch is traced away and Dynamo fuses the call itself.
            return _compiled_flex_attention()(q, k, v, block_mask=mask)
        return flex_attention(q, k, v, block_mask=mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class AdaLNBlock(nn.Module):
    """Pre-norm transformer block with six-way AdaLN from the time embedding.

    With `attends_text`, the block's queries are its own tokens and its keys/values are its tokens
    followed by a block-owned projection of the refined text; q and all keys get per-head RMSNorm.
    """

    def __init__(self, hidden: int, heads: int, mlp_hidden: int, attends_text: bool):
        super().__init__()
        self.heads = heads
        head_dim = hidden // heads
        self.norm_attn = RMSNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.text_kv = nn.Linear(hidden, 2 * hidden, bias=False) if attends_text else None
        self.q_norm = RMSNorm(head_dim)
        self.k_norm = RMSNorm(head_dim)
        self.attn_out = nn.Linear(hidden, hidden)
        self.norm_mlp = RMSNorm(hidden)
        self.mlp = SwiGLU(hidden, mlp_hidden)
        self.adaln = nn.Linear(hidden, 6 * hidden)
        self.checkpointing = False  # switched by DeCo.set_activation_checkpointing

    def forward(self, x, cond, rope=None, text=None, attn_mask=None):
        batch, tokens, hidden = x.shape
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaln(F.silu(cond)).unsqueeze(1).chunk(6, dim=-1)

        h = modulate(self.norm_attn(x), shift_a, scale_a)
        q, k, v = self.qkv(h).unflatten(-1, (3, self.heads, -1)).unbind(dim=2)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if text is not None:
            text_k, text_v = self.text_kv(text).unflatten(-1, (2, self.heads, -1)).unbind(dim=2)
            k = torch.cat([k, self.k_norm(text_k)], dim=1)
            v = torch.cat([v, text_v], dim=1)
        # attn_mask: None, a boolean SDPA mask or a FlexAttention BlockMask, built once per forward by DiT.
        attn = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask)
        x = x + gate_a * self.attn_out(attn.transpose(1, 2).reshape(batch, tokens, hidden))
        x = x + gate_m * self.mlp(modulate(self.norm_mlp(x), shift_m, scale_m))
        return x
