"""The `mmdet` backend: the reference detector itself, mmdetection 2.x Mask2Former Swin-S
(`mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco`), for numbers exactly comparable with published
GenEval scores. Used only when mmdetection 2.x (and its mmcv-full) is installed: building that is
the user's choice, and this module says so clearly when it is missing. Colours go through the same
CLIP step as the `hf` backend.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from deco.pipeline.config import ConfigError
from deco.pipeline.evaluate.geneval.detections import Detection, decode_rle
from deco.pipeline.evaluate.geneval.detectors.base import Detector, MMDetDetectorConfig, resolve_device
from deco.pipeline.evaluate.geneval.detectors.clip_color import ClipColorClassifier
from deco.pipeline.evaluate.geneval.detectors.hf import geneval_label_map
from deco.pipeline.evaluate.geneval.prompts import object_names

INSTALL_HINT = ("the mmdet backend needs mmdetection 2.x with a matching mmcv-full (e.g. mmcv-full 1.7 and "
                "mmdet 2.28, built for your CUDA and GPU architecture) plus the reference config and "
                "checkpoint in detector.mmdet.config / detector.mmdet.checkpoint; or use --detector hf, which "
                "needs only transformers")


def convert_mmdet_result(result, labels: dict[int, str]) -> dict[str, list[Detection]]:
    """An mmdetection 2.x instance result -> class -> detections.

    Mask2Former returns [{"ins_results": (boxes, masks)}] (or the dict alone); classic instance
    models return (boxes, masks): per class index, an (n, 5) array of x1, y1, x2, y2, score and a
    list of n masks (bool arrays, or COCO RLE when encoded).
    """
    if isinstance(result, list) and len(result) == 1 and isinstance(result[0], dict):
        result = result[0]
    if isinstance(result, dict):
        if "ins_results" not in result:
            raise ValueError(f"mmdet result has no instance results (keys: {sorted(result)})")
        result = result["ins_results"]
    boxes_per_class, masks_per_class = result if isinstance(result, tuple) else (result, None)
    found: dict[str, list[Detection]] = {name: [] for name in labels.values()}
    for label, boxes in enumerate(boxes_per_class):
        if label not in labels:
            continue
        for j, row in enumerate(np.asarray(boxes, dtype=np.float64).reshape(-1, 5)):
            mask = None
            if masks_per_class is not None:
                raw = masks_per_class[label][j]
                mask = decode_rle(raw) if isinstance(raw, dict) else np.asarray(raw, dtype=bool)
            found[labels[label]].append(Detection(box=tuple(float(v) for v in row[:4]), score=float(row[4]),
                                                  mask=mask))
    return found


class MMDetDetector(Detector):
    name = "mmdet"

    def __init__(self, cfg: MMDetDetectorConfig | None = None):
        self.cfg = cfg or MMDetDetectorConfig()
        try:
            import mmdet
            from mmdet.apis import inference_detector, init_detector
        except ImportError as err:
            raise ConfigError(f"{INSTALL_HINT} (import failed: {err})") from None
        if not str(mmdet.__version__).startswith("2."):
            raise ConfigError(f"mmdetection {mmdet.__version__} is installed; {INSTALL_HINT}")
        if not self.cfg.config or not self.cfg.checkpoint:
            raise ConfigError("set detector.mmdet.config and detector.mmdet.checkpoint to the reference "
                              "Mask2Former config and weights")
        self.device = resolve_device(self.cfg.device)
        self._inference = inference_detector
        self.model = init_detector(self.cfg.config, self.cfg.checkpoint, device=self.device)
        self.labels = geneval_label_map(dict(enumerate(self.model.CLASSES)))
        self.classes = tuple(object_names())
        self._colors: ClipColorClassifier | None = None

    def detect(self, images: list[Image.Image]) -> list[dict[str, list[Detection]]]:
        # mmdetection reads ndarrays as BGR, like cv2.imread.
        return [convert_mmdet_result(self._inference(self.model, np.asarray(im.convert("RGB"))[:, :, ::-1].copy()),
                                     self.labels) for im in images]

    def classify_color(self, image: Image.Image, class_name: str, detection: Detection) -> str:
        if self._colors is None:
            self._colors = ClipColorClassifier(self.cfg.clip, self.device)
        return self._colors.classify(image, class_name, detection)
