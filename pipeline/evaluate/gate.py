"""Stage gates: evaluate one complete checkpoint with GenEval, decide, record, promote.

Records in object storage (the layout of pipeline/train/manifest.py):

    <stage_uri>/checkpoints/step_N/gate_verdict.json   the verdict (created once: see create_exclusive)
    <stage_uri>/checkpoints/step_N/gate/report.html    self-contained HTML report
    <stage_uri>/checkpoints/step_N/gate/results.jsonl  per-image results (official fields)
    <stage_uri>/checkpoints/step_N/gate/summary.json   the GenEval summary
    <stage_uri>/checkpoints/step_N/gate/grid.png       fixed prompts x seeds, green/red by score
    <stage_uri>/promoted.json                          the stage's promoted checkpoint (read by the next stage)

Verdict (format deco-gate-verdict/1): stage, checkpoint {uri, step}, decision ("promote" | "reject"),
reasons (the failed checks in words, or why it could not be evaluated), checks [{check, metric, value,
threshold, passed, baseline (regressions)}] (see decision.py), scores {overall, tasks,
correct_images_fraction, total_images, total_prompts}, baseline (the promoted record it was compared
with: {stage, step, checkpoint_uri, overall}, or null), prompts {set, digest, count}, generation,
scoring, report {html, results, summary, wandb, grid}, thresholds, evaluation {watcher_id, attempt, host,
started_unix, finished_unix}, error (null, or why it was rejected unevaluated).

Promotion only moves forward: promoted.json names the newest promoted step; a passing checkpoint
older than it is recorded as passing but not promoted.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from deco.data.object_store import is_s3, join, open_store
from deco.pipeline.train.manifest import STEP_DIR, CheckpointError, CheckpointRef, read_manifest
from deco.pipeline.config import ConfigError, to_dict
from deco.pipeline.evaluate.decision import decide
from deco.pipeline.evaluate.gate_config import GateConfig, dump_gate_config

log = logging.getLogger(__name__)

VERDICT = "gate_verdict.json"
PROMOTED = "promoted.json"
GATE_DIR = "gate"
VERDICT_FORMAT = "deco-gate-verdict/1"
PROMOTED_FORMAT = "deco-gate-promoted/1"

WeightsFor = Callable[[CheckpointRef], Path]


class ClaimLost(RuntimeError):
    """A watcher's evaluation no longer owns its checkpoint (its claim was taken over, or another
    evaluation recorded the verdict first): its result is dropped, nothing is recorded."""


# ---- storage records ---------------------------------------------------------------------------

def create_exclusive(store, key: str, data: bytes) -> bool:
    """Write `key` only if it does not exist; True when this call created it. Atomic on a local
    directory (hard link of a complete temporary file) and on S3 (a conditional PUT, If-None-Match):
    the store's `put_if_absent`."""
    return store.put_if_absent(key, data)


def read_json(uri: str, key: str) -> dict | None:
    try:
        return json.loads(open_store(uri).get_bytes(key))
    except FileNotFoundError:
        return None
    except ValueError as err:
        raise CheckpointError(f"{join(uri, key)} is not valid JSON: {err}") from None


def read_verdict(checkpoint_uri: str) -> dict | None:
    return read_json(checkpoint_uri, VERDICT)


def read_promoted(stage_uri: str) -> dict | None:
    return read_json(stage_uri, PROMOTED)


def promoted_checkpoint(stage_uri: str) -> CheckpointRef | None:
    """The checkpoint the next stage starts from: the promoted one, verified complete."""
    record = read_promoted(stage_uri)
    if record is None:
        return None
    ref = CheckpointRef(record["step"], record["checkpoint_uri"])
    if read_manifest(ref.uri) is None:
        raise CheckpointError(f"{stage_uri}/{PROMOTED} names {ref.uri}, which has no manifest")
    return ref


def regression_baseline(stage_uri: str, ref: CheckpointRef, baseline_uri: str = "") -> dict | None:
    """The promoted record whose scores `ref` must not fall behind: the stage's own last promoted
    checkpoint; before the stage has one (or when `ref` is it), the promoted checkpoint of the stage
    it started from (`baseline_uri`, the pipeline's init_from), so a new stage cannot lose what the
    last one reached."""
    current = read_promoted(stage_uri)
    if current is not None and current["step"] != ref.step:
        return current
    return read_promoted(baseline_uri) if baseline_uri else None


