"""`deco demo` / `make demo`: the whole pipeline, offline, on this machine, then a summary.

Runs configs/pipelines/demo.yaml (synthetic raw data with faults -> Ray curation -> MDS -> tiny DeCo
under ZeRO-3 at 32 px -> gate -> 64 px from the promoted EMA -> gate), then scores an UNTRAINED
model of the last stage on the same prompts with the same detector (first, so that stage's gate
report draws it beside the trained scores), so the summary shows what training bought. The closing
table names each stage's pictures: its gate's sample grid and report, and its loss curve. DEMO_S3=1 puts the object store on moto's S3 server (127.0.0.1) instead of a
local directory. A rerun continues where an interrupted one stopped.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from deco.pipeline.evaluate.compare import record_untrained
from deco.pipeline.stages import PipelineRunner, PipelineStopped, format_status, load_pipeline

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
DEMO_PIPELINE = CONFIG_DIR / "pipelines" / "demo.yaml"


@contextlib.contextmanager
def demo_object_store(out: Path):
    """The store root: a local directory, or a bucket on a moto S3 server started here (DEMO_S3=1)."""
    if os.environ.get("DEMO_S3") != "1":
        yield str(out / "store")
        return
    import socket

    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one access-log line per S3 request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    # Children (curation, ranks, gates) inherit these; moto accepts any credentials.
    os.environ.update({"S3_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "demo",
                       "AWS_SECRET_ACCESS_KEY": "demo", "AWS_DEFAULT_REGION": "us-east-1"})
    boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT_URL"]).create_bucket(Bucket="deco-demo")
    print(f"[demo] object store: moto S3 server on 127.0.0.1:{port}, bucket deco-demo", flush=True)
    try:
        yield "s3://deco-demo/store"
    finally:
        server.stop()


def _deco(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "deco.pipeline.cli", *args], check=True)


def untrained_baseline(runner: PipelineRunner, stage) -> dict:
    """GenEval summary of an untrained model of `stage` under the stage's own gate config."""
    from deco.pipeline.config import load_config
    from deco.pipeline.train.config import TrainConfig
    from deco.pipeline.weights import save_weights

    work = runner.stage_work(stage) / "untrained_baseline"
    summary_path = work / "summary.json"
    if summary_path.exists():
        return json.loads(summary_path.read_text())
    overrides = [*stage.overrides]
    if stage.resolution:
        overrides += [f"model.resolution={stage.resolution}", f"data.resolution={stage.resolution}"]
    train_cfg = load_config(TrainConfig, runner.cfg.resolve(stage.config), overrides)
    torch.manual_seed(train_cfg.seed)  # the initialisation the trainer itself starts from
    train_cfg.model.repa.enabled = False
    weights = save_weights(work / "untrained.safetensors", train_cfg.model.build(), train_cfg.text_encoder)
    gate = ["--config", runner.cfg.resolve(stage.gate), *[a for o in stage.gate_overrides for a in ("--set", o)]]
    _deco("geneval", "generate", "--weights", str(weights), "--out", str(work / "images"), *gate)
    _deco("geneval", "score", "--images", str(work / "images"), "--out", str(work / "results.jsonl"), *gate)
    _deco("geneval", "summary", str(work / "results.jsonl"), "--out", str(summary_path))
    return json.loads(summary_path.read_text())


