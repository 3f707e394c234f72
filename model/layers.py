"""Layers shared by the DiT's text-refine and image blocks: RMSNorm, 2D RoPE, SwiGLU, the AdaLN block."""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision inputs, the input's own dtype from float32 up (float64 stays exact)."""
    return torch.promote_types(dtype, torch.float32)


class RMSNorm(nn.Module):
    """RMSNorm computed in at least float32 whatever the input dtype (bf16 sums of squares lose too much)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(compute_dtype(x.dtype))
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.to(x32.dtype)).to(x.dtype)


def rope_positions(grid_h: int, grid_w: int, mode: str, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 (x, y) positions of the image tokens along each axis: (grid_w,), (grid_h,).

    "reference" is the authors' T2I code: x = linspace(0, grid_h, grid_w), y = linspace(0, grid_w,
    grid_h). On a square grid that is linspace(0, n, n) on both axes (step n/(n-1), 0..16 over 16
    tokens at 256 px); on a non-square one each axis ends at the *other* side's token count, which is
    what their code computes (on a 10 x 25 bucket grid: steps of 0.42 along x, 2.8 along y).
    "per_axis" is linspace(0, n, n) with each axis's own n: equal to "reference" on square grids, even
    steps on non-square ones (the choice for bucketed training). "arange" is 0..n-1 per side.
    """
    if mode == "reference":
        return (torch.linspace(0, grid_h, grid_w, dtype=torch.float64, device=device),
                torch.linspace(0, grid_w, grid_h, dtype=torch.float64, device=device))
    if mode == "per_axis":
        return (torch.linspace(0, grid_w, grid_w, dtype=torch.float64, device=device),
                torch.linspace(0, grid_h, grid_h, dtype=torch.float64, device=device))
    if mode == "arange":
        return (torch.arange(grid_w, dtype=torch.float64, device=device),
                torch.arange(grid_h, dtype=torch.float64, device=device))
    raise ValueError(f"unknown RoPE positions {mode!r}")


def rope_angles(x_pos: torch.Tensor, y_pos: torch.Tensor, dim: int, theta: float) -> torch.Tensor:
    """Float64 angles (len(y_pos) * len(x_pos), dim // 2) of a 2D rotary table, tokens in raster order.

    Pair j uses the x axis when j is even and the y axis when odd (axes alternate), with frequency
    theta^(-4k/dim), k = j // 2: dim/4 frequencies per axis.
    """
    freqs = theta ** (-4.0 * torch.arange(dim // 4, dtype=torch.float64, device=x_pos.device) / dim)  # (dim/4,)
    ys, xs = torch.meshgrid(y_pos, x_pos, indexing="ij")
    angle_x = xs.reshape(-1, 1) * freqs                                              # (N, dim/4)
    angle_y = ys.reshape(-1, 1) * freqs
    return torch.stack([angle_x, angle_y], dim=-1).reshape(xs.numel(), 2 * (dim // 4))


def rope_2d(grid_h: int, grid_w: int, head_dim: int, theta: float, device=None, positions: str = "reference",
            dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (N, head_dim/2) for 2D rotary embedding of a grid of image tokens.

    Positions are absolute (not rescaled to a fixed span as the C2I model does), so a larger image
    sees new positions rather than interpolated ones, as the T2I reference does. Computed in float64
    and cast to `dtype` (float32 for training; float64 keeps a float64 forward exact).
    """
    angles = rope_angles(*rope_positions(grid_h, grid_w, positions, device), head_dim, theta)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of x (B, N, heads, head_dim) by the per-position angles."""
    x32 = x.to(compute_dtype(x.dtype)).unflatten(-1, (-1, 2))
    x0, x1 = x32[..., 0], x32[..., 1]
    cos, sin = cos[None, :, None, :].to(x32.dtype), sin[None, :, None, :].to(x32.dtype)
    rotated = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return rotated.flatten(-2).to(x.dtype)


# Initialisers for Module.apply. Under ZeRO-3's zero.Init each child module is partitioned as soon as
# its own __init__ returns, so a parent that calls nn.init on a child's parameter writes into an empty
# partition and the init is lost; Module.apply is the hook DeepSpeed gathers the parameters for.
@torch.no_grad()
def xavier_init(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


@torch.no_grad()
def small_normal_init(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)


@torch.no_grad()
def zero_init(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.zeros_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up fused in one Linear, as the reference's `w12`
    (its output is [gate; up]), so its weights load unchanged; no biases unless `bias` (the
    earlier variant of this project)."""

    def __init__(self, dim: int, hidden: int, bias: bool = False):
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=bias)
        self.down = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


def timestep_sinusoid(t: torch.Tensor, dim: int, max_period: float) -> torch.Tensor:
    half = dim // 2
    dtype = compute_dtype(t.dtype)
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=dtype) / half)
    args = t.to(dtype)[:, None] * freqs[None]
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

    def __init__(self, hidden: int, heads: int, mlp_hidden: int, attends_text: bool, mlp_bias: bool = False):
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
        self.mlp = SwiGLU(hidden, mlp_hidden, bias=mlp_bias)
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
