"""Reports of one evaluation: a self-contained HTML page (images embedded, so the page can sit in
object storage beside the verdict and be opened anywhere) that opens with the sample grid
(grid.sample_grid) and a bar chart of the per-task accuracy beside the scores it is compared with
(an earlier checkpoint, the stage it started from, an untrained model), then the scores, an image
grid per task (green border: correct, red: failed, the reason on hover) and every failed image with
its reasons; and the same scores and grids logged to wandb (offline unless the user is logged in).
"""
from __future__ import annotations

import base64
import html
import io
import logging
import netrc
import os
from collections import defaultdict
from pathlib import Path

from PIL import Image

from deco.pipeline.charts import bar_chart_svg
from deco.pipeline.evaluate.geneval.grid import task_grid

log = logging.getLogger(__name__)
# (label, {task: accuracy}) of an evaluation drawn beside this one in the accuracy chart.
Comparison = tuple[str, dict]

_STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222}
table{border-collapse:collapse}td,th{padding:3px 10px;border-bottom:1px solid #ddd;text-align:left}
.row{display:flex;align-items:center;gap:6px;margin:4px 0}.prompt{width:340px;font-size:13px}
img{border:3px solid;image-rendering:pixelated}.sample-grid{border:none;max-width:100%;image-rendering:auto}.ok{border-color:#2ea043}.fail{border-color:#d73a49}
.failure{display:flex;gap:12px;margin:8px 0}.reason{white-space:pre-wrap;font-size:13px;color:#d73a49}
.missing{display:inline-block;border:3px dashed #999;font-size:11px;color:#999}
"""


def _thumbnail(path: str, size: int, cache: dict) -> str | None:
    if path not in cache:
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
                image.thumbnail((size, size))
                # Tiny images upscale crisply in the browser (pixelated), so keep them exact as PNG.
                buffer = io.BytesIO()
                fmt = "PNG" if max(image.size) <= 64 else "JPEG"
                image.save(buffer, format=fmt, **({"quality": 85} if fmt == "JPEG" else {}))
                cache[path] = f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()
        except (OSError, ValueError):
            cache[path] = None
    return cache[path]


def _img(row: dict, size: int, cache: dict) -> str:
    css = "ok" if row["correct"] else "fail"
    title = html.escape(row.get("reason") or "correct", quote=True)
    uri = _thumbnail(row["filename"], size, cache)
    if uri is None:
        return f'<span class="missing {css}" style="width:{size}px;height:{size}px" title="{title}">missing</span>'
    return f'<img class="{css}" src="{uri}" width="{size}" height="{size}" title="{title}">'


def accuracies(tasks: dict) -> dict[str, float]:
    """{task: accuracy} from a GenEval summary's tasks ({accuracy, correct, total}) or a verdict's
    or promoted record's (plain numbers)."""
    return {tag: float(v["accuracy"] if isinstance(v, dict) else v) for tag, v in (tasks or {}).items()}


def accuracy_chart(summary: dict, compare: list[Comparison] = (), label: str = "this checkpoint") -> str:
    """Inline SVG: per-task accuracy of this evaluation beside each comparison's, then the overall."""
    tags = list(summary["tasks"]) + sorted({t for _, tasks in compare for t in accuracies(tasks)} - set(summary["tasks"]))
    series = [(label, {**accuracies(summary["tasks"]), "overall": summary["overall"]})]
    for name, tasks in compare:
        values = accuracies(tasks)
        if values:  # the overall is the mean of the task accuracies, as GenEval defines it
            values["overall"] = sum(values.values()) / len(values)
        series.append((name, values))
    return bar_chart_svg(tags + ["overall"], series, title="Accuracy per task")


def _grid_html(grid) -> str:
    data = Path(grid).read_bytes()
    return (f"<p><img class='sample-grid' src='data:image/png;base64,{base64.b64encode(data).decode()}' "
            f"alt='sample grid: fixed prompts and seeds'></p>")


def render_html(results: list[dict], summary: dict, title: str, thumbnail: int = 96, grid: str | Path | None = None,
                compare: list[Comparison] = (), label: str = "this checkpoint") -> str:
    """The report page; `grid` (a PNG, e.g. grid.write_sample_grid's) opens it, then the accuracy
    chart of this evaluation (`label`) beside `compare`."""
    cache: dict = {}
    by_task: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for row in results:
        by_task[row["tag"]][str(Path(row["filename"]).parent.parent)].append(row)
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>",
           _grid_html(grid) if grid is not None and Path(grid).is_file() else "",
           f"<div>{accuracy_chart(summary, compare, label)}</div>",
           f"<p><b>Overall (mean of task accuracies): {summary['overall']:.5f}</b> &middot; "
           f"{summary['total_images']} images, {summary['total_prompts']} prompts, "
           f"{summary['correct_images_fraction']:.2%} correct images</p>",
           "<table><tr><th>task</th><th>accuracy</th><th>correct / images</th></tr>"]
    for tag, task in summary["tasks"].items():
        out.append(f"<tr><td><a href='#{tag}'>{tag}</a></td><td>{task['accuracy']:.2%}</td>"
                   f"<td>{task['correct']} / {task['total']}</td></tr>")
    out.append("</table><p><a href='#failed'>failed images</a></p>")
    for tag in summary["tasks"]:
        out.append(f"<h2 id='{tag}'>{tag}</h2>")
        for rows in by_task[tag].values():
            prompt = html.escape(rows[0].get("prompt", ""))
            out.append(f"<div class='row'><div class='prompt'>{prompt}</div>"
                       + "".join(_img(r, thumbnail, cache) for r in rows) + "</div>")
    failed = [r for r in results if not r["correct"]]
    out.append(f"<h2 id='failed'>Failed images ({len(failed)})</h2>")
    for row in failed:
        out.append(f"<div class='failure'>{_img(row, thumbnail, cache)}<div><div>{html.escape(row.get('prompt', ''))}"
                   f" <small>({html.escape(row['tag'])}, {html.escape(row['filename'])})</small></div>"
                   f"<div class='reason'>{html.escape(row.get('reason', ''))}</div></div></div>")
    out.append("</body></html>")
    return "\n".join(out)


def write_html_report(results: list[dict], summary: dict, path: str | Path, title: str = "GenEval",
                      thumbnail: int = 96, grid: str | Path | None = None, compare: list[Comparison] = (),
                      label: str = "this checkpoint") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(render_html(results, summary, title, thumbnail, grid, compare, label), encoding="utf-8")
    os.replace(tmp, path)
    return path


def _wandb_mode() -> str:
    """The user's choice (WANDB_MODE), else online only when credentials exist: never a prompt."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        return "online" if netrc.netrc().authenticators("api.wandb.ai") else "offline"
    except (OSError, netrc.NetrcParseError):
        return "offline"


def log_to_wandb(results: list[dict], summary: dict, *, project: str, name: str, directory: str | Path,
                 config: dict | None = None, step: int | None = None, grid: str | Path | None = None) -> str | None:
    """Log scores per task, the sample grid (`grid`, a PNG) and a grid per task; returns the run's
    local directory (None if wandb failed)."""
    import wandb

    Path(directory).mkdir(parents=True, exist_ok=True)
    try:
        run = wandb.init(project=project, name=name, dir=str(directory), config=config or {},
                         mode=_wandb_mode(), settings=wandb.Settings(silent=True, console="off"))
    except Exception as err:  # reporting must never fail a gate: the verdict does not depend on it
        log.warning("wandb logging skipped: %s", err)
        return None
    by_task: dict[str, list[dict]] = defaultdict(list)
    for row in results:
        by_task[row["tag"]].append(row)
    metrics = {f"geneval/{tag}": task["accuracy"] for tag, task in summary["tasks"].items()}
    metrics["geneval/overall"] = summary["overall"]
    for tag, rows in by_task.items():
        metrics[f"geneval_grid/{tag}"] = wandb.Image(task_grid(rows), caption=f"{tag}: green correct, red failed")
    if grid is not None and Path(grid).is_file():
        metrics["geneval_grid/samples"] = wandb.Image(str(grid), caption="fixed prompts and seeds: green correct, red failed")
    if step is not None:
        metrics["checkpoint_step"] = step
    run.log(metrics)
    run.summary.update({k: v for k, v in metrics.items() if not k.startswith("geneval_grid/")})
    run_dir = str(Path(run.dir).parent)
    run.finish()
    return run_dir
