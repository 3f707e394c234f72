"""Speed of the image blocks' attention with text padding: boolean-mask SDPA, unmasked SDPA (flash),
FlexAttention with a BlockMask (compiled, what dit.attention_backend=flex/auto runs on CUDA). JSON out.

XXL/16 at 256 px: hidden 1536 = 24 heads x 64, 256 image queries over 256 image + 128 text keys,
batch 64, bf16, caption lengths drawn uniformly in 1..128. Times forward and forward+backward of
the attention call alone, plus the once-per-forward BlockMask build. Without CUDA it only checks
that flex and SDPA agree on a small CPU case, prints "no CUDA" and exits 0.

    python benchmarks/attention.py [--out benchmarks/results/attention.json] [--steps 20]
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch

from deco.model.dit import flex_block_masks
from deco.model.layers import attention

ROOT = Path(__file__).resolve().parents[1]


def problem(batch, heads, head_dim, image_tokens, text_len, device, dtype, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    shape_q, shape_kv = (batch, heads, image_tokens, head_dim), (batch, heads, image_tokens + text_len, head_dim)
    q, k, v = (torch.randn(s, generator=gen).to(device, dtype) for s in (shape_q, shape_kv, shape_kv))
    valid = torch.randint(1, text_len + 1, (batch,), generator=gen)
    text_mask = (torch.arange(text_len)[None] < valid[:, None]).to(device)
    bool_mask = torch.cat([torch.ones(batch, image_tokens, dtype=torch.bool, device=device), text_mask], 1)
    return q, k, v, text_mask, bool_mask[:, None, None, :]


def cpu_check() -> float:
    q, k, v, text_mask, bool_mask = problem(3, 2, 16, 16, 8, "cpu", torch.float32)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's once-per-process "eager flex is unfused" notice
        flex = attention(q, k, v, flex_block_masks(text_mask, 16)[1])
        diff = (flex - attention(q, k, v, bool_mask)).abs().max().item()
    assert diff < 1e-5, diff
    return diff


def timed_ms(fn, steps: int, device: str, warmup: int = 5) -> float:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    return (time.perf_counter() - start) / steps * 1e3


def measure(shape: dict, device: str, dtype: torch.dtype, steps: int) -> dict:
    q, k, v, text_mask, bool_mask = problem(**shape, device=device, dtype=dtype)
    image_tokens = shape["image_tokens"]
    block_mask = flex_block_masks(text_mask, image_tokens)[1]
    masks = {"sdpa_masked": bool_mask, "sdpa_unmasked": None, "flex_masked": block_mask}
    q, k, v = (x.requires_grad_(True) for x in (q, k, v))
    grad_out = torch.randn_like(q)
    results, outputs = {}, {}
    for name, mask in masks.items():  # attention() picks the kernel from the mask, as the blocks do
        with torch.no_grad():
            outputs[name] = attention(q, k, v, mask).float()
            forward_ms = timed_ms(lambda: attention(q, k, v, mask), steps, device)
        train_ms = timed_ms(lambda: torch.autograd.backward(attention(q, k, v, mask), grad_out), steps, device)
        results[name] = {"forward_ms": round(forward_ms, 3), "forward_backward_ms": round(train_ms, 3)}
    build_ms = timed_ms(lambda: flex_block_masks(text_mask, image_tokens), steps, device)
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else device, "torch": torch.__version__,
        "dtype": str(dtype).removeprefix("torch."), **shape,
        "results": results,
        "block_mask_build_ms": round(build_ms, 3),   # both masks, built once per DiT forward
        "flex_vs_sdpa_masked_max_abs_diff": (outputs["flex_masked"] - outputs["sdpa_masked"]).abs().max().item(),
        "flex_speedup_over_sdpa_masked": {
            key: round(results["sdpa_masked"][key] / results["flex_masked"][key], 3) for key in results["sdpa_masked"]
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "attention.json")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    print(f"cpu: flex vs sdpa masked max abs diff {cpu_check():.2e}")
    if not torch.cuda.is_available():
        print("no CUDA")
        return
    shape = dict(batch=64, heads=24, head_dim=64, image_tokens=256, text_len=128)
    report = measure(shape, "cuda", torch.bfloat16, args.steps)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
