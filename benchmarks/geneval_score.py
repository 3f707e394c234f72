"""GenEval scoring throughput. JSON out.

CPU (always): the `synthetic` backend over freshly drawn scenes of the synthetic dataset written in
the official layout, at 32 / 64 / 256 / 512 px: images/s scored (detection + rules + I/O), the
detector's exact-match rate on those scenes, and two same-run baselines: decoding the PNGs alone
(the I/O floor) and re-scoring from the saved detections (the rules alone). Plus a whole demo gate
on the tiny model: generation images/s and scoring images/s.
GPU (when CUDA is present): the `hf` backend at the reference's size (Mask2Former Swin-S at the
1333 x 800 test scale, CLIP ViT-L/14 for colour clauses) with randomly initialised weights of the
real architectures (the cost does not depend on the weights' values), on 512 px images, images/s;
DeCo XXL/16 generation at 512 px with the paper's sampler (25 Adams-Bashforth steps, guidance as
one doubled batch), images/s; and the projected time of a full gate (2,212 images: generate + score).

    python benchmarks/geneval_score.py [--out benchmarks/results/geneval_score.json] [--scenes 100]
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from deco.data.synthetic import ground_truth, make_scene
from deco.pipeline.evaluate.geneval.detectors import DetectorConfig, build_detector
from deco.pipeline.evaluate.geneval.layout import read_layout, write_prompt_folder
from deco.pipeline.evaluate.geneval.score import score_images

ROOT = Path(__file__).resolve().parents[1]
GENEVAL_IMAGES = 2212


def exact(found: dict, truth: list[dict]) -> bool:
    got = sorted((name, d.color) for name, dets in found.items() for d in dets if d.score > 0.9)
    return got == sorted((o["class"], o["color"]) for o in truth)


def synthetic_backend(size: int, scenes: int, workdir: Path) -> dict:
    rng = random.Random(size)
    drawn = [make_scene(rng, size) for _ in range(scenes)]
    images = workdir / f"synthetic_{size}"
    for index, scene in enumerate(drawn):
        write_prompt_folder(images, index, scene.metadata(), [scene.image()])
    paths = [p for _, p in read_layout(images).images]
    start = time.perf_counter()
    for path in paths:
        with Image.open(path) as im:
            im.convert("RGB")
    decode_s = time.perf_counter() - start
    detector = build_detector(DetectorConfig(backend="synthetic"))
    start = time.perf_counter()
    results = score_images(images, detector, save_detections=workdir / f"detections_{size}.jsonl")
    score_s = time.perf_counter() - start
    start = time.perf_counter()
    score_images(images, None, detections_file=workdir / f"detections_{size}.jsonl")
    rules_s = time.perf_counter() - start
    found = detector.detect([s.image() for s in drawn])
    accuracy = sum(exact(f, ground_truth(s)) for f, s in zip(found, drawn)) / len(drawn)
    ips = len(paths) / score_s
    return {"resolution": size, "images": len(paths), "images_per_s": round(ips, 1),
            "decode_only_images_per_s": round(len(paths) / decode_s, 1),
            "rules_from_saved_detections_images_per_s": round(len(paths) / rules_s, 1),
            "ratio_vs_decode_only": round(ips / (len(paths) / decode_s), 4),
            "correct_fraction_vs_captions": round(sum(r["correct"] for r in results) / len(results), 4),
            "detector_exact_match": round(accuracy, 4),
            "projected_s_for_2212_images": round(GENEVAL_IMAGES / ips, 1)}


def demo_gate(workdir: Path) -> dict:
    """The demo gate's cost on this machine: tiny model at 32 px, 41 synthetic prompts x 4 images."""
    from deco.model.config import ModelConfig
    from deco.model.text_encoder import TextEncoderConfig
    from deco.pipeline.config import load_config
    from deco.pipeline.evaluate.gate_config import load_gate_config
    from deco.pipeline.evaluate.geneval.generate import generate_layout
    from deco.pipeline.evaluate.geneval.prompts import resolve_prompts
    from deco.pipeline.weights import save_weights

    torch.manual_seed(0)
    model = load_config(ModelConfig, ROOT / "configs" / "model" / "tiny.yaml").build()
    weights = save_weights(workdir / "tiny.safetensors", model,
                           TextEncoderConfig(kind="encoder", path="minilm", max_length=32, dtype="float32"))
    cfg = load_gate_config("demo_32")
    prompts = resolve_prompts(cfg.prompts, cfg.synthetic_per_task, cfg.synthetic_seed)
    start = time.perf_counter()
    stats = generate_layout(weights, prompts, workdir / "demo_images", cfg.generation, device="cpu")
    generation_s = time.perf_counter() - start
    start = time.perf_counter()
    results = score_images(workdir / "demo_images", build_detector(cfg.detector))
    score_s = time.perf_counter() - start
    return {"prompts": len(prompts), "images": stats["images"], "sampler_steps": cfg.generation.sampler.steps,
            "generation_images_per_s": round(stats["images"] / generation_s, 2),
            "generation_s_including_model_and_text_encoder_load": round(generation_s, 1),
            "scoring_images_per_s": round(len(results) / score_s, 1), "gate_s": round(generation_s + score_s, 1)}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def hf_backend(images: int, workdir: Path, device: str, clip_batch: int = 64) -> dict:
    from transformers import CLIPConfig, CLIPModel, Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

    from deco.pipeline.evaluate.geneval.detectors.base import HFDetectorConfig
    from deco.pipeline.evaluate.geneval.detectors.hf import HFDetector
    from deco.pipeline.evaluate.geneval.prompts import object_names

    names = object_names()
    swin = SwinConfig(embed_dim=96, depths=[2, 2, 18, 2], num_heads=[3, 6, 12, 24], window_size=7,
                      out_features=["stage1", "stage2", "stage3", "stage4"])
    m2f = Mask2FormerConfig(backbone_config=swin, num_queries=100, num_labels=80, id2label=dict(enumerate(names)),
                            label2id={n: i for i, n in enumerate(names)}, use_pretrained_backbone=False)
    Mask2FormerForUniversalSegmentation(m2f).save_pretrained(workdir / "mask2former")
    detector = HFDetector(HFDetectorConfig(mask2former=str(workdir / "mask2former"), device=device))
    clip = CLIPModel(CLIPConfig(text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                 num_attention_heads=12),
                                vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                                   num_attention_heads=16, patch_size=14, image_size=224),
                                projection_dim=768)).to(device).eval()
    rng = np.random.default_rng(0)
    batch = [Image.fromarray(rng.integers(0, 255, (512, 512, 3), dtype=np.uint8))
             for _ in range(min(detector.batch_size, images))]
    detector.detect(batch)  # warm-up
    _sync(device)
    start = time.perf_counter()
    done = 0
    while done < images:
        detector.detect(batch)
        done += len(batch)
    _sync(device)
    detect_s = time.perf_counter() - start
    # The colour step: one CLIP image embedding per coloured object (about 0.9 per GenEval image).
    crops = torch.randn(clip_batch, 3, 224, 224, device=device)
    with torch.no_grad():
        clip.get_image_features(pixel_values=crops[:2])
        _sync(device)
        start = time.perf_counter()
        for _ in range(4):
            clip.get_image_features(pixel_values=crops)
        _sync(device)
    clip_per_object_s = (time.perf_counter() - start) / (4 * clip_batch)
    per_image = detect_s / done + 0.9 * clip_per_object_s * 4  # unbatched crops cost about 4x a batched one
    return {"device": device, "images": done, "mask2former_images_per_s": round(done / detect_s, 2),
            "clip_ms_per_object_batched": round(clip_per_object_s * 1e3, 2),
            "images_per_s": round(1 / per_image, 2), "projected_s_for_2212_images": round(GENEVAL_IMAGES * per_image, 1),
            "note": "random weights of the real architectures (cost does not depend on their values)"}


