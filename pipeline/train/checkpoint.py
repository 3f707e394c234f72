"""Checkpoints of a training run: save every N steps and on SIGTERM, keep the last K, resume exactly
or on another number of ranks, and never trust a file that changed after it was written.

Inside a checkpoint prefix (<stage>/checkpoints/step_XXXXXXXX/, the contract of manifest.py):

    <ZeRO-3 state>           every rank: weights, optimizer and EMA partitions (orchestration/zero3
                             names and writes them; this module never looks inside)
    rng/rank_<r>.json        every rank: torch/numpy/python RNG states
    loader.json              streaming's resume state (global)
    trainer.json             step, samples seen, world size, batch...
    config.yaml              the run's full TrainConfig
    manifest.json            written LAST by rank 0: every file, its size and its checksum

A local stage is written in place; for an s3:// stage each rank writes to a local staging
directory and uploads its own files (multipart, retried). The manifest commits the checkpoint.
Before writing, every rank checks that the filesystem it writes to has room for its share; when it
has not, older checkpoints beyond keep_last - 1 are pruned first, and if that is not enough the run
stops with one line naming the location and the space needed, before writing anything.
Restoring fetches (S3) and verifies the checksum of every file a rank reads before any is used.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from deco.data.checksum import DiskFullError, HashingWriter
from deco.data.object_store import StorageError, is_s3, join, open_store
from deco.orchestration.zero3 import state as zero_state
from deco.pipeline.train.manifest import (MANIFEST, STEP_DIR, CheckpointError, CheckpointRef, Manifest,
                                          checkpoints_uri, complete_checkpoints, list_checkpoints, read_manifest, step_dir,
                                          verify_file, write_manifest)

log = logging.getLogger(__name__)

LOADER = "loader.json"
TRAINER = "trainer.json"
CONFIG = "config.yaml"
GIB = 2**30


@dataclass(kw_only=True)
class CheckpointConfig:
    every: int = 1000          # optimizer steps between checkpoints (0 = only at the end and on SIGTERM)
    keep_last: int = 3         # complete checkpoints kept (0 = all); the stage's promoted one is never deleted
    uri: str = ""              # stage URI (local path or s3://bucket/prefix); "" = the run directory
    on_sigterm: bool = True    # save before exiting when the job is told to stop
    upload_attempts: int = 3   # per file, on top of boto3's own retries

    def validate(self) -> None:
        if self.every < 0 or self.keep_last < 0 or self.upload_attempts < 1:
            raise ValueError("checkpoint.every and checkpoint.keep_last must be >= 0, upload_attempts >= 1")


def rng_key(rank: int) -> str:
    return f"rng/rank_{rank:05d}.json"


def resolve_resume(resume: str, stage_uri: str) -> list[CheckpointRef]:
    """Checkpoints to try, best first. `auto`: every complete checkpoint of the stage, newest first
    (a corrupt one is logged and skipped); a checkpoint URI: that one, which must be complete;
    `` or `none`: nothing."""
    if not resume or resume == "none":
        return []
    if resume == "auto":
        intact = [ref for ref, _ in complete_checkpoints(stage_uri)]
        if not intact and list_checkpoints(stage_uri):
            raise CheckpointError(no_intact_checkpoint(stage_uri, "every checkpoint with a manifest is corrupt"))
        return intact
    manifest = read_manifest(resume)
    if manifest is None:
        raise CheckpointError(f"{resume} has no {MANIFEST}: not a complete checkpoint")
    return [CheckpointRef(manifest.step, resume.rstrip("/"))]


def check_writable(stage_uri: str) -> None:
    """The stage's checkpoint location takes a write and a delete now, not at the first checkpoint."""
    where = checkpoints_uri(stage_uri)
    probe = f".write-probe-{socket.gethostname()}-{os.getpid()}"
    try:
        store = open_store(where)
        store.check(create=True)
        store.put_bytes(probe, b"deco")
        store.delete_prefix(probe)
    except Exception as err:  # StorageError, OSError, and boto3's errors (credentials, permissions) of many types
        raise StorageError(f"cannot write checkpoints to {where}: {err}") from None


def no_intact_checkpoint(stage_uri: str, why: str) -> str:
    return (f"no intact checkpoint in {stage_uri}: {why}; restore the files, or pass --resume none to start "
            f"over (the stage's checkpoints would then be overwritten)")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state().tolist(), "numpy": None, "python": None, "cuda": None}
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state["numpy"] = [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)]
    version, internal, gauss_next = random.getstate()
    state["python"] = [version, list(internal), gauss_next]
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def _gather(value):
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


