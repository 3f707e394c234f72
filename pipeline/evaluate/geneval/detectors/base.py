"""The one interface every detector backend implements, and the backends' typed configs.

A detector turns images into class -> detections (boxes, scores, optional masks and colours) over
its own class vocabulary, and classifies an object's colour when asked. Thresholds, the 16-object
cap and every decision stay in rules.py, so all backends are scored by the same code.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from PIL import Image

from deco.pipeline.evaluate.geneval.detections import Detection
from deco.pipeline.evaluate.geneval.rules import ColorFn

BACKENDS = ("synthetic", "hf", "mmdet")


@dataclass(kw_only=True)
class SyntheticDetectorConfig:
    foreground_delta_e: float = 15.0    # CIELAB distance from the local background that makes a pixel foreground
    background_palette_l1: int = 45     # pixels this far (RGB L1) from every palette colour seed the background
    min_area_fraction: float = 0.002    # smaller components are noise (of the image area)
    min_area_pixels: int = 6
    min_side_fraction: float = 0.12     # and so are objects narrower than this share of the image (drawn: >= 0.2)
    split_fraction: float = 0.15        # a colour region this share of a component is its own object...
    split_depth: float = 0.3            # ...when its inscribed radius is this share of the component's
    denoise_above: float = 2.0          # border noise (RGB std) above which a 3x3 median runs first
    # Every object is drawn in one palette colour: a region whose pixels are not mostly within
    # purity_delta_e of that one colour is a blob of mixed colours (noise, smears), not an object.
    min_color_purity: float = 0.6
    purity_delta_e: float = 25.0
    max_area_fraction: float = 0.8      # a "component" this large means no background was found
    # A scene has a coherent background: the median CIELAB distance of background pixels from the
    # smooth background estimate is ~1 on renders, 7-15 on a trained model's samples, 20+ on noise.
    # Detection scores are scaled by 1 at or below background_residual_ok down to 0 at _max.
    background_residual_ok: float = 10.0
    background_residual_max: float = 20.0


@dataclass(kw_only=True)
class HFDetectorConfig:
    # Local directories or hub ids already in the local cache; nothing is downloaded.
    mask2former: str = "facebook/mask2former-swin-small-coco-instance"
    clip: str = "openai/clip-vit-large-patch14"
    device: str = "auto"                # auto: cuda when available
    batch_size: int = 8
    # The reference (mmdetection) test pipeline: resize keeping the aspect ratio to fit 1333 x 800,
    # pad to a multiple of 32, keep the 100 best (query, class) pairs.
    test_scale: tuple[int, int] = (1333, 800)
    size_divisor: int = 32
    max_per_image: int = 100


@dataclass(kw_only=True)
class MMDetDetectorConfig:
    config: str = ""                    # mmdetection 2.x config, e.g. mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.py
    checkpoint: str = ""                # its .pth weights
    clip: str = "openai/clip-vit-large-patch14"
    device: str = "auto"


@dataclass(kw_only=True)
class DetectorConfig:
    backend: str = "hf"                 # synthetic | hf | mmdet
    synthetic: SyntheticDetectorConfig = field(default_factory=SyntheticDetectorConfig)
    hf: HFDetectorConfig = field(default_factory=HFDetectorConfig)
    mmdet: MMDetDetectorConfig = field(default_factory=MMDetDetectorConfig)

    def validate(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"detector.backend {self.backend!r} is not one of {', '.join(BACKENDS)}")


class Detector(ABC):
    name: str = ""
    classes: tuple[str, ...] = ()
    batch_size: int = 1

    @abstractmethod
    def detect(self, images: list[Image.Image]) -> list[dict[str, list[Detection]]]:
        """Per image, class -> every detection found (unthresholded), best first or not."""

    def classify_color(self, image: Image.Image, class_name: str, detection: Detection) -> str:
        raise NotImplementedError(f"the {self.name} detector does not classify colours")

    def color_fn(self, image: Image.Image) -> ColorFn:
        return lambda class_name, detection: self.classify_color(image, class_name, detection)


def resolve_device(device: str) -> str:
    """`auto`: this rank's GPU (cuda:LOCAL_RANK under a launcher, else the current device), or the
    CPU. Plain `cuda` would put every rank's detector on GPU 0."""
    if device != "auto":
        return device
    import os

    import torch

    if not torch.cuda.is_available():
        return "cpu"
    local_rank = os.environ.get("LOCAL_RANK")
    return f"cuda:{int(local_rank) if local_rank is not None else torch.cuda.current_device()}"
