"""The per-image GenEval decision, as the reference evaluator (djghosh13/geneval, commit af4902f,
evaluation/evaluate_images.py) makes it on every input, restated from its behaviour
(spec/geneval.md):

- per class, detections ordered best first as the reference orders them: numpy's default argsort of
  the float32 scores, reversed (`reference_argsort`: ties come out in reverse listing order, exactly
  so for up to 16 detections of a class, and as numpy 1.23's introsort leaves them beyond that);
  kept when the float32 score is strictly above float32(0.3) (float32(0.9) for the counting task),
  at most 16; no overlap suppression, no cross-class suppression;
- each include clause, in order: the first `count` kept objects of its class are "found" (fewer:
  fail); with a colour, at least `count` found objects must have it; with a position (checked only
  when the clause has not failed yet), the reference clause must have passed and every (object,
  reference object) pair must satisfy the relation, the first failing pair ending the check;
- each exclude clause fails the image when its class has at least `count` kept objects;
- the image is correct when nothing failed; the reason lists every failure, one per line, in the
  reference's words (`Decision.reason`).

The position rule runs in float32, as the reference's numpy arithmetic on the detector's float32
boxes does. Scores and boxes that arrive as Python floats are rounded to float32 first (what the
reference detector would have produced).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from deco.pipeline.evaluate.geneval.detections import Detection
from deco.pipeline.evaluate.geneval.prompts import COLORS, RELATIONS

SCORE_THRESHOLD = 0.3
COUNTING_SCORE_THRESHOLD = 0.9
MAX_OBJECTS = 16
POSITION_MARGIN = 0.1        # of the two boxes' summed size, per axis
NO_RELATION = 1e-3           # both reduced offsets below this: no relation at all
DIRECTION_THRESHOLD = 0.5    # of the unit offset, per axis

ColorFn = Callable[[str, Detection], str]   # (class name, detection) -> one of the 10 colours

_F32 = np.float32
_SMALL_SORT = 16             # numpy sorts runs of up to this many elements by insertion (stable)


# ---- ordering --------------------------------------------------------------------------------------
# The reference orders a class's detections with `np.argsort(scores)[::-1]`, numpy's default
# (introsort) kind, in its pinned environment numpy 1.23. That sort is not stable: runs of up to 16
# elements are insertion-sorted (equal scores keep their listing order, so the reversal puts the last
# listed first), longer arrays are first partitioned around median-of-three pivots, which moves equal
# scores around. Newer numpy builds dispatch argsort to SIMD sorts with yet other tie orders, so the
# order is reproduced here rather than asked of the installed numpy.

def _less(a: float, b: float) -> bool:
    """numpy's float order: NaN after everything."""
    return a < b or (b != b and a == a)


def _heapsort(v: list[float], idx: list[int], start: int, n: int) -> None:
    """numpy's heapsort of idx[start:start + n] by v (the introsort fallback), 1-based as numpy's."""
    def get(k):
        return idx[start + k - 1]

    def put(k, value):
        idx[start + k - 1] = value

    def sift(i: int, tmp: int, size: int) -> None:
        j = 2 * i
        while j <= size:
            if j < size and _less(v[get(j)], v[get(j + 1)]):
                j += 1
            if _less(v[tmp], v[get(j)]):
                put(i, get(j))
                i, j = j, 2 * j
            else:
                break
        put(i, tmp)

    for top in range(n >> 1, 0, -1):
        sift(top, get(top), n)
    while n > 1:
        tmp = get(n)
        put(n, get(1))
        n -= 1
        sift(1, tmp, n)


def reference_argsort(scores) -> list[int]:
    """Indices that sort `scores` ascending exactly as numpy 1.23's default `np.argsort` does
    (introsort: median-of-three quicksort, insertion sort for runs of <= 16, heapsort past a depth of
    2 * floor(log2 n)); `reversed()` of it is the reference's best-first order."""
    v = [float(s) for s in np.asarray(scores, dtype=_F32).ravel()]
    idx = list(range(len(v)))
    if len(v) < 2:
        return idx
    stack: list[tuple[int, int, int]] = []
    lo, hi = 0, len(v) - 1
    depth = 2 * (len(v).bit_length() - 1)
    while True:
        if depth < 0:
            _heapsort(v, idx, lo, hi - lo + 1)
        else:
            while hi - lo >= _SMALL_SORT:
                mid = lo + ((hi - lo) >> 1)
                if _less(v[idx[mid]], v[idx[lo]]):
                    idx[mid], idx[lo] = idx[lo], idx[mid]
                if _less(v[idx[hi]], v[idx[mid]]):
                    idx[hi], idx[mid] = idx[mid], idx[hi]
                if _less(v[idx[mid]], v[idx[lo]]):
                    idx[mid], idx[lo] = idx[lo], idx[mid]
                pivot = v[idx[mid]]
                i, j = lo, hi - 1
                idx[mid], idx[j] = idx[j], idx[mid]
                while True:
                    i += 1
                    while _less(v[idx[i]], pivot):
                        i += 1
                    j -= 1
                    while _less(pivot, v[idx[j]]):
                        j -= 1
                    if i >= j:
                        break
                    idx[i], idx[j] = idx[j], idx[i]
                idx[i], idx[hi - 1] = idx[hi - 1], idx[i]
                depth -= 1
                if i - lo < hi - i:      # the larger side waits on the stack
                    stack.append((i + 1, hi, depth))
                    hi = i - 1
                else:
                    stack.append((lo, i - 1, depth))
                    lo = i + 1
            for i in range(lo + 1, hi + 1):  # insertion sort: equal values keep their order
                item = idx[i]
                value = v[item]
                j = i
                while j > lo and _less(value, v[idx[j - 1]]):
                    idx[j] = idx[j - 1]
                    j -= 1
                idx[j] = item
        if not stack:
            return idx
        lo, hi, depth = stack.pop()


