"""Scoring an official-layout image directory: detections (from a detector backend or a precomputed
file) -> the protocol's per-image decision -> results JSON lines with the official fields:

    filename  the image path            tag      the task          prompt   the prompt text
    correct   true / false              reason   failures, one per line ("" when correct)
    metadata  the prompt object, as a JSON string (as the reference writes it)
    details   per clause: kept count, scores, boxes, colours, relations, as a JSON string

An image that cannot be decoded is scored incorrect with reason "unreadable image: ..." (a broken
generation is a failure, and the denominators stay those of the prompt set).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from deco.orchestration.progress import Progress
from deco.pipeline.config import ConfigError
from deco.pipeline.evaluate.geneval.detections import Detection, DetectionsIndex, read_detections, write_detections
from deco.pipeline.evaluate.geneval.detectors.base import Detector
from deco.pipeline.evaluate.geneval.layout import read_layout
from deco.pipeline.evaluate.geneval.prompts import validate_metadata
from deco.pipeline.evaluate.geneval.rules import evaluate_image

log = logging.getLogger(__name__)
UNREADABLE = "unreadable image"


def _load(path: Path) -> Image.Image | str:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
        return f"{UNREADABLE}: {err}"


def _result(path: Path, metadata: dict, correct: bool, reason: str, details: dict) -> dict:
    return {"filename": str(path), "tag": metadata["tag"], "prompt": metadata["prompt"], "correct": correct,
            "reason": reason, "metadata": json.dumps(metadata), "details": json.dumps(details)}


def score_images(images_dir: str | Path, detector: Detector | None = None, detections_file: str | Path | None = None,
                 save_detections: str | Path | None = None,
                 show_progress: bool = True) -> list[dict]:
    """Score every image of every complete prompt folder under `images_dir`.

    Images scored, with rate and ETA, are shown (deco.orchestration.progress) unless show_progress
    is False.

    With `detections_file`, its detections are used and `detector` (optional) only classifies the
    colours the file does not give; without it, `detector` detects.
    """
    images_dir = Path(images_dir)
    scan = read_layout(images_dir)
    entries = scan.images
    if not entries:
        raise ConfigError(f"{images_dir}: no complete prompt folders with images (official layout: "
                          "<index>/metadata.jsonl and <index>/samples/<n>.png)")
    for folder in scan.folders:
        validate_metadata(folder.metadata, str(folder.folder / "metadata.jsonl"))
    needed = set().union(*({c["class"] for c in f.metadata["include"] + f.metadata.get("exclude", [])}
                           for f in scan.folders))
    index = None
    if detections_file is not None:
        index = DetectionsIndex(read_detections(detections_file))
        # An unreadable image needs no record: it is scored incorrect from its bytes alone.
        missing = [str(p.relative_to(images_dir)) for _, p in entries
                   if index.find(str(p.relative_to(images_dir))) is None and not isinstance(_load(p), str)]
        if missing:
            raise ConfigError(f"{detections_file} has no record for {len(missing)} of {len(entries)} images, "
                              f"e.g. {missing[0]} (filenames are relative to {images_dir})")
    elif detector is None:
        raise ConfigError("scoring needs a detector backend or a detections file")
    else:
        unknown = sorted(needed - set(detector.classes))
        if unknown:
            raise ConfigError(f"the {detector.name} detector does not know the prompt class(es) {unknown[:5]}; "
                              f"its classes: {', '.join(detector.classes[:10])}"
                              f"{'...' if len(detector.classes) > 10 else ''}")

    results: list[dict] = []
    saved: list[tuple[str, dict[str, list[Detection]]]] = []
    batch_size = detector.batch_size if detector is not None and index is None else 64
    bar = Progress("geneval score", len(entries), unit="image", enabled=show_progress)
    for first in range(0, len(entries), batch_size):
        batch = entries[first:first + batch_size]
        loaded = [_load(path) for _, path in batch]
        readable = [i for i, im in enumerate(loaded) if not isinstance(im, str)]
        if index is not None:
            found = {i: index.find(str(batch[i][1].relative_to(images_dir))) for i in readable}
        else:
            found = dict(zip(readable, detector.detect([loaded[i] for i in readable]) if readable else []))
        for i, (folder, path) in enumerate(batch):
            if isinstance(loaded[i], str):
                log.warning("%s: %s", path, loaded[i])
                results.append(_result(path, folder.metadata, False, loaded[i], {}))
                continue
            color_of = detector.color_fn(loaded[i]) if detector is not None else None
            try:
                decision = evaluate_image(folder.metadata, found[i], color_of)
            except ValueError as err:
                raise ConfigError(f"{path}: {err}; the detections file gives no colour for an object of a colour "
                                  "clause, so pass --detector to classify colours from the pixels") from None
            results.append(_result(path, folder.metadata, decision.correct, decision.reason, decision.details))
            saved.append((str(path.relative_to(images_dir)), found[i]))
        bar.update(len(batch))
    bar.close()
    if save_detections is not None:
        write_detections(save_detections, saved)
    return results


def write_results(results: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in results), encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_results(path: str | Path) -> list[dict]:
    """Results lines (ours or the reference evaluator's); metadata/details decoded to dicts."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"results file not found: {path}")
    results = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            for key in ("metadata", "details"):
                if isinstance(row.get(key), str):
                    row[key] = json.loads(row[key]) if row[key] else {}
        except ValueError as err:
            raise ConfigError(f"{path}:{number}: invalid JSON: {err}") from None
        if not {"filename", "tag", "correct"} <= set(row):
            raise ConfigError(f"{path}:{number}: a result needs filename, tag and correct")
        results.append(row)
    return results
