"""GenEval decided exactly as the reference evaluator (djghosh13/geneval af4902f, evaluate_images.py and
summary_scores.py) decides, on the inputs where a close reading is not enough: equal scores, scores
and positions on the float32 boundaries, each failure message word for word, the summary's task order
and prompt count, detections that survive a save and reload bit for bit, and the image names it scores.

Every expected value below is worked out from the reference's behaviour: its numpy default argsort of
the float32 scores reversed, `scores > threshold` on float32 arrays, float32 box arithmetic."""
import json

import numpy as np
import pytest
from PIL import Image

from deco.pipeline.evaluate.geneval.detections import Detection, read_detections, write_detections
from deco.pipeline.evaluate.geneval.layout import read_layout, write_prompt_folder
from deco.pipeline.evaluate.geneval.rules import evaluate_image, keep, reference_argsort, relations
from deco.pipeline.evaluate.geneval.summary import format_summary, summarize

F32 = np.float32
UP = lambda x: float(np.nextafter(F32(x), F32(np.inf)))      # the next float32 above float32(x)  # noqa: E731
DOWN = lambda x: float(np.nextafter(F32(x), F32(-np.inf)))   # noqa: E731


def det(score, b=(0, 0, 10, 10), color=None, name=None):
    d = Detection(box=b, score=score, color=color)
    d.name = name
    return d


def square(cx, cy, side=100):
    return (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)


def meta(tag, *include, exclude=None):
    out = {"tag": tag, "include": list(include), "prompt": tag}
    if exclude:
        out["exclude"] = exclude
    return out


def never_called(cls, detection):
    raise AssertionError("the colour classifier must not be asked")


# ---- equal scores -------------------------------------------------------------------------------------

def test_equal_scores_come_out_in_reverse_listing_order():
    a, b, c, top = det(0.8, name="a"), det(0.8, name="b"), det(0.8, name="c"), det(0.95, name="top")
    # np.argsort([.8, .95, .8, .8]) = [0, 2, 3, 1] (up to 16 elements numpy's sort is an insertion sort:
    # equal scores keep their order); reversed: 1, 3, 2, 0.
    assert [d.name for d in keep([a, top, b, c], "single_object")] == ["top", "c", "b", "a"]


def test_a_tie_decides_which_object_the_position_is_judged_on():
    # Two equally confident dogs, left and right of the kite: the reference takes the one listed last.
    kite = det(0.9, square(500, 500))
    left, right = det(0.7, square(200, 500)), det(0.7, square(800, 500))
    clause = [{"class": "kite", "count": 1}, {"class": "dog", "count": 1, "position": ["right of", 0]}]
    assert evaluate_image(meta("position", *clause), {"kite": [kite], "dog": [left, right]}).correct
    decision = evaluate_image(meta("position", *clause), {"kite": [kite], "dog": [right, left]})
    assert decision.reason == "expected dog right of target, found left of target"


def test_a_tie_decides_which_object_the_colour_is_judged_on():
    clause = {"class": "car", "count": 1, "color": "blue"}
    red, blue = det(0.9, color="red"), det(0.9, color="blue")
    assert evaluate_image(meta("colors", clause), {"car": [red, blue]}, never_called).correct
    decision = evaluate_image(meta("colors", clause), {"car": [blue, red]}, never_called)
    assert decision.reason == "expected blue car>=1, found 0 blue; and 1 red"


def test_more_than_16_equal_scores_follow_numpys_introsort():
    # 17 elements are partitioned once before the insertion sorts: median of three of positions 0, 8
    # and 16 (all equal: no swaps), pivot parked at 15, the scan swaps 1<->14, 2<->13, ... 7<->8 and the
    # pivot goes to 8, giving [0, 14, 13, 12, 11, 10, 9, 15, 8, 6, 5, 4, 3, 2, 1, 7, 16]; each half is
    # then insertion sorted (no moves). Reversed, best first: 16, 7, 1, 2, ...
    assert reference_argsort([0.5] * 17)[::-1] == [16, 7, 1, 2, 3, 4, 5, 6, 8, 15, 9, 10, 11, 12, 13, 14, 0]
    # Checked against numpy 2.1's own introsort (SIMD dispatch disabled), which numpy 1.23 runs always.
    assert reference_argsort([0.5] * 8 + [0.9] + [0.5] * 8)[::-1] == [8, 7, 1, 2, 3, 4, 5, 6, 16, 15, 9, 10, 11,
                                                                       12, 13, 14, 0]
    assert reference_argsort([0.5] * 20)[::-1] == [19, 18] + list(range(1, 18)) + [0]
    # So with 17 equal-confidence cars, the two judged for "two blue cars" are the 17th and the 8th.
    cars = [det(0.95, color="blue" if i in (16, 7) else "red") for i in range(17)]
    clause = {"class": "car", "count": 2, "color": "blue"}
    assert evaluate_image(meta("colors", clause), {"car": cars}, never_called).correct


