"""The per-image GenEval decision, pinned to the protocol: thresholds, the 16-object cap, include and
exclude clauses, colours (through an injected colour classifier) and the position rule; every reason
in the reference evaluator's words (edge cases against the reference: test_geneval_reference.py)."""
import numpy as np
import pytest

from deco.pipeline.evaluate.geneval.detections import Detection, decode_rle, encode_rle, mask_to_box
from deco.pipeline.evaluate.geneval.rules import evaluate_image, keep, relations


def box(cx, cy, w=100, h=100):
    return (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)


# The spec's worked examples (100 x 100 boxes), plus the mirrored directions.
@pytest.mark.parametrize("offset, expected", [
    ((-200, 0), {"left of"}),
    ((100, 100), {"right of", "below"}),
    ((100, 60), {"right of"}),
    ((15, 0), set()),
    ((0, -150), {"above"}),
    ((-100, -100), {"left of", "above"}),
    ((0, 20), set()),          # inside the 0.1 * (100 + 100) margin
    ((0, 39), set()),          # past it, but (39 - 20) / 39 < 0.5 of the offset remains
    ((0, 41), {"below"}),      # (41 - 20) / 41 > 0.5
])
def test_position_worked_examples(offset, expected):
    subject = box(500 + offset[0], 500 + offset[1])
    assert relations(subject, box(500, 500)) == expected


def test_position_margin_scales_with_both_boxes():
    # Offset 50: with sizes 200 + 100 the margin is 30 and 20 / 50 < 0.5 remains; with two 100 px
    # boxes the margin is 20 and 30 / 50 > 0.5: "right of".
    assert relations(box(550, 500, 200, 200), box(500, 500)) == set()
    assert relations(box(550, 500), box(500, 500)) == {"right of"}


def det(score, b=(0, 0, 10, 10), color=None):
    return Detection(box=b, score=score, color=color)


def test_keep_is_strictly_above_threshold_sorted_and_capped_at_16():
    dets = [det(0.3), det(0.31), det(0.95)] + [det(0.5 + i / 100) for i in range(20)]
    kept = keep(dets, "single_object")
    assert len(kept) == 16 and [d.score for d in kept] == sorted((d.score for d in kept), reverse=True)
    assert kept[0].score == 0.95 and all(d.score > 0.3 for d in kept)
    assert [d.score for d in keep([det(0.9), det(0.91), det(0.5)], "counting")] == [0.91]


def one(cls, count=1, **extra):
    return {"class": cls, "count": count, **extra}


def never_called(cls, detection):
    raise AssertionError("the colour classifier must not be asked")


