"""DeCo training losses: plain velocity MSE plus the frequency-aware (JPEG-weighted DCT) loss.

The frequency loss compares predicted and target velocity the way JPEG compares images: in YCbCr,
per 8x8 block DCT, with each coefficient weighted by how finely JPEG would quantise it. Errors in
the frequencies the eye notices (low ones, and luma over chroma) therefore cost more.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

DCT_BLOCK = 8

# Full-range JPEG (BT.601) RGB -> YCbCr. No +128 offsets: the inputs are velocities, not pixels,
# and the loss only ever sees differences, where offsets would cancel anyway.
_RGB_TO_YCBCR = (
    (0.299, 0.587, 0.114),
    (-0.168736, -0.331264, 0.5),
    (0.5, -0.418688, -0.081312),
)

# ITU-T T.81 Annex K base quantisation tables, natural (row-major) order: row = vertical frequency.
JPEG_LUMA_BASE_TABLE = (
    (16, 11, 10, 16, 24, 40, 51, 61),
    (12, 12, 14, 19, 26, 58, 60, 55),
    (14, 13, 16, 24, 40, 57, 69, 56),
    (14, 17, 22, 29, 51, 87, 80, 62),
    (18, 22, 37, 56, 68, 109, 103, 77),
    (24, 35, 55, 64, 81, 104, 113, 92),
    (49, 64, 78, 87, 103, 121, 120, 101),
    (72, 92, 95, 98, 112, 100, 103, 99),
)
JPEG_CHROMA_BASE_TABLE = (
    (17, 18, 24, 47, 99, 99, 99, 99),
    (18, 21, 26, 66, 99, 99, 99, 99),
    (24, 26, 56, 99, 99, 99, 99, 99),
    (47, 66, 99, 99, 99, 99, 99, 99),
    (99, 99, 99, 99, 99, 99, 99, 99),
    (99, 99, 99, 99, 99, 99, 99, 99),
    (99, 99, 99, 99, 99, 99, 99, 99),
    (99, 99, 99, 99, 99, 99, 99, 99),
)


# Small constant tensors, built once per (what, device, dtype): rebuilding them every training
# step would mean a host-to-device copy (a sync) or a handful of tiny kernels per call.
_CONSTANTS: dict[tuple, Tensor] = {}


def _constant(key: tuple, build: Callable[[], Tensor], device, dtype: torch.dtype) -> Tensor:
    device = torch.device("cpu") if device is None else torch.device(device)
    full_key = (*key, device, dtype)
    value = _CONSTANTS.get(full_key)
    if value is None:
        # A constant first built inside an eval loop's inference_mode would be an inference
        # tensor, which autograd refuses to save for backward in later training steps.
        with torch.inference_mode(False), torch.no_grad():
            value = build().to(device=device, dtype=dtype)
        _CONSTANTS[full_key] = value
    return value


def rgb_to_ycbcr(x: Tensor) -> Tensor:
    """(B, 3, H, W) RGB -> (B, 3, H, W) YCbCr with the full-range JPEG matrix, no offsets."""
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"rgb_to_ycbcr expects (B, 3, H, W), got {tuple(x.shape)}")
    matrix = _constant(("ycbcr",), lambda: torch.tensor(_RGB_TO_YCBCR), x.device, x.dtype)
    return torch.einsum("oc,bchw->bohw", matrix, x)


def dct_matrix(n: int = DCT_BLOCK, *, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """Orthonormal DCT-II matrix C (n x n): coefficients = C @ signal."""
    k = torch.arange(n, dtype=torch.float64).unsqueeze(1)  # frequency index (rows)
    i = torch.arange(n, dtype=torch.float64).unsqueeze(0)  # sample index (columns)
    c = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    c[0] /= math.sqrt(2.0)  # the DC row needs sqrt(1/n) for orthonormality
    return c.to(dtype=dtype, device=device)


def block_dct_8x8(x: Tensor) -> Tensor:
    """Orthonormal 2D DCT-II of every 8x8 block of every channel.

    (B, C, H, W) -> (B, C, H/8, W/8, 8, 8): block (i, j) of the image, then its coefficients
    (vertical frequency, horizontal frequency). Keeping the 8x8 axes last lets per-frequency
    weights of shape (C, 8, 8) broadcast directly.
    """
    if x.ndim != 4 or x.shape[-2] % DCT_BLOCK or x.shape[-1] % DCT_BLOCK:
        raise ValueError(
            f"block_dct_8x8 expects (B, C, H, W) with H and W multiples of {DCT_BLOCK}, "
            f"got {tuple(x.shape)}"
        )
    b, c, h, w = x.shape
    blocks = x.reshape(b, c, h // DCT_BLOCK, DCT_BLOCK, w // DCT_BLOCK, DCT_BLOCK)
    basis = _constant(
        ("dct", DCT_BLOCK), lambda: dct_matrix(DCT_BLOCK, dtype=torch.float64), x.device, x.dtype
    )
    # C @ block @ C^T for all blocks at once: k/l are output frequencies, p/q in-block pixels.
    return torch.einsum("kp,bcipjq,lq->bcijkl", basis, blocks, basis)


def jpeg_quant_table(base: Tensor, quality: int) -> Tensor:
    """Scale a base quantisation table to a JPEG quality exactly as libjpeg does (integer maths)."""
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be in [1, 100], got {quality}")
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    base = torch.as_tensor(base, dtype=torch.int64)
    return torch.clamp(torch.div(base * scale + 50, 100, rounding_mode="floor"), 1, 255)


def _weights_from_table(table: Tensor) -> Tensor:
    inverse = 1.0 / table.to(torch.float64)
    return inverse / inverse.mean()


def frequency_weights(quality: int = 85, *, device=None, dtype: torch.dtype = torch.float32) -> Tensor:
    """(3, 8, 8) per-coefficient weights for Y, Cb, Cr: (1/Q) / mean(1/Q) of each JPEG table.

    Finer quantisation (small Q) means JPEG considers the coefficient important, so it gets a
    larger weight; normalising by the mean keeps the loss on the same scale as a plain MSE.
    """

    def build() -> Tensor:
        luma = _weights_from_table(jpeg_quant_table(torch.tensor(JPEG_LUMA_BASE_TABLE), quality))
        chroma = _weights_from_table(jpeg_quant_table(torch.tensor(JPEG_CHROMA_BASE_TABLE), quality))
        return torch.stack([luma, chroma, chroma])

    return _constant(("jpeg_weights", quality), build, device, dtype)


def frequency_aware_loss(pred: Tensor, target: Tensor, quality: int = 85) -> Tensor:
    """Mean over batch, channels and DCT coefficients of w * (DCT(YCbCr(pred)) - DCT(YCbCr(target)))^2.

    Computed in float32 whatever the input dtype: bf16 loses too much precision in the small
    high-frequency coefficients this loss exists to weigh.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    # YCbCr and DCT are linear, so transforming the difference once equals differencing the two
    # transforms, at half the cost.
    diff = pred.float() - target.float()
    coefficients = block_dct_8x8(rgb_to_ycbcr(diff))  # (B, 3, H/8, W/8, 8, 8)
    weights = frequency_weights(quality, device=diff.device, dtype=torch.float32)
    return (weights[:, None, None] * coefficients.square()).mean()


def velocity_mse(pred: Tensor, target: Tensor) -> Tensor:
    """Plain flow-matching loss: mean squared velocity error, in float32."""
    return F.mse_loss(pred.float(), target.float())


@dataclass(kw_only=True)
class LossConfig:
    freq_weight: float = 1.0  # weight of the frequency-aware loss (spec: 1.0)
    repa_weight: float = 0.5  # weight of the REPA alignment loss (spec: 0.5)
    jpeg_quality: int = 85  # quality whose quantisation tables give the frequency weights

    def __post_init__(self) -> None:
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}")


def deco_loss(
    pred: Tensor, target: Tensor, cfg: LossConfig, repa_loss: Tensor | None = None
) -> dict[str, Tensor]:
    """Total DeCo loss and its parts: mse + freq_weight * freq (+ repa_weight * repa)."""
    mse = velocity_mse(pred, target)
    freq = frequency_aware_loss(pred, target, quality=cfg.jpeg_quality)
    total = mse + cfg.freq_weight * freq
    parts = {"mse": mse, "freq": freq}
    if repa_loss is not None:
        total = total + cfg.repa_weight * repa_loss
        parts["repa"] = repa_loss
    return {"loss": total, **parts}
