"""The `hf` backend (Mask2Former Swin + CLIP through transformers) end to end on tiny random models
of the same architectures, the CLIP colour step's exact recipe, and the `mmdet` backend's edges."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from deco.pipeline.config import ConfigError
from deco.pipeline.evaluate.geneval.detections import Detection
from deco.pipeline.evaluate.geneval.detectors import DetectorConfig, HFDetectorConfig, build_detector
from deco.pipeline.evaluate.geneval.detectors.clip_color import GREY, TEMPLATES, ClipColorClassifier, masked_crop
from deco.pipeline.evaluate.geneval.detectors.hf import geneval_label_map, resized_shape
from deco.pipeline.evaluate.geneval.detectors.mmdet import convert_mmdet_result
from deco.pipeline.evaluate.geneval.layout import write_prompt_folder
from deco.pipeline.evaluate.geneval.prompts import COLORS, object_names
from deco.pipeline.evaluate.geneval.score import read_results
from geneval_helpers import run_deco

# Detectron2 / hub checkpoints spell a few COCO classes differently from GenEval.
HUB_SPELLING = {"computer mouse": "mouse", "tv remote": "remote", "computer keyboard": "keyboard"}


def coco_labels() -> dict[int, str]:
    return {i: HUB_SPELLING.get(n, n) for i, n in enumerate(object_names())}


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer, Mask2FormerConfig,
                              Mask2FormerForUniversalSegmentation, SwinConfig)
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    labels = coco_labels()
    swin = SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 2],
                      window_size=4, out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(backbone_config=swin, feature_size=32, mask_feature_size=32, hidden_dim=32,
                               encoder_feedforward_dim=64, dim_feedforward=64, encoder_layers=1, decoder_layers=2,
                               num_attention_heads=2, num_queries=8, num_labels=80, id2label=labels,
                               label2id={v: k for k, v in labels.items()}, use_pretrained_backbone=False)
    detector = Mask2FormerForUniversalSegmentation(config)
    with torch.no_grad():  # every query says "dog": the random model then finds dogs, so every rule runs
        detector.class_predictor.bias.zero_()
        detector.class_predictor.bias[object_names().index("dog")] = 12.0
    detector.save_pretrained(root / "mask2former")

    chars = list(bytes_to_unicode().values())
    vocab = {token: i for i, token in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    clip_dir = root / "clip"
    CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt")).save_pretrained(clip_dir)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(clip_dir)
    clip = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, eos_token_id=vocab["<|endoftext|>"]),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8), projection_dim=16))
    clip.save_pretrained(clip_dir)
    return root / "mask2former", clip_dir


def test_label_map_accepts_hub_spellings_and_refuses_other_label_sets():
    mapping = geneval_label_map(coco_labels())
    assert sorted(mapping.values()) == sorted(object_names())
    assert mapping[object_names().index("computer mouse")] == "computer mouse"
    with pytest.raises(ConfigError, match="do not cover 80 GenEval classes"):
        geneval_label_map({i: f"LABEL_{i}" for i in range(80)})


def test_test_scale_matches_the_reference_pipeline():
    assert resized_shape(512, 512, (1333, 800)) == (800, 800)
    assert resized_shape(480, 640, (1333, 800)) == (800, 1067)
    assert resized_shape(300, 1200, (1333, 800)) == (333, 1333)


def test_masked_crop_paints_grey_outside_the_mask_and_crops_to_the_box():
    pixels = np.zeros((20, 30, 3), dtype=np.uint8)
    pixels[:, :] = (10, 200, 10)
    mask = np.zeros((20, 30), dtype=bool)
    mask[5:10, 8:12] = True
    crop = np.asarray(masked_crop(Image.fromarray(pixels), Detection((6, 4, 14.5, 11), 0.9, mask=mask)))
    assert crop.shape == (7, 9, 3)                               # rows 4..10, columns 6..14 (box rounded outward)
    inside = mask[4:11, 6:15]
    assert (crop[inside] == (10, 200, 10)).all() and (crop[~inside] == GREY).all()


def test_clip_colour_embeddings_follow_the_recipe(tiny_models):
    _, clip_dir = tiny_models
    classifier = ClipColorClassifier(str(clip_dir))
    embeddings = classifier.color_embeddings("fire hydrant")
    assert embeddings.shape == (10, 16) and torch.allclose(embeddings.norm(dim=-1), torch.ones(10), atol=1e-5)
    with torch.no_grad():  # recomputed by hand for one colour: normalise each template, average, normalise
        texts = [t.format(color="purple", cls="fire hydrant") for t in TEMPLATES]
        assert texts[1] == "a photo of a purple-colored fire hydrant" and texts[2] == "a photo of a purple object"
        features = classifier.model.get_text_features(**classifier.tokenizer(texts, padding=True, return_tensors="pt"))
        features = features / features.norm(dim=-1, keepdim=True)
        expected = features.mean(0) / features.mean(0).norm()
    assert torch.allclose(embeddings[COLORS.index("purple")], expected, atol=1e-5)
    image = Image.fromarray(np.full((24, 24, 3), (40, 80, 220), dtype=np.uint8))
    assert classifier.classify(image, "fire hydrant", Detection((2, 2, 20, 20), 0.9)) in COLORS


def test_hf_backend_scores_a_layout_end_to_end(tiny_models, tmp_path):
    mask2former, clip_dir = tiny_models
    images = tmp_path / "images"
    prompts = [{"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"},
               {"tag": "colors", "include": [{"class": "dog", "count": 1, "color": "blue"}], "prompt": "a photo of a blue dog"},
               {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"}]
    rng = np.random.default_rng(0)
    for index, meta in enumerate(prompts):
        write_prompt_folder(images, index, meta, [Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
                                                   for _ in range(2)])
    flags = ["--set", f"detector.hf.mask2former={mask2former}", "--set", f"detector.hf.clip={clip_dir}",
             "--set", "detector.hf.test_scale=[96, 64]", "--set", "detector.hf.device=cpu"]
    result = run_deco("geneval", "score", "--images", str(images), "--out", str(tmp_path / "r.jsonl"),
                      "--detector", "hf", "--save-detections", str(tmp_path / "d.jsonl"), *flags)
    assert result.returncode == 0, result.stderr
    rows = read_results(tmp_path / "r.jsonl")
    assert len(rows) == 6
    dogs = [r for r in rows if r["prompt"] == "a photo of a dog"]
    assert all(r["correct"] for r in dogs) and all(r["details"]["include"][0]["kept"] >= 1 for r in dogs)
    assert all(not r["correct"] and "expected cat>=1, found 0" in r["reason"] for r in rows if r["prompt"] == "a photo of a cat")
    blue = [r for r in rows if r["prompt"] == "a photo of a blue dog"]
    assert all(r["details"]["include"][0]["colors"][0] in COLORS for r in blue)  # CLIP decided, right or wrong
    assert all(r["correct"] == (r["details"]["include"][0]["colors"] == ["blue"]) for r in blue)
    record = json.loads((tmp_path / "d.jsonl").read_text().splitlines()[0])
    dog = record["detections"]["dog"][0]
    assert record["filename"] == "00000/samples/0000.png" and dog["score"] > 0.3 and dog["mask"]["size"] == [48, 64]
    x1, y1, x2, y2 = dog["box"]
    assert 0 <= x1 < x2 <= 64 and 0 <= y1 < y2 <= 48


def test_hf_backend_without_weights_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="Nothing is downloaded at run time"):
        build_detector(DetectorConfig(backend="hf", hf=HFDetectorConfig(mask2former=str(tmp_path / "absent"))))


def test_mmdet_backend_says_what_to_install_and_converts_its_results():
    with pytest.raises(ConfigError, match="mmdetection 2.x"):
        build_detector(DetectorConfig(backend="mmdet"))
    boxes = [np.zeros((0, 5))] * 80
    boxes[16] = np.array([[1, 2, 11, 12, 0.97], [20, 20, 30, 40, 0.2]])   # class 16 = dog
    masks = [[] for _ in range(80)]
    masks[16] = [np.ones((50, 50), dtype=bool), np.zeros((50, 50), dtype=bool)]
    found = convert_mmdet_result([{"ins_results": (boxes, masks)}], geneval_label_map(dict(enumerate(object_names()))))
    assert [(d.box, d.score) for d in found["dog"]] == [((1, 2, 11, 12), 0.97), ((20, 20, 30, 40), 0.2)]
    assert found["dog"][0].mask.all() and found["cat"] == []
