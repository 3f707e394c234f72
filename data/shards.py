"""Shard output of curation, and the staging files a partition leaves between passes.

Output layout under the output prefix (local path or s3://bucket/prefix), the contract of
data/shard_schema.py:

    <output>/<res>/index.json                  merged MDS index of the resolution (what StreamingDataset reads)
    <output>/<res>/pNNNNN/index.json           one partition's MDS index
    <output>/<res>/pNNNNN/shard.NNNNN.mds.zstd its shards (MDSWriter, zstd, size limit)
  or, with output.format: webdataset
    <output>/<res>/pNNNNN-NNNNN.tar            <key>.jpg|png, <key>.txt, <key>.json (+ <key>.text_emb.npy)
    <output>/<res>/index.wids.json             wids shard list: url (relative) and nsamples per tar
    <output>/kept/pNNNNN.parquet               the kept index: id, position and provenance of every
                                               sample the partition's shards hold, in shard order
  with transform.crop: buckets (MDS only), <res>/ above is one folder per aspect-ratio bucket,
  <res>/b<H>x<W>/, listed with its size in <res>/buckets.json (data/buckets.py)

Partition files are written to a local temporary directory and uploaded shards first, index last,
so a partition directory with an index is whole. Writing the same samples again produces the
same bytes (MDS and tar output are deterministic: fixed order, fixed tar mtime).
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
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


def partition_dir(resolution: int | str, partition: str) -> str:
    """`resolution`: a resolution, or a bucket's <res>/b<H>x<W> (buckets.stream_key)."""
    return f"{resolution}/{partition}"


def _upload_dir(store, local: Path, prefix: str, last: str | None) -> list[str]:
    """Upload every file of `local` under `prefix`, the file named `last` after all others."""
    files = sorted(p for p in local.iterdir() if p.is_file())
    files.sort(key=lambda p: p.name == last)
    for path in files:
        store.put_file(f"{prefix}/{path.name}", path)
    return [p.name for p in files]


def write_mds_partition(output_uri: str, partition: str, samples: Iterable[dict], resolutions: list[int],
                        cfg: ShardOutputConfig, with_text_emb: bool,
                        provenance: dict[str, str] | None = None,
                        buckets: dict[int, list[tuple[int, int]]] | None = None) -> dict[int | str, dict]:
    """Write one partition's samples as one MDS dataset per resolution, or with `buckets` ((H, W)
    sizes per resolution) one per bucket; returns stats per resolution or per bucket's <res>/b<H>x<W>.

    Each sample: id, caption, orig_width, orig_height, images {res: bytes} (+ text_emb, text_emb_dim),
    provenance {column: value} (typed for `provenance`, column -> type: data/metadata.py).
    """
    from streaming import MDSWriter

    from deco.data import shard_schema
    from deco.data.buckets import encoded_size, stream_key

    store = open_store(output_uri)
    columns = shard_schema.columns(with_text_emb, provenance)
    # Every bucket gets a dataset, an empty one too: each partition then has every bucket's index.
    streams = {(r, (r, r)): r for r in resolutions} if buckets is None else \
        {(r, size): stream_key(r, size) for r in resolutions for size in buckets[r]}
    stats = {key: {"samples": 0, "shards": 0, "bytes": 0} for key in streams.values()}
    with tempfile.TemporaryDirectory(prefix="deco-mds-") as tmp:
        writers = {key: MDSWriter(out=str(Path(tmp) / str(key)), columns=columns, compression=cfg.compression or None,
                                  size_limit=cfg.size_limit_bytes, exist_ok=True) for key in streams.values()}
        try:
            for sample in samples:
                for r in resolutions:
                    # the bucket is the size the stage pass cropped to, read back from the image header
                    size = (r, r) if buckets is None else encoded_size(sample["images"][r])
                    if (r, size) not in streams:
                        raise ValueError(f"sample {sample['id']}: its {r} px image is {size[0]}x{size[1]} (HxW), "
                                         f"none of the configured buckets {buckets[r]}")
                    key = streams[(r, size)]
                    row = {"id": sample["id"], "image": sample["images"][r], "caption": sample["caption"],
                           "width": size[1], "height": size[0], "orig_width": sample["orig_width"],
                           "orig_height": sample["orig_height"]}
                    if with_text_emb:
                        row["text_emb"], row["text_emb_dim"] = sample["text_emb"], sample["text_emb_dim"]
                    row.update(provenance_values(sample, provenance))
                    writers[key].write(row)
                    stats[key]["samples"] += 1
        finally:
            for writer in writers.values():
                writer.finish()
        for key in streams.values():
            local = Path(tmp) / str(key)
            index = json.loads((local / "index.json").read_text())
            stats[key]["shards"] = len(index["shards"])
            stats[key]["bytes"] = sum((s.get("zip_data") or s["raw_data"])["bytes"] for s in index["shards"])
            _upload_dir(store, local, partition_dir(key, partition), last="index.json")
    return stats



