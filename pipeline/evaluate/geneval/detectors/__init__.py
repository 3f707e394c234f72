"""Detector backends behind one interface (base.Detector): `synthetic` (pixels of the synthetic
dataset), `hf` (Mask2Former + CLIP through transformers) and `mmdet` (the official mmdetection 2.x
Mask2Former, when installed). Backends import their heavy dependencies only when built."""
from __future__ import annotations

from deco.pipeline.evaluate.geneval.detectors.base import (BACKENDS, Detector, DetectorConfig, HFDetectorConfig,
                                                  MMDetDetectorConfig, SyntheticDetectorConfig)

__all__ = ["BACKENDS", "Detector", "DetectorConfig", "HFDetectorConfig", "MMDetDetectorConfig",
           "SyntheticDetectorConfig", "build_detector"]


def build_detector(cfg: DetectorConfig) -> Detector:
    cfg.validate()
    if cfg.backend == "synthetic":
        from deco.pipeline.evaluate.geneval.detectors.synthetic import SyntheticDetector

        return SyntheticDetector(cfg.synthetic)
    if cfg.backend == "hf":
        from deco.pipeline.evaluate.geneval.detectors.hf import HFDetector

        return HFDetector(cfg.hf)
    from deco.pipeline.evaluate.geneval.detectors.mmdet import MMDetDetector

    return MMDetDetector(cfg.mmdet)
