"""One flow-matching training objective for DeCo: draw t and noise, predict velocity, DeCo loss.

Shared by every trainer (the single-process demo and the ZeRO-3 engine), so they optimise exactly
the same thing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
from torch import Tensor

from deco.model.deco import DeCo
from deco.model.flow import interpolate, sample_train_t, velocity_target
from deco.model.losses import LossConfig, deco_loss
from deco.model.repa import repa_loss


@dataclass(kw_only=True)
class ObjectiveConfig:
    time_shift: float = 2.0         # 2 at 256 px, 4 at 512 px for T2I (spec section 5)
    time_distribution: Literal["logit_normal", "uniform"] = "logit_normal"  # flow.TIME_DISTRIBUTIONS; the paper's first
    text_dropout: float = 0.1       # share of captions replaced by the empty caption (for CFG)
    loss: LossConfig = field(default_factory=LossConfig)


def drop_text(text: Tensor, mask: Tensor, empty: tuple[Tensor, Tensor], rate: float,
              generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Replace a random `rate` share of captions by the empty caption's encoding."""
    if rate <= 0:
        return text, mask
    draw_device = generator.device if generator is not None else text.device
    dropped = (torch.rand(text.shape[0], generator=generator, device=draw_device) < rate).to(text.device)
    empty_text, empty_mask = empty[0].to(text), empty[1].to(mask.device)
    text = torch.where(dropped[:, None, None], empty_text.expand_as(text), text)
    mask = torch.where(dropped[:, None], empty_mask.expand_as(mask), mask)
    return text, mask


def draw_times(cfg: ObjectiveConfig, batch: int, generator: torch.Generator | None = None,
               device: torch.device | str | None = None) -> Tensor:
    """(batch,) training times as the objective draws them (every trainer draws through here)."""
    return sample_train_t(batch, cfg.time_shift, generator=generator, device=device, distribution=cfg.time_distribution)


def training_loss(model: DeCo, images: Tensor, text: Tensor, mask: Tensor | None, cfg: ObjectiveConfig, *,
                  generator: torch.Generator | None = None, teacher: Callable[[Tensor], Tensor] | None = None,
                  t: Tensor | None = None, noise: Tensor | None = None) -> dict[str, Tensor]:
    """DeCo loss parts for clean images in [-1, 1]; `teacher` maps clean images to REPA target tokens.

    `t` and `noise` may be given to fix the draw (overfitting checks); else they come from `generator`.
    """
    batch = images.shape[0]
    if t is None:
        t = draw_times(cfg, batch, generator, images.device)
    if noise is None:
        draw_device = generator.device if generator is not None else images.device
        noise = torch.randn(images.shape, generator=generator, device=draw_device, dtype=images.dtype).to(images.device)
    x_t = interpolate(images, noise, t)
    target = velocity_target(images, noise)
    if teacher is None:
        pred = model(x_t, t, text, mask)
        return deco_loss(pred, target, cfg.loss)
    pred, projected = model(x_t, t, text, mask, return_repa=True)
    with torch.no_grad():
        teacher_tokens = teacher(images)
    return deco_loss(pred, target, cfg.loss, repa_loss=repa_loss(projected, teacher_tokens))