def _losses(metrics: Path) -> tuple[float | None, float | None, int]:
    if not metrics.exists():
        return None, None, 0
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    losses = [r["loss"] for r in rows if isinstance(r.get("loss"), (int, float))]
    window = max(1, min(10, len(losses) // 4))
    first = sum(losses[:window]) / window if losses else None
    last = sum(losses[-window:]) / window if losses else None
    return first, last, max((r.get("step", 0) for r in rows), default=0)


def _accuracy(value) -> float:
    """A task's accuracy from a verdict (a number) or a GenEval summary ({accuracy, correct, total})."""
    return value["accuracy"] if isinstance(value, dict) else float(value)


def _readable(uri: str | None, work: Path, step: int | None) -> str | None:
    """A gate record's path a person can open: on S3, the gate's local copy in the stage's work dir."""
    if not uri or "://" not in uri or step is None:
        return uri
    local = sorted((work / "gate").glob(f"*/step_{step:08d}/{uri.rsplit('/', 1)[-1]}"))
    return str(local[-1]) if local else uri


def _loss_curve(metrics: Path) -> str | None:
    """The stage's loss curve (the trainer draws it; drawn here for a run that predates that)."""
    from deco.pipeline.train.loss_curve import LOSS_CURVE, write_loss_curve

    curve = metrics.with_name(LOSS_CURVE)
    if not curve.exists() and metrics.exists():
        write_loss_curve(metrics)
    return str(curve) if curve.exists() else None


def summary_table(runner: PipelineRunner, baseline: dict | None, baseline_stage: str) -> tuple[str, dict]:
    from deco.pipeline.train.manifest import list_checkpoints
    from deco.pipeline.evaluate.gate import read_promoted, read_verdict
    from deco.pipeline.evaluate.geneval.prompts import TASKS

    header = f"{'stage':<10} {'steps':>5} {'loss first->last':>17} {'overall':>8} " + " ".join(f"{t[:9]:>9}" for t in TASKS)
    lines, data = [header], {"stages": {}, "baseline_stage": baseline_stage}
    for stage in runner.cfg.stages:
        record = runner.record(stage) or {}
        if stage.kind != "train":
            outputs = record.get("outputs", {})
            data["stages"][stage.name] = outputs
            if stage.kind == "curate":
                lines.append(f"{stage.name:<10} curated: {outputs.get('samples_kept')} kept of {outputs.get('samples_in')} in")
            continue
        uri = runner.stage_uri(stage)
        promoted = read_promoted(uri)
        refs = list_checkpoints(uri)
        verdict = read_verdict(promoted["verdict_uri"].rsplit("/", 1)[0]) if promoted else (read_verdict(refs[-1].uri) if refs else None)
        first, last, steps = _losses(runner.stage_work(stage) / "metrics.jsonl")
        scores = (verdict or {}).get("scores") or {}
        tasks = scores.get("tasks") or {}
        loss = f"{first:.3f}->{last:.3f}" if first is not None else "-"
        overall = f"{scores['overall']:.3f}" if "overall" in scores else "-"
        lines.append(f"{stage.name:<10} {steps:>5} {loss:>17} {overall:>8} " + " ".join(
            f"{_accuracy(tasks[t]):>9.3f}" if t in tasks else f"{'-':>9}" for t in TASKS))
        report = (verdict or {}).get("report") or {}
        step = ((verdict or {}).get("checkpoint") or {}).get("step")
        data["stages"][stage.name] = {"steps": steps, "loss_first": first, "loss_last": last, "scores": scores,
                                      "promoted": promoted and promoted["checkpoint_uri"],
                                      "report": _readable(report.get("html"), runner.stage_work(stage), step),
                                      "grid": _readable(report.get("grid"), runner.stage_work(stage), step),
                                      "loss_curve": _loss_curve(runner.stage_work(stage) / "metrics.jsonl"),
                                      "metrics": str(runner.stage_work(stage) / "metrics.jsonl")}
    pictures = [f"{name}: sample grid {stage['grid'] or '-'}\n{'':<{len(name)}}  gate report {stage['report'] or '-'}\n"
                f"{'':<{len(name)}}  loss curve  {stage['loss_curve'] or '-'}"
                for name, stage in data["stages"].items() if isinstance(stage, dict) and "loss_curve" in stage]
    if baseline:
        tasks = baseline.get("tasks", {})
        lines.append(f"{'untrained':<10} {0:>5} {'-':>17} {baseline['overall']:>8.3f} " + " ".join(
            f"{_accuracy(tasks[t]):>9.3f}" if t in tasks else f"{'-':>9}" for t in TASKS) + f"   (same prompts/detector as {baseline_stage})")
        data["baseline"] = baseline
    return "\n".join(lines + ["", *pictures]), data


def untrained_verdict(runner: PipelineRunner, stage, baseline: dict) -> str:
    """What the last stage's gate says of the untrained model (the same prompts and detector): the
    gate must reject it, or it could not tell training from none."""
    from deco.pipeline.evaluate.decision import decide
    from deco.pipeline.evaluate.gate_config import load_gate_config

    gate = load_gate_config(str(runner.cfg.resolve(stage.gate)), list(stage.gate_overrides))
    passed, reasons, _ = decide(baseline, gate.thresholds, None, "")
    verdict = "PASSES (the gate cannot tell it from training)" if passed else "rejected: " + "; ".join(reasons)
    baseline["gate_verdict"] = {"passed": passed, "reasons": reasons}
    return f"untrained model under {stage.name}'s gate: {verdict}"


def run_demo(out: str | Path = "runs/demo", overrides: list[str] = ()) -> int:
    out = Path(out).resolve()
    with demo_object_store(out) as root:
        cfg = load_pipeline(DEMO_PIPELINE, [f"root={root}", f"work_dir={out / 'work'}", *overrides])
        runner = PipelineRunner(cfg)
        last = [s for s in cfg.stages if s.kind == "train" and s.gate][-1]
        baseline = untrained_baseline(runner, last)
        record_untrained(runner.stage_uri(last), baseline)  # drawn beside the scores in its gate report
        try:
            runner.run()
        except PipelineStopped:  # where each stage stands; why it stopped is the CLI's one error line
            print(format_status(runner.status()), flush=True)
            raise
        table, data = summary_table(runner, baseline, last.name)
        status = format_status(runner.status())  # reads the store: before a DEMO_S3 server stops
    print("\n" + status + "\n\n" + table + "\n")
    trained = data["stages"][last.name].get("scores", {}).get("overall")
    print(f"\nGenEval (synthetic) of the final checkpoint: {trained}; untrained model: {baseline.get('overall')}")
    print(untrained_verdict(runner, last, baseline))
    (out / "work").mkdir(parents=True, exist_ok=True)
    (out / "work" / "demo_summary.json").write_text(json.dumps(data, indent=2, default=str))
    print(f"summary: {out / 'work' / 'demo_summary.json'}")
    return 0