# (name, metadata, detections per class, colour classifier, correct, the reason in full)
CASES = [
    ("single: found", {"tag": "single_object", "include": [one("dog")]}, {"dog": [det(0.31)]}, never_called, True, ""),
    ("single: 0.3 is not above 0.3", {"tag": "single_object", "include": [one("dog")]}, {"dog": [det(0.3)]},
     never_called, False, "expected dog>=1, found 0"),
    ("single: other classes do not count", {"tag": "single_object", "include": [one("dog")]},
     {"cat": [det(0.99)]}, never_called, False, "expected dog>=1, found 0"),
    ("two: both", {"tag": "two_object", "include": [one("dog"), one("cat")]},
     {"dog": [det(0.8)], "cat": [det(0.7)]}, never_called, True, ""),
    ("two: one missing", {"tag": "two_object", "include": [one("dog"), one("cat")]},
     {"dog": [det(0.8)], "cat": [det(0.2)]}, never_called, False, "expected cat>=1, found 0"),
    ("counting: 0.9 threshold", {"tag": "counting", "include": [one("cup", 3)], "exclude": [one("cup", 4)]},
     {"cup": [det(0.95), det(0.92), det(0.91), det(0.89), det(0.5)]}, never_called, True, ""),
    ("counting: too few above 0.9", {"tag": "counting", "include": [one("cup", 3)], "exclude": [one("cup", 4)]},
     {"cup": [det(0.95), det(0.92), det(0.9)]}, never_called, False, "expected cup>=3, found 2"),
    ("counting: exclude fires at N+1", {"tag": "counting", "include": [one("cup", 3)], "exclude": [one("cup", 4)]},
     {"cup": [det(0.95)] * 4}, never_called, False, "expected cup<4, found 4"),
    ("exclude counts only kept objects", {"tag": "counting", "include": [one("cup", 2)],
                                          "exclude": [one("cup", 17)]},
     {"cup": [det(0.99)] * 20}, never_called, True, ""),
    ("colors: stub says blue", {"tag": "colors", "include": [one("car", color="blue")]},
     {"car": [det(0.9)]}, lambda cls, d: "blue", True, ""),
    ("colors: stub says red", {"tag": "colors", "include": [one("car", color="blue")]},
     {"car": [det(0.9)]}, lambda cls, d: "red", False, "expected blue car>=1, found 0 blue; and 1 red"),
    ("colors: a given colour is used as is", {"tag": "colors", "include": [one("car", color="blue")]},
     {"car": [det(0.9, color="blue")]}, never_called, True, ""),
    ("colors: only the first `count` objects are judged", {"tag": "colors", "include": [one("car", color="blue")]},
     {"car": [det(0.6, color="blue"), det(0.9, color="red")]}, never_called, False,
     "expected blue car>=1, found 0 blue; and 1 red"),
    ("colors: every found object must match", {"tag": "colors", "include": [one("car", 2, color="blue")]},
     {"car": [det(0.9, color="blue"), det(0.8, color="green")]}, never_called, False,
     "expected blue car>=2, found 1 blue; and 1 green, 1 blue"),   # every colour seen, in COLORS order
    ("color_attr: both right", {"tag": "color_attr", "include": [one("bus", color="green"), one("cup", color="pink")]},
     {"bus": [det(0.9, (0, 0, 5, 5))], "cup": [det(0.9, (50, 50, 60, 60))]},
     lambda cls, d: {"bus": "green", "cup": "pink"}[cls], True, ""),
    ("color_attr: colours swapped", {"tag": "color_attr", "include": [one("bus", color="green"), one("cup", color="pink")]},
     {"bus": [det(0.9)], "cup": [det(0.9)]}, lambda cls, d: {"bus": "pink", "cup": "green"}[cls], False,
     "expected green bus>=1, found 0 green; and 1 pink\nexpected pink cup>=1, found 0 pink; and 1 green"),
    ("position: right of", {"tag": "position", "include": [one("kite"), one("dog", position=["right of", 0])]},
     {"kite": [det(0.9, box(100, 100))], "dog": [det(0.9, box(400, 100))]}, never_called, True, ""),
    ("position: wrong side", {"tag": "position", "include": [one("kite"), one("dog", position=["right of", 0])]},
     {"kite": [det(0.9, box(400, 100))], "dog": [det(0.9, box(100, 100))]}, never_called, False,
     "expected dog right of target, found left of target"),
    ("position: too close for any relation", {"tag": "position", "include": [one("kite"), one("dog", position=["above", 0])]},
     {"kite": [det(0.9, box(100, 100))], "dog": [det(0.9, box(110, 95))]}, never_called, False,
     "expected dog above target, found  target"),   # no relation: the reference's two spaces
    ("position: no reference object", {"tag": "position", "include": [one("kite"), one("dog", position=["below", 0])]},
     {"dog": [det(0.9, box(100, 400))]}, never_called, False, "expected kite>=1, found 0\nno target for dog to be below"),
    ("position: every pair must hold", {"tag": "position", "include": [one("kite", 2), one("dog", position=["left of", 0])]},
     {"kite": [det(0.9, box(400, 100)), det(0.8, box(120, 100))], "dog": [det(0.9, box(100, 100))]}, never_called,
     False, "expected dog left of target, found  target"),   # the first failing pair only
]


@pytest.mark.parametrize("name, metadata, detections, color_of, correct, reason", CASES, ids=[c[0] for c in CASES])
def test_clause_table(name, metadata, detections, color_of, correct, reason):
    metadata = {**metadata, "prompt": name}
    decision = evaluate_image(metadata, detections, color_of)
    assert decision.correct is correct
    assert decision.reason == reason


def test_colour_is_asked_once_per_found_object_and_recorded():
    asked = []

    def classify(cls, detection):
        asked.append(detection.box)
        return "white"

    dets = {"sheep": [det(0.99, (0, 0, 4, 4)), det(0.98, (10, 0, 14, 4)), det(0.97, (20, 0, 24, 4))]}
    decision = evaluate_image({"tag": "colors", "prompt": "p", "include": [one("sheep", 2, color="white")]}, dets, classify)
    assert decision.correct and asked == [(0, 0, 4, 4), (10, 0, 14, 4)]  # the first `count`, not the third
    assert decision.details["include"][0]["colors"] == ["white", "white"]


def test_rle_round_trip_compressed_and_plain():
    rng = np.random.default_rng(0)
    mask = np.zeros((37, 23), dtype=bool)
    mask[5:30, 3:20] = rng.random((25, 17)) > 0.3
    mask[0, 0] = True  # a mask starting with a one has an empty first run of zeros
    rle = encode_rle(mask)
    assert isinstance(rle["counts"], str) and np.array_equal(decode_rle(rle), mask)
    flat = mask.flatten(order="F")
    runs, current, length = [], False, 0
    for value in flat:
        if value != current:
            runs.append(length)
            current, length = value, 0
        length += 1
    runs.append(length)
    assert np.array_equal(decode_rle({"size": [37, 23], "counts": runs}), mask)
    assert mask_to_box(mask) == (0.0, 0.0, float(np.nonzero(mask.any(0))[0].max() + 1), 30.0)
