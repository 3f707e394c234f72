"""What an input's files hold, decided from the files, and the per-sample checks of what readers find.

Parquet (`parquet_layout`): a file with `sources.image_column` is image parquet; without it, a binary
column (or a Hugging Face struct with `bytes`) whose first non-null value starts with image magic
bytes is used instead (img2dataset writes its JPEGs under `jpg`), and the input's description says
so. A file of URLs is downloaded only when `sources.format` is `urls`; otherwise it is refused with
one line, never fetched by surprise. A missing column's error names the column most likely meant.
`describe_input` says what an input was read as, and why, for the report and the console.

Tars (`watched_tarinfo`): an archive must end with its end-of-archive marker; one cut at a member
boundary is told from a complete one (Python's tarfile alone reads both as complete).

Samples (`checked`): an id that is not printable UTF-8 (a tar member named in Latin-1, a newline in a
name) is shown escaped, deterministically, and the sample is a `bad_name` reject; an image that is
not bytes (or a Hugging Face `{"bytes": ...}`), a caption that is not text or bytes, or an image over
MAX_VALUE_BYTES is a `bad_value` reject. One odd sample is counted and skipped, never fatal.
"""
from __future__ import annotations

import difflib
import tarfile
import unicodedata
from dataclasses import dataclass
from typing import TYPE_CHECKING

from deco.data.errors import ExpectedError
from deco.data.filters import Reject
from deco.data.object_store import store_and_key

if TYPE_CHECKING:
    import pyarrow as pa

# Larger than any image PIL would decode under images.max_pixels at ordinary compression: a value
# above it is a broken row (or a mislabelled column), rejected before anything copies or decodes it.
MAX_VALUE_BYTES = 256 * 2**20


class SourceError(ExpectedError, ValueError):
    """An input is missing or not what its configuration says: the message says what to fix."""


@dataclass
class RawSample:
    """One sample as a reader found it (read_partition checks its values)."""

    id: str
    image: bytes | None
    caption: bytes | str | None
    reject: Reject | None = None  # set when the sample is already known bad (fetch failed, ...)
    meta: dict | None = None      # the source's other fields (data/metadata.py)
    url: str | None = None


# ------------------------------------------------------------------------------------------------
# Image bytes
# ------------------------------------------------------------------------------------------------

_MAGIC = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
          (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))


def image_format(data: bytes | None) -> str | None:
    """The image format `data` starts with, from its magic bytes; None when it is not an image."""
    head = bytes(data[:16]) if data else b""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    if head[:2] == b"BM" and head[6:10] == b"\x00\x00\x00\x00":  # "BM" alone would match text ("BMW ...")
        return "BMP"
    return next((name for magic, name in _MAGIC if head.startswith(magic)), None)


def _binary(kind: pa.DataType) -> bool:
    import pyarrow as pa

    return (pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_fixed_size_binary(kind)
            or pa.types.is_binary_view(kind))


def _image_type(kind: pa.DataType) -> bool:
    """Binary, or a Hugging Face Image struct whose `bytes` field is binary."""
    import pyarrow as pa

    if pa.types.is_struct(kind):
        index = kind.get_field_index("bytes")
        return index >= 0 and _binary(kind.field(index).type)
    return _binary(kind)


def _text_type(kind: pa.DataType) -> bool:
    import pyarrow as pa

    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)


# ------------------------------------------------------------------------------------------------
# Parquet layouts
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ParquetLayout:
    kind: str      # "parquet" (image bytes) or "urls"
    rows: int
    column: str    # the image column when it is not sources.image_column, else ""


_SCAN_ROWS = 4096  # rows looked at for a column's first non-null value (img2dataset leaves failed rows null)


def _first_value(reader, name: str) -> object:
    import pyarrow as pa
    import pyarrow.compute as pc

    seen = 0
    for batch in reader.iter_batches(batch_size=256, columns=[name]):
        column = batch.column(0)
        if pa.types.is_struct(column.type):
            column = pc.struct_field(column, "bytes")
        present = column.drop_null()
        if len(present):
            return present[0].as_py()
        seen += len(column)
        if seen >= _SCAN_ROWS:
            break
    return None


