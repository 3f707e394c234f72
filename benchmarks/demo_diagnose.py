"""Where do a demo checkpoint's patchy, speckled samples come from? Three measurements, JSON out.

1. The denoiser on real noised inputs: PSNR of the one-step x-prediction x_t + (1 - t) v against the
   clean image, beside the noisy input's own x_t / t; how much of the within-patch (p x p) detail it
   recovers; its share of outlier pixels (|pixel - 3x3 median| > 60/255) against the data's.
   A broken decoder (position code, conditioning) fails here.
2. The text: relative change of the predicted velocity when the caption is swapped or dropped.
   A model that ignores its caption cannot follow prompts whatever the sampler does.
3. The sampler: outlier pixels of the samples under Euler / Heun / Adams2, 10 vs 25 steps, time
   shift 1 vs 3, on the same noise and captions. A faulty last step or guidance shows up here.

    python benchmarks/demo_diagnose.py --weights runs/demo/work/stage_64/init_..._ema.safetensors \
        --data runs/demo/store/curated [--out benchmarks/results/demo_diagnose.json]

(`deco export --ema` of any demo checkpoint gives the weights; benchmarks/demo_sweep.py --grids
writes them too.)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import median_filter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_sweep import Encodings, load_samples  # noqa: E402  (a sibling script, not a package)

from deco.model.sampling import SamplerConfig  # noqa: E402
from deco.pipeline.evaluate.geneval.generate import sample_images  # noqa: E402
from deco.pipeline.weights import load_weights  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUTLIER = 60  # |pixel - its 3x3 median| in 0..255 above which a pixel counts as speckle
PROMPTS = ["a photo of a red circle", "a photo of a blue square", "a photo of two triangles",
           "a photo of a green triangle"]


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return round(float(10 * torch.log10(4 / ((a - b) ** 2).mean())), 2)  # images in [-1, 1]: peak-to-peak 2


def outlier_percent(images: torch.Tensor) -> float:
    shares = []
    for image in ((images.clamp(-1, 1).permute(0, 2, 3, 1).numpy() + 1) * 127.5):
        shares.append((np.abs(image - median_filter(image, size=(3, 3, 1))).max(-1) > OUTLIER).mean())
    return round(float(np.mean(shares)) * 100, 2)


def patch_mean(x: torch.Tensor, patch: int) -> torch.Tensor:
    return F.interpolate(F.avg_pool2d(x, patch), scale_factor=patch, mode="nearest")


@torch.no_grad()
def denoiser(model, images, text, mask, generator) -> list[dict]:
    patch = model.cfg.dit.patch_size
    noise = torch.randn(images.shape, generator=generator)
    detail = images - patch_mean(images, patch)
    rows = []
    for t in (0.2, 0.5, 0.75, 0.9, 0.97):
        x_t = t * images + (1 - t) * noise
        x_hat = x_t + (1 - t) * model(x_t, torch.full((len(images),), t), text, mask)
        missed = ((x_hat - patch_mean(x_hat, patch)) - detail).pow(2).mean() / detail.pow(2).mean()
        rows.append({"t": t, "psnr_prediction": psnr(x_hat, images), "psnr_noisy_input": psnr((x_t / t).clamp(-1, 1), images),
                     "in_patch_detail_recovered": round(1 - float(missed), 3), "outlier_pct_prediction": outlier_percent(x_hat)})
    return rows


@torch.no_grad()
def text_influence(model, encode: Encodings, resolution: int) -> list[dict]:
    text, mask = encode(PROMPTS)
    empty_text, empty_mask = encode.encoder.empty_encoding()
    x = torch.randn(len(PROMPTS), 3, resolution, resolution, generator=torch.Generator().manual_seed(0))
    rows = []
    for t in (0.0, 0.3, 0.6, 0.9):
        times = torch.full((len(PROMPTS),), t)
        v = model(x, times, text, mask)
        dropped = model(x, times, empty_text.expand_as(text), empty_mask.expand_as(mask))
        swapped = model(x, times, text.roll(1, 0), mask.roll(1, 0))
        rows.append({"t": t, "caption_dropped": round(float((v - dropped).norm() / v.norm()), 4),
                     "caption_swapped": round(float((v - swapped).norm() / v.norm()), 4)})
    return rows


def samplers(model, encoder) -> list[dict]:
    rows = []
    for method, steps, shift in (("euler", 10, 1.0), ("heun", 10, 1.0), ("adams2", 10, 1.0), ("adams2", 25, 1.0),
                                 ("adams2", 10, 3.0)):
        for cfg_scale in (1.5, 4.0):
            sampler = SamplerConfig(method=method, steps=steps, cfg_scale=cfg_scale, time_shift=shift)
            images = sample_images(model, encoder, PROMPTS * 4, list(range(16)), sampler, model.cfg.resolution)
            rows.append({"method": method, "steps": steps, "time_shift": shift, "cfg": cfg_scale,
                         "outlier_pct": outlier_percent(images)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", required=True)
    parser.add_argument("--data", default=str(ROOT / "runs" / "demo" / "store" / "curated"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "demo_diagnose.json"))
    parser.add_argument("--samples", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, text_cfg = load_weights(args.weights)
    model.eval()
    encode = Encodings(text_cfg)
    images, captions = load_samples(Path(args.data), model.cfg.resolution)
    generator = torch.Generator().manual_seed(1)
    chosen = torch.randperm(len(captions), generator=generator)[:args.samples]
    text, mask = encode([captions[i] for i in chosen])
    result = {"weights": args.weights, "resolution": model.cfg.resolution,
              "data_outlier_pct": outlier_percent(images[chosen]),
              "denoiser": denoiser(model, images[chosen], text, mask, generator),
              "text_influence": text_influence(model, encode, model.cfg.resolution),
              "samplers": samplers(model, encode.encoder)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
