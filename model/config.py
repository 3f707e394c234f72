"""Typed configuration of the DeCo generator (DiT + pixel decoder + REPA projector).

Field defaults are the paper's T2I XXL/16 model (../shared/spec/deco.md section 2); YAML files in
configs/model/ override them. `ModelConfig.build()` is the only way a model is made.
"""
from __future__ import annotations

from dataclasses import dataclass, field

ATTENTION_BACKENDS = ("sdpa", "flex", "auto")
# Image-token positions for the DiT's 2D RoPE (layers.rope_positions):
#   "reference": the authors' T2I code, linspace(0, n, n) per side (step n/(n-1));
#   "arange":    0..n-1 per side (this project's earlier variant);
#   "per_axis":  linspace(0, n, n) along each axis with its own n: the reference on square grids (same
#                weights), evenly spaced on the non-square grids of aspect-ratio buckets, where the
#                reference's code ends each axis at the other side's count.
ROPE_POSITIONS = ("reference", "arange", "per_axis")
# The decoder's in-patch position code (decoder.position_code):
#   "rope_cos": the authors' T2I code, the real part (cosines) of their RoPE helper's table;
#   "dct":      an orthonormal 2D DCT-II basis (this project's earlier variant).
POSITION_CODES = ("rope_cos", "dct")
# Fields that choose how the model computes, not what: weights trained under one value serve under
# another, so comparisons of a checkpoint's config with a run's leave them out.
EXECUTION_FIELDS = {"dit": ("attention_backend",)}
# Fields that say which variant of the architecture a set of weights belongs to. A config tree that
# lacks one was written before the field existed, by the pre-reference architecture (SwiGLU with
# biases, arange positions, DCT code, one decoder input Linear), which this version does not build.
VARIANT_FIELDS = {"dit": ("rope_positions", "mlp_bias"), "decoder": ("position_code",)}
# Fields added later whose default is what older weights were trained as: a config tree without one
# reads as that default (so older checkpoints still resume and initialise later stages).
LATER_FIELDS = {"dit": {"pooled_text": False}, "decoder": {"predicts": "velocity", "min_noise_level": 0.05}}
# What the pixel decoder outputs (DeCo.forward turns either into the velocity the loss and samplers use):
#   "velocity": x - noise directly, as the reference;
#   "data":     the clean image x, velocity = (x - x_t) / (1 - t): a network of limited width keeps to
#               the image manifold instead of having to reproduce the noise (Li & He, "Back to Basics:
#               Let Denoising Generative Models Denoise", 2025).
PREDICTS = ("velocity", "data")


def model_identity(tree: dict) -> dict:
    """A model config as a plain tree (ModelConfig fields), without its EXECUTION_FIELDS, with the
    LATER_FIELDS it lacks at their defaults."""
    return {section: ({**LATER_FIELDS.get(section, {}),
                       **{k: v for k, v in value.items() if k not in EXECUTION_FIELDS.get(section, ())}}
                      if isinstance(value, dict) else value) for section, value in tree.items()}


def identity_differences(theirs: dict, ours: dict, sections=("dit", "decoder")) -> list[str]:
    """'field: theirs vs ours' for every identity field (model_identity) that differs between two
    model config trees (plain dicts), within `sections` (None: the whole tree, resolution included).
    A field missing from a tree reads '<absent>'."""
    theirs, ours = model_identity(theirs), model_identity(ours)
    lines = []
    for key in sorted(set(theirs) | set(ours)) if sections is None else sections:
        mine, other = ours.get(key, "<absent>"), theirs.get(key, "<absent>")
        if isinstance(mine, dict) and isinstance(other, dict):
            lines += [f"{key}.{line}" for line in identity_differences(other, mine, sections=None)]
        elif mine != other:
            lines.append(f"{key}: {other} vs {mine}")
    return lines


def missing_variant_fields(tree: dict) -> list[str]:
    """The VARIANT_FIELDS a config tree lacks (non-empty: weights of the pre-reference architecture)."""
    return [f"{section}.{key}" for section, keys in VARIANT_FIELDS.items() for key in keys
            if key not in (tree.get(section) or {})]


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
    # The reference attends to padding slots (False); True masks them (this project's variant).
    mask_text_padding: bool = False
    rope_positions: str = "reference"   # one of ROPE_POSITIONS
    mlp_bias: bool = False              # SwiGLU Linears with biases (True: the earlier variant, +2H+D per block)
    # Also condition every AdaLN on the caption: the mean of the text features over valid tokens,
    # through a small MLP, added to the time embedding (as SD3 adds its pooled text vector). Not in
    # the reference (False), which conditions on text only through attention; a small model trained
    # briefly learns the caption much sooner through AdaLN (benchmarks/demo_sweep.py).
    pooled_text: bool = False
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
        if self.rope_positions not in ROPE_POSITIONS:
            raise ValueError(f"dit.rope_positions={self.rope_positions!r} is not one of {', '.join(ROPE_POSITIONS)}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"dit.attention_backend={self.attention_backend!r} is not one of {', '.join(ATTENTION_BACKENDS)}"
            )


@dataclass(kw_only=True)
class DecoderConfig:
    width: int = 32
    depth: int = 3
    position_code: str = "rope_cos"  # one of POSITION_CODES
    # Size of the code: pos_freqs^2 values per pixel ("rope_cos": pos_freqs^2 / 2 frequencies, each
    # a cosine per axis; "dct": the first min(pos_freqs, patch)^2 basis functions).
    pos_freqs: int = 8
    predicts: str = "velocity"       # one of PREDICTS
    # With predicts "data": the smallest 1 - t divided by, so the velocity stays bounded at t -> 1.
    min_noise_level: float = 0.05

    def code_width(self, patch: int) -> int:
        """Values of the in-patch position code per pixel."""
        return self.pos_freqs**2 if self.position_code == "rope_cos" else min(self.pos_freqs, patch) ** 2

    def validate(self) -> None:
        if self.predicts not in PREDICTS:
            raise ValueError(f"decoder.predicts={self.predicts!r} is not one of {', '.join(PREDICTS)}")
        if not 0.0 < self.min_noise_level < 1.0:
            raise ValueError(f"decoder.min_noise_level={self.min_noise_level} must be within (0, 1)")
        if self.position_code not in POSITION_CODES:
            raise ValueError(f"decoder.position_code={self.position_code!r} is not one of {', '.join(POSITION_CODES)}")
        if self.position_code == "rope_cos" and self.pos_freqs % 2:
            # pos_freqs^2 / 2 frequencies, two cosines each: an odd square leaves one value short.
            raise ValueError(f"decoder.pos_freqs={self.pos_freqs} must be even with position_code rope_cos")


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
        self.decoder.validate()
        if self.resolution % self.dit.patch_size:
            raise ValueError(f"resolution {self.resolution} is not a multiple of dit.patch_size {self.dit.patch_size}")
        if self.repa.enabled and not 1 <= self.repa.block <= self.dit.depth:
            raise ValueError(f"repa.block={self.repa.block} must be within 1..dit.depth={self.dit.depth}")

    def build(self):
        from deco.model.deco import DeCo

        self.validate()
        return DeCo(self)
