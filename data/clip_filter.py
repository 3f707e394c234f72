"""The optional CLIP-score filter of curation: a pluggable image-text scorer (SCORERS, by name from
the config, never code named by a config) and the batch filter that rejects pairs below min_score
as `clip_score_low` (data/filters.py lists every reason)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
from PIL import Image

from deco.data.filters import Reject


@dataclass(kw_only=True)
class ClipFilterConfig:
    enabled: bool = False
    scorer: str = "clip"  # a name in SCORERS
    path: str = ""        # local directory (or local hub cache id) of the scorer's weights
    min_score: float = 0.28  # cosine similarity; DataComp's CLIP-score filters sit around 0.28-0.30
    batch_size: int = 32
    device: str = "cpu"
    # Reuse a score the dataset ships instead of running a model (no weights needed; scored from the
    # sample's metadata before its image is fetched or decoded, data/metadata.py): a field holding it
    # (LAION `similarity`, DataComp `clip_l14_similarity_score`), or the two .npz embeddings whose
    # cosine it is (DataComp: [l14_img, l14_txt]). At most one of the two.
    stored_score: str = ""
    stored_embeddings: list[str] = field(default_factory=list)

    @property
    def stored(self) -> bool:
        return bool(self.stored_score or self.stored_embeddings)

    def validate(self) -> None:
        if self.stored_embeddings and len(self.stored_embeddings) != 2:
            raise ValueError(f"clip.stored_embeddings names two .npz arrays (image, text), got {self.stored_embeddings}")
        if self.stored_score and self.stored_embeddings:
            raise ValueError("set clip.stored_score or clip.stored_embeddings, not both")


class ImageTextScorer(Protocol):
    def score(self, images: list[Image.Image], captions: list[str]) -> np.ndarray:
        """Similarity of each (image, caption) pair, shape (N,)."""


class ClipScorer:
    """Cosine similarity of CLIP image and text embeddings (Hugging Face CLIPModel, local weights)."""

    def __init__(self, model, tokenizer, image_processor, device: str = "cpu"):
        self.model = model.eval().to(device)
        self.tokenizer, self.image_processor, self.device = tokenizer, image_processor, device

    @classmethod
    def from_config(cls, cfg: ClipFilterConfig) -> ClipScorer:
        import transformers

        from deco.model.text_encoder import from_pretrained_offline

        model = from_pretrained_offline(transformers.CLIPModel, cfg.path, "CLIP scorer")
        tokenizer = from_pretrained_offline(transformers.AutoTokenizer, cfg.path, "CLIP scorer")
        if (Path(cfg.path) / "preprocessor_config.json").is_file():
            processor = from_pretrained_offline(transformers.CLIPImageProcessor, cfg.path, "CLIP scorer")
        else:
            side = model.config.vision_config.image_size
            processor = transformers.CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
        return cls(model, tokenizer, processor, cfg.device)

    def score(self, images: list[Image.Image], captions: list[str]) -> np.ndarray:
        import torch

        max_length = getattr(self.model.config.text_config, "max_position_embeddings", 77)
        with torch.no_grad():
            pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
            tokens = self.tokenizer(captions, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            image_emb = self.model.get_image_features(pixel_values=pixels)
            text_emb = self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                                    attention_mask=tokens["attention_mask"].to(self.device))
            image_emb = torch.nn.functional.normalize(image_emb.float(), dim=-1)
            text_emb = torch.nn.functional.normalize(text_emb.float(), dim=-1)
            return (image_emb * text_emb).sum(-1).cpu().numpy()


SCORERS: dict[str, Callable[[ClipFilterConfig], ImageTextScorer]] = {"clip": ClipScorer.from_config}


def register_scorer(name: str, factory: Callable[[ClipFilterConfig], ImageTextScorer]) -> None:
    """Make another scorer selectable as `clip.scorer: <name>` (registered in code, never from YAML)."""
    SCORERS[name] = factory


def build_scorer(cfg: ClipFilterConfig) -> ImageTextScorer:
    if cfg.scorer not in SCORERS:
        raise ValueError(f"clip.scorer {cfg.scorer!r} is not registered; known: {sorted(SCORERS)}")
    return SCORERS[cfg.scorer](cfg)


class ClipScoreFilter:
    def __init__(self, scorer: ImageTextScorer, min_score: float, batch_size: int = 32):
        self.scorer, self.min_score, self.batch_size = scorer, min_score, batch_size

    def check_batch(self, images: list[Image.Image], captions: list[str]) -> list[Reject | None]:
        results: list[Reject | None] = []
        for start in range(0, len(images), self.batch_size):
            scores = self.scorer.score(images[start:start + self.batch_size], captions[start:start + self.batch_size])
            results.extend(Reject("clip_score_low", f"{s:.4f} < {self.min_score}") if s < self.min_score else None
                           for s in np.asarray(scores, dtype=np.float64))
        return results