def checkpoint_ref(checkpoint_uri: str) -> tuple[str, CheckpointRef]:
    """(stage_uri, ref) of `<stage_uri>/checkpoints/step_XXXXXXXX`."""
    uri = str(checkpoint_uri).rstrip("/")
    if not is_s3(uri):
        uri = str(Path(uri).resolve())
    parent, _, name = uri.rpartition("/")
    match = STEP_DIR.match(name)
    stage, _, folder = parent.rpartition("/")
    if not match or folder != "checkpoints":
        raise ConfigError(f"{checkpoint_uri} is not a checkpoint: expected <stage_uri>/checkpoints/step_XXXXXXXX")
    return stage, CheckpointRef(int(match.group(1)), uri)


def promote(stage_uri: str, stage: str, ref: CheckpointRef, verdict: dict) -> dict:
    """Point the stage's promoted.json at `ref` unless it already names this or a newer step."""
    current = read_promoted(stage_uri)
    if current is not None and current["step"] >= ref.step:
        if current["step"] > ref.step:
            log.info("step %d passed but step %d is already promoted: promotion only moves forward",
                     ref.step, current["step"])
        return current
    record = {"format": PROMOTED_FORMAT, "stage": stage, "step": ref.step, "checkpoint_uri": ref.uri,
              "verdict_uri": join(ref.uri, VERDICT), "overall": verdict["scores"]["overall"],
              "tasks": verdict["scores"]["tasks"], "prompts_digest": verdict["prompts"]["digest"],
              "promoted_unix": time.time(),
              "previous": None if current is None else {"step": current["step"], "checkpoint_uri": current["checkpoint_uri"]}}
    open_store(stage_uri).put_bytes(PROMOTED, json.dumps(record, indent=2).encode())
    log.info("promoted %s (overall %.4f)", ref.uri, record["overall"])
    return record


# ---- one evaluation ----------------------------------------------------------------------------

def weights_resolver(cfg: GateConfig) -> WeightsFor:
    """The default `weights_for`: weights.source=export goes through the trainer's
    deco.pipeline.train.export.export_checkpoint (EMA weights); weights.source=file downloads a weights
    file the checkpoint already holds (weights.key)."""
    def local_path(ref: CheckpointRef) -> Path:
        return work_dir(cfg, ref) / "weights.safetensors"

    def from_file(ref: CheckpointRef) -> Path:
        return open_store(ref.uri).get_file(cfg.weights.key, local_path(ref))

    def from_export(ref: CheckpointRef) -> Path:
        try:
            from deco.pipeline.train.export import export_checkpoint
        except ImportError as err:
            raise ConfigError(f"weights.source=export needs deco.pipeline.train.export.export_checkpoint ({err})") from None
        return Path(export_checkpoint(ref.uri, local_path(ref), ema=cfg.weights.ema))

    return from_file if cfg.weights.source == "file" else from_export


def work_dir(cfg: GateConfig, ref: CheckpointRef) -> Path:
    """Local scratch of one evaluation: <work_dir>/<stage>-<hash of the stage URI>/step_N."""
    stage_key = hashlib.sha256(ref.uri.rpartition("/checkpoints/")[0].encode()).hexdigest()[:8]
    return Path(cfg.work_dir) / f"{cfg.stage or 'stage'}-{stage_key}" / f"step_{ref.step:08d}"


def _generate(cfg: GateConfig, weights: Path, prompts, prompts_file: Path, images: Path) -> dict:
    from deco.pipeline.evaluate.geneval.generate import generate_layout

    if cfg.generation.nproc == 1:
        return generate_layout(weights, prompts, images, cfg.generation)
    # One process per GPU, through torchrun: generation is most of a gate's time.
    config_file = dump_gate_config(cfg, images.parent / "gate_config.yaml")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cfg.generation.nproc}",
               "-m", "deco.pipeline.cli", "geneval", "generate", "--weights", str(weights), "--prompts",
               str(prompts_file), "--out", str(images), "--config", str(config_file)]
    start = time.perf_counter()
    subprocess.run(command, check=True)
    return {"world_size": cfg.generation.nproc, "seconds": round(time.perf_counter() - start, 2),
            "images": len(prompts) * cfg.generation.images_per_prompt}


