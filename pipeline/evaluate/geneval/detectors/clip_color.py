"""GenEval's colour step with CLIP (ViT-L/14, OpenAI weights) through transformers.

The object's pixels outside its instance mask are painted grey #999, the image is cropped to the
object's box, and the crop is classified zero-shot over the ten colours. Each colour's text
embedding is the mean of the normalised embeddings of three prompts ("a photo of a {c} {class}",
"a photo of a {c}-colored {class}", "a photo of a {c} object"), normalised again; the colour whose
embedding has the highest cosine similarity with the crop's wins.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from deco.pipeline.evaluate.geneval.detections import Detection
from deco.pipeline.evaluate.geneval.prompts import COLORS

GREY = (153, 153, 153)  # #999
TEMPLATES = ("a photo of a {color} {cls}", "a photo of a {color}-colored {cls}", "a photo of a {color} object")


def masked_crop(image: Image.Image, detection: Detection) -> Image.Image:
    """The object on grey: pixels outside its mask painted #999, cropped to its box."""
    rgb = np.array(image.convert("RGB"))
    if detection.mask is not None:
        if detection.mask.shape != rgb.shape[:2]:
            raise ValueError(f"mask {detection.mask.shape} does not match the image {rgb.shape[:2]}")
        rgb[~detection.mask] = GREY
    x1, y1, x2, y2 = detection.box
    left, top = max(0, int(np.floor(x1))), max(0, int(np.floor(y1)))
    right, bottom = min(rgb.shape[1], int(np.ceil(x2))), min(rgb.shape[0], int(np.ceil(y2)))
    if right <= left or bottom <= top:  # a degenerate box: classify the single nearest pixel
        right, bottom = min(rgb.shape[1], left + 1), min(rgb.shape[0], top + 1)
    return Image.fromarray(rgb[top:bottom, left:right])


class ClipColorClassifier:
    """Zero-shot colour of a detected object; text embeddings are computed once per class."""

    def __init__(self, path: str, device: str = "cpu"):
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        from deco.model.text_encoder import from_pretrained_offline

        self.device = device
        self.model = from_pretrained_offline(CLIPModel, path, "CLIP").to(device).eval()
        self.tokenizer = from_pretrained_offline(AutoTokenizer, path, "CLIP tokenizer")
        self.processor = from_pretrained_offline(CLIPImageProcessor, path, "CLIP image processor")
        self._text: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def color_embeddings(self, class_name: str) -> torch.Tensor:
        """(10, D) unit vectors, one per colour in COLORS order."""
        if class_name not in self._text:
            texts = [t.format(color=c, cls=class_name) for c in COLORS for t in TEMPLATES]
            tokens = self.tokenizer(texts, padding=True, return_tensors="pt").to(self.device)
            features = self.model.get_text_features(**tokens).float()
            features = features / features.norm(dim=-1, keepdim=True)
            mean = features.view(len(COLORS), len(TEMPLATES), -1).mean(dim=1)
            self._text[class_name] = mean / mean.norm(dim=-1, keepdim=True)
        return self._text[class_name]

    @torch.no_grad()
    def probabilities(self, crops: list[Image.Image], class_name: str) -> torch.Tensor:
        pixels = self.processor(images=crops, return_tensors="pt")["pixel_values"].to(self.device)
        features = self.model.get_image_features(pixel_values=pixels).float()
        features = features / features.norm(dim=-1, keepdim=True)
        logits = self.model.logit_scale.exp().float() * features @ self.color_embeddings(class_name).T
        return logits.softmax(dim=-1).cpu()

    def classify(self, image: Image.Image, class_name: str, detection: Detection) -> str:
        return COLORS[int(self.probabilities([masked_crop(image, detection)], class_name)[0].argmax())]
