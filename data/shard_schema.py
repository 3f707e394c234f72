"""The MDS sample schema that curation writes and training streams: one definition for both.

Layout written by curation under an output prefix (local path or s3://bucket/prefix):

    <output>/<resolution>/index.json + shard.*.mds.zstd   one MDS dataset per target resolution
    (or, with aspect-ratio buckets, <output>/<resolution>/b<H>x<W>/ per bucket: data/buckets.py)
    <output>/curation_report.json                          counts per reason; samples_in = kept + rejected
    <output>/rejects.parquet                               id, reason, detail of every rejected sample

Columns (mosaicml-streaming encodings):
    id           str      stable sample id from the source
    image        bytes    encoded JPEG or PNG, already resized + centre-cropped to <resolution> (or its bucket)
    caption      str      the (normalised) caption
    width/height int      stored image size (== resolution, or the bucket's W and H)
    orig_width/orig_height int   size before resizing
    text_emb     bytes    OPTIONAL (text-embedding cache): frozen text-encoder features of the valid
                          tokens only, bfloat16 little-endian, row-major (tokens, text_emb_dim)
    text_emb_dim int      OPTIONAL, with text_emb
    source       str      OPTIONAL (provenance, on by default): the input file the sample came from
    <name>       json | str | float64 | int64   OPTIONAL: each provenance.columns entry (url, licence,
                          scores: data/metadata.py), after the columns above
"""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

COLUMNS = {
    "id": "str", "image": "bytes", "caption": "str",
    "width": "int", "height": "int", "orig_width": "int", "orig_height": "int",
}
TEXT_EMB_COLUMNS = {"text_emb": "bytes", "text_emb_dim": "int"}


def columns(with_text_emb: bool, provenance: dict[str, str] | None = None) -> dict[str, str]:
    """The MDS columns: `provenance` maps each provenance column to its type (MDS encodings of the
    same names)."""
    return {**COLUMNS, **(TEXT_EMB_COLUMNS if with_text_emb else {}), **(provenance or {})}


def encode_text_emb(features: torch.Tensor) -> bytes:
    """(tokens, E) features of the valid tokens -> bf16 bytes."""
    return features.detach().to(torch.bfloat16).contiguous().cpu().view(torch.int16).numpy().tobytes()


def decode_text_emb(raw: bytes, dim: int) -> torch.Tensor:
    """Inverse of encode_text_emb: (tokens, dim) bfloat16 tensor."""
    bits = torch.from_numpy(np.frombuffer(raw, dtype=np.int16).copy())
    return bits.view(torch.bfloat16).reshape(-1, dim)


def decode_image(raw: bytes) -> Image.Image:
    with Image.open(io.BytesIO(raw)) as image:
        return image.convert("RGB")


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float32 in [-1, 1], the model's pixel range."""
    array = np.asarray(image, dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous() / 127.5 - 1.0
