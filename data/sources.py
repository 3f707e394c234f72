"""Input readers: webdataset tars, parquet with image bytes, image folders with sidecar captions, and
URL lists (parquet url + caption) fetched over HTTP. Every input may be a local path or s3:// URI.

The job is cut into deterministic partitions by `plan_sources` (sorted listings; a tar is one
partition, parquet and URL files are cut into row ranges, folders into runs of files), which also
says what each input was read as and why (`inputs`: the report's and the console's). The format is
chosen from what the files hold (data/source_formats.py); URLs are fetched only with format `urls`.
Tars are read by data/source_tars.py.
`read_partition` yields a partition's samples in a fixed order. Sample ids:

    webdataset  the sample key (member path without extensions); `<tar name>/<key>` with qualify_ids
    parquet     the `id_column` value, else `<file stem>:<row>`
    folder      the image path relative to the folder, without extension
    urls        the `id_column` value, else `<file stem>:<row>`

Each sample also carries its source's metadata (`meta`: a parquet row's other columns, a tar sample's
.json and .npz members) and url where it has one: data/metadata.py filters on them here, before an
image is fetched (format `urls`) or decoded, and copies them into the shards as provenance.

Data errors never stop the job: a missing caption or image is a sample with nothing there, an
unreadable file becomes one `source_unreadable` sample, a file that ends early (a tar without its
end-of-archive marker, cut inside a member) one `source_truncated` sample after the samples read
before, and a sample with an unusable name or value a `bad_name` / `bad_value` reject. Storage errors
(after the store's retries) do stop it: the run is resumable.
"""
from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

from deco.data import metadata, source_formats
from deco.data.filters import Reject
from deco.data.http_fetch import HttpConfig, HttpFetcher
from deco.data.source_formats import (RawSample, SourceError, checked, describe_input, parquet_layout, printable_id,
                                     tar_stem)
from deco.data.source_tars import CAPTION_EXTENSIONS, IMAGE_EXTENSIONS, caption_from, read_webdataset
from deco.data.object_store import Location, bucket_uri, is_s3, open_store, parse_uri, store_and_key

FORMATS = ("webdataset", "parquet", "folder", "urls")


@dataclass(kw_only=True)
class SourceConfig:
    uris: list[str] = field(default_factory=list)  # files, folders or prefixes; `{a..b}` braces expand
    format: Literal["auto", "webdataset", "parquet", "folder", "urls"] = "auto"
    partition_size: int = 1000  # samples per partition (parquet, urls, folders; a tar is one partition)
    image_column: str = "image"  # parquet: binary, or a struct with a "bytes" field (Hugging Face)
    caption_column: str = "caption"  # string or binary
    id_column: str = "id"  # optional
    url_column: str = "url"
    qualify_ids: bool = False  # webdataset: prefix keys with the tar name (keys restart per tar)
    http: HttpConfig = field(default_factory=HttpConfig)

    def validate(self) -> None:
        if self.partition_size < 1:
            raise ValueError(f"sources.partition_size must be >= 1, got {self.partition_size}")


@dataclass(frozen=True)
class Partition:
    index: int
    kind: str            # one of FORMATS, or "unreadable"
    uri: str             # the file (or folder root) it reads
    start: int = 0       # row range for parquet / urls
    stop: int = 0
    items: tuple[tuple[str, str], ...] = ()  # folder: (image key or "", caption key or "") per sample
    detail: str = ""     # unreadable: why
    column: str = ""     # parquet: the image column found in the file when sources.image_column is absent

    @property
    def name(self) -> str:
        return f"p{self.index:05d}"

    def to_dict(self) -> dict:
        data = {"index": self.index, "kind": self.kind, "uri": self.uri, "start": self.start, "stop": self.stop,
                "items": [list(i) for i in self.items], "detail": self.detail}
        # only when set: plans written before this field still compare equal on resume
        return data | {"column": self.column} if self.column else data

    @classmethod
    def from_dict(cls, data: dict) -> Partition:
        return cls(**{**data, "items": tuple(tuple(i) for i in data["items"])})


# ------------------------------------------------------------------------------------------------
# Locations
# ------------------------------------------------------------------------------------------------

def _split(uri: str) -> tuple[object, str]:
    """(store, key) for a file URI: the store is rooted at its bucket or its local folder."""
    return store_and_key(uri)


def read_bytes(uri: str) -> bytes:
    store, key = _split(uri)
    return store.get_bytes(key)


def open_binary(uri: str):
    store, key = _split(uri)
    return store.open(key)


def _expand(uri: str) -> list[str]:
    from braceexpand import braceexpand

    return list(braceexpand(uri)) if "{" in uri else [uri]


def list_files(uri: str) -> list[str]:
    """The file itself, or every file under a folder / prefix, as sorted URIs."""
    location = parse_uri(uri)
    if location.is_s3:
        store = open_store(bucket_uri(uri))
        if location.key and store.exists(location.key):
            return [uri]
        keys = [k for k in store.list(location.key) if not posixpath.basename(k).startswith(".")]
        return [Location("s3", location.bucket, k).uri for k in keys]
    path = Path(uri).expanduser()
    if path.is_file():
        return [str(path.resolve())]
    if not path.is_dir():
        return []
    files = [p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)]
    return sorted(str(p.resolve()) for p in files)


