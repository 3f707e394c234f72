"""The per-image GenEval decision, exactly as the protocol states it (spec/geneval.md):

- per class, detections sorted by score, kept when the score is strictly above 0.3 (0.9 for the
  counting task), at most 16; no overlap suppression, no cross-class suppression;
- each include clause, in order: the first `count` kept objects of its class are "found" (fewer:
  fail); with a colour, at least `count` found objects must have it; with a position, the reference
  clause must have passed and every (object, reference object) pair must satisfy the relation;
- each exclude clause fails the image when its class has at least `count` kept objects;
- the image is correct when nothing failed; the reason lists every failure, one per line.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from deco.pipeline.evaluate.geneval.detections import Detection

SCORE_THRESHOLD = 0.3
COUNTING_SCORE_THRESHOLD = 0.9
MAX_OBJECTS = 16
POSITION_MARGIN = 0.1        # of the two boxes' summed size, per axis
DIRECTION_THRESHOLD = 0.5    # of the unit offset, per axis

ColorFn = Callable[[str, Detection], str]   # (class name, detection) -> one of the 10 colours


def keep(detections: list[Detection], tag: str) -> list[Detection]:
    threshold = COUNTING_SCORE_THRESHOLD if tag == "counting" else SCORE_THRESHOLD
    ranked = sorted(detections, key=lambda d: d.score, reverse=True)  # stable for equal scores
    return [d for d in ranked if d.score > threshold][:MAX_OBJECTS]


def relations(subject_box, reference_box) -> set[str]:
    """The relations ("left of", "right of", "above", "below") that hold of subject vs reference."""
    sx1, sy1, sx2, sy2 = subject_box
    rx1, ry1, rx2, ry2 = reference_box
    offset = ((sx1 + sx2) / 2 - (rx1 + rx2) / 2, (sy1 + sy2) / 2 - (ry1 + ry2) / 2)
    sizes = ((sx2 - sx1) + (rx2 - rx1), (sy2 - sy1) + (ry2 - ry1))
    reduced = [math.copysign(max(abs(o) - POSITION_MARGIN * s, 0.0), o) for o, s in zip(offset, sizes)]
    if all(abs(r) < 1e-3 for r in reduced):
        return set()
    norm = math.hypot(*offset)
    dx, dy = reduced[0] / norm, reduced[1] / norm
    found = set()
    if dx < -DIRECTION_THRESHOLD:
        found.add("left of")
    if dx > DIRECTION_THRESHOLD:
        found.add("right of")
    if dy < -DIRECTION_THRESHOLD:
        found.add("above")
    if dy > DIRECTION_THRESHOLD:
        found.add("below")
    return found


@dataclass
class Decision:
    correct: bool
    reasons: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)

    @property
    def reason(self) -> str:
        return "\n".join(self.reasons)


def _describe(clause: dict) -> str:
    color = f"{clause['color']} " if "color" in clause else ""
    return f"{color}{clause['class']}"


def evaluate_image(metadata: dict, detections: Mapping[str, list[Detection]],
                   color_of: ColorFn | None = None) -> Decision:
    """Decide one image from its detections (class -> list, unfiltered) and a colour classifier.

    `color_of` is asked only for found objects of colour clauses that carry no colour already.
    """
    tag = metadata["tag"]
    kept = {name: keep(list(detections.get(name, [])), tag) for name in
            {c["class"] for c in metadata["include"] + metadata.get("exclude", [])}}
    reasons: list[str] = []
    groups: list[list[Detection] | None] = []
    include_details = []
    for clause in metadata["include"]:
        name, count = clause["class"], clause["count"]
        objects = kept[name]
        info = {"class": name, "count": count, "kept": len(objects),
                "scores": [round(d.score, 4) for d in objects],
                "boxes": [[round(v, 1) for v in d.box] for d in objects]}
        include_details.append(info)
        if len(objects) < count:
            reasons.append(f"expected {name}>={count}, found {len(objects)}")
            groups.append(None)
            continue
        found = objects[:count]
        passed = True
        if "color" in clause:
            colors = []
            for obj in found:
                if obj.color is None:
                    if color_of is None:
                        raise ValueError(f"{name!r} needs a colour but no colour classifier was given")
                    obj.color = color_of(name, obj)
                colors.append(obj.color)
            info["colors"] = colors
            matching = sum(c == clause["color"] for c in colors)
            if matching < count:
                passed = False
                others = ", ".join(f"{colors.count(c)} {c}" for c in sorted(set(colors)) if c != clause["color"])
                reasons.append(f"expected {_describe(clause)}>={count}, found {matching} {clause['color']}"
                               + (f"; and {others}" if others else ""))
        if "position" in clause:
            relation, ref_index = clause["position"]
            reference = groups[ref_index] if ref_index < len(groups) else None
            ref_name = metadata["include"][ref_index]["class"]
            if reference is None:
                passed = False
                reasons.append(f"no {ref_name} for {name} to be {relation}")
            else:
                pairs = [sorted(relations(obj.box, ref.box)) for obj in found for ref in reference]
                info["relations"] = pairs
                if not all(relation in pair for pair in pairs):
                    passed = False
                    seen = "; ".join(" and ".join(p) or "no relation" for p in pairs)
                    reasons.append(f"expected {name} {relation} {ref_name}, found {seen}")
        info["passed"] = passed
        groups.append(found if passed else None)
    exclude_details = []
    for clause in metadata.get("exclude", []):
        name, count = clause["class"], clause["count"]
        present = len(kept[name])
        exclude_details.append({"class": name, "count": count, "kept": present, "passed": present < count})
        if present >= count:
            reasons.append(f"expected {name}<{count}, found {present}")
    details = {"include": include_details}
    if exclude_details:
        details["exclude"] = exclude_details
    return Decision(correct=not reasons, reasons=reasons, details=details)
