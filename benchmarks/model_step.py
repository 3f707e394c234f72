"""Forward+backward throughput of DeCo: samples/s, peak memory and MFU. JSON out.

CPU (always): the tiny config at its resolution, fp32.
GPU (when CUDA is present): t2i_xxl16 at 256 px batch 64 and 512 px batch 16 in bf16, eager and
torch.compile, with MFU against 989 TFLOP/s (dense bf16, H100 SXM / H200). The reference measured on
one H200 on the same work: 160.5 img/s eager and 331.7 img/s compiled at 256 px, 43.6 img/s eager at
512 px; the ratios below are against those numbers.

    python benchmarks/model_step.py [--out benchmarks/results/model_step.json] [--steps 10]
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import torch

from deco.model.config import ModelConfig
from deco.model.flops import deco_flops
from deco.model.objective import ObjectiveConfig, training_loss
from deco.pipeline.config import load_config

ROOT = Path(__file__).resolve().parents[1]
PEAK_BF16_FLOPS = 989e12
REFERENCE_IMG_S = {(256, "eager"): 160.5, (256, "compiled"): 331.7, (512, "eager"): 43.6}


def measure(name: str, cfg: ModelConfig, batch: int, device: str, dtype: torch.dtype, compiled: bool, steps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    model = cfg.build().to(device=device, dtype=dtype).train()
    res, dit = cfg.resolution, cfg.dit
    images = torch.rand(batch, 3, res, res, device=device, dtype=dtype) * 2 - 1
    text = torch.randn(batch, dit.text_len, dit.text_dim, device=device, dtype=dtype)
    mask = torch.ones(batch, dit.text_len, dtype=torch.bool, device=device)
    objective = ObjectiveConfig(text_dropout=0.0, time_shift=2.0 if res <= 256 else 4.0)

    def step():
        loss = training_loss(model, images, text, mask, objective)["loss"]
        loss.backward()
        return loss

    run = torch.compile(step) if compiled else step
    for _ in range(warmup):
        run()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        run()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    samples_per_s = batch * steps / seconds
    result = {
        "config": name, "resolution": res, "batch": batch, "dtype": str(dtype).removeprefix("torch."),
        "mode": "compiled" if compiled else "eager", "step_ms": round(1000 * seconds / steps, 2),
        "samples_per_s": round(samples_per_s, 2),
        "train_flops_per_sample": deco_flops(cfg).train,
    }
    if device == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        result["mfu"] = round(samples_per_s * deco_flops(cfg).train / PEAK_BF16_FLOPS, 4)
        reference = REFERENCE_IMG_S.get((res, result["mode"]))
        if reference:
            result["reference_h200_samples_per_s"] = reference
            result["ratio_vs_reference"] = round(samples_per_s / reference, 3)
    else:
        result["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
        result["achieved_gflop_s"] = round(samples_per_s * deco_flops(cfg).train / 1e9, 2)
    del model
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "model_step.json"))
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    results = {"host": platform.node(), "torch": torch.__version__, "threads": torch.get_num_threads(), "runs": []}

    tiny = load_config(ModelConfig, ROOT / "configs" / "model" / "tiny.yaml")
    results["runs"].append(measure("tiny", tiny, 32, "cpu", torch.float32, False, args.steps, warmup=2))

    if torch.cuda.is_available():
        results["gpu"] = torch.cuda.get_device_name()
        torch.backends.cuda.matmul.allow_tf32 = True
        for res, batch, modes in ((256, 64, (False, True)), (512, 16, (False, True))):
            cfg = load_config(ModelConfig, ROOT / "configs" / "model" / "t2i_xxl16.yaml", [f"resolution={res}", "repa.enabled=false"])
            for compiled in modes:
                results["runs"].append(measure("t2i_xxl16", cfg, batch, "cuda", torch.bfloat16, compiled, args.steps, warmup=3))
                torch.cuda.empty_cache()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
