"""A GenEval prompt set over the synthetic dataset's vocabulary (data/synthetic.py: 3 shapes, the 10
GenEval colours), in exactly the format of GenEval's evaluation_metadata.jsonl, so that the demo's
gates run the same generation, scoring and summary code as the real benchmark.

The six tasks are built as GenEval builds them: one object; two different objects; 2-4 objects of
one class (include N, exclude N + 1); one coloured object; an object left of / right of / above /
below another (the reference is clause 0); two different objects with two different colours.
"""
from __future__ import annotations

import itertools
import random
from pathlib import Path

from deco.data.synthetic import COLORS, NUMBER_WORDS, SHAPES, plural
from deco.pipeline.evaluate.geneval.prompts import RELATIONS, TASKS, write_prompts


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _all_prompts() -> dict[str, list[dict]]:
    pairs = list(itertools.permutations(SHAPES, 2))
    color_pairs = list(itertools.permutations(COLORS, 2))
    return {
        "single_object": [{"tag": "single_object", "include": [{"class": s, "count": 1}],
                           "prompt": f"a photo of {_a(s)}"} for s in SHAPES],
        "two_object": [{"tag": "two_object", "include": [{"class": a, "count": 1}, {"class": b, "count": 1}],
                        "prompt": f"a photo of {_a(a)} and {_a(b)}"} for a, b in pairs],
        "counting": [{"tag": "counting", "include": [{"class": s, "count": n}],
                      "exclude": [{"class": s, "count": n + 1}],
                      "prompt": f"a photo of {NUMBER_WORDS[n]} {plural(s, n)}"}
                     for s in SHAPES for n in (2, 3, 4)],
        "colors": [{"tag": "colors", "include": [{"class": s, "count": 1, "color": c}],
                    "prompt": f"a photo of {_a(c)} {s}"} for s in SHAPES for c in COLORS],
        "position": [{"tag": "position",
                      "include": [{"class": ref, "count": 1}, {"class": subject, "count": 1, "position": [rel, 0]}],
                      "prompt": f"a photo of {_a(subject)} {rel} {_a(ref)}"}
                     for subject, ref in pairs for rel in RELATIONS],
        "color_attr": [{"tag": "color_attr",
                        "include": [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}],
                        "prompt": f"a photo of {_a(ca)} {a} and {_a(cb)} {b}"}
                       for a, b in pairs for ca, cb in color_pairs],
    }


def synthetic_prompts(per_task: int = 0, seed: int = 0) -> list[dict]:
    """Prompt objects for all six tasks; per_task > 0 draws at most that many per task (seeded),
    0 keeps every combination (3 / 6 / 9 / 30 / 24 / 540 prompts)."""
    if per_task < 0:
        raise ValueError(f"per_task must be >= 0, got {per_task}")
    rng = random.Random(seed)
    chosen = []
    by_task = _all_prompts()
    for task in TASKS:
        rows = by_task[task]
        if per_task and len(rows) > per_task:
            keep = sorted(rng.sample(range(len(rows)), per_task))
            rows = [rows[i] for i in keep]
        chosen.extend(rows)
    return chosen


def write_synthetic_prompts(path: str | Path, per_task: int = 0, seed: int = 0) -> Path:
    return write_prompts(synthetic_prompts(per_task, seed), path)
