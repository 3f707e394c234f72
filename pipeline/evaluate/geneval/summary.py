"""The GenEval summary of a results file: totals, per-task accuracy, and the overall score, which is
the unweighted mean of the task accuracies (not the fraction of correct images).

Computed and printed as the reference's summary_scores.py does: tasks in order of first appearance
in the results (its `groupby('tag', sort=False)`), a prompt being one distinct `metadata` string (its
`groupby('metadata')`: two folders holding the same prompt object count once; a row without metadata
counts by its folder), the overall score numpy's mean of the task accuracies in that order:

    Summary
    =======
    Total images: 2212
    Total prompts: 553
    % correct images: 61.30%
    % correct prompts: 84.09%

    Task breakdown
    ==============
    single_object    = 98.75% (316 / 320)
    two_object       = 81.31% (322 / 396)
    ...

    Overall score (avg. over tasks): 0.63107
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from deco.pipeline.evaluate.geneval.score import UNREADABLE

FORMAT = "deco-geneval-summary/1"


def summarize(results: list[dict]) -> dict:
    if not results:
        raise ValueError("no results to summarise")
    by_task: dict[str, list[bool]] = {}      # insertion order = first appearance, as the reference
    by_prompt: dict[str, list[bool]] = {}
    for row in results:
        by_task.setdefault(row["tag"], []).append(bool(row["correct"]))
        by_prompt.setdefault(prompt_key(row), []).append(bool(row["correct"]))
    tasks = {tag: {"accuracy": sum(v) / len(v), "correct": sum(v), "total": len(v)} for tag, v in by_task.items()}
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
        # np.mean, not sum() / n: its summation order decides the last bit, and so, rarely, the 5th decimal.
        "overall": float(np.mean([t["accuracy"] for t in tasks.values()])),
    }


def prompt_key(row: dict) -> str:
    """What makes two results the same prompt: the reference groups by the `metadata` JSON string.

    Our reader decodes that string; re-encoding it with json.dumps gives the string back (the
    reference and this project both write json.dumps(metadata) with the default settings)."""
    metadata = row.get("metadata")
    if isinstance(metadata, str):
        return metadata
    if metadata is not None:
        return json.dumps(metadata)
    # No metadata (hand-made rows): the prompt is the image's folder, <outdir>/<index>/samples/<n>.png.
    return "folder:" + str(Path(row["filename"]).parent.parent)


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
