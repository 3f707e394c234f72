"""Model-agnostic ODE samplers for the rectified flow of flow.py (t = 0 noise -> t = 1 data).

The sampler only needs `velocity_fn(x, t, cond) -> v`, with t a (B,) tensor and cond whatever the
model takes. Classifier-free guidance runs the conditional and unconditional branches in one
batched call, so a guided step costs one model call at double batch rather than two calls.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .flow import time_shift

VelocityFn = Callable[[Tensor, Tensor, Any], Tensor]
VALID_METHODS = ("euler", "heun", "adams2")
# "reference": the authors' default Heun (exact_henu=False): the corrector-point velocity is reused
#   as the next step's predictor velocity and the last step is Euler, so n steps cost n model calls;
# "textbook": every step a full predictor-corrector step, 2n calls.
HEUN_VARIANTS = ("reference", "textbook")


@dataclass(kw_only=True)
class SamplerConfig:
    method: str = "adams2"  # "euler" | "heun" | "adams2" (variable-step 2nd-order Adams-Bashforth)
    steps: int = 25  # integration steps; Heun costs two model calls per step, the others one
    cfg_scale: float = 4.0  # guidance weight w in u + w * (c - u); 1.0 disables guidance
    cfg_interval: tuple[float, float] = (0.0, 1.0)  # guide only when lo < t <= hi
    time_shift: float = 3.0  # grid warp, > 1 spends more steps near the noise end
    heun_variant: str = "reference"  # one of HEUN_VARIANTS (method "heun" only)
    # Integrate from this time instead of 0: the input is then a noised image x_t (SDEdit), so a
    # diagnosis can ask from how much noise a model still keeps a scene, and img2img can reuse it.
    start_time: float = 0.0

    def __post_init__(self) -> None:
        if self.method not in VALID_METHODS:
            raise ValueError(f"unknown sampler method {self.method!r}; valid: {', '.join(VALID_METHODS)}")
        if self.heun_variant not in HEUN_VARIANTS:
            raise ValueError(f"unknown heun_variant {self.heun_variant!r}; valid: {', '.join(HEUN_VARIANTS)}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        lo, hi = self.cfg_interval
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"cfg_interval must satisfy 0 <= lo <= hi <= 1, got {self.cfg_interval}")
        if self.time_shift <= 0:
            raise ValueError(f"time_shift must be > 0, got {self.time_shift}")
        if not 0.0 <= self.start_time < 1.0:
            raise ValueError(f"start_time must be in [0, 1), got {self.start_time}")

    @property
    def guided(self) -> bool:
        return self.cfg_scale != 1.0

    def guides_at(self, t: float) -> bool:
        """Open lower bound: with (0, 1] the first step (t = 0, pure noise) is never guided."""
        lo, hi = self.cfg_interval
        return lo < t <= hi


def time_grid(cfg: SamplerConfig) -> list[float]:
    """steps + 1 increasing times from cfg.start_time (0 by default) to 1: uniform in the unwarped
    time, then warped by the time shift, so a late start keeps the shift's spacing of those steps."""
    s, start = cfg.time_shift, cfg.start_time
    unwarped_start = s * start / (1 - start + s * start)  # the inverse of flow.time_shift
    uniform = torch.linspace(unwarped_start, 1.0, cfg.steps + 1, dtype=torch.float64)
    times = time_shift(uniform, s).tolist()
    times[0] = start  # exact, whatever the round trip through the warp gives
    return times


