"""Detections: the in-memory record the rules read, and a JSON-lines file format for detections made
elsewhere (`deco geneval score --detections FILE`, written by `--save-detections FILE`).

File format: one JSON object per image.

    {"filename": "00012/samples/0003.png",
     "detections": {
        "dog": [{"box": [x1, y1, x2, y2], "score": 0.97,
                 "mask": {"size": [H, W], "counts": "<COCO RLE string>" | [run lengths...]},
                 "color": "brown"}],
        "cat": []}}

- `filename`: the image's path relative to the image directory (official layout:
  `<index>/samples/<n>.png`); an absolute path or one that ends with that relative path also matches.
- `detections`: class name -> list of objects; a class that is absent or empty was not detected.
  Thresholds and the 16-object cap are applied by the scorer, so list everything the detector found.
- `box`: pixels, x1 < x2 and y1 < y2, x right and y down (COCO `xywh` must be converted).
- `score`: confidence in [0, 1].
- Numbers are written exactly (`--save-detections` writes each box coordinate and score as the
  shortest decimal that reads back to the same float, never rounded), so a saved file rescored gives
  the same decisions bit for bit; files with rounded numbers read as before. The scorer rounds boxes
  and scores to float32 (the reference detector's precision) before it applies the rules.
- `mask` (optional): COCO run-length encoding, column-major, starting with a run of zeros; `counts`
  either the uncompressed list or the compressed string pycocotools writes. Or `mask_png`: a path
  (relative to the detections file) to a PNG whose non-zero pixels are the object.
- `color` (optional): one of the 10 GenEval colours, when colours were classified elsewhere; a colour
  clause on an object without one needs a colour classifier (`--detector`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from deco.pipeline.config import ConfigError
from deco.pipeline.evaluate.geneval.prompts import COLORS


@dataclass(eq=False)
class Detection:
    box: tuple[float, float, float, float]   # x1, y1, x2, y2 in pixels
    score: float
    mask: np.ndarray | None = None           # (H, W) bool, the object's pixels
    color: str | None = None                  # a colour already classified, else None

    def to_json(self, with_mask: bool = True) -> dict:
        # Exact (float repr round-trips): a score of 0.300004 rounded to 0.3 would drop below the threshold.
        record = {"box": [float(v) for v in self.box], "score": float(self.score)}
        if with_mask and self.mask is not None:
            record["mask"] = encode_rle(self.mask)
        if self.color is not None:
            record["color"] = self.color
        return record


def mask_to_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """Tight box of a mask, end-exclusive: a one-pixel object at (x, y) is (x, y, x + 1, y + 1)."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return (0.0, 0.0, 0.0, 0.0)
    return (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))


# ---- COCO run-length encoding --------------------------------------------------------------------
# Runs alternate zeros and ones over the mask read column by column (Fortran order). The compressed
# string stores each run in 5-bit groups (least significant first, bit 0x20 = more groups follow,
# plus 48 to make it printable); from the third run on, the difference to the run two before is
# stored instead, which keeps typical object masks short.

def encode_rle(mask: np.ndarray) -> dict:
    flat = np.asarray(mask, dtype=bool).flatten(order="F")
    changes = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        runs = [0] + runs
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": _compress(runs)}


def _compress(runs: list[int]) -> str:
    out = []
    for i, run in enumerate(runs):
        value = run - runs[i - 2] if i > 2 else run
        more = True
        while more:
            group = value & 0x1F
            value >>= 5
            more = not ((value == 0 and not group & 0x10) or (value == -1 and group & 0x10))
            out.append(chr(group + 48 + (0x20 if more else 0)))
    return "".join(out)


def _decompress(text: str) -> list[int]:
    runs, pos = [], 0
    while pos < len(text):
        value, shift, more = 0, 0, True
        while more:
            group = ord(text[pos]) - 48
            pos += 1
            value |= (group & 0x1F) << shift
            more = bool(group & 0x20)
            shift += 5
            if not more and group & 0x10:
                value |= -1 << shift
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def decode_rle(rle: dict) -> np.ndarray:
    try:
        height, width = (int(v) for v in rle["size"])
        counts = rle["counts"]
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"an RLE mask needs 'size': [H, W] and 'counts', got {rle!r}") from None
    runs = _decompress(counts) if isinstance(counts, str) else [int(c) for c in counts]
    if sum(runs) != height * width or any(r < 0 for r in runs):
        raise ConfigError(f"RLE runs cover {sum(runs)} pixels, the mask has {height * width}")
    values = np.zeros(len(runs), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, runs)
    return flat.reshape((height, width), order="F")


# ---- the file ------------------------------------------------------------------------------------

def _parse_detection(raw, where: str, base_dir: Path) -> Detection:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: a detection must be an object")
    try:
        box = tuple(float(v) for v in raw["box"])
        score = float(raw["score"])
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"{where}: a detection needs 'box': [x1, y1, x2, y2] and 'score'") from None
    if len(box) != 4 or box[2] < box[0] or box[3] < box[1]:
        raise ConfigError(f"{where}: box must be [x1, y1, x2, y2] with x1 <= x2, y1 <= y2, got {list(box)}")
    mask = None
    if "mask" in raw:
        mask = decode_rle(raw["mask"])
    elif "mask_png" in raw:
        path = base_dir / raw["mask_png"]
        if not path.is_file():
            raise FileNotFoundError(f"{where}: mask PNG not found: {path}")
        mask = np.asarray(Image.open(path).convert("L")) > 0
    color = raw.get("color")
    if color is not None and color not in COLORS:
        raise ConfigError(f"{where}: unknown color {color!r}; valid: {', '.join(COLORS)}")
    return Detection(box=box, score=score, mask=mask, color=color)


def read_detections(path: str | Path) -> dict[str, dict[str, list[Detection]]]:
    """filename (as written) -> class -> detections; ConfigError names the line of a bad record."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"detections file not found: {path}")
    records: dict[str, dict[str, list[Detection]]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except ValueError as err:
            raise ConfigError(f"{where}: invalid JSON: {err}") from None
        if not isinstance(record, dict) or not isinstance(record.get("filename"), str):
            raise ConfigError(f"{where}: each line needs 'filename' and 'detections'")
        per_class = record.get("detections", {})
        if not isinstance(per_class, dict):
            raise ConfigError(f"{where}: 'detections' must map class names to lists")
        records[record["filename"]] = {
            name: [_parse_detection(d, f"{where} {name}[{i}]", path.parent) for i, d in enumerate(dets or [])]
            for name, dets in per_class.items()}
    return records


class DetectionsIndex:
    """Finds an image's record by its path relative to the image directory, or a path ending in it."""

    def __init__(self, records: dict[str, dict[str, list[Detection]]]):
        self.records = records
        self._by_suffix = {}
        for name in records:
            parts = Path(name).parts
            self._by_suffix["/".join(parts[-3:])] = name

    def find(self, relative: str) -> dict[str, list[Detection]] | None:
        if relative in self.records:
            return self.records[relative]
        key = self._by_suffix.get("/".join(Path(relative).parts[-3:]))
        return self.records.get(key) if key is not None else None


def write_detections(path: str | Path, rows: list[tuple[str, dict[str, list[Detection]]]],
                     with_masks: bool = True) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for filename, per_class in rows:
            record = {"filename": filename,
                      "detections": {k: [d.to_json(with_masks) for d in v] for k, v in per_class.items()}}
            f.write(json.dumps(record) + "\n")
    return path
