"""Typed config of a staged pipeline (configs/pipelines/*.yaml): which stages, in which order.

Each stage names its own config file (paths relative to the pipeline file) and overrides for it:
- synth:   write the synthetic raw dataset (demo and tests) with `deco data synth`.
- curate:  `deco curate` of raw inputs (URIs, or the output of a synth stage) into MDS shards.
- train:   `deco train` on a curate stage's shards; `init_from` names the train stage whose
           PROMOTED checkpoint (EMA weights) starts this one; `gate` is the gate config run on its
           checkpoints. A train stage whose `init_from` stage has promoted nothing does not start.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from deco.pipeline.config import ConfigError

STAGE_KINDS = ("synth", "curate", "train")


@dataclass(kw_only=True)
class StageConfig:
    name: str
    kind: Literal["synth", "curate", "train"]
    config: str = ""                      # curate / train / the train stage's gate: config files
    overrides: list[str] = field(default_factory=list)   # `--set` for the stage's config
    # synth
    samples: int = 0
    seed: int = 0
    bad_fraction: float = 0.0
    format: Literal["webdataset", "parquet", "folder"] = "webdataset"
    # curate
    inputs: list[str] = field(default_factory=list)      # URIs or names of synth stages
    # train
    data_from: str = ""                   # the curate stage whose shards this stage streams
    resolution: int = 0                   # the shard resolution to stream (0: the train config's)
    init_from: str = ""                   # a train stage whose promoted checkpoint starts this one
    nproc: int = 1                        # local ranks (a cluster launch uses `deco launch` instead)
    gate: str = ""                        # gate config file; empty: no gate (nothing is promoted)
    gate_overrides: list[str] = field(default_factory=list)


@dataclass(kw_only=True)
class PipelineConfig:
    name: str
    root: str = "runs/pipeline"           # object storage for every stage's output (local or s3://)
    work_dir: str = ""                    # local scratch (logs, metrics, exports); "" = runs/<name>
    stages: list[StageConfig] = field(default_factory=list)
    source: str = ""                      # the pipeline file, set by the loader (paths resolve from it)

    def validate(self) -> None:
        seen: dict[str, StageConfig] = {}
        for stage in self.stages:
            if stage.name in seen:
                raise ValueError(f"stage name {stage.name!r} is used twice")
            if stage.kind in ("curate", "train") and not stage.config:
                raise ValueError(f"stage {stage.name!r} ({stage.kind}) needs `config`")
            if stage.kind == "synth" and stage.samples < 1:
                raise ValueError(f"stage {stage.name!r} (synth) needs samples >= 1")
            for ref, wanted in self._references(stage):
                if ref not in seen:
                    raise ValueError(f"stage {stage.name!r} refers to {ref!r}, which is not an earlier stage")
                if seen[ref].kind not in wanted:
                    raise ValueError(f"stage {stage.name!r}: {ref!r} is a {seen[ref].kind} stage, expected {'/'.join(wanted)}")
            seen[stage.name] = stage
        if not self.stages:
            raise ValueError("a pipeline needs at least one stage")

    @staticmethod
    def _references(stage: StageConfig):
        if stage.kind == "curate":
            yield from ((i, ("synth",)) for i in stage.inputs if "://" not in i and not i.startswith(("/", ".")))
        if stage.kind == "train":
            if not stage.data_from:
                raise ValueError(f"stage {stage.name!r} (train) needs `data_from` (a curate stage)")
            yield stage.data_from, ("curate",)
            if stage.init_from:
                yield stage.init_from, ("train",)

    def resolve(self, path: str) -> str:
        """A stage's config path, relative to the pipeline file."""
        if not path or "://" in path or Path(path).is_absolute():
            return path
        return str((Path(self.source).parent / path).resolve())

    def stage(self, name: str) -> StageConfig:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise ConfigError(f"no stage {name!r} in {self.source}; stages: {[s.name for s in self.stages]}")