def keep(detections: list[Detection], tag: str) -> list[Detection]:
    """The kept detections of one class, best first: float32 score strictly above the threshold
    (float32 too), in the reference's order, at most 16."""
    threshold = _F32(COUNTING_SCORE_THRESHOLD if tag == "counting" else SCORE_THRESHOLD)
    with np.errstate(over="ignore"):
        scores = np.array([d.score for d in detections], dtype=_F32)
    order = reference_argsort(scores)[::-1]
    return [detections[i] for i in order if scores[i] > threshold][:MAX_OBJECTS]


# ---- position ----------------------------------------------------------------------------------------

def relations(subject_box, reference_box) -> set[str]:
    """The relations ("left of", "right of", "above", "below") that hold of subject vs reference.

    In float32 throughout, as the reference computes them from float32 boxes: centres
    (x1 + x2) / 2, sizes |x2 - x1|, offset o = c_subject - c_reference, per axis
    r = sign(o) * max(|o| - float32(0.1) * (s_subject + s_reference), 0); no relation when both
    |r| < float32(1e-3); else (dx, dy) = r / sqrt(ox*ox + oy*oy) against +-0.5.
    """
    boxes = np.array([list(subject_box)[:4], list(reference_box)[:4]], dtype=_F32).reshape(2, 2, 2)
    with np.errstate(all="ignore"):
        centers = (boxes[:, 0, :] + boxes[:, 1, :]) / _F32(2)
        sizes = np.abs(boxes[:, 1, :] - boxes[:, 0, :])
        offset = centers[0] - centers[1]
        margin = _F32(POSITION_MARGIN) * (sizes[0] + sizes[1])
        reduced = np.maximum(np.abs(offset) - margin, _F32(0)) * np.sign(offset)
        if np.all(np.abs(reduced) < _F32(NO_RELATION)):
            return set()
        norm = np.sqrt(offset[0] * offset[0] + offset[1] * offset[1])
        dx, dy = reduced / norm
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


def ordered(found: set[str]) -> list[str]:
    """Relations in a fixed order (left of, right of, above, below) for reasons and details."""
    return [r for r in RELATIONS if r in found]


# ---- the decision ----------------------------------------------------------------------------------------

@dataclass
class Decision:
    correct: bool
    reasons: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)

    @property
    def reason(self) -> str:
        return "\n".join(self.reasons)


# The reference's failure messages, word for word (its quirks included: the colour message always
# says "; and " and then lists every colour seen, the expected one too, in COLORS order; a position
# failure names the reference object "target" and reports only the first failing pair, with no
# relation at all giving "found  target", two spaces).

def missing_reason(name: str, count: int, found: int) -> str:
    return f"expected {name}>={count}, found {found}"


def color_reason(name: str, count: int, color: str, colors: list[str]) -> str:
    seen = ", ".join(f"{colors.count(c)} {c}" for c in COLORS if c in colors)
    return f"expected {color} {name}>={count}, found {colors.count(color)} {color}; and {seen}"


def no_target_reason(name: str, relation: str) -> str:
    return f"no target for {name} to be {relation}"


def position_reason(name: str, relation: str, found: set[str]) -> str:
    # The reference joins a Python set, whose order varies from run to run when two relations hold;
    # this joins them in the fixed order of `ordered`.
    return f"expected {name} {relation} target, found {' and '.join(ordered(found))} target"


def exclude_reason(name: str, count: int, present: int) -> str:
    return f"expected {name}<{count}, found {present}"


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
                "scores": [round(float(d.score), 4) for d in objects],
                "boxes": [[round(float(v), 1) for v in d.box] for d in objects]}
        include_details.append(info)
        found = objects[:count]
        passed = True
        if len(found) < count:
            passed = False
            reasons.append(missing_reason(name, count, len(found)))
        else:
            if "color" in clause:
                colors = []
                for obj in found:
                    if obj.color is None:
                        if color_of is None:
                            raise ValueError(f"{name!r} needs a colour but no colour classifier was given")
                        obj.color = color_of(name, obj)
                    colors.append(obj.color)
                info["colors"] = colors
                if colors.count(clause["color"]) < count:
                    passed = False
                    reasons.append(color_reason(name, count, clause["color"], colors))
            if "position" in clause and passed:
                relation, ref_index = clause["position"]
                # The reference only ever refers back (a later clause would be an IndexError there).
                reference = groups[ref_index] if -len(groups) <= ref_index < len(groups) else None
                if reference is None:
                    passed = False
                    reasons.append(no_target_reason(name, relation))
                else:
                    pairs = [[relations(obj.box, ref.box) for ref in reference] for obj in found]
                    info["relations"] = [ordered(r) for row in pairs for r in row]
                    failing = next((r for row in pairs for r in row if relation not in r), None)
                    if failing is not None:
                        passed = False
                        reasons.append(position_reason(name, relation, failing))
        info["passed"] = passed
        groups.append(found if passed else None)
    exclude_details = []
    for clause in metadata.get("exclude", []):
        name, count = clause["class"], clause["count"]
        present = len(kept[name])
        exclude_details.append({"class": name, "count": count, "kept": present, "passed": present < count})
        if present >= count:
            reasons.append(exclude_reason(name, count, present))
    details = {"include": include_details}
    if exclude_details:
        details["exclude"] = exclude_details
    return Decision(correct=not reasons, reasons=reasons, details=details)
