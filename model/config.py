"""Typed configuration of the DeCo generator (DiT + pixel decoder + REPA projector).

Field defaults are the paper's T2I XXL/16 model (../shared/spec/deco.md section 2); YAML files in
configs/model/ override them. `ModelConfig.build()` is the only way a model is made.
"""
from __future__ import annotations

from dataclasses import dataclass, field

ATTENTION_BACKENDS = ("sdpa", "flex", "auto")
# Fields that choose how the model computes, not what: weights trained under one value serve under
# another, so comparisons of a checkpoint's config with a run's leave them out.
EXECUTION_FIELDS = {"dit": ("attention_backend",)}


def model_identity(tree: dict) -> dict:
    """A model config as a plain tree (ModelConfig fields), without its EXECUTION_FIELDS."""
    return {section: ({k: v for k, v in value.items() if k not in EXECUTION_FIELDS.get(section, ())}
                      if isinstance(value, dict) else value) for section, value in tree.items()}


@dataclass(kw_only=True)
class DiTConfig:
    patch_size: int = 16
    hidden: int = 1536
    heads: int = 24
    depth: int = 16                 # image blocks
    text_refine_depth: int = 4      # text-only blocks before the image blocks
    mlp_hidden: int = 6144          # SwiGLU inner width
    text_dim: int = 2048            # width E of the frozen text encoder's features
    text_len: int = 128             # learned text position table length
    rope_theta: float = 10000.0
    time_freq_dim: int = 256
    time_max_period: float = 10.0   # t lives in [0, 1], so the sinusoid's periods are short
    mask_text_padding: bool = True  # False reproduces the reference, which attends to padding
    # How masked attention runs (an unmasked forward always uses plain SDPA, i.e. flash on GPU):
    #   "sdpa": F.scaled_dot_product_attention with a boolean mask, which rules out the flash kernel;
    #   "flex": FlexAttention with a BlockMask built once per forward (fused only under torch.compile;
    #           on CPU torch runs it unfused and forward-only);
    #   "auto": flex on CUDA when padding is masked, sdpa otherwise (torch's CPU flex has no backward).
    attention_backend: str = "auto"

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def validate(self) -> None:
        if self.hidden % self.heads:
            raise ValueError(f"dit.hidden={self.hidden} is not divisible by dit.heads={self.heads}")
        if self.head_dim % 4:
            raise ValueError(f"head dim {self.head_dim} must be a multiple of 4 for 2D RoPE")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"dit.attention_backend={self.attention_backend!r} is not one of {', '.join(ATTENTION_BACKENDS)}"
            )


@dataclass(kw_only=True)
class DecoderConfig:
    width: int = 32
    depth: int = 3
    pos_freqs: int = 8   # the in-patch position code is the first pos_freqs x pos_freqs 2D DCT basis


@dataclass(kw_only=True)
class RepaConfig:
    enabled: bool = True
    block: int = 6          # 1-based image block whose output is aligned with the teacher
    teacher_dim: int = 768  # DINOv2 ViT-B/14


@dataclass(kw_only=True)
class ModelConfig:
    resolution: int = 256
    dit: DiTConfig = field(default_factory=DiTConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    repa: RepaConfig = field(default_factory=RepaConfig)

    def validate(self) -> None:
        self.dit.validate()
        if self.resolution % self.dit.patch_size:
            raise ValueError(f"resolution {self.resolution} is not a multiple of dit.patch_size {self.dit.patch_size}")
        if self.repa.enabled and not 1 <= self.repa.block <= self.dit.depth:
            raise ValueError(f"repa.block={self.repa.block} must be within 1..dit.depth={self.dit.depth}")

    def build(self):
        from deco.model.deco import DeCo

        self.validate()
        return DeCo(self)
