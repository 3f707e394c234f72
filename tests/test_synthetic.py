"""The synthetic dataset: captions in GenEval's six styles that match the pixels, drawn truth a detector
can test against, injected faults that really are faulty, and `deco data synth` on disk."""
import io
import itertools
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deco.data.dedup import hamming, phash, pixel_digest
from deco.data.synthetic import (COLORS, MIN_BACKGROUND_DISTANCE, SHAPES, TASKS, geneval_prompts, geneval_relations,
                                 ground_truth, make_scene, random_scene, synthetic_pairs, synthetic_scenes)
from deco.data.synthetic_faults import (CLEAN_MIN_HASH_DISTANCE, FAULTS, MIN_CLEAN_SIDE, NEAR_MAX_HASH_DISTANCE,
                                        synthetic_samples, write_synthetic_dataset)
from deco.data.transforms import resize_centre_crop

ROOT = Path(__file__).resolve().parents[1]
NUMBERS = {"a": 1, "one": 1, "two": 2, "three": 3, "four": 4}
SHAPE = "(circle|square|triangle)"
COLOR = "(" + "|".join(COLORS) + ")"


def parse_caption(caption: str) -> tuple[str, list[tuple[str, str | None, int]], str | None]:
    """(task, [(shape, colour or None, count)], relation) read from the caption text alone."""
    patterns = [
        ("color_attr", rf"a photo of an? {COLOR} {SHAPE} and an? {COLOR} {SHAPE}"),
        ("two_object", rf"a photo of a {SHAPE} and a {SHAPE}"),
        ("position", rf"a photo of a {SHAPE} (left of|right of|above|below) a {SHAPE}"),
        ("colors", rf"a photo of an? {COLOR} {SHAPE}"),
        ("counting", rf"a photo of (one|two|three|four) {SHAPE}s?"),
        ("single_object", rf"a photo of a {SHAPE}"),
    ]
    for task, pattern in patterns:
        match = re.fullmatch(pattern, caption)
        if not match:
            continue
        g = match.groups()
        if task == "color_attr":
            return task, [(g[1], g[0], 1), (g[3], g[2], 1)], None
        if task == "two_object":
            return task, [(g[0], None, 1), (g[1], None, 1)], None
        if task == "position":
            return task, [(g[0], None, 1), (g[2], None, 1)], g[1]
        if task == "colors":
            return task, [(g[1], g[0], 1)], None
        if task == "counting":
            return task, [(g[1], None, NUMBERS[g[0]])], None
        return task, [(g[0], None, 1)], None
    raise AssertionError(f"caption in no GenEval style: {caption!r}")


