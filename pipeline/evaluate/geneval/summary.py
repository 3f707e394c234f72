"""The GenEval summary of a results file: totals, per-task accuracy, and the overall score, which is
the unweighted mean of the task accuracies (not the fraction of correct images).

Printed as the reference prints it (tasks in sorted order, as its pandas groupby gives them):

    Summary
    =======
    Total images: 2212
    Total prompts: 553
    % correct images: 61.30%
    % correct prompts: 84.09%

    Task breakdown
    ==============
    color_attr       = 36.50% (146 / 400)
    ...

    Overall score (avg. over tasks): 0.63107
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

from deco.pipeline.evaluate.geneval.score import UNREADABLE

FORMAT = "deco-geneval-summary/1"


def summarize(results: list[dict]) -> dict:
    if not results:
        raise ValueError("no results to summarise")
    by_task: dict[str, list[bool]] = defaultdict(list)
    by_prompt: dict[str, list[bool]] = defaultdict(list)
    for row in results:
        by_task[row["tag"]].append(bool(row["correct"]))
        # An image's prompt is its folder: <outdir>/<index>/samples/<n>.png.
        by_prompt[str(Path(row["filename"]).parent.parent)].append(bool(row["correct"]))
    tasks = {tag: {"accuracy": sum(v) / len(v), "correct": sum(v), "total": len(v)}
             for tag, v in sorted(by_task.items())}
    correct = sum(bool(r["correct"]) for r in results)
    prompts_ok = sum(any(v) for v in by_prompt.values())
    return {
        "format": FORMAT,
        "total_images": len(results),
        "total_prompts": len(by_prompt),
        "correct_images": correct,
        "correct_images_fraction": correct / len(results),
        "prompts_with_a_correct_image": prompts_ok,
        "correct_prompts_fraction": prompts_ok / len(by_prompt),
        "unreadable_images": sum(str(r.get("reason", "")).startswith(UNREADABLE) for r in results),
        "tasks": tasks,
        "overall": sum(t["accuracy"] for t in tasks.values()) / len(tasks),
    }


def format_summary(summary: dict) -> str:
    lines = ["Summary", "=======",
             f"Total images: {summary['total_images']}",
             f"Total prompts: {summary['total_prompts']}",
             f"% correct images: {summary['correct_images_fraction']:.2%}",
             f"% correct prompts: {summary['correct_prompts_fraction']:.2%}",
             "", "Task breakdown", "=============="]
    for tag, task in summary["tasks"].items():
        lines.append(f"{tag:<16} = {task['accuracy']:.2%} ({task['correct']} / {task['total']})")
    lines += ["", f"Overall score (avg. over tasks): {summary['overall']:.5f}"]
    return "\n".join(lines)


def write_summary(summary: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def default_summary_path(results_path: str | Path) -> Path:
    results_path = Path(results_path)
    return results_path.with_name(results_path.stem + "_summary.json")
