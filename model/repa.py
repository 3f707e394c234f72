"""REPA (spec §7): a frozen DINOv2 teacher, the student-side projector, and the alignment loss.

The teacher sees the clean image resized so that its patch grid equals the DiT's token grid
(256 px with DiT patch 16 -> 224 px with DINOv2 patch 14 -> 16x16 tokens), so teacher token i and
DiT token i describe the same image region.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn

from .text_encoder import dtype_from_pretrained_kwargs, freeze, from_pretrained_offline, parse_dtype

# DINOv2 was trained on ImageNet-normalised inputs.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(kw_only=True)
class RepaTeacherConfig:
    # A local directory, or a hub id (e.g. facebook/dinov2-base) already in the local hub cache.
    path: str = ""
    dtype: str = "bfloat16"
    # The teacher's own patch size; checked against the loaded model's config.
    patch_size: int = 14
    # Antialias the bicubic resize to the teacher's grid. The reference resizes without (False);
    # True low-passes first, which changes the teacher's targets slightly.
    antialias: bool = False

    def __post_init__(self) -> None:
        parse_dtype(self.dtype)

    def build(self, device: str | torch.device = "cpu") -> RepaTeacher:
        model = from_pretrained_offline(
            transformers.AutoModel,
            self.path,
            "REPA teacher (DINOv2)",
            **dtype_from_pretrained_kwargs(parse_dtype(self.dtype)),
        )
        if model.config.patch_size != self.patch_size:
            raise ValueError(
                f"REPA teacher at {self.path!r} has patch size {model.config.patch_size}, "
                f"config says {self.patch_size}"
            )
        return RepaTeacher(model.to(device), antialias=self.antialias)


class RepaTeacher(nn.Module):
    """Frozen DINOv2 (with or without registers): images in [-1, 1] -> patch tokens (B, N, C)."""

    def __init__(self, model: nn.Module, antialias: bool = False) -> None:
        super().__init__()
        self.model = freeze(model)
        self.antialias = antialias
        self.patch_size = int(model.config.patch_size)
        # Register tokens (DINOv2-with-registers) sit between CLS and the patch tokens.
        self.num_prefix_tokens = 1 + int(getattr(model.config, "num_register_tokens", 0) or 0)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_modules(cls, model: nn.Module, antialias: bool = False) -> RepaTeacher:
        """Wrap an already-built DINOv2 model (tests, or a model loaded by the caller)."""
        return cls(model, antialias=antialias)

    def train(self, mode: bool = True) -> RepaTeacher:
        # A parent's .train() must not switch on the teacher's dropout: it is frozen, always eval.
        return super().train(False)

    @property
    def feature_dim(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def features(self, images: Tensor, dit_patch: int = 16) -> Tensor:
        """Float32 patch tokens (B, (H/dit_patch) * (W/dit_patch), C), row-major like the DiT's."""
        height, width = images.shape[-2:]
        if height % dit_patch or width % dit_patch:
            raise ValueError(f"image size {height}x{width} is not divisible by the DiT patch {dit_patch}")
        grid = (height // dit_patch, width // dit_patch)
        size = (grid[0] * self.patch_size, grid[1] * self.patch_size)
        pixels = (images.float() + 1.0) / 2.0
        # The reference normalises before resizing; bicubic weights sum to one, so the order only
        # changes rounding.
        pixels = F.interpolate(pixels, size=size, mode="bicubic", align_corners=False, antialias=self.antialias)
        pixels = (pixels - self.mean) / self.std
        dtype = next(self.model.parameters()).dtype
        tokens = self.model(pixel_values=pixels.to(dtype)).last_hidden_state
        patch_tokens = tokens[:, self.num_prefix_tokens :].float()
        if patch_tokens.shape[1] != grid[0] * grid[1]:
            raise RuntimeError(
                f"teacher returned {patch_tokens.shape[1]} patch tokens, expected {grid[0]}x{grid[1]}"
            )
        return patch_tokens


def repa_projector(hidden: int, out_dim: int = 768) -> nn.Sequential:
    """Student-side MLP D -> D -> D -> out_dim with SiLU between layers (spec §7)."""
    return nn.Sequential(
        nn.Linear(hidden, hidden),
        nn.SiLU(),
        nn.Linear(hidden, hidden),
        nn.SiLU(),
        nn.Linear(hidden, out_dim),
    )


def repa_loss(student_projected: Tensor, teacher_tokens: Tensor) -> Tensor:
    """Mean over batch and tokens of 1 - cos(student, teacher); float32 so bf16 norms don't round."""
    if student_projected.shape != teacher_tokens.shape:
        raise ValueError(
            f"REPA shapes differ: student_projected {tuple(student_projected.shape)} vs "
            f"teacher_tokens {tuple(teacher_tokens.shape)}"
        )
    cosine = F.cosine_similarity(student_projected.float(), teacher_tokens.float(), dim=-1)
    return (1.0 - cosine).mean()