class Checkpointer:
    def __init__(self, cfg: CheckpointConfig, stage_uri: str, run_dir: Path, rank: int, world_size: int,
                 local_rank: int):
        self.cfg, self.stage_uri, self.run_dir = cfg, stage_uri, Path(run_dir)
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.remote = is_s3(stage_uri)

    def _local_root(self, step: int, purpose: str) -> Path:
        if self.remote:
            return self.run_dir / purpose / step_dir(step)
        return Path(join(checkpoints_uri(self.stage_uri), step_dir(step)))

    # -- save ---------------------------------------------------------------------------------

    def save(self, step: int, engine, ema, loader_state: dict, trainer_state: dict, config_yaml: str) -> CheckpointRef:
        """Every rank calls. Returns when the checkpoint is committed (its manifest written)."""
        start = time.perf_counter()
        uri = join(checkpoints_uri(self.stage_uri), step_dir(step))
        if self.rank == 0:  # leftovers of a run killed while writing this step must not mix in
            open_store(uri).delete_prefix("")
        dist.barrier()
        root = self._local_root(step, "staging")
        self.ensure_space(step, zero_state.estimated_bytes(engine, ema is not None), f"checkpoint step {step}")
        checksums, error = {}, None
        try:
            root.mkdir(parents=True, exist_ok=True)
            checksums = zero_state.save_state(engine, ema, root, self.rank, self.world_size)
            files = {rng_key(self.rank): json.dumps(rng_state())}
            if self.rank == 0:
                files.update({LOADER: json.dumps(loader_state), TRAINER: json.dumps(trainer_state), CONFIG: config_yaml})
            for key, text in files.items():
                checksums[key] = _write_text(root / key, text)
        except DiskFullError as err:
            error = f"{err.strerror}; free space there or lower checkpoint.keep_last"
        except OSError as err:
            error = str(err)
        errors = [e for e in _gather(error) if e]
        if errors:
            self._abandon(uri, root)
            raise CheckpointError(f"checkpoint step {step} could not be written to {self._where(root)}: "
                                  f"{errors[0]}") from None
        sizes = {key: (root / key).stat().st_size for key in checksums}
        if self.remote:
            store = open_store(uri)
            for key in checksums:
                self._upload(store, key, root / key)
        gathered = _gather((sizes, checksums))
        if self.remote:
            shutil.rmtree(root, ignore_errors=True)
        if self.rank == 0:
            manifest = Manifest(step=step, world_size=self.world_size,
                                files={k: v for part, _ in gathered for k, v in part.items()},
                                checksums={k: v for _, part in gathered for k, v in part.items()}, extra=trainer_state)
            write_manifest(uri, manifest)
            self.prune(self.cfg.keep_last)
        dist.barrier()
        log.info("checkpoint step %d committed at %s in %.1fs", step, uri, time.perf_counter() - start)
        return CheckpointRef(step, uri)

    def _where(self, root: Path) -> str:
        return str(root) if self.remote else checkpoints_uri(self.stage_uri)

    def _abandon(self, uri: str, root: Path) -> None:
        """Remove what a failed save wrote, so the space is free again and nothing half-written stays."""
        if self.remote:
            shutil.rmtree(root, ignore_errors=True)
        dist.barrier()
        if self.rank == 0 and not self.remote:
            open_store(uri).delete_prefix("")
        dist.barrier()

    def ensure_space(self, step: int, need_here: int, what: str) -> None:
        """Every rank calls, before writing checkpoint `step` (`what` names it in messages). Checks
        free space where each rank writes (ranks that share a filesystem add up their shares);
        prunes old checkpoints when that helps; else one clear error."""
        for attempt in range(2):
            target = self._local_root(step, "staging")
            probe = _existing_ancestor(target)
            host_fs = (socket.gethostname(), os.stat(probe).st_dev)
            shares = _gather((host_fs, need_here))
            need = sum(n for fs, n in shares if fs == host_fs)
            free = shutil.disk_usage(probe).free
            short = [s for s in _gather((need > free, need, free, self._where(target))) if s[0]]
            if not short:
                return
            keep = max(self.cfg.keep_last - 1, 1)
            if attempt == 0 and not self.remote and self.cfg.keep_last != 0:
                if self.rank == 0:
                    pruned = self.prune(keep)
                    if pruned:
                        log.warning("low on space at %s: pruned checkpoints of steps %s before writing %s",
                                    short[0][3], pruned, what)
                dist.barrier()
                continue
            _, need, free, where = short[0]
            raise CheckpointError(f"not enough space for {what} at {where}: it needs about "
                                  f"{need / GIB:.2f} GiB, {free / GIB:.2f} GiB are free"
                                  f"{f' after keeping the newest {keep} checkpoints' if not self.remote else ''}; "
                                  f"free space there or lower checkpoint.keep_last")

    def _upload(self, store, key: str, path: Path) -> None:
        for attempt in range(1, self.cfg.upload_attempts + 1):
            try:
                store.put_file(key, path)  # multipart above 64 MiB, each part retried by boto3
                return
            except Exception as err:  # network errors come in many types; the last one is raised
                if attempt == self.cfg.upload_attempts:
                    raise StorageError(f"upload of {join(store.uri, key)} failed {attempt} times: {err}") from err
                log.warning("upload of %s failed (%s); retrying", key, err)
                time.sleep(2 ** attempt)

    def prune(self, keep_last: int) -> list[int]:
        """Keep the newest `keep_last` complete checkpoints (and the promoted one); remove older
        ones and unfinished leftovers older than the newest complete checkpoint. Returns the steps
        removed."""
        if keep_last == 0:
            return []
        complete = [ref for ref, _ in complete_checkpoints(self.stage_uri, newest_first=False)]
        if not complete:
            return []
        keep = {ref.step for ref in complete[-keep_last:]} | self._promoted_steps()
        store = open_store(checkpoints_uri(self.stage_uri))
        steps = {int(m.group(1)) for key in store.list() if (m := STEP_DIR.match(key.split("/")[0]))}
        removed = [step for step in sorted(steps) if step < complete[-1].step and step not in keep]
        for step in removed:
            store.delete_prefix(step_dir(step))
        return removed

    def _promoted_steps(self) -> set[int]:
        try:
            raw = open_store(self.stage_uri).get_bytes("promoted.json").decode()
        except FileNotFoundError:
            return set()
        # The gate's pointer names its checkpoint's step directory; whatever else it holds.
        return {int(m) for m in re.findall(r"step_(\d{8})", raw)}

    # -- restore ------------------------------------------------------------------------------

    def fetch_verified(self, ref: CheckpointRef) -> tuple[Manifest, Path, str | None]:
        """Every rank calls. Fetches (S3) and checksums the files this rank will read. Returns the
        manifest, the local root, and the first problem any rank met (None when all is intact)."""
        problem, manifest, root = None, None, Path(ref.uri)
        try:
            manifest = read_manifest(ref.uri)
            if manifest is None:
                raise CheckpointError(f"{ref.uri} has no {MANIFEST}")
            same_world = manifest.world_size == self.world_size
            keys = [*zero_state.restore_keys(manifest.files, self.rank, manifest.world_size, self.world_size),
                    LOADER, TRAINER, CONFIG] + ([rng_key(self.rank)] if same_world else [])
            # Elastic: each node's local rank 0 fetches every shard once for the node.
            mine = same_world or self.local_rank == 0
            root = self._fetch(ref, keys, fetch_here=mine)
            if mine:
                for key in keys:
                    verify_file(manifest, ref.uri, key, root / key)
        except (CheckpointError, FileNotFoundError, StorageError) as err:
            problem = str(err)
        problems = [p for p in _gather(problem) if p]
        return manifest, root, problems[0] if problems else None

    def restore(self, ref: CheckpointRef, manifest: Manifest, root: Path, engine, ema, loader) -> dict:
        """Every rank calls, after fetch_verified found the checkpoint intact. Loads weights,
        optimizer, EMA, loader and RNG; returns trainer.json."""
        trainer_state = json.loads((root / TRAINER).read_text())
        zero_state.restore_state(engine, ema, root, manifest.files, manifest.world_size, self.rank, self.world_size)
        if manifest.world_size == self.world_size:
            set_rng_state(json.loads((root / rng_key(self.rank)).read_text()))
        loader.load_state_dict(json.loads((root / LOADER).read_text()))
        dist.barrier()
        self.discard_fetched(ref, root)
        return trainer_state

    def discard_fetched(self, ref: CheckpointRef, root: Path) -> None:
        if is_s3(ref.uri) and self.local_rank == 0:
            shutil.rmtree(root, ignore_errors=True)

    def _fetch(self, ref: CheckpointRef, keys: list[str], fetch_here: bool) -> Path:
        if not is_s3(ref.uri):
            return Path(ref.uri)
        # Per node: the run directory may be on a file system that several nodes share.
        root = self.run_dir / "restore" / socket.gethostname() / step_dir(ref.step)
        if fetch_here:
            store = open_store(ref.uri)
            for key in keys:
                store.get_file(key, root / key)
        return root


def _existing_ancestor(path: Path) -> Path:
    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    return path


def _write_text(path: Path, text: str) -> str:
    """Write a small file; returns its checksum. A full disk is a DiskFullError naming the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = HashingWriter(path)
    try:
        writer.write(text.encode())
    except BaseException:
        writer.abandon()
        raise
    return writer.close()