def _image_columns(reader, cfg) -> list[tuple[str, str]]:
    """(column, format) of every binary column whose first value is an image, in schema order."""
    schema = reader.schema_arrow
    others = {cfg.caption_column, cfg.id_column, cfg.url_column}
    found = []
    for field in schema:
        if field.name not in others and _image_type(field.type):
            kind = image_format(_first_value(reader, field.name))
            if kind:
                found.append((field.name, kind))
    return found


def parquet_layout(reader, uri: str, cfg, seen: dict, required: tuple[str, ...] = ()) -> ParquetLayout:
    """What one parquet file holds. `seen` remembers the image columns found per schema, so that
    the files of one dataset cost one look at their values, not one each. A `required` column (a
    metadata filter's, matched in any case) that the file lacks is a SourceError naming the columns."""
    schema, rows = reader.schema_arrow, reader.metadata.num_rows
    names = schema.names
    lowered = {name.lower() for name in names}
    for column in required:
        if column.lower() not in lowered:
            close = difflib.get_close_matches(column.lower(), sorted(lowered), n=1, cutoff=0.6)
            hint = f"; did you mean {next(n for n in names if n.lower() == close[0])!r}?" if close else ""
            raise SourceError(f"{uri}: no column {column!r} for metadata_filters (columns: {_shown_names(names)}){hint}")

    def need(setting: str) -> None:
        column = getattr(cfg, setting)
        if column not in names:
            raise SourceError(missing_column(uri, setting, column, schema))

    if cfg.format == "urls":
        need("url_column")
        need("caption_column")
        return ParquetLayout("urls", rows, "")
    if cfg.image_column in names:
        need("caption_column")
        return ParquetLayout("parquet", rows, "")
    key = schema.to_string(show_schema_metadata=False)
    if key not in seen and rows:
        seen[key] = _image_columns(reader, cfg)
    found = seen.get(key)
    if found is None:  # an empty file: nothing to read, nothing to decide
        return ParquetLayout("parquet", 0, "")
    if len(found) > 1:
        listed = ", ".join(f"{name!r} ({kind})" for name, kind in found)
        raise SourceError(f"{uri}: no column {cfg.image_column!r}, and columns {listed} all hold image bytes: "
                          "set sources.image_column to the one to read")
    if found:
        need("caption_column")
        return ParquetLayout("parquet", rows, found[0][0])
    if cfg.url_column in names:
        raise SourceError(f"{uri} holds URLs (column {cfg.url_column!r}), not images: "
                          "set sources.format: urls to download them")
    raise SourceError(missing_column(uri, "image_column", cfg.image_column, schema))


# Names people give these columns, most likely first (LAION, CC12M, img2dataset, Hugging Face).
_ALIASES = {"image_column": ("image", "img", "jpg", "jpeg", "png", "webp", "image_bytes", "bytes"),
            "caption_column": ("caption", "text", "txt", "prompt", "alt", "alt_text", "description", "title"),
            "url_column": ("url", "image_url", "img_url", "link", "src"),
            "id_column": ("id", "key", "uid", "sample_id")}
_FITS = {"image_column": _image_type, "caption_column": lambda t: _text_type(t) or _binary(t),
         "url_column": _text_type, "id_column": lambda t: True}


def likely_column(setting: str, wanted: str, schema: pa.Schema) -> str | None:
    """The column the user most likely meant by `wanted`: among columns of a fitting type, the same
    name in other case, then a usual name for it, then a close spelling; else a close spelling of
    any type."""
    fitting = {f.name.lower(): f.name for f in schema if _FITS[setting](f.type)}
    for name in (wanted.lower(), *_ALIASES[setting]):
        if name in fitting:
            return fitting[name]
    close = difflib.get_close_matches(wanted.lower(), list(fitting), n=1, cutoff=0.6)
    if close:
        return fitting[close[0]]
    close = difflib.get_close_matches(wanted, schema.names, n=1, cutoff=0.8)
    return close[0] if close else None