def initial_noise(
    shape: Sequence[int],
    seed: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Standard normal noise drawn on the CPU in float32, then moved and cast.

    GPU generators produce different streams from CPU ones (and from each other across
    architectures), so drawing on the CPU makes a seed mean the same image everywhere.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn(tuple(shape), generator=generator, dtype=torch.float32)
    return noise.to(device=device, dtype=dtype)


def _concat_conditions(cond: Any, uncond: Any) -> Any:
    """Stack cond and uncond along the batch dim, element-wise for tuples/lists of tensors."""
    if isinstance(cond, Tensor):
        if not isinstance(uncond, Tensor):
            raise TypeError(f"cond is a tensor but uncond is {type(uncond).__name__}")
        return torch.cat([cond, uncond])
    if isinstance(cond, (tuple, list)):
        if not isinstance(uncond, (tuple, list)) or len(uncond) != len(cond):
            raise TypeError("cond and uncond must be tuples of the same length")
        merged = []
        for index, (c, u) in enumerate(zip(cond, uncond)):
            if c is None and u is None:
                merged.append(None)
            elif isinstance(c, Tensor) and isinstance(u, Tensor):
                merged.append(torch.cat([c, u]))
            else:
                raise TypeError(
                    f"cond/uncond element {index} must be tensors in both or None in both, "
                    f"got {type(c).__name__} and {type(u).__name__}"
                )
        return type(cond)(merged)
    raise TypeError(
        f"guidance batches cond and uncond together, so they must be tensors or tuples of "
        f"tensors/None; got {type(cond).__name__}"
    )


class _GuidedVelocity:
    """velocity(x, t) with t a python float: conditional, or guided inside the interval."""

    def __init__(self, velocity_fn: VelocityFn, cfg: SamplerConfig, cond: Any, uncond: Any) -> None:
        self.velocity_fn = velocity_fn
        self.cfg = cfg
        self.cond = cond
        # Concatenated once: the conditions are the same at every step.
        self.both = _concat_conditions(cond, uncond) if cfg.guided else None

    def __call__(self, x: Tensor, t: float, guide_by: float | None = None) -> Tensor:
        """The velocity at (x, t), guided when `guide_by` (default t) lies in the guidance interval."""
        t_dtype = torch.promote_types(x.dtype, torch.float32)
        if self.both is None or not self.cfg.guides_at(t if guide_by is None else guide_by):
            t_batch = torch.full((x.shape[0],), t, dtype=t_dtype, device=x.device)
            return self.velocity_fn(x, t_batch, self.cond).to(x.dtype)
        t_batch = torch.full((2 * x.shape[0],), t, dtype=t_dtype, device=x.device)
        v_cond, v_uncond = self.velocity_fn(torch.cat([x, x]), t_batch, self.both).chunk(2)
        return (v_uncond + self.cfg.cfg_scale * (v_cond - v_uncond)).to(x.dtype)


def _euler(velocity: _GuidedVelocity, x: Tensor, times: list[float]) -> Tensor:
    for t0, t1 in zip(times[:-1], times[1:]):
        x = x + (t1 - t0) * velocity(x, t0)
    return x


def _heun_textbook(velocity: _GuidedVelocity, x: Tensor, times: list[float]) -> Tensor:
    # Every step, the last included, is a full predictor-corrector step, so the model is also
    # evaluated at t = 1. That is safe here: the network predicts velocity directly (nothing
    # divides by 1 - t), and it keeps second order with exactly 2 * steps model calls.
    for t0, t1 in zip(times[:-1], times[1:]):
        h = t1 - t0
        v0 = velocity(x, t0)
        v1 = velocity(x + h * v0, t1)
        x = x + 0.5 * h * (v0 + v1)
    return x


def _heun_reference(velocity: _GuidedVelocity, x: Tensor, times: list[float]) -> Tensor:
    # The reference's HeunSampler as configured by default: the predictor of step i > 0 reuses the
    # velocity the corrector of step i - 1 evaluated at its predictor point x_hat (not at the
    # corrected x), the last step is a plain Euler step with that velocity, and the corrector is
    # guided by whether the step's start time t0 (not t1) lies in the interval. Second order all
    # the same, with one model call per step.
    v0: Tensor | None = None
    for index, (t0, t1) in enumerate(zip(times[:-1], times[1:])):
        h = t1 - t0
        if v0 is None:
            v0 = velocity(x, t0)
        if index == len(times) - 2:
            return x + h * v0
        x_hat = x + h * v0
        v_hat = velocity(x_hat, t1, guide_by=t0)
        x = x + 0.5 * h * (v0 + v_hat)
        v0 = v_hat
    return x


def _adams2(velocity: _GuidedVelocity, x: Tensor, times: list[float]) -> Tensor:
    # Two-step Adams-Bashforth on a non-uniform grid (the time shift makes steps unequal):
    # integrate the line through (t_prev, v_prev) and (t0, v0) over [t0, t1]. With
    # r = h / (2 h_prev): x1 = x0 + h * ((1 + r) v0 - r v_prev). The first step has no history,
    # so it is Euler; its O(h^2) local error keeps the method second order overall.
    v_prev: Tensor | None = None
    h_prev = 0.0
    for t0, t1 in zip(times[:-1], times[1:]):
        h = t1 - t0
        v0 = velocity(x, t0)
        if v_prev is None:
            x = x + h * v0
        else:
            r = h / (2 * h_prev)
            x = x + h * ((1 + r) * v0 - r * v_prev)
        v_prev, h_prev = v0, h
    return x


_STEPPERS = {"euler": _euler, "adams2": _adams2}
_HEUN_STEPPERS = {"reference": _heun_reference, "textbook": _heun_textbook}


@torch.no_grad()
def sample(
    velocity_fn: VelocityFn,
    noise: Tensor,
    cfg: SamplerConfig,
    cond: Any,
    uncond: Any = None,
) -> Tensor:
    """Integrate dx/dt = velocity from t = 0 (noise) to t = 1 and return the sample at t = 1.

    x is integrated in noise's dtype (pass float32 noise; the model may run under autocast).
    With cfg_scale != 1, `uncond` is required, and cond/uncond must be tensors or tuples of
    tensors (or None) with batch first, so both branches can share one model call.
    """
    if cfg.guided and uncond is None:
        raise ValueError(f"cfg_scale={cfg.cfg_scale} needs uncond; pass it or set cfg_scale=1.0")
    velocity = _GuidedVelocity(velocity_fn, cfg, cond, uncond)
    stepper = _HEUN_STEPPERS[cfg.heun_variant] if cfg.method == "heun" else _STEPPERS[cfg.method]
    return stepper(velocity, noise, time_grid(cfg))
