"""Prompt sets, the official layout (written and read back) and generation into it: fixed seeds,
resumable, spread over torchrun ranks."""
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deco.pipeline.config import ConfigError
from deco.pipeline.evaluate.geneval.generate import GenerationConfig, generate_layout
from deco.pipeline.evaluate.geneval.layout import read_layout, write_prompt_folder
from deco.pipeline.evaluate.geneval.prompts import (TASKS, load_prompts, object_names, official_prompts, parse_prompts,
                                           prompts_digest)
from deco.pipeline.evaluate.geneval.synthetic_prompts import synthetic_prompts, write_synthetic_prompts
from geneval_helpers import ROOT, tiny_weights


def test_official_prompts_are_the_published_set():
    prompts = official_prompts()
    assert Counter(p.tag for p in prompts) == {"single_object": 80, "two_object": 99, "counting": 80, "colors": 94,
                                                "position": 100, "color_attr": 100}
    assert len(object_names()) == 80 and prompts[0].text == "a photo of a bench"
    counting = [p for p in prompts if p.tag == "counting"]
    assert all(p.metadata["exclude"][0]["count"] == p.metadata["include"][0]["count"] + 1 for p in counting)
    generation = (ROOT / "data" / "geneval_prompts" / "generation_prompts.txt").read_text().splitlines()
    assert [p.text for p in prompts] == generation
    assert (ROOT / "data" / "geneval_prompts" / "LICENSE").read_text().startswith("MIT License")


