"""Image grids of scored GenEval images: the gate's sample grid (a fixed choice of prompts, a row per
prompt with its prompt text) and the per-task grids logged to wandb. Each image gets a thin green
(correct) or red (failed) border. They reuse the images the gate generated, which are fixed-seed
per (prompt index, image number), so a checkpoint's grid costs no sampling and the grids of
successive checkpoints show the same prompts from the same noise.
"""
from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

from PIL import Image, ImageDraw, ImageOps

from deco.pipeline.charts import font, text_width, wrap
from deco.pipeline.evaluate.geneval.prompts import TASKS

OK_COLOR, FAIL_COLOR, MISSING_COLOR = (46, 160, 67), (215, 58, 73), (200, 200, 200)
BORDER = 3


def _prompt_key(row: dict) -> tuple:
    """Rows of one prompt share the official layout's prompt folder (<index>/samples/<n>.png)."""
    folder = Path(row["filename"]).parent.parent
    return (int(folder.name) if folder.name.isdigit() else 0, str(folder))


def grid_rows(results: list[dict], per_task: int = 2, images: int = 4) -> list[list[dict]]:
    """The rows a sample grid shows, fixed by the prompt set alone: the first `per_task` prompts of
    each task (lowest prompt index, tasks in GenEval's order), each with its first `images` images."""
    by_prompt: dict[tuple, list[dict]] = defaultdict(list)
    for row in results:
        by_prompt[_prompt_key(row)].append(row)
    by_task: dict[str, list[list[dict]]] = defaultdict(list)
    for key in sorted(by_prompt):
        rows = sorted(by_prompt[key], key=lambda r: Path(r["filename"]).name)
        by_task[rows[0]["tag"]].append(rows[:images])
    order = [t for t in TASKS if t in by_task] + sorted(t for t in by_task if t not in TASKS)
    return [rows for tag in order for rows in by_task[tag][:per_task]]


def tile(row: dict, size: int) -> Image.Image:
    """One image at `size` px inside its correct/failed border. Small images are enlarged with
    nearest-neighbour, so a 32 px sample shows its own pixels rather than a blur."""
    try:
        with Image.open(row["filename"]) as image:
            image = image.convert("RGB")
            resample = Image.NEAREST if max(image.size) <= size else Image.LANCZOS
            image = image.resize((size, size), resample)
    except (OSError, ValueError):
        image = Image.new("RGB", (size, size), MISSING_COLOR)
        ImageDraw.Draw(image).text((6, size // 2 - 7), "missing", fill=(90, 90, 90), font=font(12))
    return ImageOps.expand(image, border=BORDER, fill=OK_COLOR if row["correct"] else FAIL_COLOR)


def cell_size(results: list[dict], smallest: int = 128, largest: int = 256) -> int:
    """Display size: tiny samples are enlarged to `smallest` px, large ones shrunk to `largest`."""
    for row in results:
        try:
            with Image.open(row["filename"]) as image:
                return min(max(max(image.size), smallest), largest)
        except (OSError, ValueError):
            continue
    return smallest


def sample_grid(results: list[dict], title: str = "", per_task: int = 2, images: int = 4,
                cell: int | None = None) -> Image.Image:
    """The sample grid of one evaluation: a row per chosen prompt (grid_rows), its task and prompt text
    on the left, its images to the right, and how many of them were judged correct."""
    rows = grid_rows(results, per_task, images)
    columns = max((len(r) for r in rows), default=1)
    cell = cell or cell_size(results)
    label_w, pad, count_w = 300, 8, 56
    box = cell + 2 * BORDER
    header = 54 if title else 28
    row_h = box + pad
    width = pad + label_w + columns * (box + pad) + count_w
    grid = Image.new("RGB", (width, header + max(1, len(rows)) * row_h + pad), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((pad, 8), title, fill=(34, 34, 34), font=font(18))
    legend_y = header - 22
    draw.rectangle([pad, legend_y + 2, pad + 12, legend_y + 14], outline=OK_COLOR, width=BORDER)
    draw.text((pad + 18, legend_y), "correct", fill=(60, 60, 60), font=font(13))
    x = pad + 18 + text_width("correct") + 16
    draw.rectangle([x, legend_y + 2, x + 12, legend_y + 14], outline=FAIL_COLOR, width=BORDER)
    draw.text((x + 18, legend_y), "failed (GenEval rules)", fill=(60, 60, 60), font=font(13))
    if not rows:
        draw.text((pad, header + 8), "no scored images", fill=(120, 120, 120), font=font(14))
    for r, prompt_rows in enumerate(rows):
        y = header + r * row_h
        draw.text((pad, y + 4), prompt_rows[0]["tag"], fill=(120, 120, 120), font=font(12))
        for i, line in enumerate(wrap(prompt_rows[0].get("prompt", ""), label_w - 12, 15)[:max(1, (box - 24) // 19)]):
            draw.text((pad, y + 22 + 19 * i), line, fill=(34, 34, 34), font=font(15))
        for i, row in enumerate(prompt_rows):
            grid.paste(tile(row, cell), (pad + label_w + i * (box + pad), y))
        correct = sum(bool(row["correct"]) for row in prompt_rows)
        draw.text((pad + label_w + columns * (box + pad), y + box // 2 - 8), f"{correct}/{len(prompt_rows)}",
                  fill=OK_COLOR if correct else FAIL_COLOR, font=font(15))
    return grid


def write_sample_grid(results: list[dict], path: str | Path, title: str = "", per_task: int = 2,
                      images: int = 4) -> Path:
    """Write sample_grid(...) as a PNG (by rename: a reader never sees half a file); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    sample_grid(results, title, per_task, images).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def task_grid(rows: list[dict], cell: int = 96, columns: int = 8, limit: int = 32) -> Image.Image:
    """Up to `limit` images of one task tiled, `columns` to a line, each in its border."""
    rows = rows[:limit]
    count = max(1, len(rows))
    columns = min(columns, count)
    box = cell
    grid = Image.new("RGB", (columns * box, -(-count // columns) * box), (255, 255, 255))
    for i, row in enumerate(rows):
        grid.paste(tile(row, cell - 2 * BORDER), ((i % columns) * box, (i // columns) * box))
    return grid
