"""Pictures of a gated checkpoint: the fixed-prompt sample grid beside its verdict, the HTML report that
opens with it and a per-task accuracy chart beside the scores it is compared with, the same in wandb
(offline), and the demo's closing table naming them.

The gate runs for real (tiny weights, synthetic prompts, synthetic detector), on images already in
its work folder, written as a resumed generation would have left them (same run key): it scores
drawn scenes instead of sampling, which keeps this module to seconds."""
import base64
import io
import json
import random
import re
from pathlib import Path

import pytest
from PIL import Image

from deco.data.object_store import join, open_store
from deco.data.synthetic import BACKGROUNDS, DrawnObject, make_scene, render
from deco.pipeline.evaluate.compare import record_untrained
from deco.pipeline.evaluate.gate import VERDICT, checkpoint_ref, evaluate_checkpoint, work_dir
from deco.pipeline.evaluate.gate_config import load_gate_config
from deco.pipeline.evaluate.geneval.generate import run_key, weights_fingerprint
from deco.pipeline.evaluate.geneval.grid import BORDER, FAIL_COLOR, OK_COLOR, grid_rows, sample_grid
from deco.pipeline.evaluate.geneval.layout import write_prompt_folder
from deco.pipeline.evaluate.geneval.prompts import resolve_prompts
from geneval_helpers import FAST_GATE, tiny_weights, write_checkpoint

TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
STAGE_32 = {t: a for t, a in zip(TASKS, (0.5, 0.25, 0.0, 0.125, 0.375, 0.0))}
PROMOTED = {t: a for t, a in zip(TASKS, (0.75, 0.5, 0.25, 0.0, 0.5, 0.125))}
UNTRAINED = {t: a for t, a in zip(TASKS, (0.25, 0.0, 0.0, 0.0, 0.125, 0.0))}


def _scene_images(prompt, size: int) -> list[Image.Image]:
    """Image 0: the prompt's own shape for single-object prompts (judged correct), a scene of its task
    otherwise; image 1: an empty background (judged failed)."""
    if prompt.tag == "single_object":
        first = render([DrawnObject(prompt.metadata["include"][0]["class"], "red", (6, 6, 26, 26))], size, BACKGROUNDS[0])
    else:
        first = make_scene(random.Random(prompt.index), size, prompt.tag).image()
    return [first, render([], size, BACKGROUNDS[1])]


@pytest.fixture(scope="module")
def gated(tmp_path_factory):
    """A demo-shaped store: stage_32's gated checkpoint, and stage_64 (initialised from it, with a
    promoted step 5 and an untrained model's summary recorded) whose step 10 the gate evaluates."""
    tmp = tmp_path_factory.mktemp("pictures")
    root = str(tmp / "store")
    weights = tiny_weights(tmp / "tiny.safetensors")
    stage_32, stage_64 = join(root, "stage_32"), join(root, "stage_64")
    source = join(stage_32, "checkpoints", "step_00000360")
    open_store(source).put_bytes(VERDICT, json.dumps({"stage": "stage_32", "checkpoint": {"uri": source, "step": 360},
                                                      "scores": {"tasks": STAGE_32}}).encode())
    # The weights stage_64 started from name the checkpoint they were exported from (as `deco export` writes).
    from safetensors.torch import load_file, save_file

    from deco.pipeline.weights import read_metadata

    init = tmp / "init_stage_32_ema.safetensors"
    save_file(load_file(str(weights)), str(init), metadata={**read_metadata(weights), "deco.checkpoint": json.dumps(source)})
    record_untrained(stage_64, {"tasks": {t: {"accuracy": a} for t, a in UNTRAINED.items()}})
    open_store(stage_64).put_bytes("promoted.json", json.dumps(
        {"step": 5, "checkpoint_uri": join(stage_64, "checkpoints", "step_00000005"), "overall": 0.35,
         "tasks": PROMOTED, "prompts_digest": "another-set", "verdict_uri": ""}).encode())
    checkpoint = write_checkpoint(stage_64, 10, weights)
    open_store(checkpoint).put_bytes("config.yaml", f"init_from: {init}\n".encode())

    cfg = load_gate_config("demo_64", FAST_GATE + [f"work_dir={tmp / 'gate_work'}", "stage=stage_64",
                                                   "report.wandb=true"])
    prompts = resolve_prompts(cfg.prompts, cfg.synthetic_per_task, cfg.synthetic_seed)
    key = run_key(weights_fingerprint(weights), cfg.generation, 32)  # the tiny model's 32 px
    images = work_dir(cfg, checkpoint_ref(checkpoint)[1]) / "images"  # where the gate generates
    for prompt in prompts:
        write_prompt_folder(images, prompt.index, prompt.metadata, _scene_images(prompt, 32), generation={"run_key": key})
    verdict = evaluate_checkpoint(checkpoint, cfg)
    results = [json.loads(line) for line in open_store(checkpoint).get_bytes("gate/results.jsonl").decode().splitlines()]
    return {"tmp": tmp, "root": root, "checkpoint": checkpoint, "verdict": verdict, "results": results,
            "prompts": prompts}


