"""`deco demo`: what exists of the pipeline, end to end, offline, on this CPU in a few minutes.

Builds the tiny DeCo, encodes synthetic captions with the packaged MiniLM text encoder, trains on a
fixed batch of synthetic images with the real DeCo objective, exports the weights, and samples a
grid through the same code path as `deco sample`.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from deco.data.synthetic import synthetic_pairs
from deco.model.config import ModelConfig
from deco.model.objective import ObjectiveConfig, drop_text, training_loss
from deco.model.sampling import SamplerConfig
from deco.model.text_encoder import TextEncoderConfig
from deco.pipeline.config import load_config
from deco.pipeline.sample import generate, save_grid
from deco.pipeline.weights import save_weights

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
DEMO_TEXT_ENCODER = TextEncoderConfig(kind="encoder", path="minilm", max_length=32, dtype="float32")


def images_to_tensor(images) -> torch.Tensor:
    array = np.stack([np.asarray(im, dtype=np.float32) for im in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1.0


def run_demo(out_dir: str | Path = "demo_out", steps: int = 400, batch: int = 32, seed: int = 0,
             lr: float = 1e-3, log_every: int = 25) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model_cfg = load_config(ModelConfig, CONFIG_DIR / "model" / "tiny.yaml")
    model = model_cfg.build()
    encoder = DEMO_TEXT_ENCODER.build()
    objective = ObjectiveConfig(time_shift=1.0)  # 32 px: little signal to hide, no shift needed

    pairs = synthetic_pairs(batch, model_cfg.resolution, seed)
    captions = [caption for _, caption in pairs]
    images = images_to_tensor([image for image, _ in pairs])
    text, mask = encoder.encode(captions)
    empty = encoder.empty_encoding()
    save_grid(images[:16], out_dir / "train_batch.png", columns=4)

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    losses, start = [], time.perf_counter()
    with open(out_dir / "metrics.jsonl", "w") as metrics:
        for step in range(1, steps + 1):
            step_text, step_mask = drop_text(text, mask, empty, objective.text_dropout, generator)
            parts = training_loss(model, images, step_text, step_mask, objective, generator=generator)
            optimizer.zero_grad(set_to_none=True)
            parts["loss"].backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            record = {"step": step, **{k: round(v.item(), 5) for k, v in parts.items()},
                      "grad_norm": round(grad_norm.item(), 4), "elapsed_s": round(time.perf_counter() - start, 2)}
            metrics.write(json.dumps(record) + "\n")
            losses.append(record["loss"])
            if step % log_every == 0 or step == 1:
                print(f"step {step:4d}/{steps}  loss {record['loss']:.4f}  mse {record['mse']:.4f}  "
                      f"freq {record['freq']:.4f}  {record['elapsed_s']:.0f}s", flush=True)

    weights = save_weights(out_dir / "tiny_demo.safetensors", model.eval(), DEMO_TEXT_ENCODER,
                           extra={"steps": steps, "captions": captions[:16]})
    sampler = SamplerConfig(method="adams2", steps=25, cfg_scale=2.0, time_shift=1.0)
    samples = generate(model, encoder, captions[:16], sampler, seed=seed)
    grid = save_grid(samples, out_dir / "samples.png", columns=4)
    window = min(20, len(losses))
    summary = {
        "steps": steps,
        "loss_first": round(float(np.mean(losses[:window])), 4),
        "loss_last": round(float(np.mean(losses[-window:])), 4),
        "train_seconds": round(time.perf_counter() - start, 1),
        "weights": str(weights), "samples": str(grid), "train_batch": str(out_dir / "train_batch.png"),
        "sample_command": f"deco sample --weights {weights} --prompt \"{captions[0]}\" --n 4 --out {out_dir}/sample.png",
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