def _extension(uri: str) -> str:
    name = posixpath.basename(uri)
    return name.rsplit(".", 1)[-1].lower() if "." in name else ""


# ------------------------------------------------------------------------------------------------
# Planning
# ------------------------------------------------------------------------------------------------

def _parquet_layout(uri: str, cfg: SourceConfig, seen: dict, required: tuple[str, ...]) -> source_formats.ParquetLayout:
    import pyarrow.parquet as pq

    with open_binary(uri) as handle:  # buffered: a look at a column's first value reads one page, not its chunk
        return parquet_layout(pq.ParquetFile(handle, buffer_size=1 << 20, pre_buffer=False), uri, cfg, seen, required)


def _folder_items(files: list[str]) -> list[tuple[str, str]]:
    """(image uri, caption uri) pairs grouped by path without extension, sorted by that stem."""
    groups: dict[str, dict[str, str]] = {}
    for uri in files:
        ext = _extension(uri)
        if ext in IMAGE_EXTENSIONS or ext in CAPTION_EXTENSIONS or ext == "json":
            stem = uri[: -(len(ext) + 1)]
            role = "image" if ext in IMAGE_EXTENSIONS else "caption"
            if role == "caption" and "caption" in groups.get(stem, {}) and ext == "json":
                continue  # a .txt caption wins over a .json sidecar
            groups.setdefault(stem, {})[role] = uri
    return [(g.get("image", ""), g.get("caption", "")) for _, g in sorted(groups.items())]


def _root(uri: str) -> str:
    return uri.rstrip("/") if is_s3(uri) else str(Path(uri).expanduser().resolve())


@dataclass
class SourcePlan:
    partitions: list[Partition]
    inputs: list[dict]  # per input: uri, format, why, files, samples (see describe_inputs)


def plan_sources(cfg: SourceConfig) -> SourcePlan:
    """The job's partitions, and what each input was read as and why."""
    partitions = plan_partitions(cfg)
    return SourcePlan(partitions, describe_inputs(cfg, partitions))


def plan_partitions(cfg: SourceConfig, required: tuple[str, ...] = ()) -> list[Partition]:
    """Deterministic partitions of every input, in input order then sorted listing order. Every
    parquet file must hold the `required` columns (the metadata filters'), in any case."""
    if not cfg.uris:
        raise SourceError("no input: set sources.uris in the config or pass --input")
    partitions: list[Partition] = []
    layouts: dict = {}  # parquet image columns found per schema, shared by the inputs

    def add(**kw) -> None:
        partitions.append(Partition(index=len(partitions), **kw))

    for given in cfg.uris:
        for uri in _expand(given):
            files = list_files(uri)
            if not files:
                raise SourceError(f"input {uri} does not exist or holds no files")
            tars = [f for f in files if tar_stem(posixpath.basename(f)) is not None]
            parquets = [f for f in files if _extension(f) == "parquet"]
            kind = cfg.format
            if kind == "auto" and tars and parquets:  # reading one kind would silently skip the other
                raise SourceError(f"input {uri} holds both tar and parquet files: set sources.format, "
                                  "or give each kind as its own input")
            if kind == "auto":
                kind = "webdataset" if tars else "parquet" if parquets else "folder"
            before = len(partitions)
            if kind == "webdataset":
                for tar in tars:
                    add(kind="webdataset", uri=tar)
            elif kind in ("parquet", "urls"):
                for path in parquets:
                    try:
                        layout = _parquet_layout(path, cfg, layouts, tuple(required))
                    except SourceError:
                        raise
                    except Exception as err:  # a corrupt file is counted, not fatal
                        add(kind="unreadable", uri=path, detail=f"{type(err).__name__}: {str(err)[:160]}")
                        continue
                    for start in range(0, layout.rows, cfg.partition_size):
                        add(kind=layout.kind, uri=path, start=start, stop=min(layout.rows, start + cfg.partition_size),
                            column=layout.column)
            else:
                items = _folder_items(files)
                for start in range(0, len(items), cfg.partition_size):
                    add(kind="folder", uri=_root(uri), items=tuple(items[start:start + cfg.partition_size]))
            empty_parquet = kind in ("parquet", "urls") and parquets
            if len(partitions) == before and not empty_parquet:
                raise SourceError(f"input {uri} holds no {kind} files (set sources.format if it is another kind)")
    return partitions


def describe_inputs(cfg: SourceConfig, partitions: list[Partition]) -> list[dict]:
    """Per input of `cfg.uris`: what it was read as (`format`) and why, from the plan's partitions
    alone (no I/O), so that a resumed or extended job describes exactly what its plan reads.
    Partitions of no listed input (an earlier run's) are left out."""
    uris = [uri for given in cfg.uris for uri in _expand(given)]
    roots = [_root(uri) for uri in uris]
    owned: list[list[Partition]] = [[] for _ in uris]
    for p in partitions:
        owner = next((i for i, root in enumerate(roots) if p.uri == root or p.uri.startswith(root.rstrip("/") + "/")), None)
        if owner is not None:
            owned[owner].append(p)
    return [describe_input(uri, parts, cfg) for uri, parts in zip(uris, owned)]


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------

