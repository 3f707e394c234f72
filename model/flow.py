"""Rectified-flow conventions shared by training and sampling.

t = 1 is data and t = 0 is pure noise: x_t = t * x + (1 - t) * noise, so the velocity dx_t/dt is
x - noise, constant along each straight path. Sampling integrates from t = 0 up to t = 1.
"""

from __future__ import annotations

import torch
from torch import Tensor


def time_shift(t: Tensor | float, shift: float) -> Tensor | float:
    """Warp t towards the noise end for shift > 1: t / (t + shift * (1 - t)).

    Higher resolutions keep more signal at a given noise level, so they need more time spent
    near t = 0 (mostly noise) to learn and generate the coarse structure. Fixes 0 and 1.
    """
    return t / (t + shift * (1 - t))


# logit_normal: sigmoid of a standard normal (SD3, the paper), which rarely trains the ends: 4% of
# times fall below t = 0.15, where a small image's layout is decided. uniform: every time alike.
TIME_DISTRIBUTIONS = ("logit_normal", "uniform")


def sample_train_t(
    batch: int,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    distribution: str = "logit_normal",
) -> Tensor:
    """(batch,) float32 training times from `distribution` (TIME_DISTRIBUTIONS), then shifted."""
    if distribution not in TIME_DISTRIBUTIONS:
        raise ValueError(f"unknown time distribution {distribution!r}; valid: {', '.join(TIME_DISTRIBUTIONS)}")
    # Draw where the generator lives (randn refuses a generator on another device), then move.
    draw_device = generator.device if generator is not None else device
    if distribution == "uniform":
        t = torch.rand(batch, generator=generator, device=draw_device, dtype=torch.float32)
    else:
        t = torch.sigmoid(torch.randn(batch, generator=generator, device=draw_device, dtype=torch.float32))
    return time_shift(t, shift).to(device)


def _per_sample(t: Tensor, like: Tensor) -> Tensor:
    """(B,) times -> (B, 1, 1, ...) so they broadcast over every non-batch axis of `like`."""
    return t.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def interpolate(x: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """Noised sample x_t = t * x + (1 - t) * noise, with t of shape (B,)."""
    t = _per_sample(t, x)
    return t * x + (1 - t) * noise


def velocity_target(x: Tensor, noise: Tensor) -> Tensor:
    """d x_t / dt along the straight path: x - noise."""
    return x - noise
