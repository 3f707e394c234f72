"""The typed config tree of a training run (configs/train/*.yaml).

    model          ModelConfig (usually `base: ../model/<size>.yaml`)
    text_encoder   frozen text encoder        repa_teacher   frozen DINOv2 (when model.repa.enabled)
    data           streams, shuffle, loader   objective      time shift, text dropout, loss weights
    optimizer      AdamW, lr, warm-up         engine         ZeRO-3, precision, clipping, accumulation
    ema            decay                      checkpoint     every N steps, keep K, remote URI
    logging        metrics, wandb, sample grids
    global_batch, max_steps, seed, init_from, run_dir
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from deco.data.streaming import DataConfig, StreamConfig
from deco.model.config import ModelConfig
from deco.model.objective import ObjectiveConfig
from deco.model.repa import RepaTeacherConfig
from deco.model.text_encoder import TextEncoderConfig
from deco.orchestration.zero3.engine import EngineConfig, OptimizerConfig
from deco.pipeline.train.checkpoint import CheckpointConfig
from deco.pipeline.config import ConfigError, from_dict, load_config, to_dict
from deco.orchestration.zero3.ema import EmaConfig
from deco.pipeline.train.metrics import LoggingConfig


@dataclass(kw_only=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    repa_teacher: RepaTeacherConfig = field(default_factory=RepaTeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    global_batch: int = 1536         # samples per optimizer step over all ranks (fixed for a run)
    max_steps: int = 200_000
    seed: int = 0
    # Weights (.safetensors path or URI, e.g. the previous stage's promoted EMA export) to start
    # from when there is no checkpoint to resume; the optimizer starts fresh.
    init_from: str = ""
    run_dir: str = ""                # "" = runs/<config file name>
    # Non-finite losses in a row before the run stops (each such step is skipped and counted).
    max_nonfinite_steps: int = 10

    def validate(self) -> None:
        try:
            self.model.validate()
        except ValueError as err:
            raise ValueError(f"model: {err}") from None
        self.data.validate()
        self.engine.validate()
        self.optimizer.validate()
        self.ema.validate()
        self.checkpoint.validate()
        if self.global_batch < 1 or self.max_steps < 0:
            raise ValueError("global_batch must be >= 1 and max_steps >= 0")
        if self.text_encoder.max_length > self.model.dit.text_len:
            raise ValueError(f"text_encoder.max_length={self.text_encoder.max_length} exceeds the model's text "
                             f"position table model.dit.text_len={self.model.dit.text_len}")
        if self.model.repa.enabled and not self.repa_teacher.path:
            raise ValueError("model.repa.enabled needs repa_teacher.path (a local DINOv2 directory or cached hub id)")
        if self.resolution % self.model.dit.patch_size:
            raise ValueError(f"data resolution {self.resolution} is not a multiple of the patch {self.model.dit.patch_size}")

    @property
    def resolution(self) -> int:
        return self.data.resolution or self.model.resolution

    def micro_batch(self, world_size: int) -> int:
        """Per-rank batch of one micro-step; the global batch must divide evenly."""
        per_step = world_size * self.engine.grad_accum
        if self.global_batch % per_step:
            raise ConfigError(f"global_batch={self.global_batch} is not divisible by {world_size} ranks x "
                              f"engine.grad_accum={self.engine.grad_accum}")
        return self.global_batch // per_step

    def to_yaml(self) -> str:
        return yaml.safe_dump(to_dict(self), sort_keys=False)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(to_dict(self), sort_keys=True).encode()).hexdigest()[:16]


def load_train_config(path: str | Path, overrides: list[str] = (), *, data: str = "", max_steps: int | None = None,
                      checkpoint_every: int | None = None, run_dir: str = "") -> TrainConfig:
    """The config file with `--set` overrides, then the CLI's shortcut flags on top."""
    overrides = list(overrides)
    if max_steps is not None:
        overrides.append(f"max_steps={max_steps}")
    if checkpoint_every is not None:
        overrides.append(f"checkpoint.every={checkpoint_every}")
    if data:  # one MDS location in place of the config's streams
        overrides.append(f"data.streams=[{json.dumps(to_dict(StreamConfig(uri=data)))}]")
    if run_dir:
        overrides.append(f"run_dir={json.dumps(run_dir)}")
    cfg = load_config(TrainConfig, path, overrides)  # validates
    if not cfg.run_dir:
        cfg.run_dir = str(Path("runs") / Path(path).stem)
    return cfg


def train_config_from_yaml(text: str, source: str) -> TrainConfig:
    """The config a checkpoint carries (config.yaml), back into a TrainConfig."""
    return from_dict(TrainConfig, yaml.safe_load(text), source=source)
