"""The official GenEval image layout, written and read:

    <outdir>/<index:05d>/metadata.jsonl       the prompt's JSON object, one line
    <outdir>/<index:05d>/samples/<n:04d>.png  its images (files whose names start with `\\d+\\.png`
                                              are scored, as the reference's re.match decides)
    <outdir>/<index:05d>/generation.json      ours: seeds and what made the images (ignored by the
                                              official evaluator, which reads only the two above)

A prompt folder is complete once its metadata.jsonl exists: images and generation.json are written
first (each by rename), metadata.jsonl last, so a run killed mid-prompt leaves a folder without it,
which resuming regenerates and scoring skips.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from deco.pipeline.config import ConfigError

log = logging.getLogger(__name__)

METADATA = "metadata.jsonl"
SAMPLES = "samples"
GENERATION = "generation.json"
# Matched at the start of the name only, as the reference's `re.match(r"\d+\.png", name)`: it scores
# 0003.png.bak and 12.pngx too, so they are scored here as well.
SAMPLE_NAME = re.compile(r"\d+\.png")


def _sample_order(path: Path) -> tuple[int, str]:
    return int(SAMPLE_NAME.match(path.name).group()[:-4]), path.name


def prompt_dir(outdir: str | Path, index: int) -> Path:
    return Path(outdir) / f"{index:05d}"


def sample_path(outdir: str | Path, index: int, n: int) -> Path:
    return prompt_dir(outdir, index) / SAMPLES / f"{n:04d}.png"


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_prompt_folder(outdir: str | Path, index: int, metadata: dict, images: list[Image.Image],
                        generation: dict | None = None) -> Path:
    """Write one prompt's images then its metadata (the completion mark); returns the folder."""
    folder = prompt_dir(outdir, index)
    (folder / SAMPLES).mkdir(parents=True, exist_ok=True)
    for n, image in enumerate(images):
        path = sample_path(outdir, index, n)
        tmp = path.with_name(f".{path.name}.partial")
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
    if generation is not None:
        _atomic_write(folder / GENERATION, json.dumps(generation, indent=1).encode())
    _atomic_write(folder / METADATA, (json.dumps(metadata) + "\n").encode())
    return folder


def read_generation(outdir: str | Path, index: int) -> dict | None:
    path = prompt_dir(outdir, index) / GENERATION
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        return None  # a damaged sidecar makes the folder incomplete: it is regenerated


def is_complete(outdir: str | Path, index: int, metadata: dict, images_per_prompt: int) -> bool:
    """True when the folder holds this prompt's metadata and all its images."""
    folder = prompt_dir(outdir, index)
    try:
        written = json.loads((folder / METADATA).read_text().strip() or "null")
    except (FileNotFoundError, ValueError):
        return False
    if written != metadata:
        return False
    return all(sample_path(outdir, index, n).is_file() for n in range(images_per_prompt))


@dataclass
class PromptFolder:
    index: int
    folder: Path
    metadata: dict
    samples: list[Path] = field(default_factory=list)  # sorted by sample number


@dataclass
class LayoutScan:
    folders: list[PromptFolder]
    incomplete: list[Path]                  # prompt folders without metadata.jsonl (skipped)

    @property
    def images(self) -> list[tuple[PromptFolder, Path]]:
        return [(f, s) for f in self.folders for s in f.samples]


def read_layout(outdir: str | Path) -> LayoutScan:
    """The prompt folders of an official-layout directory, in index order."""
    outdir = Path(outdir)
    if not outdir.is_dir():
        raise FileNotFoundError(f"image directory not found: {outdir}")
    folders, incomplete = [], []
    for entry in sorted(outdir.iterdir()):
        if not entry.is_dir() or not entry.name.isdigit():
            continue
        meta_path = entry / METADATA
        if not meta_path.is_file():
            incomplete.append(entry)
            continue
        lines = [line for line in meta_path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if len(lines) != 1:
            raise ConfigError(f"{meta_path}: expected one JSON line, found {len(lines)}")
        try:
            metadata = json.loads(lines[0])
        except ValueError as err:
            raise ConfigError(f"{meta_path}: invalid JSON: {err}") from None
        sample_dir = entry / SAMPLES
        entries = list(sample_dir.iterdir()) if sample_dir.is_dir() else []
        samples = sorted((p for p in entries if SAMPLE_NAME.match(p.name) and p.is_file()), key=_sample_order)
        folders.append(PromptFolder(int(entry.name), entry, metadata, samples))
    if incomplete:
        log.warning("%s: %d prompt folder(s) without %s are incomplete and skipped, e.g. %s",
                    outdir, len(incomplete), METADATA, incomplete[0].name)
    folders.sort(key=lambda f: f.index)
    return LayoutScan(folders, incomplete)
