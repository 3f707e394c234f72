"""The staged pipeline end to end, for real: synth -> curate (Ray) -> train 32 px (ZeRO-3, 2 ranks)
-> gate -> train 64 px from the promoted EMA -> gate; killed during its second stage and rerun; and
a gate that rejects, stopping the pipeline before the next stage."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def pipeline_file(tmp: Path, name: str, stages: str) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(f"name: {name}\nroot: {tmp / 'store'}\nwork_dir: {tmp / 'work'}\nstages:\n{stages}")
    return path


DATA_STAGES = f"""
  - {{name: synth, kind: synth, samples: 160, seed: 3, bad_fraction: 0.1}}
  - name: curated
    kind: curate
    config: {CONFIGS / 'data' / 'curate_demo.yaml'}
    inputs: [synth]
    overrides: [sources.partition_size=64]
"""

# 6 prompts, 1 image each: scores move in steps of 1/6, so the regression check is made (stage_64
# against stage_32's promoted scores) but allowed any drop: two barely trained models decide nothing.
# Nor do they reach the demo gates' minimums (an untrained model's level): any score passes here.
GATE_OVERRIDES = ["synthetic_per_task=1", "generation.images_per_prompt=1", "generation.sampler.steps=4",
                  "thresholds.max_regression=1.0", "thresholds.min_overall=0.0", "thresholds.min_task.single_object=0.0"]


def train_stage(name, resolution, steps, init_from="", gate="demo_32", gate_overrides=(), nproc=2):
    init = f"\n    init_from: {init_from}" if init_from else ""
    overrides = "[" + ", ".join(GATE_OVERRIDES + list(gate_overrides)) + "]"
    gate_line = f"\n    gate: {CONFIGS / 'gates' / (gate + '.yaml')}\n    gate_overrides: {overrides}" if gate else ""
    return f"""
  - name: {name}
    kind: train
    config: {CONFIGS / 'train' / 'tiny_cpu.yaml'}
    data_from: curated
    resolution: {resolution}
    nproc: {nproc}{init}
    overrides: [max_steps={steps}, checkpoint.every={steps}, global_batch=8, logging.wandb=false]{gate_line}