@pytest.mark.parametrize("line, message", [
    ('{"tag": "colours", "include": [{"class": "dog", "count": 1}], "prompt": "x"}', "not a GenEval task"),
    ('{"tag": "colors", "include": [{"class": "dog", "count": 1, "color": "teal"}], "prompt": "x"}', "unknown color"),
    ('{"tag": "position", "include": [{"class": "dog", "count": 1, "position": ["near", 0]}], "prompt": "x"}', "position"),
    ('{"tag": "position", "include": [{"class": "dog", "count": 1, "position": ["above", 0]}], "prompt": "x"}',
     "not another clause"),
    ('{"tag": "counting", "include": [{"class": "dog", "count": 0}], "prompt": "x"}', "'count' must be an integer"),
    ('{"tag": "single_object", "include": [{"class": "unicorn", "count": 1}], "prompt": "x"}', "unknown class"),
    ('{"tag": "single_object", "include": [], "prompt": "x"}', "non-empty list"),
    ('{"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "x", "extra": 1}', "unknown key"),
    ('not json', "invalid JSON"),
])
def test_bad_prompt_lines_name_the_line(tmp_path, line, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a dog"}\n' + line + "\n")
    with pytest.raises(ConfigError, match=message) as err:
        load_prompts(path, classes=set(object_names()))
    assert f"{path}:2" in str(err.value)


def test_synthetic_prompts_have_geneval_format_and_all_tasks(tmp_path):
    rows = synthetic_prompts()
    assert Counter(r["tag"] for r in rows) == {"single_object": 3, "two_object": 6, "counting": 9, "colors": 30,
                                               "position": 24, "color_attr": 540}
    official = official_prompts()
    for tag in TASKS:  # same keys in the same order as the official file, task by task
        ours = next(r for r in rows if r["tag"] == tag)
        theirs = next(p.metadata for p in official if p.tag == tag)
        assert list(ours) == list(theirs)
        assert [list(c) for c in ours["include"]] == [list(c) for c in theirs["include"]]
    assert "a photo of an orange circle" in {r["prompt"] for r in rows}
    path = write_synthetic_prompts(tmp_path / "synthetic.jsonl", per_task=4, seed=1)
    loaded = load_prompts(path, classes={"circle", "square", "triangle"})
    assert Counter(p.tag for p in loaded) == {"single_object": 3, "two_object": 4, "counting": 4, "colors": 4,
                                              "position": 4, "color_attr": 4}
    assert prompts_digest(loaded) == prompts_digest(load_prompts(write_synthetic_prompts(tmp_path / "b.jsonl", 4, 1)))
    assert prompts_digest(loaded) != prompts_digest(load_prompts(write_synthetic_prompts(tmp_path / "c.jsonl", 4, 2)))


def test_layout_written_and_read_back(tmp_path):
    metadata = [{"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a photo of a circle"},
                {"tag": "counting", "include": [{"class": "square", "count": 2}], "exclude": [{"class": "square", "count": 3}],
                 "prompt": "a photo of two squares"}]
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    for index, meta in enumerate(metadata):
        write_prompt_folder(tmp_path, index * 7, meta, [Image.new("RGB", (8, 8), c) for c in colors])
    (tmp_path / "00007" / "samples" / "notes.txt").write_text("not an image")   # ignored: not \d+.png
    (tmp_path / "unrelated").mkdir()                                             # ignored: not a number
    (tmp_path / "00099" / "samples").mkdir(parents=True)                         # no metadata: incomplete
    assert sorted(p.name for p in (tmp_path / "00007").iterdir()) == ["metadata.jsonl", "samples"]
    assert (tmp_path / "00007" / "metadata.jsonl").read_text() == json.dumps(metadata[1]) + "\n"
    assert sorted(p.name for p in (tmp_path / "00007" / "samples").iterdir()) == ["0000.png", "0001.png", "0002.png", "notes.txt"]
    scan = read_layout(tmp_path)
    assert [f.index for f in scan.folders] == [0, 7] and [p.name for p in scan.incomplete] == ["00099"]
    assert [f.metadata for f in scan.folders] == metadata
    assert [[Image.open(s).getpixel((0, 0)) for s in f.samples] for f in scan.folders] == [colors, colors]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return tiny_weights(tmp_path_factory.mktemp("weights") / "tiny.safetensors")


def _fast(**changes) -> GenerationConfig:
    cfg = GenerationConfig(images_per_prompt=2, batch_size=4, autocast="none")
    cfg.sampler.steps, cfg.sampler.time_shift = 3, 1.0
    for key, value in changes.items():
        setattr(cfg, key, value)
    return cfg


def _pixels(outdir: Path) -> dict:
    return {str(s.relative_to(outdir)): np.asarray(Image.open(s), dtype=np.int16) for f in read_layout(outdir).folders
            for s in f.samples}


def test_generation_fixed_seeds_resume_and_guard(tmp_path, weights):
    prompts = parse_prompts([json.dumps(r) for r in synthetic_prompts(per_task=1)], "synthetic")
    first = generate_layout(weights, prompts, tmp_path / "a", _fast())
    assert first["generated"] == 6 and first["images"] == 12 and first["resolution"] == 32
    images = _pixels(tmp_path / "a")
    assert len(images) == 12 and all(im.shape == (32, 32, 3) for im in images.values())
    # Seeds belong to (prompt, n): another batch size gives the same images.
    generate_layout(weights, prompts, tmp_path / "b", _fast(batch_size=12))
    again = _pixels(tmp_path / "b")
    assert all(np.abs(again[k] - images[k]).max() <= 1 for k in images)
    assert not np.array_equal(images["00000/samples/0000.png"], images["00000/samples/0001.png"])
    # Resume: complete folders are kept untouched, an interrupted one (no metadata) is redone.
    (tmp_path / "a" / "00003" / "metadata.jsonl").unlink()
    (tmp_path / "a" / "00003" / "samples" / "0001.png").unlink()
    kept = tmp_path / "a" / "00001" / "samples" / "0000.png"
    before = kept.stat().st_mtime_ns
    resumed = generate_layout(weights, prompts, tmp_path / "a", _fast())
    assert (resumed["generated"], resumed["kept"]) == (1, 5) and kept.stat().st_mtime_ns == before
    assert np.abs(_pixels(tmp_path / "a")["00003/samples/0001.png"] - images["00003/samples/0001.png"]).max() <= 1
    # Other settings (here the seed) never mix into an existing directory.
    with pytest.raises(ConfigError, match="made by other weights or settings"):
        generate_layout(weights, prompts, tmp_path / "a", _fast(seed=5))


def test_generation_spreads_prompts_over_torchrun_ranks(tmp_path, weights):
    prompts_file = write_synthetic_prompts(tmp_path / "prompts.jsonl", per_task=1)
    out = tmp_path / "images"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "deco.pipeline.cli", "geneval", "generate", "--weights", str(weights), "--prompts", str(prompts_file),
               "--out", str(out), "--set", "generation.images_per_prompt=2", "--set", "generation.sampler.steps=3",
               "--set", "generation.sampler.time_shift=1.0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    stats = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert sorted((s["rank"], s["prompts"]) for s in stats) == [(0, 3), (1, 3)]
    folders = read_layout(out).folders
    assert [f.index for f in folders] == list(range(6)) and all(len(f.samples) == 2 for f in folders)
    ranks = {f.index: json.loads((f.folder / "generation.json").read_text())["rank"] for f in folders}
    assert ranks == {i: i % 2 for i in range(6)}