def test_reference_argsort_is_numpys_stable_order_up_to_16_and_a_sort_beyond():
    rng = np.random.default_rng(0)
    for n in list(range(1, 17)) * 20:
        scores = rng.choice(F32([0.2, 0.5, 0.5, 0.9, np.nan]), n)
        assert reference_argsort(scores) == np.argsort(scores, kind="stable").tolist()   # NaN last, as numpy
    for n in (17, 40, 100, 300):
        scores = rng.choice(F32([0.2, 0.5, 0.9]), n)
        order = reference_argsort(scores)
        assert sorted(order) == list(range(n)) and np.all(np.diff(scores[order]) >= 0)


# ---- thresholds in float32 -------------------------------------------------------------------------------

def test_score_exactly_float32_0_3_is_not_kept_and_the_next_float32_is():
    clause = {"class": "dog", "count": 1}
    at = float(F32(0.3))                  # 0.30000001192092896 > 0.3 in float64, not in float32
    assert at > 0.3 and keep([det(at)], "single_object") == []
    assert evaluate_image(meta("single_object", clause), {"dog": [det(at)]}).reason == "expected dog>=1, found 0"
    assert len(keep([det(UP(0.3))], "single_object")) == 1    # 0.30000004172325134
    # A float64 score that rounds to float32(0.3) is float32(0.3) to the reference's detector.
    assert keep([det(0.3000000001)], "single_object") == []


def test_counting_threshold_exactly_float32_0_9():
    counting = meta("counting", {"class": "cup", "count": 2}, exclude=[{"class": "cup", "count": 3}])
    at = float(F32(0.9))                  # 0.8999999761581421
    cups = [det(0.99), det(at), det(0.95)]
    assert evaluate_image(counting, {"cup": cups}).correct        # float32(0.9) is not above it: 2 cups
    cups = [det(0.99), det(UP(0.9)), det(0.95)]                    # 0.9000000357627869: 3 cups
    assert evaluate_image(counting, {"cup": cups}).reason == "expected cup<3, found 3"
    # 0.9000000001 > 0.9 in float64, but it is float32(0.9) once a detector's float32 made it.
    assert evaluate_image(counting, {"cup": [det(0.99), det(0.9000000001), det(0.95)]}).correct
    assert len(keep([det(at)], "two_object")) == 1                # 0.9 applies to counting only


# ---- position in float32 -----------------------------------------------------------------------------

C = float(F32(0.6))   # 0.6000000238418579; C - 0.5 and C + 0.5 are float32 numbers too


def test_position_exactly_on_the_half_cut_in_float32():
    # Subject 1 wide centred at C, reference 2 wide centred at 0: o = C, margin float32(0.1) * 3 =
    # float32(0.3) = C / 2 exactly, so dx = (C - C/2) / C = 0.5, not > 0.5: no relation. In float64
    # 0.1 * 3 = 0.30000000000000004 < C / 2 and dx = 0.50000002 would say "right of".
    reference = (-1.0, -1.0, 1.0, 1.0)
    assert relations((C - 0.5, -1.0, C + 0.5, 1.0), reference) == set()
    assert relations((-C - 0.5, -1.0, -C + 0.5, 1.0), reference) == set()        # mirrored: not "left of"
    assert relations((-1.0, C - 0.5, 1.0, C + 0.5), reference) == set()          # vertical: not "below"
    nxt = UP(C)
    assert relations((nxt - 0.5, -1.0, nxt + 0.5, 1.0), reference) == {"right of"}  # one float32 further
    clause = [{"class": "kite", "count": 1}, {"class": "dog", "count": 1, "position": ["right of", 0]}]
    decision = evaluate_image(meta("position", *clause), {"kite": [det(0.9, reference)],
                                                          "dog": [det(0.9, (C - 0.5, -1.0, C + 0.5, 1.0))]})
    assert decision.reason == "expected dog right of target, found  target"


