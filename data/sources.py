"""Input readers: webdataset tars, parquet with image bytes, image folders with sidecar captions, and
URL lists (parquet url + caption) fetched over HTTP. Every input may be a local path or s3:// URI.

The job is cut into deterministic partitions by `plan_partitions` (sorted listings; a tar is one
partition, parquet and URL files are cut into row ranges, folders into runs of files), and
`read_partition` yields a partition's samples in a fixed order. Sample ids:

    webdataset  the sample key (member path without extensions); `<tar name>/<key>` with qualify_ids
    parquet     the `id_column` value, else `<file stem>:<row>`
    folder      the image path relative to the folder, without extension
    urls        the `id_column` value, else `<file stem>:<row>`

Data errors never stop the job: a missing caption or image is a sample with nothing there, an
unreadable file becomes one `source_unreadable` sample. Storage errors (after the store's retries)
do stop it: the run is resumable.
"""
from __future__ import annotations

import gzip
import importlib
import json
import os
import posixpath
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

from deco.data.filters import Reject
from deco.data.http_fetch import HttpConfig, HttpFetcher
from deco.data.object_store import is_s3, open_store

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
CAPTION_EXTENSIONS = ("txt", "caption")
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


class SourceError(ValueError):
    """An input is missing or not what its configuration says: the message says what to fix."""


@dataclass(frozen=True)
class Partition:
    index: int
    kind: str            # one of FORMATS, or "unreadable"
    uri: str             # the file (or folder root) it reads
    start: int = 0       # row range for parquet / urls
    stop: int = 0
    items: tuple[tuple[str, str], ...] = ()  # folder: (image key or "", caption key or "") per sample
    detail: str = ""     # unreadable: why

    @property
    def name(self) -> str:
        return f"p{self.index:05d}"

    def to_dict(self) -> dict:
        return {"index": self.index, "kind": self.kind, "uri": self.uri, "start": self.start, "stop": self.stop,
                "items": [list(i) for i in self.items], "detail": self.detail}

    @classmethod
    def from_dict(cls, data: dict) -> Partition:
        return cls(**{**data, "items": tuple(tuple(i) for i in data["items"])})


@dataclass
class RawSample:
    id: str
    image: bytes | None
    caption: bytes | str | None
    reject: Reject | None = None  # set when the sample is already known bad (fetch failed, ...)


# ------------------------------------------------------------------------------------------------
# Locations
# ------------------------------------------------------------------------------------------------

def _split(uri: str) -> tuple[object, str]:
    """(store, key) for a file URI: the store is rooted at its parent."""
    if is_s3(uri):
        bucket, _, key = uri[len("s3://"):].partition("/")
        return open_store(f"s3://{bucket}"), key
    path = Path(uri).expanduser().resolve()
    return open_store(path.parent), path.name


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
    if is_s3(uri):
        bucket, _, prefix = uri[len("s3://"):].partition("/")
        store = open_store(f"s3://{bucket}")
        if prefix and store.exists(prefix):
            return [uri]
        base = prefix.rstrip("/") + "/" if prefix else ""
        keys = [k for k in store.list(base) if not posixpath.basename(k).startswith(".")]
        return [f"s3://{bucket}/{k}" for k in keys]
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

def _parquet_kind(uri: str, cfg: SourceConfig, declared: str) -> tuple[str, int]:
    import pyarrow.parquet as pq

    with open_binary(uri) as handle:
        meta = pq.ParquetFile(handle)
        names, rows = meta.schema_arrow.names, meta.metadata.num_rows
    kind = declared if declared in ("parquet", "urls") else ("urls" if cfg.url_column in names and cfg.image_column not in names else "parquet")
    needed = {"image_column" if kind == "parquet" else "url_column", "caption_column"}
    for setting in sorted(needed):
        column = getattr(cfg, setting)
        if column not in names:
            raise SourceError(f"{uri}: no column {column!r} (columns: {names}); set sources.{setting}")
    return kind, rows


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


def plan_partitions(cfg: SourceConfig) -> list[Partition]:
    """Deterministic partitions of every input, in input order then sorted listing order."""
    if not cfg.uris:
        raise SourceError("no input: set sources.uris in the config or pass --input")
    partitions: list[Partition] = []

    def add(**kw) -> None:
        partitions.append(Partition(index=len(partitions), **kw))

    for given in cfg.uris:
        for uri in _expand(given):
            files = list_files(uri)
            if not files:
                raise SourceError(f"input {uri} does not exist or holds no files")
            tars = [f for f in files if _extension(f) == "tar"]
            parquets = [f for f in files if _extension(f) == "parquet"]
            kind = cfg.format
            if kind == "auto":
                kind = "webdataset" if tars else "parquet" if parquets else "folder"
            before = len(partitions)
            if kind == "webdataset":
                for tar in tars:
                    add(kind="webdataset", uri=tar)
            elif kind in ("parquet", "urls"):
                for path in parquets:
                    try:
                        file_kind, rows = _parquet_kind(path, cfg, cfg.format)
                    except SourceError:
                        raise
                    except Exception as err:  # a corrupt file is counted, not fatal
                        add(kind="unreadable", uri=path, detail=f"{type(err).__name__}: {str(err)[:160]}")
                        continue
                    for start in range(0, rows, cfg.partition_size):
                        add(kind=file_kind, uri=path, start=start, stop=min(rows, start + cfg.partition_size))
            else:
                items = _folder_items(files)
                for start in range(0, len(items), cfg.partition_size):
                    add(kind="folder", uri=_root(uri), items=tuple(items[start:start + cfg.partition_size]))
            empty_parquet = kind in ("parquet", "urls") and parquets
            if len(partitions) == before and not empty_parquet:
                raise SourceError(f"input {uri} holds no {kind} files (set sources.format if it is another kind)")
    return partitions


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------