def scenes_under_test():
    rng = random.Random(7)
    for i in range(360):
        size = (32, 64, 96)[i % 3]
        canvas = None if i % 4 else ((size * 4 // 3, size) if i % 8 else (size, size * 4 // 3))
        yield make_scene(rng, size, canvas=canvas)


def test_every_caption_says_what_the_pixels_show():
    seen_tasks = set()
    for scene in scenes_under_test():
        task, clauses, relation = parse_caption(scene.caption)
        assert task == scene.tag
        seen_tasks.add(task)
        drawn = ground_truth(scene)
        for shape, color, count in clauses:
            matching = [o for o in drawn if o["class"] == shape and (color is None or o["color"] == color)]
            assert len(matching) == count, scene
        assert len(drawn) == sum(count for _, _, count in clauses)
        if relation:
            subject = next(o for o in drawn if o["class"] == clauses[0][0])
            reference = next(o for o in drawn if o["class"] == clauses[1][0])
            assert geneval_relations(subject["box"], reference["box"]) == {relation}
        pixels = np.asarray(scene.image(), dtype=np.int64)
        background = np.ones(pixels.shape[:2], dtype=bool)
        for obj in drawn:
            x0, y0, x1, y1 = obj["box"]
            inside = pixels[y0:y1, x0:x1]
            exact = (inside == np.array(obj["rgb"])).all(-1).mean()
            assert exact > 0.4, (scene.caption, obj)  # triangles fill half their box
            background[y0:y1, x0:x1] = False
        palette = np.array(list(COLORS.values()))
        distances = np.abs(pixels[background][:, None, :] - palette[None]).sum(-1)
        assert distances.min() >= MIN_BACKGROUND_DISTANCE
    assert seen_tasks == set(TASKS)


def test_objects_never_overlap_are_large_enough_and_survive_the_centre_crop():
    for scene in scenes_under_test():
        side = min(scene.width, scene.height)
        left, top = (scene.width - side) // 2, (scene.height - side) // 2
        boxes = [o.box for o in scene.objects]
        for x0, y0, x1, y1 in boxes:
            assert left <= x0 < x1 <= left + side and top <= y0 < y1 <= top + side
            assert min(x1 - x0, y1 - y0) >= side / 5
        for a, b in itertools.combinations(boxes, 2):
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (scene, a, b)


def test_ground_truth_follows_the_resize_and_crop_to_32_px():
    rng = random.Random(3)
    for _ in range(40):
        scene = make_scene(rng, 96, task="colors", canvas=(128, 96))
        small = np.asarray(resize_centre_crop(scene.image(), 32), dtype=np.int64)
        (obj,) = ground_truth(scene, resolution=32)
        x0, y0, x1, y1 = obj["box"]
        assert min(x1 - x0, y1 - y0) >= 32 / 5 - 1e-6
        centre = small[int((y0 + y1) / 2 + 0.5 * (obj["class"] == "triangle") * (y1 - y0) / 2), int((x0 + x1) / 2)]
        assert np.abs(centre - np.array(obj["rgb"])).sum() < 40


def test_scenes_are_deterministic_for_a_seed():
    first, again, other = synthetic_scenes(12, 64, 5), synthetic_scenes(12, 64, 5), synthetic_scenes(12, 64, 6)
    assert [s.image().tobytes() for s in first] == [s.image().tobytes() for s in again]
    assert [s.caption for s in first] != [s.caption for s in other]


def test_the_original_helpers_keep_working():
    pairs = synthetic_pairs(4, 32, 0)
    assert all(image.size == (32, 32) and isinstance(caption, str) for image, caption in pairs)
    image, caption, objects = random_scene(random.Random(0), 48)
    assert image.size == (48, 48) and objects and parse_caption(caption)


def test_geneval_prompt_set_covers_the_vocabulary_in_the_official_format():
    prompts = geneval_prompts()
    tags = {p["tag"] for p in prompts}
    assert tags == set(TASKS)
    for p in prompts:
        assert set(p) <= {"tag", "include", "exclude", "prompt"}
        for clause in p["include"] + p.get("exclude", []):
            assert clause["class"] in SHAPES and clause.get("color", "red") in COLORS
        task, clauses, _ = parse_caption(p["prompt"])
        assert task == p["tag"]
        if task == "counting":
            assert p["exclude"] == [{"class": p["include"][0]["class"], "count": p["include"][0]["count"] + 1}]
        if task == "position":
            assert p["include"][1]["position"][1] == 0
    assert {c for p in prompts if p["tag"] == "colors" for c in [p["include"][0]["color"]]} == set(COLORS)


@pytest.fixture(scope="module")
def faulty():
    return synthetic_samples(240, seed=11, bad_fraction=0.3)


def decodes(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
        return True
    except Exception:
        return False


def test_every_fault_is_injected_and_really_faulty(faulty):
    by_id = {s.id: s for s in faulty}
    kinds = [s.fault for s in faulty if s.fault]
    assert len(kinds) == round(0.3 * 240) and set(kinds) == set(FAULTS)
    for s in faulty:
        image_ok = decodes(s.image)
        if s.fault in ("undecodable_image", "truncated_jpeg"):
            assert not image_ok
        else:
            assert image_ok
        text = None
        try:
            text = s.caption.decode("utf-8")
        except UnicodeDecodeError:
            assert s.fault == "non_utf8_caption"
        if s.fault in ("empty_caption", "whitespace_caption"):
            assert text is not None and not text.strip()
        if s.fault == "too_small":
            assert max(Image.open(io.BytesIO(s.image)).size) < MIN_CLEAN_SIDE
        if s.fault == "extreme_aspect":
            w, h = Image.open(io.BytesIO(s.image)).size
            assert max(w, h) / min(w, h) > 3 and min(w, h) >= MIN_CLEAN_SIDE
        if s.fault in ("exact_duplicate", "near_duplicate"):
            original = by_id[s.duplicate_of]
            assert original.fault is None and original.id < s.id and s.caption == original.caption
            a, b = Image.open(io.BytesIO(s.image)).convert("RGB"), Image.open(io.BytesIO(original.image)).convert("RGB")
            if s.fault == "exact_duplicate":
                assert s.image == original.image
            else:
                assert pixel_digest(a) != pixel_digest(b) and hamming(phash(a), phash(b)) <= NEAR_MAX_HASH_DISTANCE
        if s.fault is None:
            assert min(Image.open(io.BytesIO(s.image)).size) >= MIN_CLEAN_SIDE and parse_caption(text)


def test_clean_images_are_never_near_duplicates_of_each_other(faulty):
    hashes = [phash(Image.open(io.BytesIO(s.image)).convert("RGB")) for s in faulty if s.fault is None]
    assert min(hamming(a, b) for a, b in itertools.combinations(hashes, 2)) >= CLEAN_MIN_HASH_DISTANCE


def test_synth_command_writes_the_same_dataset_as_the_api(tmp_path):
    result = subprocess.run([sys.executable, "-m", "deco.pipeline.cli", "data", "synth", "--out", str(tmp_path / "cli"),
                             "--n", "50", "--seed", "4", "--format", "webdataset", "--bad-fraction", "0.2"],
                            capture_output=True, text=True, timeout=120, cwd=ROOT, env=os.environ.copy())
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["samples"] == 50 and sum(summary["faults"].values()) == 10
    write_synthetic_dataset(str(tmp_path / "api"), 50, 4, "webdataset", 0.2)
    for name in ("shard-00000.tar", "truth.jsonl", "evaluation_metadata.jsonl"):
        assert (tmp_path / "cli" / name).read_bytes() == (tmp_path / "api" / name).read_bytes()
    truth = [json.loads(line) for line in (tmp_path / "cli" / "truth.jsonl").read_text().splitlines()]
    assert [t["id"] for t in truth] == [f"{i:06d}" for i in range(50)]
    assert all(t["fault"] is None or t["reason"] == FAULTS[t["fault"]] for t in truth)
    prompts = [json.loads(line) for line in (tmp_path / "cli" / "evaluation_metadata.jsonl").read_text().splitlines()]
    assert prompts == geneval_prompts()


@pytest.mark.parametrize("layout", ["parquet", "folder"])
def test_other_layouts_hold_the_same_samples(tmp_path, layout):
    summary = write_synthetic_dataset(str(tmp_path), 30, 2, layout, 0.2, per_file=16)
    samples = synthetic_samples(30, 2, 0.2)
    if layout == "parquet":
        import pyarrow.parquet as pq

        rows = [r for f in summary["files"] for r in pq.read_table(tmp_path / f).to_pylist()]
        assert [(r["id"], r["image"], r["caption"]) for r in rows] == [(s.id, s.image, s.caption) for s in samples]
    else:
        for s in samples:
            assert (tmp_path / f"{s.id}.{s.ext}").read_bytes() == s.image
            assert (tmp_path / f"{s.id}.txt").read_bytes() == s.caption


def test_synth_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="bad_fraction"):
        synthetic_samples(10, 0, 1.5)
    with pytest.raises(ValueError, match="size"):
        synthetic_samples(10, 0, 0.0, size=32)
