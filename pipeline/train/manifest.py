"""The checkpoint contract shared by the trainer, the exporter, the gates and the staged pipeline.

Layout of a training stage in object storage (local directory or s3://):

    <stage_uri>/checkpoints/step_00001000/...          files written by every rank
    <stage_uri>/checkpoints/step_00001000/manifest.json written LAST, by rank 0
    <stage_uri>/checkpoints/step_00001000/gate_verdict.json   the gate's record (not in the manifest)
    <stage_uri>/promoted.json                           the stage's promoted-checkpoint pointer

A checkpoint is complete only when its manifest exists and every file it lists is present with the
listed size; anything else is ignored by `--resume auto`, the gate watcher and promotion. A
manifest that exists but cannot be parsed, or lists missing files, is corrupt: CheckpointError.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field

from deco.data.object_store import join, open_store

MANIFEST = "manifest.json"
FORMAT = "deco-checkpoint/1"
STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    pass


def step_dir(step: int) -> str:
    return f"step_{step:08d}"


def checkpoints_uri(stage_uri: str) -> str:
    return join(stage_uri, "checkpoints")


@dataclass(kw_only=True)
class Manifest:
    step: int
    world_size: int
    files: dict[str, int]                 # key relative to the checkpoint prefix -> size in bytes
    format: str = FORMAT
    created_unix: float = field(default_factory=time.time)
    extra: dict = field(default_factory=dict)  # trainer's own facts: samples seen, config digest...


@dataclass(frozen=True)
class CheckpointRef:
    step: int
    uri: str                              # the checkpoint prefix, e.g. s3://b/run/checkpoints/step_00000020


def write_manifest(checkpoint_uri: str, manifest: Manifest) -> None:
    """Call after every file of the checkpoint is durable in storage: this commits it."""
    open_store(checkpoint_uri).put_bytes(MANIFEST, json.dumps(asdict(manifest), indent=2).encode())


def read_manifest(checkpoint_uri: str, verify_files: bool = True) -> Manifest | None:
    """None when no manifest (an unfinished checkpoint); CheckpointError when it is corrupt."""
    store = open_store(checkpoint_uri)
    try:
        raw = store.get_bytes(MANIFEST)
    except FileNotFoundError:
        return None
    try:
        data = json.loads(raw)
        manifest = Manifest(**data)
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{join(checkpoint_uri, MANIFEST)} is corrupt: {err}") from None
    if manifest.format != FORMAT:
        raise CheckpointError(f"{checkpoint_uri}: unknown checkpoint format {manifest.format!r}")
    if verify_files:
        present = store.list_sizes()
        missing = [k for k, size in manifest.files.items() if present.get(k) != size]
        if missing:
            raise CheckpointError(f"{checkpoint_uri} is corrupt: {len(missing)} listed files missing or "
                                  f"of the wrong size, e.g. {missing[:3]}")
    return manifest


def list_checkpoints(stage_uri: str) -> list[CheckpointRef]:
    """All checkpoint prefixes that have a manifest file, oldest first (contents not verified)."""
    root = checkpoints_uri(stage_uri)
    steps = set()
    for key in open_store(root).list():
        parts = key.split("/")
        if len(parts) == 2 and parts[1] == MANIFEST and STEP_DIR.match(parts[0]):
            steps.add(int(STEP_DIR.match(parts[0]).group(1)))
    return [CheckpointRef(step, join(root, step_dir(step))) for step in sorted(steps)]


def latest_complete(stage_uri: str) -> CheckpointRef | None:
    """The newest checkpoint with a valid manifest; a corrupt newest one is an error, not skipped."""
    refs = list_checkpoints(stage_uri)
    if not refs:
        return None
    newest = refs[-1]
    read_manifest(newest.uri)  # raises CheckpointError when corrupt
    return newest