def test_position_exactly_on_the_no_relation_cut_in_float32():
    # A 0.0025 wide, flat subject beside a point: in real numbers r = 0.00125 - 0.00025 = 0.001, not
    # below 1e-3, and dx = 0.8 ("right of"). In float32, float32(0.0025) / 2 - float32(0.1) * float32(0.0025)
    # = 0.0009999999310821295 < float32(1e-3): no relation. The next float32 width gives r =
    # float32(1e-3) exactly, which is not below it: "right of".
    point = (0.0, 0.0, 0.0, 0.0)
    assert relations((0.0, 0.0, 0.0025, 0.0), point) == set()
    assert relations((0.0, 0.0, UP(0.0025), 0.0), point) == {"right of"}
    assert relations((0.0, 0.0, DOWN(0.0025), 0.0), point) == set()


# ---- the reasons, word for word -------------------------------------------------------------------------

REASONS = [
    ("missing", meta("two_object", {"class": "dog", "count": 1}, {"class": "cat", "count": 2}),
     {"dog": [det(0.2)], "cat": [det(0.8)]},
     "expected dog>=1, found 0\nexpected cat>=2, found 1"),
    ("colour: every colour seen, the expected one too, in COLORS order, after '; and '",
     meta("colors", {"class": "car", "count": 3, "color": "blue"}),
     {"car": [det(0.9, color="white"), det(0.8, color="blue"), det(0.7, color="red")]},
     "expected blue car>=3, found 1 blue; and 1 red, 1 blue, 1 white"),
    ("colour: counts per colour", meta("colors", {"class": "car", "count": 3, "color": "green"}),
     {"car": [det(0.9, color="pink"), det(0.8, color="pink"), det(0.7, color="orange")]},
     "expected green car>=3, found 0 green; and 1 orange, 2 pink"),
    ("no target", meta("position", {"class": "kite", "count": 1}, {"class": "dog", "count": 1,
                                                                    "position": ["below", 0]}),
     {"dog": [det(0.9)]}, "expected kite>=1, found 0\nno target for dog to be below"),
    ("position: two relations found", meta("position", {"class": "kite", "count": 1},
                                           {"class": "dog", "count": 1, "position": ["left of", 0]}),
     {"kite": [det(0.9, square(100, 100))], "dog": [det(0.9, square(300, 300))]},
     "expected dog left of target, found right of and below target"),
    ("position: none found", meta("position", {"class": "kite", "count": 1},
                                  {"class": "dog", "count": 1, "position": ["left of", 0]}),
     {"kite": [det(0.9, square(100, 100))], "dog": [det(0.9, square(105, 100))]},
     "expected dog left of target, found  target"),
    ("position: the first failing pair only, object by object",
     meta("position", {"class": "kite", "count": 2}, {"class": "dog", "count": 2, "position": ["above", 0]}),
     {"kite": [det(0.9, square(100, 500)), det(0.8, square(900, 500))],
      "dog": [det(0.9, square(100, 100)), det(0.8, square(900, 900))]},
     "expected dog above target, found left of target"),   # dog 0 vs kite 1; dog 1 is never looked at
    ("exclude", meta("counting", {"class": "cup", "count": 2}, exclude=[{"class": "cup", "count": 3}]),
     {"cup": [det(0.95)] * 5}, "expected cup<3, found 5"),
    ("exclude counts only kept objects (at most 16)",
     meta("counting", {"class": "cup", "count": 2}, exclude=[{"class": "cup", "count": 16}]),
     {"cup": [det(0.95)] * 20}, "expected cup<16, found 16"),
]


@pytest.mark.parametrize("name, metadata, detections, reason", REASONS, ids=[r[0] for r in REASONS])
def test_reason_strings_word_for_word(name, metadata, detections, reason):
    decision = evaluate_image(metadata, detections, never_called)
    assert decision.correct is False and decision.reason == reason


