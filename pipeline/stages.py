"""`deco pipeline run|status`: the staged pipeline (curate -> train -> gate -> next resolution).

Each stage runs through the same CLI a user runs by hand (curation on Ray, training through the
launcher, gates through the watcher), as a child process whose death takes nothing with it: every
stage is resumable on its own, and the pipeline records a stage's completion in object storage
(<root>/_pipeline/<stage>.json) only when it has fully finished, so a rerun after any interruption
continues at the first unfinished stage and never redoes a finished one.

A stage that cannot go on stops the pipeline with one line (cli/main.py prints it): StageFailed (its
command exited non-zero), StageRejected (its gate promoted none of its checkpoints) or StageBlocked
(what it starts from is missing). A failed or rejected stage is recorded as such and redone by the
next run (training resumes: raise max_steps to train longer; a verdict recorded by hand with
`deco gate run --force` is picked up); the stages after it wait.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from deco.data.errors import ExpectedError
from deco.data.object_store import join, open_store
from deco.pipeline.train.manifest import list_checkpoints
from deco.pipeline.config import ConfigError, load_tree, apply_overrides, from_dict
from deco.pipeline.stages_config import PipelineConfig, StageConfig

log = logging.getLogger(__name__)
RECORDS = "_pipeline"


class PipelineStopped(ExpectedError):
    """The pipeline cannot go on; the message says which stage, why, and where to look."""

    state = "blocked"  # what `deco pipeline status` shows for the stage

    def __init__(self, message: str, why: str = "", outputs: dict | None = None):
        super().__init__(message)
        self.why, self.outputs = why or message, outputs or {}


class StageBlocked(PipelineStopped):
    """A stage cannot start: what it needs from an earlier stage is missing."""

    exit_code = 3


class StageRejected(PipelineStopped):
    """A train stage's gate promoted none of its checkpoints: the newest one's failed checks."""

    state, exit_code = "rejected", 3


class StageFailed(PipelineStopped):
    """A stage's command exited non-zero (its own error line is in the message) or left no result."""

    state, exit_code = "failed", 1


def load_pipeline(path: str | Path, overrides: list[str] = ()) -> PipelineConfig:
    tree, prov = load_tree(path)
    apply_overrides(tree, prov, overrides)
    tree["source"] = str(Path(path).resolve())
    cfg = from_dict(PipelineConfig, tree, source=str(path))
    # What would stop a later stage hours in is said now, before the first one starts.
    for stage in cfg.stages:
        for key in ("config", "gate"):
            value = getattr(stage, key)
            if value and "://" not in value and not Path(cfg.resolve(value)).is_file():
                raise ConfigError(f"{path}: stage {stage.name!r}: {key} file not found: {cfg.resolve(value)}")
        if stage.init_from and not cfg.stage(stage.init_from).gate:
            raise ConfigError(f"{path}: stage {stage.name!r} starts from the promoted checkpoint of "
                              f"{stage.init_from!r}, which has no gate to promote one: give {stage.init_from!r} a `gate`")
    return cfg


