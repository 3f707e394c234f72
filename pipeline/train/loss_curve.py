"""The loss curve of a run as a picture: loss, mse, freq (and repa) vs step in <run_dir>/loss_curve.png.
MetricsLogger feeds a LossHistory with every step and redraws it at each checkpoint and at the end;
write_loss_curve draws one from any run's metrics.jsonl.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

LOSS_CURVE = "loss_curve.png"
CURVE_KEYS = ("loss", "mse", "freq", "repa")  # the loss and its terms, as the trainer records them


class LossHistory:
    """The loss terms per step, in bounded memory: past 2 x `points` buckets, neighbours merge
    pairwise (summed, so every point stays the mean of the steps it covers), so a million-step run
    keeps about `points` of them and redrawing stays a matter of milliseconds."""

    def __init__(self, points: int = 500):
        self.points, self.stride = points, 1
        self.buckets: list[dict] = []  # {"n": steps, "step": sum of steps, "last": step, key: [sum, count]}

    @classmethod
    def from_jsonl(cls, path: str | Path, points: int = 500) -> "LossHistory":
        history = cls(points)
        if Path(path).exists():
            with open(path) as f:
                for line in f:
                    try:
                        history.add(json.loads(line))
                    except (ValueError, KeyError, TypeError):
                        continue  # the half-written last line of a killed run
        return history

    def add(self, record: dict) -> None:
        step = record["step"]
        if not self.buckets or self.buckets[-1]["n"] >= self.stride:
            self.buckets.append({"n": 0, "step": 0})
        bucket = self.buckets[-1]
        bucket["n"] += 1
        bucket["step"] += step
        bucket["last"] = step
        for key in CURVE_KEYS:
            value = record.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                total = bucket.setdefault(key, [0.0, 0])
                total[0] += value
                total[1] += 1
        if len(self.buckets) >= 2 * self.points and bucket["n"] >= self.stride:
            self.buckets = [_merged(a, b) for a, b in zip(self.buckets[::2], self.buckets[1::2])]
            self.stride *= 2

    def series(self) -> dict[str, list[tuple[float, float]]]:
        """{term: [(step, mean value)]} of the terms recorded at least once; a bucket without the
        term (non-finite steps only) is a NaN, which the chart draws as a gap."""
        out = {}
        for key in CURVE_KEYS:
            if any(key in b for b in self.buckets):
                out[key] = [(b["step"] / b["n"], b[key][0] / b[key][1] if key in b else math.nan)
                            for b in self.buckets]
        return out


def _merged(a: dict, b: dict) -> dict:
    out = {"n": a["n"] + b["n"], "step": a["step"] + b["step"], "last": b["last"]}
    for key in CURVE_KEYS:
        if key in a or key in b:
            sa, sb = a.get(key, [0.0, 0]), b.get(key, [0.0, 0])
            out[key] = [sa[0] + sb[0], sa[1] + sb[1]]
    return out


def save_loss_curve(history: LossHistory, path: str | Path, name: str = "") -> Path:
    """Draw `history` as a PNG at `path` (written by rename: a viewer never reads half a file)."""
    from deco.pipeline.charts import line_chart

    series = history.series()
    loss = [y for _, y in series.get("loss", []) if math.isfinite(y)]
    last = history.buckets[-1]["last"] if history.buckets else 0
    title = f"{name}: training loss" + (f" (step {last}: {loss[-1]:.4f})" if loss else " (no finite loss yet)")
    x_label = "step" + (f" (each point: the mean of {history.stride} steps)" if history.stride > 1 else "")
    image = line_chart(series, title=title, x_label=x_label, y_label="loss")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def write_loss_curve(metrics_path: str | Path, out_path: str | Path | None = None, name: str = "") -> Path:
    """The loss curve of a run's metrics.jsonl, by default beside it as loss_curve.png."""
    metrics_path = Path(metrics_path)
    if not metrics_path.is_file():
        raise FileNotFoundError(f"no metrics file at {metrics_path}")
    out_path = Path(out_path) if out_path is not None else metrics_path.with_name(LOSS_CURVE)
    return save_loss_curve(LossHistory.from_jsonl(metrics_path), out_path, name or metrics_path.parent.name)
