"""The curation job's configuration: one typed tree, each section owned by the component it builds.

Load with `load_config(CurateConfig, path, overrides)`; see configs/data/curate.yaml (production
defaults) and configs/data/curate_demo.yaml (the synthetic dataset on this machine).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Literal

from deco.data.dedup import DedupConfig
from deco.data.clip_filter import ClipFilterConfig
from deco.data.filters import CaptionFilterConfig, ImageFilterConfig
from deco.data.metadata import MetadataFilter, MetadataSpec, ProvenanceConfig
from deco.data.shards import ShardOutputConfig
from deco.data.sources import SourceConfig
from deco.data.transforms import TextEmbeddingConfig, TransformConfig
from deco.orchestration.ray_cluster import RayConfig


@dataclass(kw_only=True)
class ResourcesConfig:
    """Ray resources per task of each pass (a task is one partition)."""

    stage_cpus: float = 1.0  # read, decode, filter, hash, resize
    write_cpus: float = 1.0  # (text embedding) and shard writing
    write_gpus: float = 0.0  # set to 1 to run the text encoder of text_emb on a GPU per write task


@dataclass(kw_only=True)
class CurateConfig:
    sources: SourceConfig = field(default_factory=SourceConfig)
    output: ShardOutputConfig = field(default_factory=ShardOutputConfig)
    captions: CaptionFilterConfig = field(default_factory=CaptionFilterConfig)
    images: ImageFilterConfig = field(default_factory=ImageFilterConfig)
    # Numeric bounds on the metadata a dataset ships (parquet columns, a tar sample's .json / .npz),
    # checked before its image is fetched or decoded: data/metadata.py.
    metadata_filters: list[MetadataFilter] = field(default_factory=list)
    clip: ClipFilterConfig = field(default_factory=ClipFilterConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    transform: TransformConfig = field(default_factory=TransformConfig)
    text_emb: TextEmbeddingConfig = field(default_factory=TextEmbeddingConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    # Source fields copied into every shard row and the kept index (url, licence, scores, ...).
    provenance: ProvenanceConfig = field(default_factory=ProvenanceConfig)
    # "ray": partitions run as Ray tasks. "local": the same work in a plain loop in this process
    # (debugging, and the baseline of benchmarks/curate_throughput.py).
    execution: Literal["ray", "local"] = "ray"
    num_workers: int | None = None  # partitions in flight at once; None = as many as the cluster's CPUs allow
    progress: bool = True  # progress bars on stderr
    # `deco curate` exits non-zero (after writing the report) when it keeps nothing, or a smaller
    # fraction of the samples in than this: a job that silently keeps nothing is a broken input.
    min_kept_fraction: float = 0.0

    def validate(self) -> None:
        if not self.output.uri:
            raise ValueError("output.uri is not set: set it in the config or pass --output")
        if self.num_workers is not None and self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")
        if not 0.0 <= self.min_kept_fraction <= 1.0:
            raise ValueError(f"min_kept_fraction must be in [0, 1], got {self.min_kept_fraction}")
        if self.images.min_side is not None and self.images.min_side < 1:
            raise ValueError(f"images.min_side must be >= 1, got {self.images.min_side}")
        if self.clip.enabled and not self.clip.path and self.clip.scorer == "clip" and not self.clip.stored:
            raise ValueError("clip.path must name local CLIP weights when clip.enabled is true "
                             "(or set clip.stored_score / clip.stored_embeddings to reuse the dataset's own)")
        if self.transform.crop == "buckets" and self.output.format != "mds":
            raise ValueError("transform.crop: buckets writes MDS shards only; set output.format: mds")
        for n, flt in enumerate(self.metadata_filters):
            flt.validate(f"metadata_filters[{n}]")
        for section in (self.sources, self.sources.http, self.output, self.images, self.captions, self.clip, self.dedup,
                        self.transform, self.text_emb, self.ray, self.provenance):
            section.validate()

    @property
    def min_side(self) -> int:
        """Images below this are rejected: images.min_side, else the largest target resolution."""
        return self.images.min_side if self.images.min_side is not None else max(self.transform.resolutions)

    @property
    def metadata(self) -> MetadataSpec:
        """What the readers and the stage pass need of the metadata settings."""
        return MetadataSpec(self.metadata_filters, self.provenance, self.clip)


# Sections that do not change which samples are kept or what bytes the shards hold.
RUNTIME_ONLY = ("ray", "resources", "execution", "num_workers", "progress", "min_kept_fraction")


def output_fingerprint(cfg: CurateConfig) -> str:
    """Hash of every setting that decides the output: a resumed run must match it."""
    tree = dataclasses.asdict(cfg)
    for key in RUNTIME_ONLY:
        tree.pop(key)
    tree["sources"].pop("http")
    tree["output"].pop("keep_staging")
    tree["output"].pop("uri")
    # Settings added later leave the fingerprint of outputs made without them as it was. Not so the
    # caption rules of this version (spam rules, the short-caption language rule) and images.background:
    # they change which samples are kept and what pixels are written, so an output curated before
    # them is refused as "made with other settings" rather than extended under other rules.
    for section, key, default in (("clip", "stored_score", ""), ("clip", "stored_embeddings", []),
                                  (None, "metadata_filters", []), (None, "provenance", {"enabled": False})):
        node = tree[section] if section else tree
        if node[key] == default or (key == "provenance" and not node[key]["enabled"]):
            node.pop(key)
    if tree["transform"]["crop"] == "square":  # the bucket settings only matter with buckets
        del tree["transform"]["crop"], tree["transform"]["buckets"]
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:16]
