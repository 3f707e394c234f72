"""Stage gates: the decision policy, and whole evaluations of real checkpoints (tiny model, synthetic
prompts, synthetic detector) recorded in object storage, local and S3 (moto over HTTP)."""
import json
from pathlib import Path

import pytest

from deco.data.object_store import join, open_store
from deco.pipeline.evaluate.decision import decide, rejection_line
from deco.pipeline.evaluate.gate import (VERDICT, evaluate_checkpoint, promote, promoted_checkpoint, read_promoted,
                                         regression_baseline)
from deco.pipeline.train.manifest import CheckpointRef
from deco.pipeline.evaluate.gate_config import Thresholds, load_gate_config
from deco.pipeline.evaluate.geneval.prompts import prompts_digest, resolve_prompts
from geneval_helpers import FAST_GATE, read_store_json, tiny_weights, write_checkpoint

TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


def summary(**accuracy):
    tasks = {t: {"accuracy": accuracy.get(t, 0.8), "correct": 0, "total": 10} for t in TASKS}
    return {"tasks": tasks, "overall": sum(t["accuracy"] for t in tasks.values()) / len(tasks)}


def baseline(digest="set-a", **accuracy):
    s = summary(**accuracy)
    return {"step": 100, "checkpoint_uri": "x", "overall": s["overall"], "prompts_digest": digest,
            "tasks": {t: v["accuracy"] for t, v in s["tasks"].items()}}


def test_gate_passes_when_every_check_holds():
    passed, reasons, checks = decide(summary(), Thresholds(min_overall=0.7, min_task={"counting": 0.5},
                                                           max_regression=0.05, max_task_regression=0.1),
                                     baseline(counting=0.85), "set-a")
    assert passed and reasons == []
    assert {c["check"] for c in checks} == {"min_overall", "min_task.counting", "max_regression"} | {
        f"max_task_regression.{t}" for t in TASKS}


def test_gate_fails_on_a_task_minimum():
    passed, reasons, _ = decide(summary(counting=0.3), Thresholds(min_overall=0.5, min_task={"counting": 0.4}), None, "set-a")
    assert not passed and reasons == ["min_task.counting: counting 0.300 < 0.400"]


def test_gate_fails_on_regression_against_the_promoted_checkpoint():
    thresholds = Thresholds(max_regression=0.03, max_task_regression=0.1)
    passed, reasons, _ = decide(summary(position=0.5), thresholds, baseline(), "set-a")
    assert not passed
    assert reasons == ["max_regression: overall dropped 0.050 > 0.030 (0.800 -> 0.750 vs step 100)",
                       "max_task_regression.position: position dropped 0.300 > 0.100 (0.800 -> 0.500 vs step 100)"]
    # Scores from another prompt set are not comparable: no regression check.
    assert decide(summary(position=0.5), thresholds, baseline(digest="set-b"), "set-a")[0]


def test_a_task_without_images_fails_its_minimum():
    scores = summary()
    del scores["tasks"]["position"]
    passed, reasons, _ = decide(scores, Thresholds(min_task={"position": 0.1}), None, "d")
    assert not passed and reasons == ["min_task.position: no position images scored"]


def test_a_rejection_is_one_line_built_from_the_recorded_checks():
    passed, reasons, checks = decide(summary(counting=0.39996), Thresholds(min_overall=0.9, min_task={"counting": 0.4}),
                                     None, "d")
    assert checks[0] == {"check": "min_overall", "metric": "overall", "value": pytest.approx(0.733327),
                         "threshold": 0.9, "passed": False}
    verdict = {"checkpoint": {"uri": "s3://b/s/checkpoints/step_00000240", "step": 240}, "checks": checks,
               "reasons": reasons, "report": {"html": "s3://b/s/checkpoints/step_00000240/gate/report.html"}}
    # Printed equal at 3 decimals, 0.39996 and 0.4 get the digits that tell them apart.
    assert rejection_line(verdict) == ("checkpoint s3://b/s/checkpoints/step_00000240 failed min_overall: overall "
                                       "0.733 < 0.900; min_task.counting: counting 0.39996 < 0.40000 "
                                       "(report s3://b/s/checkpoints/step_00000240/gate/report.html)")


