"""Duplicate detection across a whole curation job: exact keys and perceptual hashes.

Two passes, so that the result does not depend on how the job was partitioned or in which order
workers finished:
1. per sample (anywhere, in parallel): `exact_key` (SHA-256 of the decoded pixels and the normalised
   caption) and `phash` (64-bit DCT perceptual hash of the image). Curation takes both from the
   sample's smallest output image (its centre crop at the smallest resolution, before encoding):
   what the shards hold, at a fraction of a full-size pass. Same source pixels give the same small
   pixels, so exact duplicates stay exact; a lossless re-encode that is decoded differently (a large
   JPEG drafted, the same pixels as PNG not) is caught as a near duplicate instead;
2. once, over every sample's keys: `find_duplicates` keeps the smallest id of each exact group, then
   walks the survivors in id order and drops a sample whose hash is within `threshold` bits of an
   already kept one. The kept set therefore holds no two images within the threshold, and the same
   sample is kept whatever the partitioning.

Near-duplicate search uses multi-index hashing: the 64 bits are cut into threshold + 1 chunks, and
two hashes within `threshold` bits agree exactly on at least one chunk (pigeonhole), so only
samples sharing a chunk value are compared. Only kept samples enter the index.
"""
from __future__ import annotations

import functools
import hashlib
import re
import unicodedata
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image

HASH_BITS = 64
DUPLICATE_EXACT = "duplicate_exact"
DUPLICATE_NEAR = "duplicate_near"


@dataclass(kw_only=True)
class DedupConfig:
    exact: bool = True  # same decoded pixels and same normalised caption
    near: bool = True   # perceptual hashes within `hamming_threshold` bits
    # 64-bit pHash: re-encodes and small resizes land within ~4 bits; 6 leaves a margin without
    # merging distinct images (the synthetic dataset guarantees its clean images are > 6 apart).
    hamming_threshold: int = 6

    def validate(self) -> None:
        if not 0 <= self.hamming_threshold < HASH_BITS // 2:
            raise ValueError(f"dedup.hamming_threshold must be in [0, {HASH_BITS // 2}), got {self.hamming_threshold}")


def dedup_caption(caption: str) -> str:
    """The caption as exact dedup compares it: case, spacing and edge punctuation do not count."""
    text = unicodedata.normalize("NFKC", caption).casefold()
    return re.sub(r"\s+", " ", text).strip(" .,;:!?\"'")