def provenance_values(sample: dict, types: dict[str, str] | None) -> dict:
    """The sample's value for each provenance column (a sample staged without one gets the type's
    missing value)."""
    from deco.data.metadata import typed

    given = sample.get("provenance") or {}
    return {name: given[name] if name in given else typed(None, kind) for name, kind in (types or {}).items()}


def merge_mds_index(output_uri: str, resolution: int | str, partitions: list[str]) -> dict:
    """Write <res>/index.json (or a bucket's <res>/b<H>x<W>/index.json) listing every partition's
    shards, as streaming's merge_index does."""
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


# A rewritten shard gets a new name (the digest of its bytes): a reader's cache never serves the old
# bytes under it. `stem` is the writer's name without that digest and the extensions.
_SHARD_NAME = re.compile(r"^(?P<stem>.+?)(?:\.[0-9a-f]{10})?\.mds(?:\..+)?$")


def _mds_samples(raw: bytes) -> tuple[bytes, list[bytes]]:
    """(the config bytes, every sample's bytes) of an MDS shard file, streaming's layout: the sample
    count (uint32), count + 1 offsets (uint32), the config JSON, the samples."""
    count = int(np.frombuffer(raw[:4], np.uint32)[0])
    offsets = np.frombuffer(raw[4:8 + 4 * count], np.uint32).astype(np.int64)
    return raw[8 + 4 * count:offsets[0]], [raw[offsets[i]:offsets[i + 1]] for i in range(count)]


def _mds_shard(config: bytes, samples: list[bytes]) -> bytes:
    """An MDS shard file of these samples, as MDSWriter encodes one."""
    offsets = np.cumsum([0] + [len(s) for s in samples]).astype(np.uint32) + 4 + 4 * (len(samples) + 1) + len(config)
    return np.uint32(len(samples)).tobytes() + offsets.tobytes() + config + b"".join(samples)


def drop_mds_samples(store, prefix: str, ids: set[str]) -> tuple[dict, dict[str, int], list[str]]:
    """Remove the samples with these ids from the MDS dataset in `prefix` (a partition's folder).
    Only the shards holding one are rewritten: the other samples' bytes as they were, the file
    under a new name (uploaded here), the index entry updated; a shard left empty is dropped.
    Returns (the new index, for the caller to write; samples removed per shard; files it no longer
    lists, for the caller to delete once every index points past them)."""
    from streaming.base.compression import compress, decompress, get_compression_extension
    from streaming.base.format import reader_from_json
    from streaming.base.hashing import get_hash

    def info(name: str, data: bytes, hashes: list[str]) -> dict:
        return {"basename": name, "bytes": len(data), "hashes": {algo: get_hash(algo, data) for algo in hashes}}

    index = json.loads(store.get_bytes(f"{prefix}/index.json"))
    entries, removed, obsolete = [], {}, []
    for entry in index["shards"]:
        zipped = entry.get("zip_data")
        data = store.get_bytes(f"{prefix}/{(zipped or entry['raw_data'])['basename']}")
        raw = decompress(entry["compression"], data) if zipped else data
        reader = reader_from_json("", None, entry)  # only its column layout is used, to read the ids
        config, samples = _mds_samples(raw)
        kept = [s for s in samples if reader.decode_sample(s)["id"] not in ids]
        if len(kept) == len(samples):
            entries.append(entry)
            continue
        removed[entry["raw_data"]["basename"]] = len(samples) - len(kept)
        obsolete += [i["basename"] for i in (entry["raw_data"], zipped) if i]
        if not kept:
            continue
        raw = _mds_shard(config, kept)
        name = f"{_SHARD_NAME.match(entry['raw_data']['basename'])['stem']}.{hashlib.sha256(raw).hexdigest()[:10]}.mds"
        new = dict(entry, samples=len(kept), raw_data=info(name, raw, entry["hashes"]), zip_data=None)
        if zipped:
            data = compress(entry["compression"], raw)
            new["zip_data"] = info(f"{name}.{get_compression_extension(entry['compression'])}", data, entry["hashes"])
        store.put_bytes(f"{prefix}/{(new['zip_data'] or new['raw_data'])['basename']}", data if zipped else raw)
        entries.append(new)
    return {**index, "shards": entries}, removed, obsolete