def _png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return image.convert("RGB")


def test_the_gate_writes_a_fixed_prompt_grid_beside_its_verdict(gated):
    checkpoint, verdict, results = gated["checkpoint"], gated["verdict"], gated["results"]
    store = open_store(checkpoint)
    assert verdict["report"]["grid"] == join(checkpoint, "gate", "grid.png") and store.exists(VERDICT)
    grid = _png(store.get_bytes("gate/grid.png"))
    rows = grid_rows(results)  # 2 prompts per task, in GenEval's task order, 2 images each
    assert [r[0]["tag"] for r in rows] == [t for t in TASKS for _ in range(2)] and {len(r) for r in rows} == {2}
    # Layout (grid.sample_grid): 54 px header, rows of a 128 px cell in its border plus 8 px, the
    # images right of a 300 px label column, 8 px padding, 56 px for the per-row count.
    box = 128 + 2 * BORDER
    assert grid.size == (8 + 300 + 2 * (box + 8) + 56, 54 + len(rows) * (box + 8) + 8)
    for r, prompt_rows in enumerate(rows):
        for i, row in enumerate(prompt_rows):
            x, y = 8 + 300 + i * (box + 8), 54 + r * (box + 8)
            assert grid.getpixel((x + 1, y + 1)) == (OK_COLOR if row["correct"] else FAIL_COLOR)
            # The 32 px sample enlarged 4x with nearest-neighbour: each source pixel is a 4x4 block.
            source = Image.open(row["filename"]).convert("RGB")
            for sx, sy in ((0, 0), (13, 7), (31, 31)):
                assert grid.getpixel((x + BORDER + 4 * sx, y + BORDER + 4 * sy)) == source.getpixel((sx, sy))
                assert grid.getpixel((x + BORDER + 4 * sx + 3, y + BORDER + 4 * sy + 3)) == source.getpixel((sx, sy))
    marks = [row["correct"] for r in rows for row in r]
    assert any(marks) and not all(marks)  # the drawn single objects pass, the empty backgrounds fail


def test_grid_prompts_are_the_first_of_each_task_whatever_the_scores(gated):
    results = gated["results"]
    first = {}
    for prompt in gated["prompts"]:
        first.setdefault(prompt.tag, prompt.text)
    rows = grid_rows(results, per_task=1)
    assert [r[0]["prompt"] for r in rows] == [first[t] for t in TASKS]
    flipped = [{**row, "correct": not row["correct"]} for row in results]
    assert [r[0]["prompt"] for r in grid_rows(list(reversed(flipped)), per_task=1)] == [first[t] for t in TASKS]
    assert sample_grid(results, "a title", per_task=1).height == 54 + 6 * (128 + 2 * BORDER + 8) + 8


