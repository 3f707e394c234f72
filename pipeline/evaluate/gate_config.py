"""Typed config of a stage gate (configs/gates/*.yaml): which prompts, how to generate and detect,
and the policy that promotes or rejects a checkpoint of the stage.

Policy (all checks must pass):
- overall GenEval score (mean of the task accuracies) >= thresholds.min_overall;
- each task named in thresholds.min_task >= its minimum;
- against the stage's last promoted checkpoint, or before it has one the promoted checkpoint of
  the stage it started from (baseline_uri), when evaluated on the same prompt set: the overall score
  may drop by at most thresholds.max_regression, and each task by at most
  thresholds.max_task_regression (absolute accuracy; null disables the check).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from deco.pipeline.config import ConfigError, apply_overrides, from_dict, load_config, to_dict
from deco.pipeline.evaluate.geneval.detectors.base import DetectorConfig
from deco.pipeline.evaluate.geneval.generate import GenerationConfig
from deco.pipeline.evaluate.geneval.prompts import TASKS

GATES_DIR = Path(__file__).resolve().parents[2] / "configs" / "gates"
WEIGHT_SOURCES = ("export", "file")


@dataclass(kw_only=True)
class Thresholds:
    min_overall: float = 0.0
    min_task: dict[str, float] = field(default_factory=dict)
    max_regression: float | None = None
    max_task_regression: float | None = None


@dataclass(kw_only=True)
class WeightsSource:
    # export: the trainer's deco.pipeline.train.export.export_checkpoint (EMA weights);
    # file: a weights .safetensors already inside the checkpoint, at `key`.
    source: str = "export"
    key: str = "weights.safetensors"
    ema: bool = True


@dataclass(kw_only=True)
class ReportConfig:
    html: bool = True
    wandb: bool = True
    wandb_project: str = "deco-gates"
    thumbnail: int = 96


@dataclass(kw_only=True)
class GateConfig:
    stage: str = ""                     # the stage's name, e.g. t2i_256
    stage_uri: str = ""                 # where its checkpoints land: <stage_uri>/checkpoints/step_*/
    # The stage this one started from (the pipeline sets it from init_from): until this stage promotes
    # a checkpoint, that stage's promoted scores are the baseline of the regression checks.
    baseline_uri: str = ""
    prompts: str = "official"           # official | synthetic | a prompt file (evaluation_metadata.jsonl format)
    synthetic_per_task: int = 0         # with prompts: synthetic, prompts per task (0: all combinations)
    synthetic_seed: int = 0
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    thresholds: Thresholds = field(default_factory=Thresholds)
    weights: WeightsSource = field(default_factory=WeightsSource)
    report: ReportConfig = field(default_factory=ReportConfig)
    work_dir: str = "runs/gates"        # local scratch: weights, images, results
    keep_images: bool = True            # keep generated images in work_dir after the verdict
    poll_s: float = 60.0                # watcher: seconds between looks at the checkpoint prefix
    lease_s: float = 900.0              # watcher: a claim not renewed for this long is abandoned
    max_attempts: int = 3               # evaluation failures before a checkpoint is rejected as unevaluable

    def validate(self) -> None:
        self.generation.validate()
        self.detector.validate()
        t = self.thresholds
        values = [t.min_overall, *t.min_task.values()] + [v for v in (t.max_regression, t.max_task_regression)
                                                           if v is not None]
        if any(not 0.0 <= v <= 1.0 for v in values):
            raise ValueError("thresholds are accuracies: every value must be within [0, 1]")
        unknown = sorted(set(t.min_task) - set(TASKS))
        if unknown:
            raise ValueError(f"thresholds.min_task names unknown task(s) {unknown}; tasks: {', '.join(TASKS)}")
        if self.weights.source not in WEIGHT_SOURCES:
            raise ValueError(f"weights.source must be one of {WEIGHT_SOURCES}, got {self.weights.source!r}")
        if self.poll_s <= 0 or self.lease_s <= 0 or self.max_attempts < 1:
            raise ValueError("poll_s and lease_s must be > 0 and max_attempts >= 1")
        if self.synthetic_per_task < 0:
            raise ValueError("synthetic_per_task must be >= 0")


def dump_gate_config(cfg: GateConfig, path: str | Path) -> Path:
    """Write `cfg` as YAML that load_gate_config reads back equal (how the gate hands its settings
    to the torchrun ranks it launches)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(json.loads(json.dumps(to_dict(cfg))), sort_keys=False))
    return path


def gate_config_path(name_or_path: str) -> Path:
    """A path to a YAML file, or the name of one in configs/gates/ (e.g. `demo_32`)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        return path
    candidate = GATES_DIR / f"{name_or_path}.yaml"
    if not candidate.is_file():
        known = sorted(p.stem for p in GATES_DIR.glob("*.yaml"))
        raise ConfigError(f"no gate config {name_or_path!r}: not a file, and not one of configs/gates: {', '.join(known)}")
    return candidate


def load_gate_config(name_or_path: str | None, overrides: list[str] = ()) -> GateConfig:
    """Load a gate config (defaults when None); invalid values are ConfigErrors naming the key."""
    try:
        if name_or_path is None:
            tree: dict = {}
            apply_overrides(tree, {}, overrides)
            return from_dict(GateConfig, tree, source="--set")
        return load_config(GateConfig, gate_config_path(name_or_path), overrides)
    except ValueError as err:  # a nested config's own check (e.g. the sampler's) fails as a ValueError
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(str(err)) from None
