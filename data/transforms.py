"""Per-sample transforms of curation: resize + centre-crop to each target resolution, re-encode, and
the optional text-embedding cache (frozen text encoder features of the valid tokens, bf16).

The crop is the central min(w, h) square of the original, resampled straight to the target size
(PIL's resize with a source box), so every resolution sees exactly the same region.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Literal

from PIL import Image

RESAMPLING = {"lanczos": Image.Resampling.LANCZOS, "bicubic": Image.Resampling.BICUBIC,
              "bilinear": Image.Resampling.BILINEAR, "box": Image.Resampling.BOX}


@dataclass(kw_only=True)
class TransformConfig:
    resolutions: list[int] = field(default_factory=lambda: [256, 512])
    format: Literal["jpeg", "png"] = "jpeg"
    jpeg_quality: int = 90
    jpeg_subsampling: Literal["4:4:4", "4:2:2", "4:2:0"] = "4:2:0"
    resample: Literal["lanczos", "bicubic", "bilinear", "box"] = "lanczos"

    def validate(self) -> None:
        if not self.resolutions or any(r < 8 for r in self.resolutions):
            raise ValueError(f"transform.resolutions must be a non-empty list of sizes >= 8, got {self.resolutions}")
        if len(set(self.resolutions)) != len(self.resolutions):
            raise ValueError(f"transform.resolutions has repeats: {self.resolutions}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"transform.jpeg_quality must be in [1, 100], got {self.jpeg_quality}")


def centre_square(width: int, height: int) -> tuple[float, float, float, float]:
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side


def resize_centre_crop(image: Image.Image, resolution: int, resample: str = "lanczos") -> Image.Image:
    """Shortest side to `resolution`, centre crop to resolution x resolution, in one resampling."""
    return image.resize((resolution, resolution), RESAMPLING[resample], box=centre_square(*image.size))


def encode_image(image: Image.Image, cfg: TransformConfig) -> bytes:
    buffer = io.BytesIO()
    if cfg.format == "png":
        image.save(buffer, format="PNG", compress_level=6)
    else:
        image.save(buffer, format="JPEG", quality=cfg.jpeg_quality, subsampling=cfg.jpeg_subsampling)
    return buffer.getvalue()


def image_extension(cfg: TransformConfig) -> str:
    return "png" if cfg.format == "png" else "jpg"


def transform_image(image: Image.Image, cfg: TransformConfig) -> dict[int, bytes]:
    """Encoded bytes per target resolution, all from the same decoded image."""
    return {r: encode_image(resize_centre_crop(image, r, cfg.resample), cfg) for r in cfg.resolutions}


@dataclass(kw_only=True)
class TextEmbeddingConfig:
    """Run the frozen text encoder during curation and store its features in the shards.

    kind / path / max_length / dtype are deco.model.text_encoder.TextEncoderConfig's fields (path
    "minilm" is the packaged MiniLM); they must match the text encoder the model trains with.
    """

    enabled: bool = False
    kind: Literal["causal_lm", "encoder"] = "causal_lm"
    path: str = ""
    max_length: int = 128
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    batch_size: int = 64
    device: str = "cpu"

    def validate(self) -> None:
        if self.enabled and not self.path:
            raise ValueError("text_emb.path must name the text encoder's weights when text_emb.enabled is true")
        if self.batch_size < 1 or self.max_length < 1:
            raise ValueError("text_emb.batch_size and text_emb.max_length must be >= 1")

    def encoder_config(self):
        # Imported here: workers that only stage samples never load torch's text stack.
        from deco.model.text_encoder import TextEncoderConfig

        return TextEncoderConfig(kind=self.kind, path=self.path, max_length=self.max_length, dtype=self.dtype)


class TextEmbedder:
    """Captions -> per-caption bf16 bytes of the valid tokens' features (data/shard_schema.py)."""

    def __init__(self, cfg: TextEmbeddingConfig):
        self.cfg = cfg
        self.encoder = cfg.encoder_config().build(device=cfg.device)
        self.dim = self.encoder.feature_dim

    def embed(self, captions: list[str]) -> list[bytes]:
        from deco.data.shard_schema import encode_text_emb

        out: list[bytes] = []
        for start in range(0, len(captions), self.cfg.batch_size):
            features, mask = self.encoder.encode(captions[start:start + self.cfg.batch_size])
            out.extend(encode_text_emb(f[m]) for f, m in zip(features, mask))
        return out
