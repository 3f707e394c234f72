"""Shard output of curation, and the staging files a partition leaves between passes.

Output layout under the output prefix (local path or s3://bucket/prefix), the contract of
data/shard_schema.py:

    <output>/<res>/index.json                  merged MDS index of the resolution (what StreamingDataset reads)
    <output>/<res>/pNNNNN/index.json           one partition's MDS index
    <output>/<res>/pNNNNN/shard.NNNNN.mds.zstd its shards (MDSWriter, zstd, size limit)
  or, with output.format: webdataset
    <output>/<res>/pNNNNN-NNNNN.tar            <key>.jpg|png, <key>.txt, <key>.json (+ <key>.text_emb.npy)
    <output>/<res>/index.wids.json             wids shard list: url (relative) and nsamples per tar

Partition files are written to a local temporary directory and uploaded shards first, index last,
so a partition directory with an index is whole. Writing the same samples again produces the
same bytes (MDS and tar output are deterministic: fixed order, fixed tar mtime).
"""
from __future__ import annotations

import io
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from deco.data.object_store import open_store


@dataclass(kw_only=True)
class ShardOutputConfig:
    uri: str = ""  # local path or s3://bucket/prefix
    format: Literal["mds", "webdataset"] = "mds"
    compression: str = "zstd"   # MDS compression: "zstd", "zstd:<level>", or "" for none
    size_limit_mb: float = 64.0  # per shard, before compression
    keep_staging: bool = False   # keep <output>/_work/stage after a successful run

    def validate(self) -> None:
        if self.size_limit_mb <= 0:
            raise ValueError(f"output.size_limit_mb must be > 0, got {self.size_limit_mb}")

    @property
    def size_limit_bytes(self) -> int:
        return max(1024, int(self.size_limit_mb * 2**20))


def partition_dir(resolution: int, partition: str) -> str:
    return f"{resolution}/{partition}"


def _upload_dir(store, local: Path, prefix: str, last: str | None) -> list[str]:
    """Upload every file of `local` under `prefix`, the file named `last` after all others."""
    files = sorted(p for p in local.iterdir() if p.is_file())
    files.sort(key=lambda p: p.name == last)
    for path in files:
        store.put_file(f"{prefix}/{path.name}", path)
    return [p.name for p in files]


def write_mds_partition(output_uri: str, partition: str, samples: Iterable[dict], resolutions: list[int],
                        cfg: ShardOutputConfig, with_text_emb: bool) -> dict[int, dict]:
    """Write one partition's samples as one MDS dataset per resolution; returns per-resolution stats.

    Each sample: id, caption, orig_width, orig_height, images {res: bytes} (+ text_emb, text_emb_dim).
    """
    from streaming import MDSWriter

    from deco.data import shard_schema

    store = open_store(output_uri)
    columns = shard_schema.columns(with_text_emb)
    stats = {r: {"samples": 0, "shards": 0, "bytes": 0} for r in resolutions}
    with tempfile.TemporaryDirectory(prefix="deco-mds-") as tmp:
        writers = {r: MDSWriter(out=str(Path(tmp) / str(r)), columns=columns, compression=cfg.compression or None,
                                size_limit=cfg.size_limit_bytes, exist_ok=True) for r in resolutions}
        try:
            for sample in samples:
                for r, writer in writers.items():
                    row = {"id": sample["id"], "image": sample["images"][r], "caption": sample["caption"],
                           "width": r, "height": r, "orig_width": sample["orig_width"], "orig_height": sample["orig_height"]}
                    if with_text_emb:
                        row["text_emb"], row["text_emb_dim"] = sample["text_emb"], sample["text_emb_dim"]
                    writer.write(row)
                    stats[r]["samples"] += 1
        finally:
            for writer in writers.values():
                writer.finish()
        for r in resolutions:
            local = Path(tmp) / str(r)
            index = json.loads((local / "index.json").read_text())
            stats[r]["shards"] = len(index["shards"])
            stats[r]["bytes"] = sum((s.get("zip_data") or s["raw_data"])["bytes"] for s in index["shards"])
            _upload_dir(store, local, partition_dir(r, partition), last="index.json")
    return stats


def merge_mds_index(output_uri: str, resolution: int, partitions: list[str]) -> dict:
    """Write <res>/index.json listing every partition's shards, as streaming's merge_index does."""
    store = open_store(output_uri)
    shards = []
    for partition in partitions:
        index = json.loads(store.get_bytes(f"{partition_dir(resolution, partition)}/index.json"))
        for shard in index["shards"]:
            for key in ("raw_data", "zip_data", "raw_meta", "zip_meta"):
                if shard.get(key):
                    shard[key]["basename"] = f"{partition}/{shard[key]['basename']}"
            shards.append(shard)
    merged = {"version": 2, "shards": shards}
    store.put_bytes(f"{resolution}/index.json", json.dumps(merged, sort_keys=True).encode())
    return merged