def _shown_names(names: list[str]) -> list[str]:
    return names if len(names) <= 20 else [*names[:20], f"... {len(names) - 20} more"]


def missing_column(uri: str, setting: str, wanted: str, schema: pa.Schema) -> str:
    names = schema.names
    shown = _shown_names(names)
    guess = likely_column(setting, wanted, schema)
    hint = f"did you mean {guess!r}? " if guess else ""
    return f"{uri}: no column {wanted!r} (columns: {shown}); {hint}set sources.{setting}"


# ------------------------------------------------------------------------------------------------
# Descriptions
# ------------------------------------------------------------------------------------------------

def _plural(count: int, what: str) -> str:
    return f"{count} {what}{'' if count == 1 else 's'}"


def describe_input(uri: str, parts: list, cfg) -> dict:
    """What one input was read as (`format`) and why, from its partitions."""
    readable = [p for p in parts if p.kind != "unreadable"]
    unreadable = len({p.uri for p in parts if p.kind == "unreadable"})
    kind = readable[0].kind if readable else cfg.format if cfg.format != "auto" else "parquet"
    files = len({p.uri for p in readable})
    samples = sum(len(p.items) if kind == "folder" else p.stop - p.start for p in readable)
    entry = {"uri": uri, "format": kind, "files": files + unreadable, "samples": samples if kind != "webdataset" else None}
    if kind == "webdataset":
        why = _plural(files, "tar file")
    elif kind == "folder":
        images = sum(1 for p in readable for image, _ in p.items if image)
        captions = sum(1 for p in readable for _, caption in p.items if caption)
        why = f"{_plural(images, 'image')}, {_plural(captions, 'caption file')}"
    elif kind == "urls":
        why = (f"{_plural(files, 'parquet file')}, {_plural(samples, 'URL')} in column {cfg.url_column!r}, "
               "downloaded")
    else:
        columns = sorted({p.column or cfg.image_column for p in readable})
        entry["image_column"] = columns[0] if len(columns) == 1 else columns
        found = [c for c in columns if c != cfg.image_column]
        why = f"{_plural(files, 'parquet file')}, {_plural(samples, 'row')}, images from column " + \
              " / ".join(repr(c) for c in columns)
        if found:
            why += f": there is no column {cfg.image_column!r}, set sources.image_column to choose"
    if unreadable:
        why += f", {_plural(unreadable, 'unreadable file')}"
    if cfg.format != "auto":
        why += f"; sources.format: {cfg.format}"
    entry["why"] = why
    return entry


# ------------------------------------------------------------------------------------------------
# Tars
# ------------------------------------------------------------------------------------------------

def tar_stem(name: str) -> str | None:
    """A tar file's name without .tar, .tar.gz or .tgz; None when it is not a tar's name."""
    return next((name[: -len(s)] for s in (".tar.gz", ".tgz", ".tar") if name.lower().endswith(s)), None)


def watched_tarinfo(ended: list) -> type[tarfile.TarInfo]:
    """A TarInfo that notes why the header listing stopped. Python's tarfile (stream mode) takes a
    missing or short header anywhere after the first for the end of the archive; a real archive ends
    with a zero block (EOFHeaderError), so anything else there is a file cut short or damaged."""

    class Watched(tarfile.TarInfo):
        @classmethod
        def fromtarfile(cls, tar):
            try:
                return super().fromtarfile(tar)
            except tarfile.HeaderError as err:
                ended.append(err)
                raise

    return Watched


# ------------------------------------------------------------------------------------------------
# Per-sample checks
# ------------------------------------------------------------------------------------------------