def _set_parent_death_signal() -> None:
    # Linux: a stage's process group gets SIGKILL if the pipeline process dies, so an interrupted
    # pipeline leaves no orphan training ranks holding ports and files.
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class PipelineRunner:
    def __init__(self, cfg: PipelineConfig, python: str = sys.executable):
        self.cfg, self.python = cfg, python
        self.root = cfg.root if "://" in cfg.root else str(Path(cfg.root).resolve())
        self.work = Path(cfg.work_dir or Path("runs") / cfg.name).resolve()
        self.store = open_store(self.root)

    # ---- where things are -------------------------------------------------------------------
    def stage_uri(self, stage: StageConfig) -> str:
        return join(self.root, stage.name)

    def stage_work(self, stage: StageConfig) -> Path:
        return self.work / stage.name

    def record(self, stage: StageConfig) -> dict | None:
        try:
            return json.loads(self.store.get_bytes(f"{RECORDS}/{stage.name}.json"))
        except FileNotFoundError:
            return None

    def _write_record(self, stage: StageConfig, record: dict) -> None:
        self.store.put_bytes(f"{RECORDS}/{stage.name}.json", json.dumps(record, indent=2).encode())

    # ---- running ----------------------------------------------------------------------------
    def run(self) -> list[dict]:
        self.store.check(create=True)
        records = []
        for stage in self.cfg.stages:
            record = self.record(stage)
            if record and record.get("status") == "done":
                print(f"[pipeline] {stage.name}: done earlier, skipped", flush=True)
                records.append(record)
                continue
            self._check_ready(stage)
            attempt = (record or {}).get("attempt", 0) + 1
            started = time.time()
            self._write_record(stage, {"name": stage.name, "kind": stage.kind, "status": "running",
                                       "attempt": attempt, "started_unix": started})
            print(f"[pipeline] {stage.name}: {stage.kind} (attempt {attempt})", flush=True)
            try:
                outputs = getattr(self, f"_run_{stage.kind}")(stage)
            except (ExpectedError, OSError) as err:  # recorded: status says why, and the next run redoes it
                stopped = err if isinstance(err, PipelineStopped) else StageFailed(f"stage {stage.name} failed: {err}")
                self._write_record(stage, {"name": stage.name, "kind": stage.kind, "status": stopped.state,
                                           "attempt": attempt, "started_unix": started, "finished_unix": time.time(),
                                           "why": stopped.why, "error": str(stopped), "outputs": stopped.outputs})
                if stopped is err:
                    raise
                raise stopped from err
            record = {"name": stage.name, "kind": stage.kind, "status": "done", "attempt": attempt,
                      "started_unix": started, "finished_unix": time.time(), "outputs": outputs}
            self._write_record(stage, record)
            records.append(record)
        return records

    def _cli(self, stage: StageConfig, *args: str) -> None:
        """Run `deco ARGS` for a stage, its output teed to <work>/<stage>/<command>.log."""
        log_dir = self.stage_work(stage)
        log_dir.mkdir(parents=True, exist_ok=True)
        command = [self.python, "-m", "deco.pipeline.cli", *args]
        log_path = log_dir / f"{args[0]}.log"
        said = ""
        with open(log_path, "a") as log_file:
            log_file.write(f"$ {' '.join(command)}\n")
            log_file.flush()
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                       preexec_fn=_set_parent_death_signal, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            for line in process.stdout:
                log_file.write(line)
                print(f"  {stage.name} | {line}", end="", flush=True)
                if line.startswith("deco: error: "):
                    said = line[len("deco: error: "):].strip()  # the command's own one-line reason
            code = process.wait()
        if code != 0:
            name = " ".join(itertools.takewhile(lambda a: not a.startswith("-"), args))
            how = f"exited with {code}" if code > 0 else f"was killed by signal {-code}"
            why = f"`deco {name}` {how}" + (f": {said}" if said else "")
            raise StageFailed(f"stage {stage.name} failed: {why} (log {log_path})", why)

    def _run_synth(self, stage: StageConfig) -> dict:
        out = self.stage_uri(stage)
        self._cli(stage, "data", "synth", "--out", out, "--n", str(stage.samples), "--seed", str(stage.seed),
                  "--format", stage.format, "--bad-fraction", str(stage.bad_fraction))
        return {"uri": out}

    def _run_curate(self, stage: StageConfig) -> dict:
        inputs = [self.stage_uri(self.cfg.stage(i)) if "://" not in i and not i.startswith(("/", ".")) else i
                  for i in stage.inputs]
        out = self.stage_uri(stage)
        args = ["curate", "--config", self.cfg.resolve(stage.config), "--output", out]
        for uri in inputs:
            args += ["--input", uri]
        for item in stage.overrides:
            args += ["--set", item]
        self._cli(stage, *args)
        report = json.loads(open_store(out).get_bytes("curation_report.json"))
        return {"uri": out, "samples_in": report.get("samples_in"), "samples_kept": report.get("samples_kept")}

    def _check_ready(self, stage: StageConfig) -> None:
        """Raise StageBlocked before a stage starts when an earlier stage did not give what it needs
        (run() stops at a rejected stage; this catches a promotion gone since, e.g. a deleted promoted.json)."""
        if stage.kind != "train" or not stage.init_from:
            return
        from deco.pipeline.evaluate.gate import promoted_checkpoint  # imports torch: only where needed

        previous = self.cfg.stage(stage.init_from)
        if promoted_checkpoint(self.stage_uri(previous)) is None:
            why = f"waits for {previous.name}: {self._no_promotion(previous)}"
            raise StageBlocked(f"stage {stage.name} cannot start: it {why}; fix {previous.name}'s gate or train it "
                               "longer, then rerun", why)

    def _no_promotion(self, stage: StageConfig) -> str:
        """Why a gated stage has no promoted checkpoint, from its newest checkpoint's verdict."""
        from deco.pipeline.evaluate.decision import short_rejection
        from deco.pipeline.evaluate.gate import read_verdict

        refs = list_checkpoints(self.stage_uri(stage))
        if not refs:
            return "it has no checkpoint"
        verdict = read_verdict(refs[-1].uri)
        if verdict is None:
            return f"step {refs[-1].step} has no gate verdict"
        return f"promoted no checkpoint ({short_rejection(verdict)})"

    def _gate_outcome(self, stage: StageConfig, outputs: dict) -> None:
        """After a stage's gate: StageRejected when it promoted nothing (the newest checkpoint's
        failed checks, value against threshold, and its report), StageFailed when it could not judge."""
        from deco.pipeline.evaluate.decision import rejection_line, short_rejection
        from deco.pipeline.evaluate.gate import read_verdict

        refs = list_checkpoints(self.stage_uri(stage))
        if not refs:
            raise StageFailed(f"stage {stage.name} failed: training wrote no complete checkpoint to gate "
                              f"(log {self.stage_work(stage) / 'train.log'})", "no checkpoint to gate", outputs)
        verdict = read_verdict(refs[-1].uri)
        if verdict is None:  # the watcher's evaluation failed; --once leaves it to the next run
            why = f"the gate could not evaluate step {refs[-1].step}"
            raise StageFailed(f"stage {stage.name} failed: {why} (log {self.stage_work(stage) / 'gate.log'}); "
                              "rerun to retry", why, outputs)
        raise StageRejected(f"stage {stage.name} rejected: {rejection_line(verdict)}", short_rejection(verdict), outputs)

    def _init_weights(self, stage: StageConfig) -> str:
        """EMA weights of the `init_from` stage's promoted checkpoint, exported once for this stage."""
        from deco.pipeline.train.export import export_checkpoint
        from deco.pipeline.evaluate.gate import promoted_checkpoint

        previous = self.cfg.stage(stage.init_from)
        ref = promoted_checkpoint(self.stage_uri(previous))
        # Keyed by the checkpoint's URI as well: the same work dir may serve another `root`.
        digest = hashlib.sha256(ref.uri.encode()).hexdigest()[:8]
        path = self.stage_work(stage) / f"init_{previous.name}_step{ref.step}_{digest}_ema.safetensors"
        if not path.exists():
            export_checkpoint(ref.uri, path, ema=True)
        return str(path)

    def _run_train(self, stage: StageConfig) -> dict:
        from deco.pipeline.evaluate.gate import read_promoted

        data = self.stage_uri(self.cfg.stage(stage.data_from))
        out = self.stage_uri(stage)
        args = ["train", "--config", self.cfg.resolve(stage.config), "--nproc", str(stage.nproc),
                "--run-dir", str(self.stage_work(stage)), "--data", data, "--resume", "auto",
                "--set", f"checkpoint.uri={out}"]
        if stage.resolution:
            args += ["--set", f"data.resolution={stage.resolution}", "--set", f"model.resolution={stage.resolution}"]
        if stage.init_from:
            args += ["--set", f"init_from={self._init_weights(stage)}"]
        for item in stage.overrides:
            args += ["--set", item]
        self._cli(stage, *args)
        outputs = {"uri": out, "checkpoints": [c.step for c in list_checkpoints(out)]}
        if stage.gate:
            gate = ["gate", "watch", "--stage", stage.name, "--stage-uri", out,
                    "--config", self.cfg.resolve(stage.gate), "--once",
                    "--set", f"work_dir={self.stage_work(stage) / 'gate'}"]
            if stage.init_from:  # regression checks against what the stage it started from reached
                gate += ["--set", f"baseline_uri={self.stage_uri(self.cfg.stage(stage.init_from))}"]
            for item in stage.gate_overrides:
                gate += ["--set", item]
            self._cli(stage, *gate)
            promoted = read_promoted(out)
            outputs["promoted_step"] = promoted["step"] if promoted else None
            if promoted is None:
                self._gate_outcome(stage, outputs)
        return outputs

    # ---- status -----------------------------------------------------------------------------
    def status(self) -> list[dict]:
        """Each stage's state, checkpoints with gate verdicts, and promoted checkpoint."""
        from deco.pipeline.evaluate.gate import read_promoted, read_verdict

        rows = []
        blocked_by = None  # the first stage that stopped the pipeline: every stage after it waits for it
        for stage in self.cfg.stages:
            record = self.record(stage) or {}
            state = record.get("status", "pending")
            if state == "running":
                state = "interrupted"  # a live run would be the one writing; a rerun resumes it
            row = {"stage": stage.name, "kind": stage.kind, "state": state, "attempt": record.get("attempt", 0)}
            if state in ("failed", "rejected"):
                row["why"] = record.get("why")
                blocked_by = blocked_by or f"{stage.name} ({state})"
            elif state == "pending" and blocked_by:
                row.update(state="blocked", why=f"waits for {blocked_by}")
            if stage.kind == "train":
                uri = self.stage_uri(stage)
                checkpoints = []
                for ref in list_checkpoints(uri):
                    verdict = read_verdict(ref.uri)
                    checkpoints.append({"step": ref.step, "uri": ref.uri,
                                        "decision": verdict["decision"] if verdict else None,
                                        "overall": (verdict.get("scores") or {}).get("overall") if verdict else None})
                promoted = read_promoted(uri)
                row.update(checkpoints=checkpoints, promoted=promoted["checkpoint_uri"] if promoted else None)
                if stage.init_from and row["state"] == "pending":
                    previous = self.cfg.stage(stage.init_from)
                    if (self.record(previous) or {}).get("status") == "done" and not read_promoted(self.stage_uri(previous)):
                        row.update(state="blocked", why=f"waits for {previous.name}: {self._no_promotion(previous)}")
                        blocked_by = blocked_by or f"{stage.name} (blocked)"
            elif record.get("outputs"):
                row["outputs"] = record["outputs"]
            rows.append(row)
        return rows


def format_status(rows: list[dict]) -> str:
    lines = [f"{'stage':<18} {'kind':<7} {'state':<12} {'checkpoints (decision overall)':<44} promoted"]
    for row in rows:
        checkpoints = " ".join(
            f"{c['step']}({c['decision'] or '-'}{'' if c['overall'] is None else ' %.3f' % c['overall']})"
            for c in row.get("checkpoints", [])) or "-"
        promoted = row.get("promoted") or ("-" if row["kind"] == "train" else "")
        lines.append(f"{row['stage']:<18} {row['kind']:<7} {row['state']:<12} {checkpoints:<44} {promoted}")
        if row.get("why"):  # under its row: a rejection's checks would push the columns off the screen
            lines.append(f"{'':<18} {'':<7} {row['state']}: {row['why']}")
    return "\n".join(lines)
