"""The synthetic dataset on disk: clean scenes mixed with the faults real crawls have, and the truth.

`write_synthetic_dataset(out, n, seed, format, bad_fraction)` writes, to a local folder or s3://:

    webdataset   shard-NNNNN.tar with <id>.jpg|png, <id>.txt (raw caption bytes), <id>.json
    parquet      part-NNNNN.parquet with id (string), image (binary), caption (binary: may be non-UTF-8)
    folder       <id>.jpg|png + <id>.txt (the folder reader ignores the two .jsonl files)
    truth.jsonl  one object per sample: id, fault (null when clean), reason (the reject reason curation
                 must give it, or null), duplicate_of, tag, width, height, objects (class, color, rgb, box)
    evaluation_metadata.jsonl   a GenEval prompt set over the dataset's vocabulary (for the gates)

Guarantees, so that truth.jsonl is exact for curation with configs/data/curate_demo.yaml:
- clean images have a shortest side >= `size` (96 by default, >= MIN_CLEAN_SIDE) and aspect <= 4:3;
- clean images' perceptual hashes are pairwise more than CLEAN_MIN_HASH_DISTANCE - 1 bits apart
  (scenes are redrawn until they are), so no clean image is a near duplicate of another at any
  dedup.hamming_threshold below CLEAN_MIN_HASH_DISTANCE;
- a near_duplicate is within NEAR_MAX_HASH_DISTANCE bits of its original, with different pixels;
- duplicates always copy an earlier clean sample (smaller id), which curation keeps.
"""
from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image

from deco.data.dedup import hamming, hamming_to_many, phash, pixel_digest
from deco.data.object_store import open_store
from deco.data.synthetic import Scene, geneval_prompts, ground_truth, make_scene

# fault -> the reject reason curation must record for it
FAULTS: dict[str, str] = {
    "undecodable_image": "image_undecodable",
    "truncated_jpeg": "image_truncated",
    "empty_caption": "caption_empty",
    "whitespace_caption": "caption_empty",
    "non_utf8_caption": "caption_undecodable",
    "boilerplate_caption": "caption_boilerplate",
    "blocklisted_caption": "caption_blocklisted",
    "foreign_caption": "caption_language",
    "too_small": "image_too_small",
    "extreme_aspect": "image_aspect_ratio",
    "exact_duplicate": "duplicate_exact",
    "near_duplicate": "duplicate_near",
}
BLOCKLIST_WORDS = ("nsfw", "xxx")  # configs/data/curate_demo.yaml blocklists these
MIN_CLEAN_SIDE = 64     # curate_demo's min_side: clean images are at least this, too_small ones below
CLEAN_MIN_HASH_DISTANCE = 7
NEAR_MAX_HASH_DISTANCE = 4
FORMATS = ("webdataset", "parquet", "folder")
BOILERPLATE = ("IMG_{n:04d}.jpg", "DSC{n:05d}", "image may contain: outdoor, nature", "untitled",
               "photo_{n}.png", "https://example.com/images/{n}.jpg", "No description available", "IMG-{n}")
FOREIGN = ("ein Foto von einem roten Kreis und einem blauen Quadrat", "une photo d'un cercle rouge à côté d'un carré bleu",
           "una foto de un círculo rojo junto a un cuadrado azul", "una foto di un cerchio rosso accanto a un quadrato blu",
           "uma foto de um círculo vermelho ao lado de um quadrado azul", "drei grüne Dreiecke auf einem grauen Hintergrund",
           "zdjęcie czerwonego koła obok niebieskiego kwadratu", "фотография красного круга рядом с синим квадратом")


@dataclass
class SyntheticSample:
    id: str
    image: bytes
    caption: bytes
    ext: str  # "jpg" or "png"
    fault: str | None = None
    duplicate_of: str | None = None
    scene: Scene | None = None

    def truth_record(self) -> dict:
        scene = self.scene
        return {"id": self.id, "fault": self.fault, "reason": FAULTS.get(self.fault) if self.fault else None,
                "duplicate_of": self.duplicate_of, "tag": scene.tag if scene else None,
                "width": scene.width if scene else None, "height": scene.height if scene else None,
                "objects": [o | {"box": list(o["box"]), "rgb": list(o["rgb"])} for o in ground_truth(scene)] if scene else []}


