"""Exact and near-duplicate detection: robust hashes, smallest id kept, the same answer whatever the order."""
import io
import random

import numpy as np
import pytest
from PIL import Image

from deco.data.dedup import (DUPLICATE_EXACT, DUPLICATE_NEAR, NearDuplicateIndex, dedup_caption, exact_key,
                             find_duplicates, hamming, hamming_to_many, phash, pixel_digest)
from deco.data.synthetic import synthetic_scenes


def reencode(image, fmt, **kw):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kw)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


@pytest.fixture(scope="module")
def images():
    return [scene.image() for scene in synthetic_scenes(40, 96, 2)]


def test_phash_survives_reencoding_and_small_resizes(images):
    for image in images:
        reference = phash(image)
        assert hamming(reference, phash(reencode(image, "JPEG", quality=75))) <= 4
        assert hamming(reference, phash(image.resize((86, 86), Image.Resampling.BICUBIC))) <= 4
        assert hamming(reference, phash(image.resize((110, 110), Image.Resampling.BILINEAR))) <= 4


def test_phash_separates_different_scenes(images):
    hashes = [phash(image) for image in images]
    distances = [hamming(a, b) for i, a in enumerate(hashes) for b in hashes[i + 1:]]
    assert np.median(distances) > 20
    assert 0 <= min(h for h in hashes) and max(hashes) < 2**64


def test_exact_key_ignores_encoding_and_caption_formatting(images):
    image = images[0]
    lossless = reencode(image, "PNG", compress_level=1)
    assert pixel_digest(lossless) == pixel_digest(image)
    assert exact_key(lossless, "A photo of a red circle.") == exact_key(image, "a  photo of a RED circle")
    assert exact_key(image, "a photo of a red circle") != exact_key(image, "a photo of a blue circle")
    assert exact_key(image, "x") != exact_key(reencode(image, "JPEG", quality=90), "x")
    assert dedup_caption("  Ａ photo\n of X!! ") == "a photo of x"


def test_the_smallest_id_of_each_group_is_kept():
    keys = [b"k1", b"k1", b"k2", b"k3", b"k1"]
    hashes = [0, 0, 0b1111, 2**64 - 1, 0]
    found = find_duplicates(["b", "a", "c", "d", "e"], keys, hashes, threshold=4)
    assert [(d.id, d.reason, d.duplicate_of) for d in found] == [
        ("b", DUPLICATE_EXACT, "a"), ("c", DUPLICATE_NEAR, "a"), ("e", DUPLICATE_EXACT, "a")]
    assert found[1].distance == 4


def test_threshold_is_inclusive():
    base = 0x0F0F_0F0F_0F0F_0F0F
    at, beyond = base ^ 0b111, base ^ 0b1111
    found = find_duplicates(["a", "b", "c"], [b"1", b"2", b"3"], [base, at, beyond], threshold=3)
    assert [(d.id, d.duplicate_of) for d in found] == [("b", "a")]


def test_chains_keep_every_sample_far_from_a_kept_one():
    # a~b and b~c but not a~c: b goes (near a), c stays (only near b, which is not kept).
    a, b, c = 0, 0b111, 0b111111
    found = find_duplicates(["a", "b", "c"], [b"1", b"2", b"3"], [a, b, c], threshold=3)
    assert [d.id for d in found] == ["b"]


def test_same_result_whatever_the_order_or_partitioning():
    rng = random.Random(0)
    ids, keys, hashes = [], [], []
    for i in range(400):
        base = rng.getrandbits(64)
        for copy in range(rng.choice([1, 1, 2, 3])):
            flips = sum(1 << b for b in rng.sample(range(64), rng.randint(0, 7)))
            ids.append(f"{i:04d}-{copy}")
            keys.append(bytes([i % 251, copy % 2]))  # some exact repeats
            hashes.append(base ^ flips if copy else base)
    reference = find_duplicates(ids, keys, hashes, threshold=5)
    assert {d.reason for d in reference} == {DUPLICATE_EXACT, DUPLICATE_NEAR}
    order = list(range(len(ids)))
    for _ in range(3):
        rng.shuffle(order)
        shuffled = find_duplicates([ids[i] for i in order], [keys[i] for i in order], [hashes[i] for i in order],
                                   threshold=5)
        assert shuffled == reference


def test_index_matches_brute_force_greedy():
    rng = random.Random(1)
    hashes = []
    for _ in range(300):
        if hashes and rng.random() < 0.4:
            hashes.append(rng.choice(hashes) ^ sum(1 << b for b in rng.sample(range(64), rng.randint(0, 9))))
        else:
            hashes.append(rng.getrandbits(64))
    for threshold in (0, 3, 6, 8):
        index, kept, brute_kept = NearDuplicateIndex(threshold), [], []
        for value in hashes:
            if index.nearest(value) is None:
                index.add(value)
                kept.append(value)
            if all(hamming(value, k) > threshold for k in brute_kept):
                brute_kept.append(value)
        assert kept == brute_kept


def test_dct_is_the_orthonormal_dct_ii():
    from scipy.fft import dctn

    from deco.data.dedup import low_frequency_dct

    pixels = np.random.default_rng(0).uniform(0, 255, (32, 32))
    np.testing.assert_allclose(low_frequency_dct(pixels, 8), dctn(pixels, type=2, norm="ortho")[:8, :8], atol=1e-9)


def test_vectorised_hamming_agrees_with_python():
    rng = random.Random(2)
    values = [rng.getrandbits(64) for _ in range(50)]
    probe = rng.getrandbits(64)
    assert hamming_to_many(probe, np.array(values, dtype=np.uint64)).tolist() == [hamming(probe, v) for v in values]


def test_ids_must_be_unique():
    with pytest.raises(ValueError, match="unique"):
        find_duplicates(["a", "a"], [b"1", b"2"], [0, 1])
