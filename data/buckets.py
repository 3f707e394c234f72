"""Aspect-ratio buckets: the sizes that curation crops to in place of one square, and how an image
finds its bucket. Training reads them back through the bucket index below (data/streaming.py).

A bucket is an H x W size of about the resolution's pixel count (R x R), each side a multiple of
`multiple` (the model's patch size: the DiT sees whole tokens). A resolution's buckets are generated
from `aspect_ratios` (width / height): H = R / sqrt(a), W = R * sqrt(a), each rounded to the nearest
multiple (repeats dropped), or listed per resolution in `sizes` ("HxW"). An image goes to the
bucket nearest its own aspect ratio in log space (2:1 and 1:2 are equally far from 1:1), and is
scaled to cover the bucket with only the excess centre-cropped (data/transforms.py).

Sizes are written H x W everywhere (folder names, `sizes`, `deco sample --size`), as torch's
(B, C, H, W); an image's own size stays PIL's width x height.

Layout of a bucketed curation output, per resolution:

    <output>/<res>/buckets.json          {"buckets": [{"name", "height", "width", "samples"}, ...]}
    <output>/<res>/b<H>x<W>/index.json   the bucket's merged MDS index (what StreamingDataset reads)
    <output>/<res>/b<H>x<W>/pNNNNN/      one partition's shards of the bucket (an empty index when
                                         the partition has no image of that shape)
"""
from __future__ import annotations

import io
import json
import math
import re
from dataclasses import dataclass, field

INDEX = "buckets.json"
# Landscape ratios of common open T2I bucket sets (SDXL's 1152x896, 1216x832, 1344x768, 1536x640
# are 1.29, 1.46, 1.75, 2.4) and their portrait mirrors.
DEFAULT_ASPECT_RATIOS = [1 / 2.4, 1 / 1.75, 1 / 1.46, 1 / 1.29, 1.0, 1.29, 1.46, 1.75, 2.4]
_SIZE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


@dataclass(kw_only=True)
class BucketConfig:
    aspect_ratios: list[float] = field(default_factory=lambda: [round(a, 4) for a in DEFAULT_ASPECT_RATIOS])
    multiple: int = 16                # each side a multiple of this: the model's patch size
    # Explicit buckets per resolution, e.g. {256: ["256x256", "224x288", "288x224"]} (H x W); a
    # resolution listed here ignores aspect_ratios.
    sizes: dict[int, list[str]] = field(default_factory=dict)

    def validate(self, resolutions: list[int]) -> None:
        if self.multiple < 1:
            raise ValueError(f"transform.buckets.multiple must be >= 1, got {self.multiple}")
        if not self.aspect_ratios or any(a <= 0 for a in self.aspect_ratios):
            raise ValueError(f"transform.buckets.aspect_ratios must be positive numbers, got {self.aspect_ratios}")
        unknown = set(self.sizes) - set(resolutions)
        if unknown:
            raise ValueError(f"transform.buckets.sizes names resolutions {sorted(unknown)} that are not in "
                             f"transform.resolutions {resolutions}")
        for resolution in resolutions:
            for height, width in bucket_sizes(resolution, self):
                if height % self.multiple or width % self.multiple:
                    raise ValueError(f"bucket {height}x{width} at {resolution} px: each side must be a multiple "
                                     f"of transform.buckets.multiple={self.multiple}")


def round_to(value: float, multiple: int) -> int:
    """The nearest multiple of `multiple` (halves up), at least one multiple."""
    return max(multiple, int(math.floor(value / multiple + 0.5)) * multiple)


def bucket_sizes(resolution: int, cfg: BucketConfig) -> list[tuple[int, int]]:
    """The (H, W) buckets of a resolution, widest last (ordered by aspect ratio W / H)."""
    if resolution in cfg.sizes:
        sizes = [parse_size(s) for s in cfg.sizes[resolution]]
    else:
        sizes = [(round_to(resolution / math.sqrt(a), cfg.multiple), round_to(resolution * math.sqrt(a), cfg.multiple))
                 for a in cfg.aspect_ratios]
    return sorted(set(sizes), key=lambda hw: (hw[1] / hw[0], hw))


def nearest_bucket(width: int, height: int, sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """The (H, W) of `sizes` nearest an image of width x height by log aspect ratio (a tie: the
    first in `sizes`)."""
    aspect = math.log(width / height)
    return min(sizes, key=lambda hw: abs(math.log(hw[1] / hw[0]) - aspect))


def bucket_name(size: tuple[int, int]) -> str:
    return f"b{size[0]}x{size[1]}"


def parse_size(text: str) -> tuple[int, int]:
    """"HxW" -> (H, W); a ValueError that says what was expected."""
    match = _SIZE.match(str(text))
    if not match or not all(int(v) > 0 for v in match.groups()):
        raise ValueError(f"size {text!r} is not HxW (height x width in pixels, e.g. 224x288)")
    return int(match[1]), int(match[2])


def encoded_size(data: bytes) -> tuple[int, int]:
    """(H, W) of an encoded image, from its header: the bucket the stage pass cropped it to."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return image.height, image.width


def stream_key(resolution: int, size: tuple[int, int]) -> str:
    """The bucket's MDS dataset folder under the output: <res>/b<H>x<W>."""
    return f"{resolution}/{bucket_name(size)}"


def write_bucket_index(store, resolution: int, counts: dict[tuple[int, int], int]) -> dict:
    """<res>/buckets.json: every bucket of the resolution with its sample count."""
    index = {"buckets": [{"name": bucket_name(size), "height": size[0], "width": size[1], "samples": count}
                         for size, count in counts.items()]}
    store.put_bytes(f"{resolution}/{INDEX}", json.dumps(index, sort_keys=True).encode())
    return index


def read_bucket_index(store, prefix: str = "") -> list[dict]:
    """The buckets listed by `<prefix>/buckets.json` (name, height, width, samples)."""
    key = f"{prefix.rstrip('/')}/{INDEX}" if prefix else INDEX
    return json.loads(store.get_bytes(key))["buckets"]