def test_a_stage_started_from_another_must_not_fall_behind_its_promoted_scores(tmp_path):
    first, second = str(tmp_path / "stage_32"), str(tmp_path / "stage_64")
    scores = summary()
    verdict = {"scores": {"overall": scores["overall"], "tasks": {t: 0.8 for t in TASKS}}, "prompts": {"digest": "set-a"}}
    promote(first, "stage_32", CheckpointRef(360, join(first, "checkpoints", "step_00000360")), verdict)
    ref = CheckpointRef(240, join(second, "checkpoints", "step_00000240"))
    # Until stage_64 promotes a checkpoint, stage_32's promoted scores are its baseline.
    assert regression_baseline(second, ref) is None
    baseline = regression_baseline(second, ref, first)
    passed, reasons, _ = decide(summary(colors=0.2), Thresholds(max_regression=0.05), baseline, "set-a")
    assert not passed and reasons == ["max_regression: overall dropped 0.100 > 0.050 (0.800 -> 0.700 vs stage_32 step 360)"]
    # Once it has its own, that is what a later checkpoint is held to.
    promote(second, "stage_64", ref, verdict)
    later = CheckpointRef(480, join(second, "checkpoints", "step_00000480"))
    assert regression_baseline(second, later, first)["stage"] == "stage_64"


def test_bad_thresholds_are_config_errors():
    from deco.pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="unknown task"):
        load_gate_config("demo_32", ["thresholds.min_task={countin: 0.5}"])
    with pytest.raises(ConfigError, match="within"):
        load_gate_config("demo_32", ["thresholds.min_overall=1.5"])


def test_gate_config_round_trips_for_the_ranks_it_launches(tmp_path):
    from deco.pipeline.evaluate.gate_config import dump_gate_config

    for name in ("demo_64", "t2i_finetune"):
        cfg = load_gate_config(name, ["generation.nproc=8", "thresholds.max_regression=null"])
        assert load_gate_config(str(dump_gate_config(cfg, tmp_path / f"{name}.yaml"))) == cfg


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return tiny_weights(tmp_path_factory.mktemp("gate_weights") / "tiny.safetensors")


def test_local_gate_promotes_records_reports_and_checks_regression(tmp_path, weights):
    stage = str(tmp_path / "stage")
    first = write_checkpoint(stage, 10, weights)
    cfg = load_gate_config("demo_32", FAST_GATE + [f"work_dir={tmp_path / 'work'}", "report.wandb=true",
                                                   "thresholds.max_regression=0.05"])
    verdict = evaluate_checkpoint(first, cfg)
    assert verdict["decision"] == "promote" and verdict["checkpoint"]["step"] == 10
    assert json.loads(open_store(first).get_bytes(VERDICT)) == verdict
    assert set(verdict["scores"]["tasks"]) == set(TASKS) and verdict["scores"]["total_images"] == 2 * 12
    promoted = read_promoted(stage)
    assert promoted["step"] == 10 and promoted["verdict_uri"] == join(first, VERDICT)
    assert promoted_checkpoint(stage).uri == first
    page = Path(verdict["report"]["html"]).read_text()
    assert "GenEval gate: demo_32 step 10" in page and Path(verdict["report"]["results"]).is_file()
    assert any(Path(verdict["report"]["wandb"]).glob("run-*.wandb"))  # the offline run, ready to sync
    # A stronger promoted checkpoint on the same prompt set: this one regresses and is rejected.
    digest = prompts_digest(resolve_prompts("synthetic", 2, 0))
    high = {t: 1.0 for t in TASKS}
    open_store(stage).put_bytes("promoted.json", json.dumps(
        {"step": 15, "checkpoint_uri": join(stage, "checkpoints", "step_00000015"), "overall": 1.0, "tasks": high,
         "prompts_digest": digest}).encode())
    second = write_checkpoint(stage, 20, weights)
    rejected = evaluate_checkpoint(second, cfg)
    assert rejected["decision"] == "reject" and rejected["baseline"]["step"] == 15
    assert rejected["reasons"][0].startswith("max_regression: overall dropped")
    assert read_promoted(stage)["step"] == 15