def _bars(page: str) -> dict[tuple[str, str], float]:
    found = re.findall(r'<rect class="bar" data-series="([^"]+)" data-category="([^"]+)" data-value="([^"]+)"', page)
    return {(series, category): float(value) for series, category, value in found}


def test_the_report_opens_with_the_grid_then_accuracy_beside_earlier_stages(gated):
    checkpoint, verdict = gated["checkpoint"], gated["verdict"]
    page = open_store(checkpoint).get_bytes("gate/report.html").decode()
    body = page[page.index("<body>"):]
    assert body.index("sample-grid") < body.index("<svg") < body.index("<table")
    embedded = re.search(r"class='sample-grid' src='data:image/png;base64,([^']+)'", page).group(1)
    assert base64.b64decode(embedded) == open_store(checkpoint).get_bytes("gate/grid.png")
    bars = _bars(page)
    expected = {"stage_64 step 10": verdict["scores"]["tasks"], "promoted step 5": PROMOTED,
                "stage_32 step 360 (start)": STAGE_32, "untrained": UNTRAINED}
    assert {series for series, _ in bars} == set(expected)
    for series, tasks in expected.items():
        for task, accuracy in tasks.items():
            assert bars[(series, task)] == pytest.approx(accuracy, abs=1e-5)
        assert bars[(series, "overall")] == pytest.approx(sum(tasks.values()) / len(tasks), abs=1e-5)
    # What the report showed before stays: the score table, a grid per task, the failed images.
    assert "<th>correct / images</th>" in page and "<h2 id='position'>position</h2>" in page
    assert f"Failed images ({sum(not r['correct'] for r in gated['results'])})" in page


def test_wandb_gets_the_grid_and_the_scores_per_task(gated):
    run_dir = Path(gated["verdict"]["report"]["wandb"])
    media = list((run_dir / "files" / "media" / "images" / "geneval_grid").glob("samples_*.png"))
    assert len(media) == 1
    assert _png(media[0].read_bytes()).size == _png(open_store(gated["checkpoint"]).get_bytes("gate/grid.png")).size
    # An offline run keeps its history in run-*.wandb (protobuf records, no summary file until synced):
    # an item is its key, then field 16 (bytes 0x82 0x01), a one-byte length and the value as JSON.
    data = next(run_dir.glob("run-*.wandb")).read_bytes()
    logged = {m.group(1).decode(): json.loads(data[m.end():m.end() + m.group(2)[0]])
              for m in re.finditer(rb"geneval/(\w+)\x82\x01(.)", data, re.DOTALL)}
    expected = gated["verdict"]["scores"]["tasks"]
    assert {task: logged[task] for task in expected} == pytest.approx(expected)
    assert logged["overall"] == pytest.approx(gated["verdict"]["scores"]["overall"])


def test_the_demo_closing_table_names_each_stages_pictures(gated):
    from deco.pipeline.demo import DEMO_PIPELINE, summary_table
    from deco.pipeline.stages import PipelineRunner, load_pipeline

    work = gated["tmp"] / "work"
    metrics = work / "stage_64" / "metrics.jsonl"
    metrics.parent.mkdir(parents=True)
    metrics.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s, "mse": 0.6 / s, "freq": 0.4 / s}) + "\n"
                               for s in range(1, 21)))
    runner = PipelineRunner(load_pipeline(DEMO_PIPELINE, [f"root={gated['root']}", f"work_dir={work}"]))
    table, data = summary_table(runner, None, "stage_64")
    stage = data["stages"]["stage_64"]
    assert stage["grid"] == join(gated["checkpoint"], "gate", "grid.png")
    assert stage["report"] == join(gated["checkpoint"], "gate", "report.html")
    assert stage["loss_curve"] == str(work / "stage_64" / "loss_curve.png")
    assert _png(Path(stage["loss_curve"]).read_bytes()).size == (900, 480)
    for path in (stage["grid"], stage["report"], stage["loss_curve"]):
        assert path in table
    assert data["stages"]["stage_32"]["loss_curve"] is None  # never trained here: nothing to draw