def _gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
    if mode != "rb":
        raise ValueError("the s3 gopen handler only reads")
    return open_binary(url)


def register_s3_gopen() -> None:
    """webdataset has no s3:// scheme: route it through our boto3 store (no s3fs)."""
    importlib.import_module("webdataset.gopen").gopen_schemes["s3"] = _gopen_s3


def _caption_from(parts: dict[str, bytes]) -> bytes | str | None:
    for ext in CAPTION_EXTENSIONS:
        if ext in parts:
            return parts[ext]
    if "json" in parts:
        try:
            meta = json.loads(parts["json"])
        except (ValueError, UnicodeDecodeError):
            return None
        if isinstance(meta, dict):
            for key in ("caption", "text", "prompt"):
                if isinstance(meta.get(key), str):
                    return meta[key]
    return None


def _image_from(parts: dict[str, bytes]) -> bytes | None:
    return next((parts[ext] for ext in IMAGE_EXTENSIONS if ext in parts), None)


def read_webdataset(partition: Partition, cfg: SourceConfig) -> Iterator[RawSample]:
    from webdataset.tariterators import base_plus_ext

    register_s3_gopen()
    gopen = importlib.import_module("webdataset.gopen").gopen
    prefix = posixpath.basename(partition.uri).removesuffix(".tar") + "/" if cfg.qualify_ids else ""
    key, parts, count = None, {}, 0

    def sample() -> RawSample:
        return RawSample(prefix + key, _image_from(parts), _caption_from(parts))

    try:
        with gopen(partition.uri, "rb") as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if not member.isreg():
                    continue
                base, ext = base_plus_ext(member.name)
                if base is None or posixpath.basename(member.name).startswith("__"):
                    continue
                if base != key:
                    if key is not None:
                        yield sample()
                        count += 1
                    key, parts = base, {}
                parts[ext.lower()] = tar.extractfile(member).read()
                tar.members = []  # streaming: do not keep every header in memory
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as err:
        yield RawSample(f"{partition.uri}@{count}", None, None,
                        Reject("source_unreadable", f"{type(err).__name__}: {str(err)[:160]}"))
        return
    if key is not None:
        yield sample()


def _rows(partition: Partition, columns: list[str]) -> list[dict]:
    """Rows [start, stop) of a parquet file, reading only the row groups that hold them."""
    import pyarrow.parquet as pq

    with open_binary(partition.uri) as handle:
        reader = pq.ParquetFile(handle)
        wanted = [c for c in columns if c in reader.schema_arrow.names]
        groups, first_row, group_start = [], None, 0
        for group in range(reader.num_row_groups):
            rows = reader.metadata.row_group(group).num_rows
            if group_start < partition.stop and group_start + rows > partition.start:
                groups.append(group)
                first_row = group_start if first_row is None else first_row
            group_start += rows
        if not groups:
            return []
        table = reader.read_row_groups(groups, columns=wanted)
    return table.slice(partition.start - first_row, partition.stop - partition.start).to_pylist()


def _row_id(row: dict, partition: Partition, cfg: SourceConfig, position: int) -> str:
    value = row.get(cfg.id_column)
    return str(value) if value is not None else f"{Path(partition.uri).stem}:{partition.start + position}"


def _image_value(value) -> bytes | None:
    if isinstance(value, dict):  # Hugging Face datasets' Image feature
        value = value.get("bytes")
    return bytes(value) if value is not None else None


def read_parquet(partition: Partition, cfg: SourceConfig) -> Iterator[RawSample]:
    rows = _rows(partition, [cfg.id_column, cfg.image_column, cfg.caption_column])
    for position, row in enumerate(rows):
        yield RawSample(_row_id(row, partition, cfg, position), _image_value(row.get(cfg.image_column)),
                        row.get(cfg.caption_column))


def read_urls(partition: Partition, cfg: SourceConfig, fetcher: HttpFetcher | None = None) -> Iterator[RawSample]:
    rows = _rows(partition, [cfg.id_column, cfg.url_column, cfg.caption_column])
    fetcher = fetcher or HttpFetcher(cfg.http)
    results = fetcher.fetch_all([row.get(cfg.url_column) or "" for row in rows])
    for position, (row, result) in enumerate(zip(rows, results)):
        reject = None if result.data is not None else Reject("fetch_failed", result.error)
        yield RawSample(_row_id(row, partition, cfg, position), result.data, row.get(cfg.caption_column), reject)


def read_folder(partition: Partition, cfg: SourceConfig) -> Iterator[RawSample]:
    root = partition.uri.rstrip("/")
    for image_uri, caption_uri in partition.items:
        anchor = image_uri or caption_uri
        relative = anchor[len(root) + 1:] if anchor.startswith(root + "/") else posixpath.basename(anchor)
        sample_id = relative.rsplit(".", 1)[0].replace(os.sep, "/")
        caption = None
        if caption_uri:
            raw = read_bytes(caption_uri)
            caption = _caption_from({_extension(caption_uri): raw}) if _extension(caption_uri) == "json" else raw
        yield RawSample(sample_id, read_bytes(image_uri) if image_uri else None, caption)


def read_partition(partition: Partition, cfg: SourceConfig) -> Iterator[RawSample]:
    if partition.kind == "unreadable":
        yield RawSample(partition.uri, None, None, Reject("source_unreadable", partition.detail))
        return
    readers = {"webdataset": read_webdataset, "parquet": read_parquet, "urls": read_urls, "folder": read_folder}
    yield from readers[partition.kind](partition, cfg)
