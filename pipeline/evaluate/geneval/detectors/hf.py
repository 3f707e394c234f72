"""The `hf` backend: Mask2Former (Swin-S, COCO instance segmentation) and CLIP ViT-L/14 through
transformers, from a local directory or the local hub cache. No mmcv, nothing to compile, any GPU.

What matches the reference detector (mmdetection 2.x `mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco`):
the architecture (Swin-S backbone, 100 queries, 80 COCO classes), the test pipeline (resize keeping
the aspect ratio to fit 1333 x 800, ImageNet mean/std, pad to a multiple of 32) and the instance
post-processing: class probabilities without the no-object class, the 100 best (query, class)
pairs, masks where the upsampled logit is > 0, score = class probability x mean mask probability
inside the mask, box = the mask's extent. What differs: the weights. The hub checkpoint
`facebook/mask2former-swin-small-coco-instance` is the Mask2Former authors' own training (Detectron2,
mask AP about 46), the reference one is mmdetection's retraining (box AP 49.3); both are the same
model trained the same way, but not the same numbers, so per-image decisions can differ and
published GenEval scores are reproduced exactly only by the `mmdet` backend with the reference
checkpoint. The colour step (clip_color.py) uses the same OpenAI CLIP ViT-L/14 weights as the
reference (which loads them through open_clip).
"""
from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from deco.pipeline.config import ConfigError
from deco.pipeline.evaluate.geneval.detections import Detection
from deco.pipeline.evaluate.geneval.detectors.base import Detector, HFDetectorConfig, resolve_device
from deco.pipeline.evaluate.geneval.detectors.clip_color import ClipColorClassifier
from deco.pipeline.evaluate.geneval.prompts import object_names

log = logging.getLogger(__name__)

IMAGENET_MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32)
IMAGENET_STD = np.array([58.395, 57.12, 57.375], dtype=np.float32)
# Nothing at or below the lowest protocol threshold (0.3) can ever count, so it is not kept.
MIN_SCORE = 0.3

# COCO spellings used by detector checkpoints -> GenEval's object_names.txt spelling.
SYNONYMS = {
    "mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard", "tvmonitor": "tv",
    "tv monitor": "tv", "motorbike": "motorcycle", "aeroplane": "airplane", "sofa": "couch",
    "pottedplant": "potted plant", "diningtable": "dining table", "hair dryer": "hair drier",
    "cellphone": "cell phone", "doughnut": "donut", "ball": "sports ball",
}


def _normalise(label: str) -> str:
    return " ".join(label.lower().replace("_", " ").replace("-", " ").split())


def geneval_label_map(id2label: dict) -> dict[int, str]:
    """Model label id -> GenEval class name; every GenEval class must be covered.

    A checkpoint whose labels do not name the COCO classes would score zero everywhere: that is the
    reference evaluator's most reported failure, so it is an error here, not a silent result.
    """
    names = set(object_names())
    mapping = {}
    for key, label in id2label.items():
        name = _normalise(str(label))
        name = SYNONYMS.get(name, name)
        if name in names:
            mapping[int(key)] = name
    missing = sorted(names - set(mapping.values()))
    if missing:
        raise ConfigError(f"the detector's labels do not cover {len(missing)} GenEval classes (e.g. {missing[:5]}); "
                          f"it must be a COCO instance-segmentation checkpoint (labels seen: "
                          f"{[id2label[k] for k in list(id2label)[:5]]}...)")
    return mapping


def resized_shape(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv's keep-ratio rescale: the largest size with long edge <= scale[0], short <= scale[1]."""
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


class HFDetector(Detector):
    name = "hf"

    def __init__(self, cfg: HFDetectorConfig | None = None):
        from transformers import Mask2FormerForUniversalSegmentation

        from deco.model.text_encoder import from_pretrained_offline

        self.cfg = cfg or HFDetectorConfig()
        self.device = resolve_device(self.cfg.device)
        self.batch_size = self.cfg.batch_size
        self.model = from_pretrained_offline(Mask2FormerForUniversalSegmentation, self.cfg.mask2former,
                                             "Mask2Former").to(self.device).eval()
        self.labels = geneval_label_map(self.model.config.id2label)
        self.classes = tuple(object_names())
        self._colors: ClipColorClassifier | None = None

    @property
    def colors(self) -> ClipColorClassifier:
        if self._colors is None:  # loaded on the first colour clause: many runs need none
            self._colors = ClipColorClassifier(self.cfg.clip, self.device)
        return self._colors

    def preprocess(self, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
        shapes = [resized_shape(im.height, im.width, self.cfg.test_scale) for im in images]
        div = self.cfg.size_divisor
        pad_h = max(-(-h // div) * div for h, _ in shapes)
        pad_w = max(-(-w // div) * div for _, w in shapes)
        pixels = torch.zeros(len(images), 3, pad_h, pad_w)
        valid = torch.zeros(len(images), pad_h, pad_w, dtype=torch.long)
        for i, (image, (h, w)) in enumerate(zip(images, shapes)):
            array = np.asarray(image.convert("RGB").resize((w, h), Image.BILINEAR), dtype=np.float32)
            pixels[i, :, :h, :w] = torch.from_numpy((array - IMAGENET_MEAN) / IMAGENET_STD).permute(2, 0, 1)
            valid[i, :h, :w] = 1
        return pixels, valid, shapes

    @torch.no_grad()
    def detect(self, images: list[Image.Image]) -> list[dict[str, list[Detection]]]:
        pixels, valid, shapes = self.preprocess(images)
        outputs = self.model(pixel_values=pixels.to(self.device), pixel_mask=valid.to(self.device))
        results = []
        for i, image in enumerate(images):
            results.append(self._instances(outputs.class_queries_logits[i], outputs.masks_queries_logits[i],
                                           pixels.shape[-2:], shapes[i], (image.height, image.width)))
        return results

    def _instances(self, class_logits, mask_logits, padded, resized, original) -> dict[str, list[Detection]]:
        probs = class_logits.float().softmax(dim=-1)[:, :-1]             # drop "no object"
        num_classes = probs.shape[1]
        top = min(self.cfg.max_per_image, probs.numel())
        scores, flat = probs.flatten().topk(top)
        queries, labels = flat // num_classes, flat % num_classes
        # score = class prob x mask score <= class prob: nothing else can pass MIN_SCORE.
        wanted = (scores > MIN_SCORE) & torch.tensor([int(l) in self.labels for l in labels], device=scores.device)
        found: dict[str, list[Detection]] = {name: [] for name in self.classes}
        if not wanted.any():
            return found
        scores, queries, labels = scores[wanted], queries[wanted], labels[wanted]
        masks = F.interpolate(mask_logits[queries][None].float(), size=tuple(padded), mode="bilinear",
                              align_corners=False)[0]
        masks = masks[:, :resized[0], :resized[1]]
        masks = F.interpolate(masks[None], size=original, mode="bilinear", align_corners=False)[0]
        binary = masks > 0
        mask_scores = (masks.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
        final = (scores * mask_scores).cpu().numpy()
        binary = binary.cpu().numpy()
        for score, label, mask in zip(final, labels.tolist(), binary):
            if score <= MIN_SCORE or not mask.any():
                continue
            ys, xs = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
            box = (float(xs[0]), float(ys[0]), float(xs[-1] + 1), float(ys[-1] + 1))
            found[self.labels[label]].append(Detection(box=box, score=float(score), mask=mask))
        for detections in found.values():
            detections.sort(key=lambda d: d.score, reverse=True)
        return found

    def classify_color(self, image: Image.Image, class_name: str, detection: Detection) -> str:
        return self.colors.classify(image, class_name, detection)