def encode(image: Image.Image, ext: str, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    if ext == "png":
        image.save(buffer, format="PNG")
    else:
        image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def decoded(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


class _CleanHashes:
    """Hashes of the clean images so far, to keep every new clean image far from all of them."""

    def __init__(self):
        self.values = np.zeros(0, dtype=np.uint64)

    def far_enough(self, value: int) -> bool:
        return not self.values.size or int(hamming_to_many(value, self.values).min()) >= CLEAN_MIN_HASH_DISTANCE

    def add(self, value: int) -> None:
        self.values = np.append(self.values, np.uint64(value))


def _clean(rng: random.Random, sample_id: str, size: int, hashes: _CleanHashes) -> SyntheticSample:
    for _ in range(1000):
        shape = rng.random()
        canvas = (size, size * 4 // 3) if shape < 0.1 else (size * 4 // 3, size) if shape < 0.2 else None
        scene = make_scene(rng, size, canvas=canvas)
        ext = "png" if rng.random() < 0.25 else "jpg"
        data = encode(scene.image(), ext)
        value = phash(decoded(data))
        if hashes.far_enough(value):
            hashes.add(value)
            return SyntheticSample(sample_id, data, scene.caption.encode(), ext, scene=scene)
    raise RuntimeError(f"could not draw a clean scene {CLEAN_MIN_HASH_DISTANCE} hash bits from all earlier ones: "
                       "the dataset is too large for the scene vocabulary at this size")


def _near_copy(rng: random.Random, original: SyntheticSample) -> tuple[bytes, str]:
    image = decoded(original.image)
    reference = phash(image)
    for _ in range(20):
        if rng.random() < 0.5:
            variant, ext = decoded(encode(image, "jpg", quality=rng.randint(70, 90))), "jpg"
        else:
            factor = rng.choice([rng.uniform(0.88, 0.95), rng.uniform(1.05, 1.15)])
            variant = image.resize((round(image.width * factor), round(image.height * factor)), Image.Resampling.BICUBIC)
            ext = original.ext
        data = encode(variant, ext)
        copy = decoded(data)
        if pixel_digest(copy) != pixel_digest(image) and hamming(phash(copy), reference) <= NEAR_MAX_HASH_DISTANCE:
            return data, ext
    return encode(image, "jpg", quality=90), "jpg"  # a plain re-encode always qualifies on these scenes


def _faulty(rng: random.Random, fault: str, sample_id: str, size: int, clean: list[SyntheticSample]) -> SyntheticSample:
    if fault in ("exact_duplicate", "near_duplicate"):
        original = rng.choice(clean)
        if fault == "exact_duplicate":
            data, ext = original.image, original.ext
        else:
            data, ext = _near_copy(rng, original)
        return SyntheticSample(sample_id, data, original.caption, ext, fault, original.id, original.scene)
    canvas = None
    if fault == "too_small":
        side = rng.randint(16, MIN_CLEAN_SIDE * 3 // 4)
        canvas = (side, side)
    elif fault == "extreme_aspect":
        canvas = (size * 4, size) if rng.random() < 0.5 else (size, size * 4)
    scene = make_scene(rng, size, canvas=canvas)
    data, caption, ext = encode(scene.image(), "jpg"), scene.caption.encode(), "jpg"
    n = rng.randint(1, 99999)
    if fault == "undecodable_image":
        data = rng.randbytes(rng.randint(50, 2000)) if rng.random() < 0.5 else b"<html><body>404 Not Found</body></html>"
        scene = None
    elif fault == "truncated_jpeg":
        data = data[: int(len(data) * rng.uniform(0.3, 0.8))]
    elif fault == "empty_caption":
        caption = b""
    elif fault == "whitespace_caption":
        caption = rng.choice([" ", "  \t\n ", "\u3000 \u00a0"]).encode()
    elif fault == "non_utf8_caption":
        caption = (scene.caption + rng.choice([" café", " naïve", " über", " señal"])).encode("latin-1")
    elif fault == "boilerplate_caption":
        caption = rng.choice(BOILERPLATE).format(n=n).encode()
    elif fault == "blocklisted_caption":
        caption = f"{scene.caption}, {rng.choice(BLOCKLIST_WORDS)}".encode()
    elif fault == "foreign_caption":
        caption = rng.choice(FOREIGN).encode()
    return SyntheticSample(sample_id, data, caption, ext, fault, None, scene)


def synthetic_samples(n: int, seed: int, bad_fraction: float = 0.0, size: int = 96) -> list[SyntheticSample]:
    """Samples with ids 000000.. in order; round(bad_fraction * n) carry faults, every kind in turn."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0.0 <= bad_fraction < 1.0:
        raise ValueError(f"bad_fraction must be in [0, 1), got {bad_fraction}")
    if size < MIN_CLEAN_SIDE:
        raise ValueError(f"size must be >= {MIN_CLEAN_SIDE} (curate_demo's min_side), got {size}")
    rng = random.Random(seed)
    width = max(6, len(str(n - 1)))
    count = min(round(bad_fraction * n), n - 1)  # sample 0 stays clean: duplicates need an original
    kinds = [list(FAULTS)[i % len(FAULTS)] for i in range(count)]
    rng.shuffle(kinds)
    faults = dict(zip(sorted(rng.sample(range(1, n), count)), kinds))
    hashes, clean, samples = _CleanHashes(), [], []
    for index in range(n):
        sample_id = f"{index:0{width}d}"
        if index in faults:
            samples.append(_faulty(rng, faults[index], sample_id, size, clean))
        else:
            sample = _clean(rng, sample_id, size, hashes)
            clean.append(sample)
            samples.append(sample)
    return samples


def _parquet_bytes(chunk: list[SyntheticSample]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"id": pa.array([s.id for s in chunk], pa.string()),
                      "image": pa.array([s.image for s in chunk], pa.binary()),
                      "caption": pa.array([s.caption for s in chunk], pa.binary())})
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def _tar_bytes(chunk: list[SyntheticSample]) -> bytes:
    from webdataset import TarWriter

    buffer = io.BytesIO()
    with TarWriter(buffer, mtime=0.0, encoder=False) as writer:
        for s in chunk:
            writer.write({"__key__": s.id, s.ext: s.image, "txt": s.caption,
                          "json": json.dumps({"id": s.id}).encode()})
    return buffer.getvalue()


def write_synthetic_dataset(out: str, n: int, seed: int, format: Literal["webdataset", "parquet", "folder"] = "webdataset",
                            bad_fraction: float = 0.0, size: int = 96, per_file: int = 256) -> dict:
    """Write the dataset, truth.jsonl and evaluation_metadata.jsonl under `out`; returns a summary."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    samples = synthetic_samples(n, seed, bad_fraction, size)
    store = open_store(out)
    store.check(create=True)
    files = []
    for number, start in enumerate(range(0, n, per_file)):
        chunk = samples[start:start + per_file]
        if format == "webdataset":
            files.append(f"shard-{number:05d}.tar")
            store.put_bytes(files[-1], _tar_bytes(chunk))
        elif format == "parquet":
            files.append(f"part-{number:05d}.parquet")
            store.put_bytes(files[-1], _parquet_bytes(chunk))
    if format == "folder":
        for s in samples:
            store.put_bytes(f"{s.id}.{s.ext}", s.image)
            store.put_bytes(f"{s.id}.txt", s.caption)
        files = [f"{s.id}.{s.ext}" for s in samples]
    truth = "".join(json.dumps(s.truth_record()) + "\n" for s in samples)
    store.put_bytes("truth.jsonl", truth.encode())
    store.put_bytes("evaluation_metadata.jsonl", "".join(json.dumps(p) + "\n" for p in geneval_prompts()).encode())
    faults: dict[str, int] = {}
    for s in samples:
        if s.fault:
            faults[s.fault] = faults.get(s.fault, 0) + 1
    return {"out": out, "format": format, "samples": n, "clean": n - sum(faults.values()),
            "faults": dict(sorted(faults.items())), "files": files}


def read_truth(out: str) -> list[dict]:
    return [json.loads(line) for line in open_store(out).get_bytes("truth.jsonl").decode().splitlines() if line]