def _row_id(row: dict, partition: Partition, cfg: SourceConfig, position: int) -> str:
    value = row.get(cfg.id_column)
    if isinstance(value, bytes):  # undecodable bytes travel as surrogates: read_partition escapes them
        return value.decode("utf-8", "surrogateescape")
    return str(value) if value is not None else f"{Path(partition.uri).stem}:{partition.start + position}"


def _unreadable_rows(partition: Partition, err: Exception) -> Iterator[RawSample]:
    """Every row of a partition whose row groups cannot be decoded: one reject each, so samples_in
    still counts what the file holds (its footer says how many rows)."""
    why = Reject("source_unreadable", f"{type(err).__name__}: {str(err)[:160]}")
    for row in range(partition.start, partition.stop):
        yield RawSample(f"{Path(partition.uri).stem}:{row}", None, None, why)


def _url(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def read_parquet(partition: Partition, cfg: SourceConfig, columns: list[str] = ()) -> Iterator[RawSample]:
    image_column = partition.column or cfg.image_column
    rows = source_formats.parquet_rows(partition.uri, partition.start, partition.stop,
                                       [cfg.id_column, image_column, cfg.caption_column, cfg.url_column, *columns])
    if isinstance(rows, Exception):
        yield from _unreadable_rows(partition, rows)
        return
    for position, row in enumerate(rows):  # values as found: read_partition checks their types and sizes
        image = row.pop(image_column, None)  # the row's other values are its metadata
        yield RawSample(_row_id(row, partition, cfg, position), image, row.get(cfg.caption_column), meta=row,
                        url=_url(metadata.lookup(row, cfg.url_column)))


def read_urls(partition: Partition, cfg: SourceConfig, fetcher: HttpFetcher | None = None,
              spec: metadata.MetadataSpec | None = None) -> Iterator[RawSample]:
    """The rows' images fetched over HTTP; rows the metadata filters reject are never fetched."""
    rows = source_formats.parquet_rows(partition.uri, partition.start, partition.stop,
                                       [cfg.id_column, cfg.url_column, cfg.caption_column, *(spec.columns() if spec else ())])
    if isinstance(rows, Exception):
        yield from _unreadable_rows(partition, rows)
        return
    verdicts = [spec.check(row) if spec else None for row in rows]
    wanted = [metadata.lookup(row, cfg.url_column) or "" for row, why in zip(rows, verdicts) if why is None]
    results = iter((fetcher or HttpFetcher(cfg.http)).fetch_all(wanted))
    for position, (row, why) in enumerate(zip(rows, verdicts)):
        data = None
        if why is None:
            result = next(results)
            data, why = result.data, None if result.data is not None else Reject("fetch_failed", result.error)
        yield RawSample(_row_id(row, partition, cfg, position), data, row.get(cfg.caption_column), why, meta=row,
                        url=_url(metadata.lookup(row, cfg.url_column)))


def read_folder(partition: Partition, cfg: SourceConfig) -> Iterator[RawSample]:
    root = partition.uri.rstrip("/")
    for image_uri, caption_uri in partition.items:
        anchor = image_uri or caption_uri
        relative = anchor[len(root) + 1:] if anchor.startswith(root + "/") else posixpath.basename(anchor)
        sample_id = relative.rsplit(".", 1)[0].replace(os.sep, "/")
        caption, meta = None, None
        if caption_uri:
            raw = read_bytes(caption_uri)
            caption = raw
            if _extension(caption_uri) == "json":
                caption, meta = caption_from({"json": raw}), metadata.sidecar_fields({"json": raw})
        url = metadata.lookup(meta, "url")
        yield RawSample(sample_id, read_bytes(image_uri) if image_uri else None, caption, meta=meta, url=_url(url))


def read_partition(partition: Partition, cfg: SourceConfig,
                   spec: metadata.MetadataSpec | None = None) -> Iterator[RawSample]:
    """The partition's samples, each with a printable id and values the filters take, or its reject:
    source errors first, then the metadata filters of `spec` (URL lists: before the fetch)."""
    if partition.kind == "unreadable":
        samples = iter([RawSample(partition.uri, None, None, Reject("source_unreadable", partition.detail))])
    elif partition.kind == "urls":
        samples = read_urls(partition, cfg, spec=spec)
    elif partition.kind == "parquet":
        samples = read_parquet(partition, cfg, spec.columns() if spec else [])
    else:
        samples = {"webdataset": read_webdataset, "folder": read_folder}[partition.kind](partition, cfg)
    for raw in samples:
        sample_id, image, caption, why = checked(raw.id, raw.image, raw.caption)
        if raw.reject is not None:  # its detail may quote a file name: escaped as ids are
            why = Reject(raw.reject.reason, printable_id(raw.reject.detail)[0])
        elif why is None and spec is not None and partition.kind != "urls":
            why = spec.check(raw.meta)
        yield RawSample(sample_id, image, caption, why, meta=raw.meta, url=raw.url)