def evaluate_checkpoint(checkpoint_uri: str, cfg: GateConfig, weights_for: WeightsFor | None = None,
                        detector=None, watcher_id: str = "manual", attempt: int = 1, force: bool = False,
                        owns: Callable[[], bool] | None = None) -> dict:
    """Generate, score, report, decide and record one checkpoint; returns its verdict.

    The verdict is created exclusively: when another evaluation recorded one first, that one is
    returned and this one's result is dropped (unless force, which overwrites: a deliberate re-run).
    `owns` (the watcher's claim check) is asked before anything is recorded; when it says no, or when
    another verdict was recorded first, ClaimLost is raised instead.
    """
    from deco.pipeline.evaluate.geneval.detectors import build_detector
    from deco.pipeline.evaluate.geneval.prompts import prompts_digest, resolve_prompts, write_prompts
    from deco.pipeline.evaluate.compare import reference_scores
    from deco.pipeline.evaluate.geneval.grid import write_sample_grid
    from deco.pipeline.evaluate.geneval.report import log_to_wandb, write_html_report
    from deco.pipeline.evaluate.geneval.score import score_images, write_results
    from deco.pipeline.evaluate.geneval.summary import summarize, write_summary

    stage_uri, ref = checkpoint_ref(checkpoint_uri)
    started = time.time()
    if read_manifest(ref.uri, verify_files=True) is None:
        raise CheckpointError(f"{ref.uri} has no manifest: an unfinished checkpoint is never evaluated")
    local = work_dir(cfg, ref)
    images = local / "images"
    local.mkdir(parents=True, exist_ok=True)
    prompts = resolve_prompts(cfg.prompts, cfg.synthetic_per_task, cfg.synthetic_seed)
    prompts_file = write_prompts([p.metadata for p in prompts], local / "prompts.jsonl")
    weights = (weights_for or weights_resolver(cfg))(ref)
    generation = _generate(cfg, Path(weights), prompts, prompts_file, images)

    score_start = time.perf_counter()
    detector = detector or build_detector(cfg.detector)
    results = score_images(images, detector)
    score_seconds = time.perf_counter() - score_start
    summary = summarize(results)
    write_results(results, local / "results.jsonl")
    write_summary(summary, local / "summary.json")
    title = f"GenEval gate: {cfg.stage or stage_uri} step {ref.step}"
    _check_owner(owns, ref)  # a watcher taken over must not overwrite the new owner's reports
    store = open_store(ref.uri)
    report = {"html": None, "results": join(ref.uri, GATE_DIR, "results.jsonl"),
              "summary": join(ref.uri, GATE_DIR, "summary.json"), "wandb": None,
              "grid": join(ref.uri, GATE_DIR, "grid.png")}
    # From the images already generated and scored: the grid costs no sampling.
    grid = write_sample_grid(results, local / "grid.png", f"{title} · overall {summary['overall']:.3f}")
    store.put_file(f"{GATE_DIR}/grid.png", grid)
    if cfg.report.html:
        write_html_report(results, summary, local / "report.html", title, cfg.report.thumbnail, grid=grid,
                          compare=reference_scores(ref.uri), label=f"{cfg.stage or 'this checkpoint'} step {ref.step}")
        store.put_file(f"{GATE_DIR}/report.html", local / "report.html")
        report["html"] = join(ref.uri, GATE_DIR, "report.html")
    if cfg.report.wandb:
        report["wandb"] = log_to_wandb(results, summary, project=cfg.report.wandb_project,
                                       name=f"{cfg.stage or 'stage'}-step{ref.step}", directory=local / "wandb",
                                       config={"stage": cfg.stage, "checkpoint": ref.uri}, step=ref.step, grid=grid)
    store.put_file(f"{GATE_DIR}/results.jsonl", local / "results.jsonl")
    store.put_file(f"{GATE_DIR}/summary.json", local / "summary.json")

    digest = prompts_digest(prompts)
    baseline = regression_baseline(stage_uri, ref, cfg.baseline_uri)
    passed, reasons, checks = decide(summary, cfg.thresholds, baseline, digest)
    verdict = {
        "format": VERDICT_FORMAT, "stage": cfg.stage, "checkpoint": {"uri": ref.uri, "step": ref.step},
        "decision": "promote" if passed else "reject", "reasons": reasons, "checks": checks,
        "scores": {"overall": summary["overall"], "tasks": {t: v["accuracy"] for t, v in summary["tasks"].items()},
                   "correct_images_fraction": summary["correct_images_fraction"],
                   "total_images": summary["total_images"], "total_prompts": summary["total_prompts"]},
        "baseline": None if baseline is None else {k: baseline.get(k) for k in ("stage", "step", "checkpoint_uri", "overall")},
        "prompts": {"set": cfg.prompts, "digest": digest, "count": len(prompts)},
        "generation": generation,
        "scoring": {"detector": detector.name, "seconds": round(score_seconds, 2),
                    "images_per_s": round(len(results) / max(score_seconds, 1e-9), 2)},
        "report": report, "thresholds": to_dict(cfg.thresholds),
        "evaluation": {"watcher_id": watcher_id, "attempt": attempt, "host": socket.gethostname(),
                       "started_unix": started, "finished_unix": time.time()},
        "error": None,
    }
    verdict = record_verdict(stage_uri, cfg, ref, verdict, force, owns)
    if not cfg.keep_images:
        shutil.rmtree(images, ignore_errors=True)
    Path(local / "weights.safetensors").unlink(missing_ok=True)  # re-exportable, and large
    return verdict