def test_s3_gate_by_hand_promotes_rejects_and_never_evaluates_unfinished(s3_bucket, tmp_path, weights, capsys):
    from deco.pipeline.cli import main

    def gate_run(checkpoint, *extra):  # `deco gate run`, in this process (the watcher test runs it as one)
        code = main(["gate", "run", "--checkpoint", checkpoint, "--config", "demo_32", *flags, *extra])
        out, err = capsys.readouterr()
        return code, out, err

    stage = f"{s3_bucket}/t2i/stage_32"
    flags = [f"--set={o}" for o in FAST_GATE + [f"work_dir={tmp_path / 'work'}"]]
    first = write_checkpoint(stage, 10, weights)
    code, out, err = gate_run(first)
    assert code == 0, err
    verdict = json.loads(out)
    assert verdict["decision"] == "promote" and read_store_json(first, VERDICT) == verdict
    assert read_store_json(stage, "promoted.json")["checkpoint_uri"] == first
    keys = set(open_store(first).list("gate"))
    assert {"gate/report.html", "gate/results.jsonl", "gate/summary.json"} <= keys
    assert verdict["report"]["html"] == join(first, "gate/report.html")
    # Asked again without --force: the recorded verdict stands, nothing is re-evaluated.
    code, out, err = gate_run(first)
    assert code == 0 and json.loads(out) == verdict and "a verdict exists" in err
    # A per-task minimum the random model cannot reach: rejected (exit 3), promotion unchanged.
    second = write_checkpoint(stage, 20, weights)
    code, out, err = gate_run(second, "--set", "thresholds.min_task.counting=0.5")
    assert code == 3, err
    rejected = json.loads(out)
    assert rejected["decision"] == "reject" and rejected["reasons"] == ["min_task.counting: counting 0.000 < 0.500"]
    # Why, in one line ending stderr (after the progress log): checkpoint, check, value, threshold, report.
    assert err.rstrip("\n").splitlines()[-1] == (f"deco: error: gate demo_32 rejected: checkpoint {second} failed "
                                                  f"min_task.counting: counting 0.000 < 0.500 (report "
                                                  f"{join(second, 'gate/report.html')})")
    assert err.count("deco: error:") == 1 and "Traceback" not in err
    assert read_store_json(stage, "promoted.json")["step"] == 10
    # No manifest: never evaluated, no verdict.
    third = write_checkpoint(stage, 30, weights, manifest=False)
    code, out, err = gate_run(third)
    assert code == 2 and "never evaluated" in err
    assert read_store_json(third, VERDICT) is None


def demo_model_overrides() -> tuple[str, ...]:
    """The model settings of the demo's last stage, read from configs/pipelines/demo.yaml."""
    from deco.pipeline.stages import load_pipeline

    stage = load_pipeline(Path(__file__).resolve().parents[1] / "configs" / "pipelines" / "demo.yaml").stage("stage_64")
    return tuple(o.removeprefix("model.") for o in stage.overrides if o.startswith("model."))


@pytest.mark.parametrize("gate, untrained", [("demo_32", "random"), ("demo_64", "random"),
                                             ("demo_64", "demo_model_at_init")])
def test_the_demo_gates_reject_an_untrained_model(gate, untrained, tmp_path, weights):
    """The shipped minimums, not the plumbing tests' any-score: a model at its initialisation (which is
    also what lr 0 leaves, its EMA included) is rejected on min_overall and on single_object."""
    from geneval_helpers import ANY_SCORE

    if untrained == "demo_model_at_init":
        # The demo's own model as training starts it (with data prediction: flat grey images).
        overrides = demo_model_overrides()
        assert overrides  # the demo sets its model variant; an empty read would test the default model
        weights = tiny_weights(tmp_path / "init.safetensors", overrides=overrides, as_initialised=True)
    checkpoint = write_checkpoint(str(tmp_path / "stage"), 10, weights)
    cheap = [o for o in FAST_GATE if o not in ANY_SCORE]
    verdict = evaluate_checkpoint(checkpoint, load_gate_config(gate, cheap + [f"work_dir={tmp_path / 'work'}"]))
    assert verdict["decision"] == "reject"
    failed = {c["check"] for c in verdict["checks"] if not c["passed"]}
    assert {"min_overall", "min_task.single_object"} <= failed
