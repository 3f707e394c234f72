"""Scoring an official-layout directory as a user does (the CLI), from a detector or from a
detections file, and the official summary and HTML report of the results."""
import json
import re

import numpy as np
import pytest
from PIL import Image

from deco.pipeline.evaluate.geneval.detections import Detection, write_detections
from deco.pipeline.evaluate.geneval.layout import write_prompt_folder
from deco.pipeline.evaluate.geneval.score import read_results
from deco.pipeline.evaluate.geneval.summary import format_summary, summarize
from geneval_helpers import run_deco, scene_layout

OFFICIAL_FIELDS = {"filename", "tag", "prompt", "correct", "reason", "metadata", "details"}


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """12 prompts x 2 images of drawn scenes (2 per task), one image then corrupted, scored by CLI."""
    root = tmp_path_factory.mktemp("scored")
    images = root / "images"
    scene_layout(images, size=64, count=12, seed=3, images_per_prompt=2)
    # A wrong image for prompt 0 (single object): an empty background.
    Image.new("RGB", (64, 64), (45, 75, 95)).save(images / "00000" / "samples" / "0001.png")
    (images / "00001" / "samples" / "0001.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    result = run_deco("geneval", "score", "--images", str(images), "--out", str(root / "results.jsonl"),
                      "--detector", "synthetic", "--save-detections", str(root / "detections.jsonl"))
    assert result.returncode == 0, result.stderr
    return root