def replace_merged_entries(merged: dict, partition: str, entries: list[dict]) -> dict:
    """The merged index (merge_mds_index's) with `partition`'s shards replaced by `entries` (its
    own index's) in place: what merge_mds_index would write from the partitions' indexes."""
    prefixed = []
    for shard in entries:
        shard = json.loads(json.dumps(shard))
        for key in ("raw_data", "zip_data", "raw_meta", "zip_meta"):
            if shard.get(key):
                shard[key]["basename"] = f"{partition}/{shard[key]['basename']}"
        prefixed.append(shard)
    shards, placed = [], False
    for shard in merged["shards"]:
        if shard["raw_data"]["basename"].startswith(f"{partition}/"):
            shards.extend([] if placed else prefixed)
            placed = True
        else:
            shards.append(shard)
    return {**merged, "shards": shards if placed else shards + prefixed}


def write_webdataset_partition(output_uri: str, partition: str, samples: Iterable[dict], resolutions: list[int],
                               cfg: ShardOutputConfig, with_text_emb: bool, image_ext: str,
                               provenance: dict[str, str] | None = None) -> dict[int, dict]:
    """Tar shards per resolution, rolled over at the size limit. Keys are `<partition>_<n>` (webdataset
    keys cannot hold dots); the sample id and its provenance are in the .json member."""
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
                meta.update({k: None if isinstance(v, float) and math.isnan(v) else v  # NaN is no JSON
                             for k, v in provenance_values(sample, provenance).items()})
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

# url: so that a takedown by URL also holds for inputs added later (pipeline/curate/takedown.py)
KEYS_SCHEMA = pa.schema([("id", pa.string()), ("exact_key", pa.binary(32)), ("phash", pa.uint64()),
                         ("url", pa.string())])
REJECTS_SCHEMA = pa.schema([("id", pa.string()), ("reason", pa.string()), ("detail", pa.string())])


def samples_schema(resolutions: list[int]) -> pa.Schema:
    """Staged samples: `position` in the partition's input order, `provenance` as JSON text."""
    fields = [("id", pa.string()), ("caption", pa.string()), ("orig_width", pa.int32()), ("orig_height", pa.int32()),
              ("position", pa.int32()), ("provenance", pa.string())]
    return pa.schema(fields + [(f"image_{r}", pa.binary()) for r in resolutions])


KEPT_PREFIX = "kept"
_KEPT_TYPES = {"str": pa.string(), "float64": pa.float64(), "int64": pa.int64(), "json": pa.string()}


def kept_key(partition: str) -> str:
    return f"{KEPT_PREFIX}/{partition}.parquet"


def kept_table_bytes(rows: list[dict], provenance: dict[str, str]) -> bytes:
    """The kept index of one partition: id, position and the provenance columns (json ones as JSON
    text), one row per sample its shards hold, in shard order."""
    schema = pa.schema([("id", pa.string()), ("position", pa.int32())] +
                       [(name, _KEPT_TYPES[kind]) for name, kind in provenance.items()])
    out = []
    for row in rows:
        values = provenance_values(row, provenance)
        out.append({"id": row["id"], "position": row.get("position"),
                    **{k: json.dumps(v) if provenance[k] == "json" else v for k, v in values.items()}})
    return table_bytes(out, schema)


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
               "orig_height": row["orig_height"], "images": {r: row[f"image_{r}"] for r in resolutions},
               "position": row.get("position"), "provenance": json.loads(row.get("provenance") or "{}")}


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
