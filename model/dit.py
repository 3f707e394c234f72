"""The DeCo DiT: low-frequency semantics on p x p patches, conditioned on time and refined text."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask
from torch.utils.checkpoint import checkpoint

from deco.model.config import DiTConfig
from deco.model.layers import (AdaLNBlock, RMSNorm, TimeEmbedding, compute_dtype, rope_2d, small_normal_init,
                               xavier_init)


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, patch*patch, C), tokens in raster order, pixels in raster order."""
    batch, channels, height, width = images.shape
    grid = images.reshape(batch, channels, height // patch, patch, width // patch, patch)
    return grid.permute(0, 2, 4, 3, 5, 1).reshape(batch, (height // patch) * (width // patch), patch * patch, channels)


def patch_vectors(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, C*patch*patch): each patch flattened channel-major, the order of
    F.unfold, which is the order of the reference's patch-embed weight columns."""
    return patchify(images, patch).transpose(-1, -2).flatten(2)


def unpatchify(pixels: torch.Tensor, patch: int, height: int, width: int) -> torch.Tensor:
    """Inverse of patchify: (B, N, patch*patch, C) -> (B, C, H, W)."""
    batch, _, _, channels = pixels.shape
    grid = pixels.reshape(batch, height // patch, width // patch, patch, patch, channels)
    return grid.permute(0, 5, 1, 3, 2, 4).reshape(batch, channels, height, width)


def flex_block_masks(text_mask: torch.Tensor, image_tokens: int) -> tuple[BlockMask, BlockMask]:
    """FlexAttention BlockMasks with exactly the boolean masks' meaning (see DiT._masks).

    Built once per forward, outside the (possibly compiled) blocks: create_block_mask evaluates the
    mask densely, which every block would otherwise repeat. The mask_mods close over the (B, L)
    text mask, so each batch gets new closures; Dynamo guards on their code, not their identity,
    so a compiled block does not recompile per batch. Heads share the mask (H=1 broadcasts).
    """
    text_mask = text_mask.bool()
    batch, text_len = text_mask.shape

    def text_self(b, h, q_idx, kv_idx):
        return text_mask[b, kv_idx] | (q_idx == kv_idx)

    def image(b, h, q_idx, kv_idx):
        # Clamped so image keys (kv_idx < image_tokens) never index the text mask out of range:
        # the fused kernel evaluates both sides of the `|` for every key.
        text_idx = (kv_idx - image_tokens).clamp(min=0)
        return (kv_idx < image_tokens) | text_mask[b, text_idx]

    device = text_mask.device
    return (
        create_block_mask(text_self, batch, None, text_len, text_len, device=device),
        create_block_mask(image, batch, None, image_tokens, image_tokens + text_len, device=device),
    )


def pooled_text(text: torch.Tensor, text_mask: torch.Tensor | None) -> torch.Tensor:
    """(B, L, E) features -> (B, E): their mean over valid tokens (all tokens without a mask)."""
    if text_mask is None:
        return text.mean(dim=1)
    weights = text_mask.to(text.dtype).unsqueeze(-1)
    return (text * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def _run_block(block: AdaLNBlock, *args):
    if block.checkpointing and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)


class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        hidden = cfg.hidden
        self.patch_embed = nn.Linear(3 * cfg.patch_size**2, hidden)
        self.time_embed = TimeEmbedding(hidden, cfg.time_freq_dim, cfg.time_max_period)
        self.text_proj = nn.Linear(cfg.text_dim, hidden)
        self.text_norm = RMSNorm(hidden)
        self.text_pos = nn.Parameter(torch.randn(cfg.text_len, hidden))
        self.text_pool = (nn.Sequential(nn.Linear(cfg.text_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
                          if cfg.pooled_text else None)
        self.text_blocks = nn.ModuleList(
            AdaLNBlock(hidden, cfg.heads, cfg.mlp_hidden, attends_text=False, mlp_bias=cfg.mlp_bias)
            for _ in range(cfg.text_refine_depth)
        )
        self.blocks = nn.ModuleList(
            AdaLNBlock(hidden, cfg.heads, cfg.mlp_hidden, attends_text=True, mlp_bias=cfg.mlp_bias)
            for _ in range(cfg.depth)
        )
        # The reference's initialisation (it shapes the early training curve): patch embed xavier
        # uniform with zero bias, time-MLP weights N(0, 0.02) (biases keep PyTorch's default), text
        # positions N(0, 1) (above). Every other Linear keeps PyTorch's default; the DiT's AdaLN is
        # not zero-initialised. Through Module.apply: see layers.xavier_init.
        self.patch_embed.apply(xavier_init)
        self.time_embed.mlp[0].apply(small_normal_init)
        self.time_embed.mlp[2].apply(small_normal_init)

    def attention_backend(self, device: torch.device) -> str:
        """cfg.attention_backend with "auto" resolved for tensors on `device`."""
        backend = self.cfg.attention_backend
        if backend == "auto":
            # No data-dependent check for "is there any padding": it would sync the GPU every step
            # and break a whole-model fullgraph compile; a padding-free batch only gives full
            # blocks, on which flex skips the mask_mod.
            return "flex" if device.type == "cuda" else "sdpa"
        return backend

    def _masks(self, text_mask: torch.Tensor | None, image_tokens: int):
        """Masks for the text self-attention and the image blocks: None when nothing is masked (plain
        SDPA, flash on GPU), else boolean SDPA masks (True = may attend) or FlexAttention BlockMasks
        with the same meaning, per `attention_backend`."""
        if text_mask is None or not self.cfg.mask_text_padding:
            return None, None
        if self.attention_backend(text_mask.device) == "flex":
            return flex_block_masks(text_mask, image_tokens)
        batch, text_len = text_mask.shape
        # A padded text query may still attend to itself: a row of all-masked keys would give NaN,
        # and padded rows only ever feed keys that the image blocks mask out.
        eye = torch.eye(text_len, dtype=torch.bool, device=text_mask.device)
        text_self = (text_mask[:, None, :] | eye[None]).unsqueeze(1)                  # (B, 1, L, L)
        image_keys = torch.ones(batch, image_tokens, dtype=torch.bool, device=text_mask.device)
        image_attn = torch.cat([image_keys, text_mask], dim=1)[:, None, None, :]       # (B, 1, 1, N+L)
        return text_self, image_attn

    def forward(self, x_t, t, text, text_mask=None, capture_block: int | None = None):
        """Returns (token features s (B, N, D), time embedding (B, D), features after `capture_block`).

        x_t: (B, 3, H, W) noised image; t: (B,) in [0, 1]; text: (B, L, E) frozen encoder features;
        text_mask: (B, L) bool, True on valid tokens; capture_block: 1-based image block for REPA.
        """
        cfg = self.cfg
        batch, _, height, width = x_t.shape
        if text.shape[1] > cfg.text_len:
            raise ValueError(f"text has {text.shape[1]} tokens, the model's table holds {cfg.text_len}")
        grid_h, grid_w = height // cfg.patch_size, width // cfg.patch_size
        param_dtype = self.patch_embed.weight.dtype

        tokens = self.patch_embed(patch_vectors(x_t.to(param_dtype), cfg.patch_size))
        t_emb = self.time_embed(t)
        if self.text_pool is not None:
            t_emb = t_emb + self.text_pool(pooled_text(text.to(param_dtype), text_mask))
        text_tokens = self.text_norm(self.text_proj(text.to(param_dtype))) + self.text_pos[: text.shape[1]]
        text_self_mask, image_mask = self._masks(text_mask, grid_h * grid_w)

        for block in self.text_blocks:
            text_tokens = _run_block(block, text_tokens, t_emb, None, None, text_self_mask)

        rope = rope_2d(grid_h, grid_w, cfg.head_dim, cfg.rope_theta, device=x_t.device,
                       positions=cfg.rope_positions, dtype=compute_dtype(param_dtype))
        captured = None
        for index, block in enumerate(self.blocks, start=1):
            tokens = _run_block(block, tokens, t_emb, rope, text_tokens, image_mask)
            if index == capture_block:
                captured = tokens
        return tokens, t_emb, captured
