"""Metadata that datasets ship beside their images: numeric filters on it, applied before an image is
fetched or decoded, and the provenance copied into every shard row.

A sample's fields (`RawSample.meta`) are what its source holds besides image and caption:

    parquet, urls   the row's columns (only those the filters and provenance name are read)
    webdataset      the sample's .json member (img2dataset: key, url, width, height, status, ...;
                    DataComp: uid, url, clip_l14_similarity_score, ...) and its .npz member's arrays
                    (DataComp: l14_img, l14_txt, ...), decoded only when a filter needs them
    folder          a .json sidecar that is the caption file

A name matches a field of the same name, else one in any case (`license` finds LAION's `LICENSE`).

Reason codes, one family per filter (data/filters.py REASON_FAMILIES):
    meta_<column>_below_min   value < min
    meta_<column>_above_max   value > max
    meta_<column>_missing     no value (absent, null, NaN, or not a number) and `missing: reject`
A stored CLIP score (`clip.stored_score`, or the cosine of `clip.stored_embeddings`) rejects as
`clip_score_low` like the model does, or `clip_score_missing` when the sample has none.
"""
from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from deco.data.filters import Reject

NPZ_FIELD = "__npz__"  # a tar sample's .npz bytes, decoded on first use
PROVENANCE_TYPES = ("json", "str", "float64", "int64")
# Shard columns of every row (data/shard_schema.py): provenance cannot take these names.
RESERVED = ("id", "image", "caption", "width", "height", "orig_width", "orig_height", "text_emb", "text_emb_dim",
            "source")


@dataclass(kw_only=True)
class MetadataFilter:
    column: str
    min: float | None = None
    max: float | None = None
    missing: Literal["reject", "keep"] = "reject"  # a sample without a (numeric) value

    def validate(self, where: str) -> None:
        if not self.column:
            raise ValueError(f"{where}.column is empty")
        if self.min is None and self.max is None:
            raise ValueError(f"{where} ({self.column}): set min or max")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"{where} ({self.column}): min {self.min} > max {self.max}")


@dataclass(kw_only=True)
class ProvenanceConfig:
    """Fields copied into every shard row, the kept index and a webdataset output's .json. Each entry
    is `name` or `name:type` (type json, str, float64 or int64; json when not given). A sample without
    the field stores null (json), "" (str), NaN (float64) or -1 (int64). `source` (the input file) is
    always written; the sample id is a shard column already."""

    enabled: bool = True
    columns: list[str] = field(default_factory=lambda: ["url:str", "license"])

    def validate(self) -> None:
        seen = set()
        for entry in self.columns:
            name, _, kind = entry.partition(":")
            if kind and kind not in PROVENANCE_TYPES:
                raise ValueError(f"provenance.columns: {entry!r} has type {kind!r}; types: {list(PROVENANCE_TYPES)}")
            if not name or name in RESERVED:
                raise ValueError(f"provenance.columns: {name!r} is a shard column already; reserved: {list(RESERVED)}")
            if name in seen:
                raise ValueError(f"provenance.columns: {name!r} is listed twice")
            seen.add(name)

    @property
    def types(self) -> dict[str, str]:
        """Shard column -> type, `source` first; empty when disabled."""
        if not self.enabled:
            return {}
        return {"source": "str", **{e.partition(":")[0]: e.partition(":")[2] or "json" for e in self.columns}}


def lookup(fields: dict | None, name: str) -> Any:
    """The field `name`, else one of the same name in another case; None when there is none."""
    if not fields:
        return None
    if name in fields:
        return fields[name]
    lowered = name.lower()
    return next((value for key, value in fields.items() if isinstance(key, str) and key.lower() == lowered), None)