def test_results_have_the_official_fields_and_decisions(scored):
    lines = (scored / "results.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert len(rows) == 24 and all(set(r) == OFFICIAL_FIELDS for r in rows)
    assert all(isinstance(r["metadata"], str) and isinstance(r["details"], str) for r in rows)  # as the reference
    by_file = {r["filename"].split("images/")[1]: r for r in rows}
    assert by_file["00000/samples/0001.png"]["correct"] is False
    assert re.match(r"expected \w+>=1, found 0", by_file["00000/samples/0001.png"]["reason"])
    assert by_file["00001/samples/0001.png"]["reason"].startswith("unreadable image")
    others = [r for k, r in by_file.items() if k not in ("00000/samples/0001.png", "00001/samples/0001.png")]
    assert all(r["correct"] for r in others), [r["reason"] for r in others if not r["correct"]]


def test_summary_prints_the_official_lines_and_writes_json(scored):
    result = run_deco("geneval", "summary", str(scored / "results.jsonl"))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Total images: 24" in out and "Total prompts: 12" in out
    assert "% correct images: 91.67%" in out and "% correct prompts: 100.00%" in out
    assert "single_object    = 75.00% (3 / 4)" in out and "two_object       = 75.00% (3 / 4)" in out
    assert "colors           = 100.00% (4 / 4)" in out
    assert out.strip().endswith("Overall score (avg. over tasks): 0.91667")  # (6 x 4 images: mean = fraction)
    summary = json.loads((scored / "results_summary.json").read_text())
    assert summary["unreadable_images"] == 1 and summary["tasks"]["counting"]["total"] == 4


def test_overall_is_the_unweighted_mean_of_tasks():
    rows = [{"filename": f"d/{i:05d}/samples/0000.png", "tag": "colors", "correct": True} for i in range(9)]
    rows.append({"filename": "d/00009/samples/0000.png", "tag": "counting", "correct": False})
    summary = summarize(rows)
    assert summary["overall"] == pytest.approx(0.5) and summary["correct_images_fraction"] == pytest.approx(0.9)
    assert format_summary(summary).splitlines()[-1] == "Overall score (avg. over tasks): 0.50000"


def test_rescoring_saved_detections_gives_the_same_results(scored, tmp_path):
    result = run_deco("geneval", "score", "--images", str(scored / "images"), "--out", str(tmp_path / "again.jsonl"),
                      "--detections", str(scored / "detections.jsonl"))
    assert result.returncode == 0, result.stderr
    before = {r["filename"]: (r["correct"], r["reason"]) for r in read_results(scored / "results.jsonl")}
    after = {r["filename"]: (r["correct"], r["reason"]) for r in read_results(tmp_path / "again.jsonl")}
    # The unreadable image has no detections record and is scored incorrect again from its pixels.
    assert after == before


def test_handwritten_detections_with_masks_and_colour_from_the_detector(tmp_path):
    images = tmp_path / "images"
    meta = {"tag": "color_attr", "include": [{"class": "square", "count": 1, "color": "red"},
                                             {"class": "circle", "count": 1, "color": "blue"}],
            "prompt": "a photo of a red square and a blue circle"}
    pixels = np.full((40, 40, 3), 200, dtype=np.uint8)
    pixels[5:15, 5:15] = (220, 30, 30)
    pixels[20:35, 20:35] = (40, 80, 220)
    write_prompt_folder(images, 0, meta, [Image.fromarray(pixels)])
    circle_mask = np.zeros((40, 40), dtype=bool)
    circle_mask[20:35, 20:35] = True
    Image.fromarray(circle_mask.astype(np.uint8) * 255).save(tmp_path / "circle_mask.png")
    with open(tmp_path / "dets.jsonl", "w") as f:
        f.write(json.dumps({"filename": "00000/samples/0000.png", "detections": {
            "square": [{"box": [5, 5, 15, 15], "score": 0.8, "color": "red"}],
            "circle": [{"box": [20, 20, 35, 35], "score": 0.7, "mask_png": "circle_mask.png"}]}}) + "\n")
    # Without a colour classifier the circle's colour is unknown: a clear error, not a guess.
    result = run_deco("geneval", "score", "--images", str(images), "--out", str(tmp_path / "r.jsonl"),
                      "--detections", str(tmp_path / "dets.jsonl"))
    assert result.returncode == 2 and "pass --detector" in result.stderr and "Traceback" not in result.stderr
    # The synthetic detector classifies it from the masked pixels.
    result = run_deco("geneval", "score", "--images", str(images), "--out", str(tmp_path / "r.jsonl"),
                      "--detections", str(tmp_path / "dets.jsonl"), "--detector", "synthetic")
    assert result.returncode == 0, result.stderr
    row = read_results(tmp_path / "r.jsonl")[0]
    assert row["correct"] is True and row["details"]["include"][1]["colors"] == ["blue"]


def test_missing_detection_records_are_an_error(tmp_path):
    images = tmp_path / "images"
    meta = {"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a photo of a circle"}
    write_prompt_folder(images, 0, meta, [Image.new("RGB", (16, 16))] * 2)
    write_detections(tmp_path / "d.jsonl", [("00000/samples/0000.png", {"circle": [Detection((0, 0, 4, 4), 0.9)]})])
    result = run_deco("geneval", "score", "--images", str(images), "--out", str(tmp_path / "r.jsonl"),
                      "--detections", str(tmp_path / "d.jsonl"))
    assert result.returncode == 2 and "no record for 1 of 2 images" in result.stderr


def test_html_report_shows_grids_and_failures(scored, tmp_path):
    result = run_deco("geneval", "report", "--results", str(scored / "results.jsonl"), "--out", str(tmp_path / "r.html"))
    assert result.returncode == 0, result.stderr
    page = (tmp_path / "r.html").read_text()
    for tag in ("single_object", "two_object", "counting", "colors", "position", "color_attr"):
        assert f"<h2 id='{tag}'>{tag}</h2>" in page
    assert page.count("<img class=\"ok\"") == 22          # in the task grids only
    assert page.count("<img class=\"fail\"") == 2         # the empty image: in its grid and the failed section
    assert page.count("class=\"missing fail\"") == 2      # the unreadable one, likewise, as a placeholder
    assert "Failed images (2)" in page and "unreadable image" in page and "data:image/png;base64," in page
