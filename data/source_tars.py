"""Webdataset tars: one partition per tar, read as a stream, a sample per key (its members
grouped by the path without extensions). A sample's image is its first image member, its caption
its .txt (or the caption field of its .json), its metadata its .json and .npz members
(data/metadata.py). A tar cut short or damaged yields the samples read before it and one
`source_truncated` / `source_unreadable` sample (data/sources.py describes the accounting).
"""
from __future__ import annotations

import gzip
import importlib
import json
import posixpath
import tarfile
import zlib
from typing import TYPE_CHECKING, Iterator

from deco.data import metadata, source_formats
from deco.data.filters import Reject
from deco.data.object_store import store_and_key
from deco.data.source_formats import RawSample, tar_stem, watched_tarinfo

if TYPE_CHECKING:
    from deco.data.sources import Partition, SourceConfig

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
CAPTION_EXTENSIONS = ("txt", "caption")


def _gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
    if mode != "rb":
        raise ValueError("the s3 gopen handler only reads")
    store, key = store_and_key(url)
    return store.open(key)


def register_s3_gopen() -> None:
    """webdataset has no s3:// scheme: route it through our boto3 store (no s3fs)."""
    importlib.import_module("webdataset.gopen").gopen_schemes["s3"] = _gopen_s3


def caption_from(parts: dict[str, bytes]) -> bytes | str | None:
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


def image_from(parts: dict[str, bytes]) -> bytes | None:
    return next((parts[ext] for ext in IMAGE_EXTENSIONS if ext in parts), None)


def read_webdataset(partition: Partition, cfg: SourceConfig) -> Iterator[RawSample]:
    from webdataset.tariterators import base_plus_ext

    register_s3_gopen()
    gopen = importlib.import_module("webdataset.gopen").gopen
    name = posixpath.basename(partition.uri)
    prefix = f"{tar_stem(name)}/" if cfg.qualify_ids else ""
    key, parts, count, too_big, tar, ended = None, {}, 0, "", None, []

    def sample() -> RawSample:
        if too_big:
            return RawSample(prefix + key, None, None, Reject("bad_value", too_big))
        meta = metadata.sidecar_fields(parts)
        url = metadata.lookup(meta, "url")
        return RawSample(prefix + key, image_from(parts), caption_from(parts), meta=meta,
                         url=url if isinstance(url, str) else None)

    def lost(reason: str, what: str, at: int | None) -> RawSample:
        # the sample in progress is counted here, not yielded: its members may be missing
        where = f" at byte {at}" if at is not None else ""
        rest = f"; sample {prefix + key!r} and any after it are lost" if key is not None else ""
        return RawSample(f"{partition.uri}@{count}", None, None, Reject(reason, f"{name}: {what}{where}{rest}"))

    try:
        with gopen(partition.uri, "rb") as stream, \
                tarfile.open(fileobj=stream, mode="r|*", tarinfo=watched_tarinfo(ended)) as tar:
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
                    key, parts, too_big = base, {}, ""
                if member.size > source_formats.MAX_VALUE_BYTES:  # left unread: the stream skips over it
                    too_big = f"member {ext} is {member.size} bytes, over {source_formats.MAX_VALUE_BYTES}"
                else:
                    parts[ext.lower()] = tar.extractfile(member).read()
                tar.members = []  # streaming: do not keep every header in memory
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as err:
        at = tar.fileobj.tell() if tar is not None else 0  # bytes of the (decompressed) archive read
        if str(err) == "empty file":
            yield lost("source_truncated", "is empty", None)
        elif isinstance(err, EOFError) or str(err) == "unexpected end of data":
            yield lost("source_truncated", "ends inside a member", at)
        else:
            yield lost("source_unreadable", f"{type(err).__name__}: {str(err)[:160]}", at)
        return
    if ended and isinstance(ended[-1], tarfile.InvalidHeaderError):
        yield lost("source_unreadable", f"not a tar header ({ended[-1]})", tar.offset)
    elif not ended or not isinstance(ended[-1], tarfile.EOFHeaderError):
        yield lost("source_truncated", "ends without the end-of-archive marker", tar.fileobj.tell())
    elif key is not None:
        yield sample()