def number(value: Any) -> float | None:
    """A finite number from a field's value, else None (absent, null, NaN, text that is no number)."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        result = float(value.item() if hasattr(value, "item") else value)
    except (TypeError, ValueError):
        return None
    return result if math.isfinite(result) else None


def _shown(value: float) -> str:
    return f"{value:.6g}"


def check_filter(flt: MetadataFilter, fields: dict | None) -> Reject | None:
    raw = lookup(fields, flt.column)
    value = number(raw)
    if value is None:
        if flt.missing == "keep":
            return None
        detail = "no value" if raw is None or (isinstance(raw, float) and math.isnan(raw)) else f"not a number: {str(raw)[:40]!r}"
        return Reject(f"meta_{flt.column}_missing", detail)
    if flt.min is not None and value < flt.min:
        return Reject(f"meta_{flt.column}_below_min", f"{_shown(value)} < {_shown(flt.min)}")
    if flt.max is not None and value > flt.max:
        return Reject(f"meta_{flt.column}_above_max", f"{_shown(value)} > {_shown(flt.max)}")
    return None


def stored_cosine(fields: dict | None, image_key: str, text_key: str) -> float | None:
    """Cosine of two stored embeddings of a sample's .npz member (DataComp: l14_img, l14_txt)."""
    import numpy as np

    if not fields or fields.get(NPZ_FIELD) is None:
        return None
    try:
        arrays = np.load(io.BytesIO(fields[NPZ_FIELD]), allow_pickle=False)
        if not isinstance(arrays, np.lib.npyio.NpzFile):  # a lone .npy under the .npz name
            return None
        with arrays:
            if image_key not in arrays or text_key not in arrays:
                return None
            image, text = (np.asarray(arrays[k], np.float64).ravel() for k in (image_key, text_key))
    except Exception:  # noqa: BLE001 - crawled bytes: a cut or corrupt member (BadZipFile, ...) is missing data
        return None
    norms = float(np.linalg.norm(image) * np.linalg.norm(text))
    return float(image @ text / norms) if image.shape == text.shape and norms > 0 else None


class MetadataSpec:
    """The job's metadata filters, stored CLIP score and provenance, as the readers and the stage
    pass use them. Built from plain config sections so that the data layer needs no job config."""

    def __init__(self, filters: list[MetadataFilter] = (), provenance: ProvenanceConfig | None = None, clip=None):
        self.filters = list(filters)
        self.provenance = provenance if provenance is not None else ProvenanceConfig(enabled=False)
        stored = clip is not None and clip.enabled and (clip.stored_score or clip.stored_embeddings)
        self.clip = clip if stored else None

    @property
    def active(self) -> bool:
        return bool(self.filters or self.clip or self.provenance.enabled)

    def required(self) -> tuple[str, ...]:
        """Fields every parquet input must have: the filters' and the stored CLIP score's."""
        names = [f.column for f in self.filters]
        if self.clip is not None and self.clip.stored_score:
            names.append(self.clip.stored_score)
        return tuple(dict.fromkeys(names))

    def columns(self) -> list[str]:
        """Fields a parquet reader must read besides id, image and caption."""
        names = [f.column for f in self.filters] + list(self.provenance.types)
        if self.clip is not None and self.clip.stored_score:
            names.append(self.clip.stored_score)
        return list(dict.fromkeys(n for n in names if n != "source"))

    def check(self, fields: dict | None) -> Reject | None:
        """The first filter that rejects the sample, in config order, then the stored CLIP score."""
        for flt in self.filters:
            why = check_filter(flt, fields)
            if why is not None:
                return why
        if self.clip is None:
            return None
        if self.clip.stored_score:
            score, what = number(lookup(fields, self.clip.stored_score)), self.clip.stored_score
        else:
            score, what = stored_cosine(fields, *self.clip.stored_embeddings), "cosine of " + "/".join(self.clip.stored_embeddings)
        if score is None:
            return Reject("clip_score_missing", f"no stored {what}")
        if score < self.clip.min_score:
            return Reject("clip_score_low", f"{score:.4f} < {self.clip.min_score} (stored {what})")
        return None

    def provenance_row(self, fields: dict | None, url: str | None, source: str) -> dict[str, Any]:
        """The sample's provenance values, typed for its shard columns."""
        row = {}
        for name, kind in self.provenance.types.items():
            if name == "source":
                value = source
            elif name == "url" and url:
                value = url
            else:
                value = lookup(fields, name)
            row[name] = typed(value, kind)
        return row


def typed(value: Any, kind: str) -> Any:
    if hasattr(value, "item") and not isinstance(value, (bytes, str)):
        value = value.item()  # numpy scalars from parquet or npz
    if kind == "str":
        return "" if value is None else value if isinstance(value, str) else json.dumps(value, default=str)
    if kind == "float64":
        result = number(value)
        return math.nan if result is None else result
    if kind == "int64":
        result = number(value)
        return -1 if result is None else int(result)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    return json.loads(json.dumps(value, default=str))  # any JSON value; odd objects as their text


def sidecar_fields(parts: dict[str, bytes]) -> dict | None:
    """A tar sample's fields: its .json member (an object), and its .npz bytes kept for later."""
    fields: dict = {}
    if "json" in parts:
        try:
            meta = json.loads(parts["json"])
        except (ValueError, UnicodeDecodeError):
            meta = None
        if isinstance(meta, dict):
            fields.update(meta)
    if "npz" in parts:
        fields[NPZ_FIELD] = parts["npz"]
    return fields or None
