"""The synthetic detector reads shapes and colours from pixels: measured on freshly drawn scenes of
the synthetic dataset at the demo's resolutions (32, 64 px) and larger."""
import random

import numpy as np
import pytest
from PIL import Image

from deco.data.synthetic import BACKGROUNDS, COLORS, SHAPES, DrawnObject, make_scene, render
from deco.pipeline.evaluate.geneval.detectors import DetectorConfig, build_detector
from deco.pipeline.evaluate.geneval.rules import COUNTING_SCORE_THRESHOLD, evaluate_image

SCENES_PER_SIZE = {32: 80, 64: 80, 128: 50, 256: 30}


def iou(a, b) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.fixture(scope="module")
def detector():
    return build_detector(DetectorConfig(backend="synthetic"))


def _matches(found, truth) -> bool:
    """Every drawn object found once (class, colour, box IoU >= 0.5) above the counting threshold
    (so counts are right even at 0.9), and nothing else."""
    kept = [(name, d) for name, dets in found.items() for d in dets if d.score > COUNTING_SCORE_THRESHOLD]
    if len(kept) != len(truth):
        return False
    unmatched = list(kept)
    for obj in truth:
        hit = next((k for k in unmatched if k[0] == obj["class"] and k[1].color == obj["color"]
                    and iou(k[1].box, obj["box"]) >= 0.5), None)
        if hit is None:
            return False
        unmatched.remove(hit)
    return True


@pytest.mark.parametrize("size", sorted(SCENES_PER_SIZE))
def test_finds_the_drawn_objects_at_least_95_percent(detector, size):
    rng = random.Random(1000 + size)  # fresh scenes, never seen while tuning
    scenes = [make_scene(rng, size) for _ in range(SCENES_PER_SIZE[size])]
    found = detector.detect([s.image() for s in scenes])
    from deco.data.synthetic import ground_truth

    exact = sum(_matches(f, ground_truth(s)) for f, s in zip(found, scenes))
    assert exact / len(scenes) >= 0.95, f"{size} px: {exact}/{len(scenes)} scenes exactly right"
    # Scored as GenEval would score the scene against its own caption: correct.
    correct = sum(evaluate_image(s.metadata(), f, detector.color_fn(s.image())).correct for f, s in zip(found, scenes))
    assert correct / len(scenes) >= 0.95, f"{size} px: {correct}/{len(scenes)} scenes judged correct"


def test_every_colour_on_every_background(detector):
    for background in BACKGROUNDS:
        for i, color in enumerate(COLORS):
            shape = SHAPES[i % 3]
            image = render([DrawnObject(shape, color, (10, 14, 34, 38))], 48, background, texture_seed=i)
            found = detector.detect_one(image)
            hits = [(name, d.color) for name, dets in found.items() for d in dets]
            assert hits == [(shape, color)], (background, color, hits)


def test_reads_pixels_not_captions(detector):
    base = render([DrawnObject("square", "red", (4, 4, 20, 20)), DrawnObject("circle", "blue", (36, 36, 56, 56))],
                  64, BACKGROUNDS[3], texture_seed=1)
    found = detector.detect_one(base)
    assert [(n, d.color) for n, ds in found.items() for d in ds] == [("circle", "blue"), ("square", "red")]
    # Paint the square over with the background: it is gone from the detections.
    pixels = np.asarray(base).copy()
    pixels[4:20, 4:20] = pixels[24:40, 4:20]
    found = detector.detect_one(Image.fromarray(pixels))
    assert [(n, d.color) for n, ds in found.items() for d in ds] == [("circle", "blue")]
    # A plain background has nothing on it.
    assert all(not v for v in detector.detect_one(Image.new("RGB", (64, 64), BACKGROUNDS[0])).values())


@pytest.mark.parametrize("size", [32, 64, 128])
def test_finds_nothing_in_noise(detector, size):
    """An untrained model's samples are noise: a gate must score them zero, never find shapes there."""
    rng = np.random.default_rng(size)
    gaussian = np.clip(rng.normal(127.5, 127.5, (size, size, 3)), 0, 255)   # N(0,1) noise in [-1, 1], clamped
    uniform = rng.uniform(0, 255, (size, size, 3))
    blurred = np.clip(rng.normal(127.5, 60, (size // 4, size // 4, 3)), 0, 255)
    for array in (gaussian, uniform, blurred):
        image = Image.fromarray(array.astype(np.uint8)).resize((size, size), Image.BILINEAR)
        found = detector.detect([image])[0]
        counted = {name: [d for d in dets if d.score > 0.3] for name, dets in found.items()}
        assert not any(counted.values()), {name: [(d.box, round(d.score, 3)) for d in dets] for name, dets in counted.items() if dets}