def test_a_failed_colour_skips_the_position_check():
    # The reference checks a position only while the clause still holds: one reason, not two.
    clause = [{"class": "kite", "count": 1},
              {"class": "dog", "count": 1, "color": "black", "position": ["right of", 0]}]
    decision = evaluate_image(meta("position", *clause), {"kite": [det(0.9, square(500, 500))],
                                                          "dog": [det(0.9, square(100, 500), color="white")]})
    assert decision.reasons == ["expected black dog>=1, found 0 black; and 1 white"]


# ---- the summary ---------------------------------------------------------------------------------------

def test_summary_lists_tasks_in_first_appearance_order_and_counts_prompts_by_metadata():
    def row(folder, tag, correct, prompt):
        return {"filename": f"out/{folder:05d}/samples/0000.png", "tag": tag, "correct": correct,
                "metadata": json.dumps({"tag": tag, "prompt": prompt})}

    rows = [row(0, "position", False, "a"), row(1, "colors", True, "b"), row(2, "position", True, "c"),
            row(3, "single_object", True, "d"),
            row(4, "colors", False, "b")]   # another folder with prompt "b": the same prompt to the reference
    summary = summarize(rows)
    assert list(summary["tasks"]) == ["position", "colors", "single_object"]
    assert format_summary(summary) == "\n".join([
        "Summary", "=======", "Total images: 5", "Total prompts: 4", "% correct images: 60.00%",
        "% correct prompts: 75.00%", "", "Task breakdown", "==============",
        "position         = 50.00% (1 / 2)", "colors           = 50.00% (1 / 2)",
        "single_object    = 100.00% (1 / 1)", "", "Overall score (avg. over tasks): 0.66667"])
    # Decoded metadata (as read_results gives it) groups the same way.
    decoded = [{**r, "metadata": json.loads(r["metadata"])} for r in rows]
    assert summarize(decoded) == summary


# ---- detections saved and reloaded -------------------------------------------------------------------------

def test_saved_detections_reload_bit_for_bit(tmp_path):
    score = float(F32(0.300004))          # kept; rounded to 5 decimals it became 0.3 and was dropped
    box = (float(F32(0.1)), C - 0.5, float(F32(12.345678)), float(F32(99.99999)))
    dets = [Detection(box=box, score=score, color="red"), Detection(box=(0, 0, 1, 1), score=UP(0.3))]
    path = write_detections(tmp_path / "d.jsonl", [("00000/samples/0000.png", {"dog": dets})])
    again = read_detections(path)["00000/samples/0000.png"]["dog"]
    assert [(d.box, d.score, d.color) for d in again] == [(d.box, d.score, d.color) for d in dets]
    assert len(keep(again, "single_object")) == 2
    assert keep([Detection(box=box, score=round(score, 5))], "single_object") == []   # what rounding did
    # Files written with rounded numbers (before this format note) still read.
    (tmp_path / "old.jsonl").write_text(json.dumps({"filename": "x.png", "detections": {
        "dog": [{"box": [1.23, 4.56, 7.89, 10.11], "score": 0.30000}]}}) + "\n")
    assert read_detections(tmp_path / "old.jsonl")["x.png"]["dog"][0].score == 0.3


# ---- which images are scored -----------------------------------------------------------------------------

def test_image_names_are_matched_as_the_reference_matches_them(tmp_path):
    metadata = meta("single_object", {"class": "dog", "count": 1})
    folder = write_prompt_folder(tmp_path, 0, metadata, [Image.new("RGB", (4, 4))] * 2)
    samples = folder / "samples"
    Image.new("RGB", (4, 4)).save(samples / "0002.png.bak", format="PNG")   # re.match: a prefix match
    (samples / "0003.png").mkdir()                                           # not a file
    (samples / "x0004.png").write_bytes(b"")                                 # does not start with digits
    (samples / ".0005.png.partial").write_bytes(b"")                         # our temporary names
    scan = read_layout(tmp_path)
    assert [p.name for p in scan.folders[0].samples] == ["0000.png", "0001.png", "0002.png.bak"]
