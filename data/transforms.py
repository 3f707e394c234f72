"""Per-sample transforms of curation: resize + centre-crop to each target resolution, re-encode, and
the optional text-embedding cache (frozen text encoder features of the valid tokens, bf16).

The crop is the central min(w, h) square of the original (`crop: square`, the paper's), or with
`crop: buckets` the largest centred region of the aspect ratio of the image's bucket at that
resolution (data/buckets.py): the image is scaled to cover the bucket and only the excess cut.
Either region is resampled straight to the target size (PIL's resize with a source box), so with
square crops every resolution sees exactly the same region.

Curation's fast path (`render`) decodes once for all resolutions and does less work per pixel:
- a JPEG at least twice the largest resolution is decoded at 1/2 scale by the JPEG decoder's DCT
  scaling (filters.open_image, draft mode; 1/4 and 1/8 while the decode keeps twice the target);
- the stored image is resampled, and only the small outputs are turned upright (EXIF orientation);
- where the crop is at least twice a resolution, Image.reduce box-averages it by an integer factor
  first (2, or more while the reduced crop stays at least twice the target; on a drafted decode
  only the latter), and the configured filter makes the final step. Measured on photo-like JPEGs
  against resize_centre_crop of a full decode, after the q95 encode: 512 px from 768x576 is
  identical, 256 px >= 43 dB PSNR, drafted sources from 1366x1024 to 4000x3000 >= 41 dB
  (tests/test_transforms.py holds a 40 dB bound).
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Literal

from PIL import Image

from deco.data.buckets import BucketConfig, bucket_sizes, nearest_bucket, stream_key
from deco.data.filters import DecodedImage
from deco.data.image_modes import to_rgb

RESAMPLING = {"lanczos": Image.Resampling.LANCZOS, "bicubic": Image.Resampling.BICUBIC,
              "bilinear": Image.Resampling.BILINEAR, "box": Image.Resampling.BOX}
# Filter support radius in source pixels at scale 1 (PIL's, less half a pixel as PIL's own reducing_gap uses it)
SUPPORT = {"lanczos": 2.5, "bicubic": 1.5, "bilinear": 0.5, "box": 0.0}
# The EXIF transposes that turn an image by 90 degrees (width and height trade places)
_TURNS = (Image.Transpose.TRANSPOSE, Image.Transpose.TRANSVERSE, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_270)


@dataclass(kw_only=True)
class TransformConfig:
    resolutions: list[int] = field(default_factory=lambda: [256, 512])
    format: Literal["jpeg", "png"] = "jpeg"
    jpeg_quality: int = 90
    jpeg_subsampling: Literal["4:4:4", "4:2:2", "4:2:0"] = "4:2:0"
    resample: Literal["lanczos", "bicubic", "bilinear", "box"] = "lanczos"
    # "square": the central square (the paper). "buckets": the nearest aspect-ratio bucket of each
    # resolution, one MDS dataset per bucket (data/buckets.py).
    crop: Literal["square", "buckets"] = "square"
    buckets: BucketConfig = field(default_factory=BucketConfig)

    def validate(self) -> None:
        if not self.resolutions or any(r < 8 for r in self.resolutions):
            raise ValueError(f"transform.resolutions must be a non-empty list of sizes >= 8, got {self.resolutions}")
        if len(set(self.resolutions)) != len(self.resolutions):
            raise ValueError(f"transform.resolutions has repeats: {self.resolutions}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"transform.jpeg_quality must be in [1, 100], got {self.jpeg_quality}")
        if self.crop == "buckets":
            self.buckets.validate(self.resolutions)

    def sizes(self, resolution: int) -> list[tuple[int, int]]:
        """The (H, W) outputs of a resolution: its one square, or its buckets."""
        return [(resolution, resolution)] if self.crop == "square" else bucket_sizes(resolution, self.buckets)

    def buckets_per_resolution(self) -> dict[int, list[tuple[int, int]]] | None:
        """Every resolution's buckets (None with square crops): what the shard writer splits by."""
        return None if self.crop == "square" else {r: self.sizes(r) for r in self.resolutions}

    def streams(self) -> list[int | str]:
        """The MDS datasets of an output: one per resolution (<res>/), or per bucket (<res>/b<H>x<W>/)."""
        if self.crop == "square":
            return list(self.resolutions)
        return [stream_key(r, size) for r in self.resolutions for size in self.sizes(r)]

    def target(self, width: int, height: int, resolution: int) -> tuple[int, int]:
        """The (H, W) an upright width x height image is cropped to at `resolution`."""
        if self.crop == "square":
            return resolution, resolution
        return nearest_bucket(width, height, self.sizes(resolution))


def centre_square(width: int, height: int) -> tuple[float, float, float, float]:
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side