"""


def start(path: Path, log: Path, *extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "deco.pipeline.cli", "pipeline", *extra, str(path)],
                            stdout=open(log, "a"), stderr=subprocess.STDOUT, cwd=path.parent,
                            start_new_session=True)


def record(tmp: Path, stage: str) -> dict | None:
    path = tmp / "store" / "_pipeline" / f"{stage}.json"
    return json.loads(path.read_text()) if path.exists() else None


@pytest.fixture(scope="module")
def interrupted_then_finished(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    path = pipeline_file(tmp, "two_stage", DATA_STAGES + train_stage("stage_32", 32, 6)
                         + train_stage("stage_64", 64, 4, init_from="stage_32", gate="demo_64"))
    log = tmp / "run.log"
    first = start(path, log, "run")
    deadline = time.monotonic() + 900
    # Kill the whole pipeline (runner, launcher, ranks) once the second stage's training is under way.
    while time.monotonic() < deadline and first.poll() is None:
        stage_64 = record(tmp, "stage_64")
        train_log = tmp / "work" / "stage_64" / "train.log"
        if stage_64 and train_log.exists() and "step" in train_log.read_text():
            break
        time.sleep(1)
    assert first.poll() is None, f"pipeline ended before its second stage:\n{log.read_text()[-3000:]}"
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    before = {name: record(tmp, name) for name in ("synth", "curated", "stage_32", "stage_64")}
    second = start(path, log, "run")
    assert second.wait(timeout=900) == 0, log.read_text()[-4000:]
    return tmp, path, before, log.read_text()


def test_pipeline_runs_two_stages_end_to_end(interrupted_then_finished):
    tmp, path, _, _ = interrupted_then_finished
    from deco.pipeline.evaluate.gate import read_promoted

    for stage in ("synth", "curated", "stage_32", "stage_64"):
        assert record(tmp, stage)["status"] == "done"
    for stage in ("stage_32", "stage_64"):
        promoted = read_promoted(str(tmp / "store" / stage))
        assert promoted is not None and promoted["step"] > 0
        assert (tmp / "work" / stage / "metrics.jsonl").exists()
    # The second stage started from the first stage's promoted EMA weights.
    assert list((tmp / "work" / "stage_64").glob("init_stage_32_step*_ema.safetensors"))
    status = subprocess.run([sys.executable, "-m", "deco.pipeline.cli", "pipeline", "status", "--json", str(path)],
                            capture_output=True, text=True, check=True)
    rows = {row["stage"]: row for row in json.loads(status.stdout)}
    assert rows["stage_64"]["promoted"].endswith("step_00000004")
    assert rows["stage_32"]["checkpoints"][0]["decision"] == "promote"
    # stage_64 started from stage_32, so its gate held it to stage_32's promoted scores.
    verdict = json.loads((Path(rows["stage_64"]["promoted"]) / "gate_verdict.json").read_text())
    assert verdict["baseline"]["stage"] == "stage_32"
    assert [c["baseline"]["stage"] for c in verdict["checks"] if c["check"] == "max_regression"] == ["stage_32"]


def test_rerun_after_kill_does_not_redo_finished_stages(interrupted_then_finished):
    tmp, _, before, log = interrupted_then_finished
    assert before["stage_64"]["status"] == "running"          # it was killed mid-stage
    for stage in ("synth", "curated", "stage_32"):
        assert before[stage]["status"] == "done"
        assert record(tmp, stage) == before[stage]              # untouched by the rerun
        assert f"{stage}: done earlier, skipped" in log
    assert record(tmp, "stage_64")["attempt"] == 2


def test_a_rejected_gate_stops_the_pipeline_and_the_next_stage_waits(interrupted_then_finished, capsys):
    tmp, _, _, _ = interrupted_then_finished
    from deco.pipeline.cli import main

    # Same store: the data stages are done; stage_low trains (1 rank, 2 steps: quick), and its gate
    # asks for a perfect score.
    path = pipeline_file(tmp, "rejected", DATA_STAGES
                         + train_stage("stage_low", 32, 2, nproc=1,
                                       gate_overrides=["thresholds.min_overall=1.0", "report.wandb=false"])
                         + train_stage("stage_next", 64, 2, init_from="stage_low"))
    result = subprocess.run([sys.executable, "-m", "deco.pipeline.cli", "pipeline", "run", str(path)],
                            capture_output=True, text=True, timeout=600, cwd=tmp)
    assert result.returncode == 3, result.stdout[-3000:] + result.stderr[-3000:]
    checkpoint = tmp / "store" / "stage_low" / "checkpoints" / "step_00000002"
    where = re.escape(str(checkpoint))  # the one line: checkpoint, failed check, value < threshold, report
    assert re.fullmatch(rf"deco: error: stage stage_low rejected: checkpoint {where} failed min_overall: "
                        rf"overall 0\.\d{{3}} < 1\.000 \(report {where}/gate/report\.html\)\n", result.stderr)
    assert (checkpoint / "gate" / "report.html").is_file()
    assert record(tmp, "stage_low")["status"] == "rejected"
    assert record(tmp, "stage_next") is None                    # never started
    assert not (tmp / "store" / "stage_next" / "checkpoints").exists()
    assert main(["pipeline", "status", "--json", str(path)]) == 0
    rows = {row["stage"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["stage_low"]["state"] == "rejected" and rows["stage_low"]["why"].startswith("step 2 failed min_overall")
    assert rows["stage_low"]["checkpoints"][0]["decision"] == "reject" and rows["stage_low"]["promoted"] is None
    assert rows["stage_next"]["state"] == "blocked" and rows["stage_next"]["why"] == "waits for stage_low (rejected)"


def test_pipeline_config_errors_name_the_problem(tmp_path):
    from deco.pipeline.config import ConfigError
    from deco.pipeline.stages import load_pipeline

    bad = pipeline_file(tmp_path, "bad", train_stage("stage_a", 32, 2, init_from="nowhere"))
    with pytest.raises(ConfigError, match="refers to 'curated', which is not an earlier stage"):
        load_pipeline(bad)
    # Said before the first stage runs, not when the stage that needs it starts hours later:
    ungated = pipeline_file(tmp_path, "ungated", DATA_STAGES + train_stage("stage_a", 32, 2, gate="")
                            + train_stage("stage_b", 64, 2, init_from="stage_a"))
    with pytest.raises(ConfigError, match="'stage_b' starts from the promoted checkpoint of 'stage_a', which has no gate"):
        load_pipeline(ungated)
    missing = pipeline_file(tmp_path, "missing", DATA_STAGES.replace("curate_demo.yaml", "curate_dmeo.yaml"))
    with pytest.raises(ConfigError, match="stage 'curated': config file not found: .*curate_dmeo.yaml"):
        load_pipeline(missing)
    typo = tmp_path / "typo.yaml"
    typo.write_text("name: x\nstages:\n  - {name: s, kind: synth, sampels: 3}\n")
    with pytest.raises(ConfigError, match=r"did you mean 'stages\[0\]\.samples'"):
        load_pipeline(typo)