def write_webdataset_partition(output_uri: str, partition: str, samples: Iterable[dict], resolutions: list[int],
                               cfg: ShardOutputConfig, with_text_emb: bool, image_ext: str) -> dict[int, dict]:
    """Tar shards per resolution, rolled over at the size limit. Keys are `<partition>_<n>` (webdataset
    keys cannot hold dots); the sample id is in the .json member."""
    from webdataset import TarWriter

    from deco.data import shard_schema

    store = open_store(output_uri)
    stats = {r: {"samples": 0, "shards": 0, "bytes": 0, "tars": []} for r in resolutions}
    with tempfile.TemporaryDirectory(prefix="deco-wds-") as tmp:
        state = {r: {"writer": None, "size": 0} for r in resolutions}

        def roll(r: int) -> None:
            current = state[r]
            if current["writer"] is not None:
                current["writer"].close()
            name = f"{partition}-{stats[r]['shards']:05d}.tar"
            stats[r]["shards"] += 1
            stats[r]["tars"].append({"url": name, "nsamples": 0})
            current["writer"], current["size"] = TarWriter(str(Path(tmp) / str(r) / name), mtime=0.0, encoder=False), 0

        for r in resolutions:
            (Path(tmp) / str(r)).mkdir()
        for n, sample in enumerate(samples):
            for r in resolutions:
                meta = {"id": sample["id"], "width": r, "height": r,
                        "orig_width": sample["orig_width"], "orig_height": sample["orig_height"]}
                record = {"__key__": f"{partition}_{n:06d}", image_ext: sample["images"][r],
                          "txt": sample["caption"].encode("utf-8"), "json": json.dumps(meta, sort_keys=True).encode()}
                if with_text_emb:
                    buffer = io.BytesIO()
                    features = shard_schema.decode_text_emb(sample["text_emb"], sample["text_emb_dim"])
                    np.save(buffer, features.float().numpy(), allow_pickle=False)
                    record["text_emb.npy"] = buffer.getvalue()
                size = sum(len(v) for k, v in record.items() if k != "__key__")
                if state[r]["writer"] is None or (state[r]["size"] + size > cfg.size_limit_bytes and state[r]["size"]):
                    roll(r)
                state[r]["writer"].write(record)
                state[r]["size"] += size
                stats[r]["tars"][-1]["nsamples"] += 1
                stats[r]["samples"] += 1
        for r in resolutions:
            if state[r]["writer"] is not None:
                state[r]["writer"].close()
            local = Path(tmp) / str(r)
            stats[r]["bytes"] = sum(p.stat().st_size for p in local.iterdir())
            for path in sorted(local.iterdir()):
                store.put_file(f"{r}/{path.name}", path)
    return stats


def write_wids_index(output_uri: str, resolution: int, tars: list[dict]) -> dict:
    index = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": f"deco-{resolution}", "shardlist": tars}
    open_store(output_uri).put_bytes(f"{resolution}/index.wids.json", json.dumps(index, sort_keys=True).encode())
    return index


# ------------------------------------------------------------------------------------------------
# Staging: what a partition's first pass leaves for the job-wide dedup and the write pass
# ------------------------------------------------------------------------------------------------

KEYS_SCHEMA = pa.schema([("id", pa.string()), ("exact_key", pa.binary(32)), ("phash", pa.uint64())])
REJECTS_SCHEMA = pa.schema([("id", pa.string()), ("reason", pa.string()), ("detail", pa.string())])


def samples_schema(resolutions: list[int]) -> pa.Schema:
    fields = [("id", pa.string()), ("caption", pa.string()), ("orig_width", pa.int32()), ("orig_height", pa.int32())]
    return pa.schema(fields + [(f"image_{r}", pa.binary()) for r in resolutions])


def table_bytes(rows: list[dict], schema: pa.Schema) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buffer, compression="zstd")
    return buffer.getvalue()


def read_table(data: bytes, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(io.BytesIO(data), columns=columns)


def staged_samples(table: pa.Table, resolutions: list[int], drop: set[str]) -> Iterable[dict]:
    """Rows of a staged samples table as writer samples, skipping ids in `drop`."""
    for row in table.to_pylist():
        if row["id"] in drop:
            continue
        yield {"id": row["id"], "caption": row["caption"], "orig_width": row["orig_width"],
               "orig_height": row["orig_height"], "images": {r: row[f"image_{r}"] for r in resolutions}}


# Samples per row group of a staged samples file: the stage pass holds one row group of encoded
# images at a time, the write pass reads one at a time, so neither holds a whole partition.
SAMPLES_ROW_GROUP = 32


class StagedSamplesWriter:
    """A partition's staged samples streamed into a local parquet file, one row group at a time,
    then uploaded once (`upload`). The encoded images are stored as they are, uncompressed and
    without dictionaries or statistics: JPEG and PNG bytes do not compress, and zstd over them only
    costs CPU in both passes. Use as a context manager: the local file is removed on exit."""

    def __init__(self, resolutions: list[int], row_group: int = SAMPLES_ROW_GROUP):
        self.schema, self.row_group, self.count, self._rows = samples_schema(resolutions), row_group, 0, []
        images = [name for name in self.schema.names if name.startswith("image_")]
        handle, self.path = tempfile.mkstemp(prefix="deco-stage-", suffix=".parquet")
        os.close(handle)
        self._writer = pq.ParquetWriter(
            self.path, self.schema, compression={n: "none" if n in images else "zstd" for n in self.schema.names},
            use_dictionary=[n for n in self.schema.names if n not in images],
            write_statistics=[n for n in self.schema.names if n not in images])

    def add(self, row: dict) -> None:
        self._rows.append(row)
        self.count += 1
        if len(self._rows) >= self.row_group:
            self._flush()

    def _flush(self) -> None:
        if self._rows:
            self._writer.write_table(pa.Table.from_pylist(self._rows, schema=self.schema))
            self._rows = []

    def upload(self, store, key: str) -> None:
        self._flush()
        self._writer.close()
        store.put_file(key, self.path)

    def __enter__(self) -> "StagedSamplesWriter":
        return self

    def __exit__(self, *exc) -> None:
        self._writer.close()  # idempotent
        Path(self.path).unlink(missing_ok=True)


def read_staged_samples(handle, resolutions: list[int], drop: set[str]) -> Iterator[dict]:
    """Writer samples from a staged samples file (a seekable binary handle), one row group in memory
    at a time, skipping ids in `drop`."""
    reader = pq.ParquetFile(handle)
    for group in range(reader.num_row_groups):
        yield from staged_samples(reader.read_row_group(group), resolutions, drop)