def pixel_digest(image: Image.Image) -> bytes:
    """SHA-256 of the decoded RGB pixels and the size: the same for any encoding of the same pixels."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    digest = hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode())
    digest.update(rgb.tobytes())
    return digest.digest()


def exact_key(image: Image.Image, caption: str) -> bytes:
    digest = hashlib.sha256(pixel_digest(image))
    digest.update(b"\0" + dedup_caption(caption).encode("utf-8"))
    return digest.digest()


@functools.lru_cache(maxsize=4)
def dct_basis(size: int, keep: int) -> np.ndarray:
    """The first `keep` rows of the orthonormal DCT-II matrix of order `size`."""
    k, n = np.arange(keep)[:, None], np.arange(size)[None, :]
    basis = np.cos(np.pi * (2 * n + 1) * k / (2 * size)) * np.sqrt(2.0 / size)
    basis[0] /= np.sqrt(2.0)
    return basis


def low_frequency_dct(pixels: np.ndarray, keep: int) -> np.ndarray:
    """Top-left keep x keep block of the orthonormal 2-D DCT-II of a square array."""
    basis = dct_basis(pixels.shape[0], keep)
    return basis @ pixels @ basis.T


def phash(image: Image.Image, hash_size: int = 8, highfreq_factor: int = 4) -> int:
    """Perceptual hash: greyscale, resize to (hash_size * highfreq_factor)^2, 2-D DCT-II, and one bit
    per low-frequency coefficient: above the median of the AC coefficients or not."""
    side = hash_size * highfreq_factor
    # reducing_gap: box-reduce first, then Lanczos; 5x faster on large images, same low frequencies.
    grey = image.convert("L").resize((side, side), Image.Resampling.LANCZOS, reducing_gap=2.0)
    coefficients = low_frequency_dct(np.asarray(grey, dtype=np.float64), hash_size).ravel()
    # The DC term only measures brightness and dwarfs the others: leave it out of the median.
    bits = coefficients > np.median(coefficients[1:])
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def hamming(a: int, b: int) -> int:
    return (int(a) ^ int(b)).bit_count()


_BYTE_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def hamming_to_many(value: int, others: np.ndarray) -> np.ndarray:
    """Hamming distances from `value` to each uint64 in `others`."""
    xor = np.bitwise_xor(np.asarray(others, dtype=np.uint64), np.uint64(value))
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(xor).astype(np.int64)
    return _BYTE_POPCOUNT[xor.view(np.uint8)].reshape(xor.shape + (8,)).sum(-1).astype(np.int64)


@dataclass(frozen=True)
class Duplicate:
    id: str
    reason: str          # DUPLICATE_EXACT or DUPLICATE_NEAR
    duplicate_of: str    # the kept sample it duplicates
    distance: int        # Hamming distance of the hashes (0 for exact)


def _chunks(threshold: int) -> list[tuple[int, int]]:
    """(shift, mask) of threshold + 1 contiguous bit ranges covering the 64 bits."""
    count = threshold + 1
    bounds = [round(i * HASH_BITS / count) for i in range(count + 1)]
    return [(bounds[i], (1 << (bounds[i + 1] - bounds[i])) - 1) for i in range(count)]


class NearDuplicateIndex:
    """Kept hashes, looked up by chunk: `nearest(h)` finds a kept hash within the threshold."""

    def __init__(self, threshold: int):
        self.threshold = threshold
        self.chunks = _chunks(threshold)
        self.tables: list[dict[int, list[int]]] = [{} for _ in self.chunks]
        self.hashes: list[int] = []

    def nearest(self, value: int) -> tuple[int, int] | None:
        """(position, distance) of the first-added kept hash within the threshold, or None."""
        candidates: set[int] = set()
        for (shift, mask), table in zip(self.chunks, self.tables):
            candidates.update(table.get((value >> shift) & mask, ()))
        if not candidates:
            return None
        ordered = np.fromiter(sorted(candidates), dtype=np.int64)
        distances = hamming_to_many(value, np.asarray([self.hashes[i] for i in ordered], dtype=np.uint64))
        within = np.flatnonzero(distances <= self.threshold)
        if within.size == 0:
            return None
        return int(ordered[within[0]]), int(distances[within[0]])

    def add(self, value: int) -> int:
        position = len(self.hashes)
        self.hashes.append(value)
        for (shift, mask), table in zip(self.chunks, self.tables):
            table.setdefault((value >> shift) & mask, []).append(position)
        return position


def find_duplicates(ids: Sequence[str], exact_keys: Sequence[bytes], phashes: Sequence[int], *,
                    exact: bool = True, near: bool = True, threshold: int = 6) -> list[Duplicate]:
    """Every sample to drop, with the kept sample it duplicates; the smallest id of a group is kept.

    `ids` must be unique; the three sequences are parallel. The result is sorted by id and depends
    only on the set of (id, key, hash) triples, never on their order.
    """
    if not (len(ids) == len(exact_keys) == len(phashes)):
        raise ValueError("ids, exact_keys and phashes must have the same length")
    order = sorted(range(len(ids)), key=ids.__getitem__)
    if len(set(ids)) != len(ids):
        raise ValueError("find_duplicates needs unique ids")
    duplicates: list[Duplicate] = []
    survivors = []
    first_with_key: dict[bytes, str] = {}
    for i in order:
        key = exact_keys[i]
        if exact and key in first_with_key:
            duplicates.append(Duplicate(ids[i], DUPLICATE_EXACT, first_with_key[key], 0))
            continue
        first_with_key.setdefault(key, ids[i])
        survivors.append(i)
    if near:
        index = NearDuplicateIndex(threshold)
        kept_ids: list[str] = []
        for i in survivors:
            value = int(phashes[i])
            found = index.nearest(value)
            if found is None:
                index.add(value)
                kept_ids.append(ids[i])
            else:
                position, distance = found
                duplicates.append(Duplicate(ids[i], DUPLICATE_NEAR, kept_ids[position], distance))
    duplicates.sort(key=lambda d: d.id)
    return duplicates
