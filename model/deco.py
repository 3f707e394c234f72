"""DeCo: the DiT, the pixel decoder it conditions, and the REPA projector used only in training."""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from deco.model.config import ModelConfig
from deco.model.decoder import PixelDecoder
from deco.model.dit import DiT
from deco.model.layers import compute_dtype
from deco.model.repa import repa_projector


def data_to_velocity(data: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, min_noise_level: float) -> torch.Tensor:
    """The velocity of the straight path from x_t to a predicted clean image: (x - x_t) / (1 - t)
    (flow.py: x_t = t x + (1 - t) noise), with 1 - t kept >= min_noise_level.

    Computed in at least float32 and returned in the prediction's dtype: near t = 1 the prediction
    and x_t nearly cancel, and a bf16 difference would be amplified up to 1 / min_noise_level."""
    dtype = compute_dtype(data.dtype)
    noise_level = (1 - t.to(dtype)).clamp(min=min_noise_level).reshape(-1, *([1] * (data.ndim - 1)))
    return ((data.to(dtype) - x_t.to(dtype)) / noise_level).to(data.dtype)


class DeCo(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.dit = DiT(cfg.dit)
        self.decoder = PixelDecoder(cfg.decoder, cfg.dit.hidden, cfg.dit.patch_size)
        self.repa_projector = repa_projector(cfg.dit.hidden, cfg.repa.teacher_dim) if cfg.repa.enabled else None

    def forward(self, x_t, t, text, text_mask=None, return_repa: bool = False):
        """Predicted velocity (B, 3, H, W); with return_repa also the projected REPA features (B, N, C)."""
        if return_repa and self.repa_projector is None:
            raise ValueError("return_repa=True but the model was built with repa.enabled=false")
        capture = self.cfg.repa.block if return_repa else None
        tokens, t_emb, captured = self.dit(x_t, t, text, text_mask, capture_block=capture)
        velocity = self.decoder(x_t, F.silu(t_emb[:, None, :] + tokens))
        if self.cfg.decoder.predicts == "data":
            velocity = data_to_velocity(velocity, x_t, t, self.cfg.decoder.min_noise_level)
        if return_repa:
            return velocity, self.repa_projector(captured)
        return velocity

    def set_activation_checkpointing(self, blocks: bool | Iterable[int]) -> None:
        """Recompute activations in backward for all image blocks (True), none (False), or the given
        0-based image-block indices; text-refine blocks follow the all/none choice."""
        chosen = set(range(len(self.dit.blocks))) if blocks is True else set() if blocks is False else set(blocks)
        unknown = chosen - set(range(len(self.dit.blocks)))
        if unknown:
            raise ValueError(f"no image blocks {sorted(unknown)}; the model has {len(self.dit.blocks)}")
        for index, block in enumerate(self.dit.blocks):
            block.checkpointing = index in chosen
        for block in self.dit.text_blocks:
            block.checkpointing = blocks is True

    def reset_buffers(self) -> None:
        """Recompute the buffers derived from the config (not saved with the weights)."""
        self.decoder.reset_buffers()

    def generator_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights needed to sample: everything but the training-only REPA projector."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("repa_projector.")}


def count_params(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())
