"""`deco pipeline run|status`: the staged pipeline (curate -> train -> gate -> next resolution).

Each stage runs through the same CLI a user runs by hand (curation on Ray, training through the
launcher, gates through the watcher), as a child process whose death takes nothing with it: every
stage is resumable on its own, and the pipeline records a stage's completion in object storage
(<root>/_pipeline/<stage>.json) only when it has fully finished, so a rerun after any interruption
continues at the first unfinished stage and never redoes a finished one.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from deco.data.object_store import join, open_store
from deco.pipeline.train.manifest import list_checkpoints
from deco.pipeline.config import ConfigError, load_tree, apply_overrides, from_dict
from deco.pipeline.stages_config import PipelineConfig, StageConfig

log = logging.getLogger(__name__)
RECORDS = "_pipeline"


class StageBlocked(RuntimeError):
    """A stage cannot start: what it needs from an earlier stage is missing. The message says why."""


def load_pipeline(path: str | Path, overrides: list[str] = ()) -> PipelineConfig:
    tree, prov = load_tree(path)
    apply_overrides(tree, prov, overrides)
    tree["source"] = str(Path(path).resolve())
    cfg = from_dict(PipelineConfig, tree, source=str(path))
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
            outputs = getattr(self, f"_run_{stage.kind}")(stage)
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
        with open(log_path, "a") as log_file:
            log_file.write(f"$ {' '.join(command)}\n")
            log_file.flush()
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                       preexec_fn=_set_parent_death_signal, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            for line in process.stdout:
                log_file.write(line)
                print(f"  {stage.name} | {line}", end="", flush=True)
            code = process.wait()
        if code != 0:
            raise RuntimeError(f"stage {stage.name!r}: `deco {' '.join(args)}` exited with {code}; log: {log_path}")

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
        """Raise StageBlocked before a stage starts when an earlier stage did not give what it needs."""
        from deco.pipeline.evaluate.gate import promoted_checkpoint, read_verdict

        if stage.kind != "train" or not stage.init_from:
            return
        previous = self.cfg.stage(stage.init_from)
        if promoted_checkpoint(self.stage_uri(previous)) is None:
            verdicts = [read_verdict(c.uri) for c in list_checkpoints(self.stage_uri(previous))]
            why = "; ".join(f"step {v['checkpoint']['step']}: {v['decision']} ({', '.join(v.get('reasons') or [])})"
                            for v in verdicts if v) or "no checkpoint was gated"
            raise StageBlocked(f"stage {stage.name!r} cannot start: stage {previous.name!r} has promoted no "
                               f"checkpoint ({why}). Fix the gate or train longer, then rerun.")

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
            for item in stage.gate_overrides:
                gate += ["--set", item]
            self._cli(stage, *gate)
            promoted = read_promoted(out)
            outputs["promoted_step"] = promoted["step"] if promoted else None
        return outputs

    # ---- status -----------------------------------------------------------------------------
    def status(self) -> list[dict]:
        """Each stage's state, checkpoints with gate verdicts, and promoted checkpoint."""
        from deco.pipeline.evaluate.gate import read_promoted, read_verdict

        rows, blocked_by = [], None
        for stage in self.cfg.stages:
            record = self.record(stage) or {}
            state = record.get("status", "pending")
            if state == "running":
                state = "interrupted"  # a live run would be the one writing; a rerun resumes it
            row = {"stage": stage.name, "kind": stage.kind, "state": state, "attempt": record.get("attempt", 0)}
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
                if stage.init_from and state == "pending":
                    previous = self.cfg.stage(stage.init_from)
                    if (self.record(previous) or {}).get("status") == "done" and not read_promoted(self.stage_uri(previous)):
                        row["state"] = blocked_by = "blocked"
                        row["why"] = f"{previous.name} promoted no checkpoint"
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
        state = row["state"] + (f": {row['why']}" if row.get("why") else "")
        lines.append(f"{row['stage']:<18} {row['kind']:<7} {state:<12} {checkpoints:<44} {promoted}")
    return "\n".join(lines)