def cover_box(width: int, height: int, out_width: int, out_height: int) -> tuple[float, float, float, float]:
    """The largest centred region of a width x height image with the aspect ratio of the output:
    scaled to cover the output, the image loses only what sticks out (one pair of sides)."""
    if out_width == out_height:
        return centre_square(width, height)  # the square path, bit for bit
    if width * out_height > height * out_width:  # wider than the output: cut left and right
        side = height * out_width / out_height
        return (width - side) / 2, 0.0, (width + side) / 2, float(height)
    side = width * out_height / out_width
    return 0.0, (height - side) / 2, float(width), (height + side) / 2


def resize_centre_crop(image: Image.Image, resolution: int, resample: str = "lanczos") -> Image.Image:
    """Shortest side to `resolution`, centre crop to resolution x resolution, in one resampling of the
    full image (the reference the fast path, `render`, is measured against)."""
    return image.resize((resolution, resolution), RESAMPLING[resample], box=centre_square(*image.size))


def resize_cover_crop(image: Image.Image, height: int, width: int, resample: str = "lanczos") -> Image.Image:
    """The bucket counterpart of resize_centre_crop: scale to cover height x width, cut the excess."""
    return image.resize((width, height), RESAMPLING[resample], box=cover_box(*image.size, width, height))


def encode_image(image: Image.Image, cfg: TransformConfig) -> bytes:
    buffer = io.BytesIO()
    if cfg.format == "png":
        image.save(buffer, format="PNG", compress_level=6)
    else:
        image.save(buffer, format="JPEG", quality=cfg.jpeg_quality, subsampling=cfg.jpeg_subsampling)
    return buffer.getvalue()


def image_extension(cfg: TransformConfig) -> str:
    return "png" if cfg.format == "png" else "jpg"


def reduce_factor(crop_side: float, resolution: int, drafted: bool = False) -> int:
    """Integer box reduction before the final filter: 2 when the reduced crop keeps at least the
    target's pixels, more only while it stays at least twice the target (Pillow's reducing_gap=2).
    On a drafted decode (already reduced by DCT scaling) only the latter: stacking both costs ~4 dB."""
    ratio = crop_side / resolution
    return max(1, int(ratio / 2)) if drafted or ratio < 2 else max(2, int(ratio / 2))


def resample_box(image: Image.Image, box: tuple[float, float, float, float], size: tuple[int, int],
                 resample: str = "lanczos", drafted: bool = False) -> Image.Image:
    """The `box` of `image` at size (width, height), the box's aspect ratio: Image.reduce by
    reduce_factor over the box and the filter's support around it, then the configured filter on
    the reduced box."""
    # the scale as a ratio to 1: for a square min(w, h) / r, exactly as it always was
    factor = reduce_factor(min((box[2] - box[0]) / size[0], (box[3] - box[1]) / size[1]), 1, drafted)
    if factor > 1:
        support = SUPPORT[resample] * (box[2] - box[0]) / size[0]
        region = (max(0, int(box[0] - support)), max(0, int(box[1] - support)),
                  min(image.width, math.ceil(box[2] + support)), min(image.height, math.ceil(box[3] + support)))
        image = image.reduce(factor, box=region)
        box = ((box[0] - region[0]) / factor, (box[1] - region[1]) / factor,
               (box[2] - region[0]) / factor, (box[3] - region[1]) / factor)
    return image.resize(size, RESAMPLING[resample], box=box)


def render(decoded: DecodedImage, cfg: TransformConfig) -> dict[int, Image.Image]:
    """Every resolution's upright image from one decode (a filters.DecodedImage, possibly drafted):
    resolution x resolution, or the resolution's bucket nearest the image's aspect ratio."""
    s, out = decoded.scale, {}
    swapped = decoded.transpose in _TURNS  # upright, width and height trade places
    for r in cfg.resolutions:
        height, width = cfg.target(decoded.width, decoded.height, r)
        stored = (height, width) if swapped else (width, height)
        # a centred box turns into a centred box
        left, top, right, bottom = cover_box(*decoded.stored_size, *stored)
        box = (left / s, top / s, right / s, bottom / s)
        small = resample_box(decoded.image, box, stored, cfg.resample, drafted=s > 1)
        out[r] = small if decoded.transpose is None else small.transpose(decoded.transpose)
    return out


def transform_image(image: Image.Image | DecodedImage, cfg: TransformConfig) -> dict[int, bytes]:
    """Encoded bytes per target resolution, all from the same decoded image (upright, or a DecodedImage).
    A plain image of another mode is made RGB first (image_modes.to_rgb), as open_image does."""
    if isinstance(image, Image.Image):
        image = DecodedImage(to_rgb(image), image.width, image.height)
    return {r: encode_image(small, cfg) for r, small in render(image, cfg).items()}


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