def printable_id(name: str) -> tuple[str, bool]:
    """(`name`, False) when it is printable text; else a deterministic escape and True. Undecodable
    bytes (which Python carries as U+DC80..U+DCFF) become \\xNN; control characters, other lone
    surrogates and line separators their Python escape. Ids end up in parquet, JSON and logs."""
    bad = lambda ch: unicodedata.category(ch) in ("Cc", "Cs", "Zl", "Zp")  # noqa: E731
    if not any(bad(ch) for ch in name):
        return name, False
    out = []
    for ch in name:
        if "\udc80" <= ch <= "\udcff":
            out.append(f"\\x{ord(ch) - 0xdc00:02x}")
        elif bad(ch):
            out.append(ch.encode("unicode_escape").decode("ascii"))
        else:
            out.append(ch)
    return "".join(out), True


def _size(value: bytes | bytearray | memoryview) -> int:
    return value.nbytes if isinstance(value, memoryview) else len(value)


def image_value(value: object) -> tuple[bytes | None, Reject | None]:
    if isinstance(value, dict):  # Hugging Face datasets' Image feature
        value = value.get("bytes")
    if value is None:
        return None, None
    if not isinstance(value, (bytes, bytearray, memoryview)):
        return None, Reject("bad_value", f"image is {type(value).__name__}, not bytes")
    if _size(value) > MAX_VALUE_BYTES:
        return None, Reject("bad_value", f"image is {_size(value)} bytes, over {MAX_VALUE_BYTES}")
    return bytes(value), None


def caption_value(value: object) -> tuple[bytes | str | None, Reject | None]:
    if value is None or isinstance(value, (str, bytes)):
        return value, None
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value), None
    return None, Reject("bad_value", f"caption is {type(value).__name__}, not text or bytes")


def checked(sample_id: str, image: object, caption: object) -> tuple[str, bytes | None, bytes | str | None, Reject | None]:
    """(printable id, image bytes, caption, the reject when the sample is unusable as found)."""
    sample_id, escaped = printable_id(sample_id)
    if escaped:
        return sample_id, None, None, Reject("bad_name", "not printable UTF-8: the id shows it escaped")
    image, why = image_value(image)
    if why is None:
        caption, why = caption_value(caption)
    return (sample_id, None, None, why) if why else (sample_id, image, caption, None)


# ------------------------------------------------------------------------------------------------
# Parquet rows
# ------------------------------------------------------------------------------------------------

def _rows(uri: str, start: int, stop: int, columns: list[str]) -> list[dict]:
    """Rows [start, stop) of a parquet file, reading only the row groups that hold them."""
    import pyarrow.parquet as pq

    store, key = store_and_key(uri)
    with store.open(key) as handle:
        reader = pq.ParquetFile(handle)
        names = reader.schema_arrow.names
        by_case = {name.lower(): name for name in names}  # metadata names match in any case
        found = (c if c in names else by_case.get(c.lower()) for c in columns)
        wanted = list(dict.fromkeys(c for c in found if c is not None))
        groups, first_row, group_start = [], None, 0
        for group in range(reader.num_row_groups):
            rows = reader.metadata.row_group(group).num_rows
            if group_start < stop and group_start + rows > start:
                groups.append(group)
                first_row = group_start if first_row is None else first_row
            group_start += rows
        if not groups:
            return []
        table = reader.read_row_groups(groups, columns=wanted)
    return table.slice(start - first_row, stop - start).to_pylist()


def parquet_rows(uri: str, start: int, stop: int, columns: list[str]) -> list[dict] | Exception:
    """Rows [start, stop) of a parquet file, or the decoding error of a damaged row group (pyarrow
    raises OSError or ArrowInvalid for garbled pages). Storage errors (a missing object, S3 failures)
    still propagate: the job stops and resumes, where a damaged file is counted."""
    import pyarrow

    try:
        return _rows(uri, start, stop, columns)
    except FileNotFoundError:
        raise
    except (OSError, pyarrow.ArrowException) as err:
        return err
