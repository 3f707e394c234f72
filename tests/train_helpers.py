"""Test data generation and run helpers for the training tests (not a test module).

`write_mds` writes small MDS datasets that follow data/shard_schema.py exactly, from the synthetic
shapes, with streaming's own MDSWriter: the layout curation produces, made here so the trainer's
tests do not depend on curation.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY_CPU = ROOT / "configs" / "train" / "tiny_cpu.yaml"


def write_mds(out_root: str | Path, count: int, resolution: int, seed: int = 0, *, prefix: str = "s",
              text_encoder=None, corrupt_ids: tuple[str, ...] = (), size_limit: int = 1 << 14) -> Path:
    """Write `<out_root>/<resolution>/` as curation would: PNG bytes, captions, sizes, and, when a
    text encoder is given, the bf16 text-embedding cache of the valid tokens."""
    from streaming import MDSWriter

    from deco.data.shard_schema import columns, encode_text_emb
    from deco.data.synthetic import synthetic_pairs

    out = Path(out_root) / str(resolution)
    pairs = synthetic_pairs(count, resolution, seed)
    with MDSWriter(out=str(out), columns=columns(text_encoder is not None), compression="zstd",
                   size_limit=size_limit) as writer:
        for index, (image, caption) in enumerate(pairs):
            sample_id = f"{prefix}{index:05d}"
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            raw = buffer.getvalue()
            if sample_id in corrupt_ids:
                raw = raw[: len(raw) // 3]  # a truncated file: bit rot after curation
            row = {"id": sample_id, "image": raw, "caption": caption, "width": resolution, "height": resolution,
                   "orig_width": resolution, "orig_height": resolution}
            if text_encoder is not None:
                features, mask = text_encoder.encode([caption])
                row["text_emb"] = encode_text_emb(features[0][mask[0]])
                row["text_emb_dim"] = int(features.shape[-1])
            writer.write(row)
    return out


def write_bucketed_mds(out_root: str | Path, resolution: int, counts: dict[tuple[int, int], int], seed: int = 0,
                       *, prefix: str = "s", size_limit: int = 1 << 14) -> dict[str, tuple[int, int]]:
    """Write `<out_root>/<resolution>/b<H>x<W>/` per (H, W) bucket and its buckets.json, as curation
    with transform.crop: buckets does: the synthetic shapes at 1.5x the resolution, scaled to cover
    each bucket and centre-cropped. Ids run on across the buckets; returns id -> (H, W)."""
    from streaming import MDSWriter

    from deco.data.buckets import stream_key, write_bucket_index
    from deco.data.object_store import open_store
    from deco.data.shard_schema import columns
    from deco.data.synthetic import synthetic_pairs
    from deco.data.transforms import resize_cover_crop

    pairs, where = iter(synthetic_pairs(sum(counts.values()), resolution * 3 // 2, seed)), {}
    for (height, width), count in counts.items():
        with MDSWriter(out=str(Path(out_root) / stream_key(resolution, (height, width))), columns=columns(False),
                       compression="zstd", size_limit=size_limit) as writer:
            for _ in range(count):
                image, caption = next(pairs)
                sample_id = f"{prefix}{len(where):05d}"
                where[sample_id] = (height, width)
                buffer = io.BytesIO()
                resize_cover_crop(image, height, width).save(buffer, format="PNG")
                writer.write({"id": sample_id, "image": buffer.getvalue(), "caption": caption, "width": width,
                              "height": height, "orig_width": image.width, "orig_height": image.height})
    write_bucket_index(open_store(str(out_root)), resolution, counts)
    return where


def upload_dir(local: str | Path, uri: str) -> str:
    from deco.data.object_store import open_store

    store = open_store(uri)
    for path in sorted(Path(local).rglob("*")):
        if path.is_file():
            store.put_file(str(path.relative_to(local)).replace(os.sep, "/"), path)
    return uri


def run_deco(*args: str, timeout: float = 300, env: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", **(env or {})}
    return subprocess.run([sys.executable, "-m", "deco.pipeline.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=cwd)


def start_deco(*args: str, log_path: Path, env: dict | None = None) -> subprocess.Popen:
    """Start `deco ...` in its own session, so the test can kill the whole job like a node failure."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", **(env or {})}
    log = open(log_path, "w")
    return subprocess.Popen([sys.executable, "-m", "deco.pipeline.cli", *args], stdout=log, stderr=subprocess.STDOUT,
                            env=full_env, cwd=ROOT, start_new_session=True)


def read_jsonl(path: str | Path) -> list[dict]:
    """Records of a JSONL log; a half-written last line (a killed writer) is left out."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def last_per_step(records: list[dict]) -> dict[int, dict]:
    """A resumed run appends again the steps after its checkpoint: the last record of a step wins."""
    return {r["step"]: r for r in records}


def local_checkpoint(uri: str, into: Path) -> Path:
    """The checkpoint's files on local disk (downloaded when it lives in S3)."""
    from deco.data.object_store import is_s3, open_store

    if not is_s3(uri):
        return Path(uri)
    store = open_store(uri)
    for key in store.list():
        store.get_file(key, into / key)
    return into


def checkpoint_tensors(uri: str, into: Path) -> dict:
    """Full fp32 weights, Adam moments, Adam step and EMA of a checkpoint, by parameter name."""
    from deco.orchestration.zero3.state import full_state
    from deco.pipeline.train.manifest import read_manifest

    manifest = read_manifest(uri)
    root = local_checkpoint(uri, into)
    tensors = full_state(root, manifest.files, manifest.world_size, moments=True, ema=True)
    return {"world_size": manifest.world_size, "step": manifest.step, **tensors}