def generation(images: int, device: str = "cuda", config: str = "t2i_xxl16", resolution: int = 512,
               batch: int = 16) -> dict:
    from deco.model.config import ModelConfig
    from deco.model.sampling import SamplerConfig, sample
    from deco.pipeline.config import load_config

    cfg = load_config(ModelConfig, ROOT / "configs" / "model" / f"{config}.yaml",
                      [f"resolution={resolution}", "repa.enabled=false"])
    model = cfg.build().to(device).eval()
    text = torch.randn(batch, cfg.dit.text_len, cfg.dit.text_dim, device=device)
    mask = torch.ones(batch, cfg.dit.text_len, dtype=torch.bool, device=device)
    sampler = SamplerConfig()

    def velocity(x, t, cond):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
            return model(x, t, cond[0], cond[1]).float()

    def run():
        noise = torch.randn(batch, 3, resolution, resolution, device=device)
        return sample(velocity, noise, sampler, (text, mask), (torch.zeros_like(text), mask))

    with torch.no_grad():
        run()
        _sync(device)
        start = time.perf_counter()
        done = 0
        while done < images:
            run()
            done += batch
        _sync(device)
    seconds = time.perf_counter() - start
    return {"model": config, "device": device, "resolution": resolution, "batch": batch, "steps": sampler.steps,
            "guided": sampler.guided, "images_per_s": round(done / seconds, 2),
            "projected_s_for_2212_images": round(GENEVAL_IMAGES * seconds / done, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "geneval_score.json"))
    parser.add_argument("--scenes", type=int, default=100)
    parser.add_argument("--gpu-images", type=int, default=128)
    parser.add_argument("--hf-on-cpu", type=int, default=0, metavar="N",
                        help="also time the hf backend on the CPU over N images (slow: full-size models)")
    args = parser.parse_args()
    report = {"machine": {"platform": platform.platform(), "cpus": torch.get_num_threads(),
                          "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}}
    with tempfile.TemporaryDirectory(prefix="geneval-bench-") as tmp:
        work = Path(tmp)
        report["synthetic_cpu"] = [synthetic_backend(size, args.scenes if size <= 256 else max(10, args.scenes // 4), work)
                                   for size in (32, 64, 256, 512)]
        report["demo_gate_cpu"] = demo_gate(work)
        if args.hf_on_cpu:
            report["hf_cpu"] = hf_backend(args.hf_on_cpu, work, "cpu", clip_batch=4)
        if torch.cuda.is_available():
            report["hf_gpu"] = hf_backend(args.gpu_images, work, "cuda")
            report["generation_gpu"] = generation(args.gpu_images)
            total = report["hf_gpu"]["projected_s_for_2212_images"] + report["generation_gpu"]["projected_s_for_2212_images"]
            report["projected_full_gate_minutes_one_gpu"] = round(total / 60, 2)
        else:
            report["hf_gpu"] = {"skipped": "no CUDA device on this machine"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