def _check_owner(owns: Callable[[], bool] | None, ref: CheckpointRef) -> None:
    if owns is not None and not owns():
        raise ClaimLost(f"{ref.uri}: this evaluation's claim was taken over by another watcher (its heartbeat "
                        "went stale): dropping its result")


def record_verdict(stage_uri: str, cfg: GateConfig, ref: CheckpointRef, verdict: dict, force: bool = False,
                   owns: Callable[[], bool] | None = None) -> dict:
    """Create the verdict (once), then promote when it says so; returns the verdict that stands.
    With `owns` (a watcher's evaluation): ClaimLost when the claim was lost or the verdict exists."""
    data = json.dumps(verdict, indent=2).encode()
    store = open_store(ref.uri)
    if force:
        store.put_bytes(VERDICT, data)
    else:
        _check_owner(owns, ref)
        if not create_exclusive(store, VERDICT, data):
            if owns is not None:
                raise ClaimLost(f"{ref.uri} already has a verdict, recorded by another evaluation: dropping this one's")
            log.warning("%s already has a verdict: keeping it, dropping this evaluation's", ref.uri)
            verdict = read_verdict(ref.uri)
    if verdict["decision"] == "promote":
        promote(stage_uri, cfg.stage, ref, verdict)
    return verdict


def reject_unevaluable(checkpoint_uri: str, cfg: GateConfig, error: str, watcher_id: str, attempt: int) -> dict:
    """Record a reject verdict for a checkpoint that cannot be evaluated (corrupt, or failing)."""
    stage_uri, ref = checkpoint_ref(checkpoint_uri)
    now = time.time()
    verdict = {"format": VERDICT_FORMAT, "stage": cfg.stage, "checkpoint": {"uri": ref.uri, "step": ref.step},
               "decision": "reject", "reasons": [error], "checks": [], "scores": None, "baseline": None,
               "prompts": None, "generation": None, "scoring": None, "report": None,
               "thresholds": to_dict(cfg.thresholds),
               "evaluation": {"watcher_id": watcher_id, "attempt": attempt, "host": socket.gethostname(),
                              "started_unix": now, "finished_unix": now},
               "error": error}
    return record_verdict(stage_uri, cfg, ref, verdict)


def reconcile_promotion(stage_uri: str, stage: str, verdicts: dict[int, dict]) -> None:
    """Finish a promotion that a crash cut between the verdict and promoted.json."""
    passed = [v for v in verdicts.values() if v.get("decision") == "promote"]
    if not passed:
        return
    newest = max(passed, key=lambda v: v["checkpoint"]["step"])
    current = read_promoted(stage_uri)
    if current is None or current["step"] < newest["checkpoint"]["step"]:
        promote(stage_uri, stage, CheckpointRef(newest["checkpoint"]["step"], newest["checkpoint"]["uri"]), newest)
