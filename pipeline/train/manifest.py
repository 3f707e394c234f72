"""The checkpoint contract shared by the trainer, the exporter, the gates and the staged pipeline.

Layout of a training stage in object storage (local directory or s3://):

    <stage_uri>/checkpoints/step_00001000/...          files written by every rank
    <stage_uri>/checkpoints/step_00001000/manifest.json written LAST, by rank 0
    <stage_uri>/checkpoints/step_00001000/gate_verdict.json   the gate's record (not in the manifest)
    <stage_uri>/promoted.json                           the stage's promoted-checkpoint pointer

The manifest lists every file with its size and checksum (xxh3_128, computed while the file was
written). A checkpoint is complete only when its manifest exists and every file it lists is present
with the listed size; whoever reads a file verifies its checksum before using it. Without a
manifest a checkpoint is unfinished and ignored; with a manifest that cannot be parsed, or files
missing, truncated or failing their checksum, it is corrupt: CheckpointError, one line naming it.
`--resume auto` and the gates skip a corrupt checkpoint for the newest intact one, and say so.
"""
from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from deco.data.checksum import file_checksum
from deco.data.errors import ExpectedError
from deco.data.object_store import join, open_store

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "deco-checkpoint/2"
FORMATS = ("deco-checkpoint/1", FORMAT)     # /1: sizes only, written before checksums existed
STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(ExpectedError, RuntimeError):
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
    checksums: dict[str, str] = field(default_factory=dict)   # key -> "xxh3_128:<hex>"
    format: str = FORMAT
    created_unix: float = field(default_factory=time.time)
    extra: dict = field(default_factory=dict)  # trainer's own facts: samples seen, config digest...


@dataclass(frozen=True)
class CheckpointRef:
    step: int
    uri: str                              # the checkpoint prefix, e.g. s3://b/run/checkpoints/step_00000020


def write_manifest(checkpoint_uri: str, manifest: Manifest) -> None:
    """Call after every file of the checkpoint is durable in storage: this commits it."""
    unlisted = set(manifest.files) ^ set(manifest.checksums)
    if unlisted:
        raise ValueError(f"manifest of {checkpoint_uri}: files without checksums or the reverse: {sorted(unlisted)[:3]}")
    open_store(checkpoint_uri).put_bytes(MANIFEST, json.dumps(asdict(manifest), indent=2).encode())


def read_manifest(checkpoint_uri: str, verify_files: bool = True) -> Manifest | None:
    """None when no manifest (an unfinished checkpoint); CheckpointError when it is corrupt."""
    store = open_store(checkpoint_uri)
    try:
        raw = store.get_bytes(MANIFEST)
    except FileNotFoundError:
        return None
    try:
        manifest = Manifest(**json.loads(raw))
        if not isinstance(manifest.files, dict) or not isinstance(manifest.checksums, dict):
            raise TypeError("files and checksums must be mappings")
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{join(checkpoint_uri, MANIFEST)} is corrupt: {err}") from None
    if manifest.format not in FORMATS:
        raise CheckpointError(f"{checkpoint_uri}: unknown checkpoint format {manifest.format!r}")
    if manifest.format == FORMAT and set(manifest.checksums) != set(manifest.files):
        raise CheckpointError(f"{join(checkpoint_uri, MANIFEST)} is corrupt: its checksums do not cover its files")
    if verify_files:
        present = store.list_sizes()
        missing = [k for k, size in manifest.files.items() if present.get(k) != size]
        if missing:
            raise CheckpointError(f"{checkpoint_uri} is corrupt: {len(missing)} listed files missing or "
                                  f"of the wrong size, e.g. {missing[:3]}")
    return manifest


def verify_file(manifest: Manifest, checkpoint_uri: str, key: str, path: str | Path) -> None:
    """Raise CheckpointError unless the local copy `path` of `key` has the manifest's size and checksum."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size != manifest.files.get(key):
        raise CheckpointError(f"{join(checkpoint_uri, key)} is corrupt: missing or not {manifest.files.get(key)} bytes")
    expected = manifest.checksums.get(key)
    if expected is None:   # a deco-checkpoint/1 manifest: sizes are all it recorded
        return
    if file_checksum(path) != expected:
        raise CheckpointError(f"{join(checkpoint_uri, key)} is corrupt: its checksum does not match the manifest "
                              f"(the file changed after it was written)")


def list_checkpoints(stage_uri: str) -> list[CheckpointRef]:
    """All checkpoint prefixes that have a manifest file, oldest first (contents not verified)."""
    root = checkpoints_uri(stage_uri)
    steps = set()
    for key in open_store(root).list():
        parts = key.split("/")
        if len(parts) == 2 and parts[1] == MANIFEST and STEP_DIR.match(parts[0]):
            steps.add(int(STEP_DIR.match(parts[0]).group(1)))
    return [CheckpointRef(step, join(root, step_dir(step))) for step in sorted(steps)]


def complete_checkpoints(stage_uri: str, newest_first: bool = True):
    """(ref, manifest) of every checkpoint whose manifest is sound and whose files are all there
    with their sizes; a corrupt one is logged and skipped."""
    refs = list_checkpoints(stage_uri)
    for ref in reversed(refs) if newest_first else refs:
        try:
            manifest = read_manifest(ref.uri)
        except CheckpointError as err:
            log.warning("skipping a corrupt checkpoint: %s", err)
            continue
        if manifest is not None:
            yield ref, manifest


def latest_complete(stage_uri: str) -> CheckpointRef | None:
    """The newest checkpoint with a sound manifest and all its files; corrupt newer ones are skipped
    (logged). None when there is none."""
    return next((ref for ref, _ in complete_checkpoints(stage_uri)), None)
