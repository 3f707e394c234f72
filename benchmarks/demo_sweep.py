"""Sweep of the CPU demo's training settings: which tiny DeCo learns shapes in the demo's budget?

Trains in one process (no DeepSpeed: the same model, objective, optimizer maths, EMA rule and
sampler as the demo's ZeRO-3 stages, without the launch cost) on the demo's curated shards, then
scores the EMA weights with the demo gate's synthetic GenEval (same prompts, seeds, detector).
Each variant is a list of stages (resolution, steps, settings); a stage starts from the previous
stage's weights as `init_from` does. JSON out, one row per (variant, stage), with the training
CPU seconds, so settings are compared at equal cost.

    python benchmarks/demo_sweep.py --data runs/demo/store/curated --variants base,p4 \
        [--out benchmarks/results/demo_sweep.json] [--grids /tmp/grids]

`--data` is a curation output holding 32/ and 64/ MDS datasets (what the demo's `curated` stage
writes; `make demo` leaves one at runs/demo/store/curated); `--synth N` trains on N freshly rendered
scenes instead, to measure what more distinct data buys.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch

from deco.model.objective import ObjectiveConfig, drop_text, training_loss
from deco.model.text_encoder import TextEncoderConfig
from deco.orchestration.zero3.ema import EmaConfig
from deco.pipeline.config import load_config
from deco.pipeline.evaluate.gate_config import load_gate_config
from deco.pipeline.evaluate.geneval.generate import generate_layout
from deco.pipeline.evaluate.geneval.prompts import resolve_prompts
from deco.pipeline.evaluate.geneval.score import score_images
from deco.pipeline.evaluate.geneval.summary import summarize
from deco.pipeline.train.config import TrainConfig
from deco.pipeline.weights import save_weights

ROOT = Path(__file__).resolve().parents[1]
TRAIN_CONFIG = ROOT / "configs" / "train" / "tiny_cpu.yaml"

# A variant: model overrides (on configs/model/tiny.yaml via the train config) and stages. Stage
# keys: res, steps, lr, warmup, batch, ema, shift (training time shift), sample_shift, cfg, sampler_steps,
# bf16 (train under bf16 autocast), tdist (training time distribution), cosine (lr decayed to 0),
# evals (steps scored on the way).
BASE_STAGES = [dict(res=32, steps=360, lr=1e-3, warmup=0, batch=16, ema=0.95, shift=1.0, sample_shift=1.0,
                    cfg=4.0, sampler_steps=10),
               dict(res=64, steps=240, lr=5e-4, warmup=0, batch=16, ema=0.95, shift=1.0, sample_shift=3.0,
                    cfg=4.0, sampler_steps=10)]


def stages(*changes: dict) -> list[dict]:
    return [{**base, **change} for base, change in zip(BASE_STAGES, changes)]


# A smaller DiT on a finer token grid: 8x8 tokens at 32 px, where patch 8 gives 4x4 (shapes are
# 1/5 to 1/2 of the scene's side, so at patch 8 a shape is one or two tokens).
SMALL_P4 = ["model.dit.patch_size=4", "model.dit.hidden=128", "model.dit.heads=2", "model.dit.mlp_hidden=512",
            "model.dit.depth=4", "model.dit.text_refine_depth=1"]

VARIANTS: dict[str, dict] = {
    "base": dict(model=[], stages=BASE_STAGES),
    "p8_32": dict(model=[], stages=BASE_STAGES[:1]),
    "pooled_32": dict(model=["model.dit.pooled_text=true"], stages=BASE_STAGES[:1]),
    "p4s_32": dict(model=SMALL_P4 + ["model.dit.pooled_text=true"],
                   stages=stages(dict(steps=720, evals=[360]))[:1]),
    "p4s_x_32": dict(model=SMALL_P4 + ["model.dit.pooled_text=true", "model.decoder.predicts=data"],
                     stages=stages(dict(steps=720, evals=[360]))[:1]),
    "p4s_x_lr3_32": dict(model=SMALL_P4 + ["model.dit.pooled_text=true", "model.decoder.predicts=data"],
                         stages=stages(dict(steps=720, lr=3e-3, warmup=30, evals=[360]))[:1]),
    "p8_x_32": dict(model=["model.dit.pooled_text=true", "model.decoder.predicts=data"],
                    stages=stages(dict(steps=720, evals=[360]))[:1]),
    "p8_x_b32_32": dict(model=["model.dit.pooled_text=true", "model.decoder.predicts=data"],
                        stages=stages(dict(steps=540, batch=32, lr=1.4e-3, evals=[360]))[:1]),
    "x_64only": dict(model=["model.dit.pooled_text=true", "model.decoder.predicts=data"],
                     stages=[dict(BASE_STAGES[1], steps=480, lr=1e-3, evals=[240])]),
    # How far 64 px alone goes with more samples (bf16 autocast: ~1.4x the fp32 rate at 64 px here).
    "x_64long_bf16": dict(model=["model.dit.pooled_text=true", "model.decoder.predicts=data"],
                          stages=[dict(BASE_STAGES[1], steps=1440, lr=1e-3, bf16=True, evals=[480, 960])]),
    # The same, 960 steps: with --synth 12000, on ten times the distinct scenes the demo curates.
    "x_64_bf16": dict(model=["model.dit.pooled_text=true", "model.decoder.predicts=data"],
                      stages=[dict(BASE_STAGES[1], steps=960, lr=1e-3, bf16=True, evals=[480])]),
    # The same with a 200-step EMA horizon instead of 20 (the warm-up keeps the early average short).
    "x_64_ema995_bf16": dict(model=["model.dit.pooled_text=true", "model.decoder.predicts=data"],
                             stages=[dict(BASE_STAGES[1], steps=960, lr=1e-3, ema=0.995, bf16=True, evals=[480])]),
    # Training times drawn with the sampler's shift (3 at 64 px): more of them at the noisy end.
    "x_64_shift3_bf16": dict(model=["model.dit.pooled_text=true", "model.decoder.predicts=data"],
                             stages=[dict(BASE_STAGES[1], steps=480, lr=1e-3, shift=3.0, bf16=True, evals=[240])]),
    # A finer token grid at 64 px (16x16 tokens of 4x4 pixels) with the small DiT: about the cost per image.
    "p4s_64_bf16": dict(model=SMALL_P4 + ["model.dit.pooled_text=true", "model.decoder.predicts=data"],
                        stages=[dict(BASE_STAGES[1], steps=480, lr=1e-3, bf16=True, evals=[240])]),
    # The reference for the 480-step rows below: logit-normal times, constant lr, weights kept at 480.
    "x_64_480_bf16": dict(model=["model.dit.pooled_text=true", "model.decoder.predicts=data"],
                          stages=[dict(BASE_STAGES[1], steps=480, lr=1e-3, bf16=True)]),
    # Training times drawn uniformly instead of logit-normal: the layout is decided at small t
    # (samples from t = 0.3 on keep the scene; from pure noise they do not), which logit-normal rarely trains.
    "x_64_unif_bf16": dict(model=["model.dit.pooled_text=true", "model.decoder.predicts=data"],
                           stages=[dict(BASE_STAGES[1], steps=480, lr=1e-3, tdist="uniform", bf16=True, evals=[240])]),
    # A wider, deeper DiT (the decoder, ~64% of a 64 px forward, unchanged): larger models learn
    # more per sample, and the DiT's 64 tokens are cheap next to the decoder's 4096 pixels.
    "x_64_bigdit_bf16": dict(model=["model.dit.pooled_text=true", "model.decoder.predicts=data", "model.dit.hidden=384",
                                    "model.dit.heads=6", "model.dit.mlp_hidden=1536", "model.dit.depth=8"],
                             stages=[dict(BASE_STAGES[1], steps=480, lr=1e-3, bf16=True, evals=[240])]),
    # The learning rate decayed to 0 (cosine) over the stage instead of constant.
    "x_64_cos_bf16": dict(model=["model.dit.pooled_text=true", "model.decoder.predicts=data"],
                          stages=[dict(BASE_STAGES[1], steps=480, lr=1e-3, cosine=True, bf16=True)]),
    # The demo's settings (configs/pipelines/demo.yaml), then more of the cheap 32 px stage.
    "demo_x": dict(model=["model.dit.pooled_text=true", "model.decoder.predicts=data"],
                   stages=stages(dict(batch=32, lr=1.4e-3, ema=0.98), dict(evals=[120]))),
    "demo_x_32long": dict(model=["model.dit.pooled_text=true", "model.decoder.predicts=data"],
                          stages=stages(dict(steps=480, batch=32, lr=1.4e-3, ema=0.98), dict(evals=[120]))),
    "p4_32": dict(model=["model.dit.patch_size=4"], stages=BASE_STAGES[:1]),
    "b64_32": dict(model=[], stages=stages(dict(steps=600, batch=64, lr=2e-3, warmup=50, ema=0.98,
                                                evals=[150, 300]))[:1]),
    "b64_32mask": dict(model=["model.dit.mask_text_padding=true"],
                       stages=stages(dict(steps=600, batch=64, lr=2e-3, warmup=50, ema=0.98, evals=[150, 300]))[:1]),
    "b16_32long": dict(model=[], stages=stages(dict(steps=1440, batch=16, lr=1e-3, warmup=0, ema=0.98,
                                                    evals=[360, 720]))[:1]),
}


def load_samples(data: Path, resolution: int) -> tuple[torch.Tensor, list[str]]:
    """Every sample of <data>/<resolution>/ as ((N, 3, R, R) in [-1, 1], captions), read with streaming."""
    from streaming import StreamingDataset

    from deco.data.shard_schema import decode_image, image_to_tensor

    local = Path(tempfile.mkdtemp(prefix="demo_sweep_"))
    shutil.copytree(data / str(resolution), local / "d")
    dataset = StreamingDataset(local=str(local / "d"), shuffle=False, batch_size=1)
    images, captions = [], []
    for row in dataset:
        images.append(image_to_tensor(decode_image(row["image"])))
        captions.append(row["caption"])
    shutil.rmtree(local, ignore_errors=True)
    return torch.stack(images), captions


def render_samples(count: int, resolution: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """`count` fresh scenes of the synth stage's generator (96 px canvases, its clean-image size),
    resampled to the resolution as curation does: more distinct scenes than the demo curates."""
    from deco.data.shard_schema import image_to_tensor
    from deco.data.synthetic import synthetic_scenes
    from deco.data.transforms import resize_centre_crop

    scenes = synthetic_scenes(count, 96, seed)
    images = [image_to_tensor(resize_centre_crop(scene.image(), resolution)) for scene in scenes]
    return torch.stack(images), [scene.caption for scene in scenes]


class Encodings:
    """Caption -> frozen text features, computed once per caption (the encoder is frozen)."""

    def __init__(self, cfg: TextEncoderConfig):
        self.encoder = cfg.build()
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        todo = sorted({c for c in captions if c not in self.cache})
        if todo:
            text, mask = self.encoder.encode(todo)
            for i, caption in enumerate(todo):
                self.cache[caption] = (text[i], mask[i])
        return (torch.stack([self.cache[c][0] for c in captions]), torch.stack([self.cache[c][1] for c in captions]))


def train_stage(model, ema_model, stage: dict, data, encode: Encodings, objective: ObjectiveConfig, seed: int,
                at_step=None, losses: list | None = None) -> float:
    """Train `stage` (batches drawn with replacement); returns the training CPU seconds and appends
    each step's loss to `losses` when given."""
    images, captions = data
    ema_cfg = EmaConfig(decay=stage["ema"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=stage["lr"], betas=(0.9, 0.95), weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    empty = encode.encoder.empty_encoding()
    objective = copy.deepcopy(objective)
    objective.time_shift = stage["shift"]
    objective.time_distribution = stage.get("tdist", "logit_normal")
    ema_params = list(ema_model.parameters())
    start = time.process_time()
    for step in range(1, stage["steps"] + 1):
        lr = stage["lr"] * min(1.0, step / stage["warmup"]) if stage["warmup"] else stage["lr"]
        if stage.get("cosine"):  # cosine from lr towards 0 at the stage's end (the engine has no schedule)
            lr *= 0.5 * (1 + math.cos(math.pi * (step - 1) / stage["steps"]))
        for group in optimizer.param_groups:
            group["lr"] = lr
        index = torch.randint(len(captions), (stage["batch"],), generator=generator)
        text, mask = encode([captions[i] for i in index])
        text, mask = drop_text(text, mask, empty, objective.text_dropout, generator)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=stage.get("bf16", False)):
            loss = training_loss(model, images[index], text, mask, objective, generator=generator)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if losses is not None:
            losses.append(loss.item())
        decay = ema_cfg.decay_at(step)
        with torch.no_grad():
            for e, p in zip(ema_params, model.parameters()):
                e.lerp_(p, 1.0 - decay)
        if at_step is not None and step in stage.get("evals", ()):
            scoring = time.process_time()
            at_step(step, scoring - start)
            start += time.process_time() - scoring  # the CPU time of training only, not of scoring on the way
    return time.process_time() - start


def evaluate(ema_model, train_cfg: TrainConfig, stage: dict, work: Path, grid: Path | None) -> dict:
    weights = save_weights(work / "w.safetensors", ema_model, train_cfg.text_encoder)
    # The demo gate of this resolution (prompts, seeds, images, sampler), with the stage's sampler settings.
    gate = load_gate_config(f"demo_{stage['res']}", [f"generation.sampler.steps={stage['sampler_steps']}",
                                                     f"generation.sampler.cfg_scale={stage['cfg']}",
                                                     f"generation.sampler.time_shift={stage['sample_shift']}"])
    prompts = resolve_prompts(gate.prompts, synthetic_per_task=gate.synthetic_per_task,
                              synthetic_seed=gate.synthetic_seed)
    gen = gate.generation
    shutil.rmtree(work / "images", ignore_errors=True)
    start = time.process_time()
    generate_layout(weights, prompts, work / "images", gen)
    from deco.pipeline.evaluate.geneval.detectors.synthetic import SyntheticDetector

    results = score_images(work / "images", SyntheticDetector())
    summary = summarize(results)
    if grid is not None:
        from PIL import Image

        files = sorted((work / "images").glob("*/samples/*.png"))[:48]
        tiles = [Image.open(f).convert("RGB").resize((96, 96), Image.NEAREST) for f in files]
        sheet = Image.new("RGB", (96 * 8, 96 * math.ceil(len(tiles) / 8)), "white")
        for i, tile in enumerate(tiles):
            sheet.paste(tile, (96 * (i % 8), 96 * (i // 8)))
        grid.parent.mkdir(parents=True, exist_ok=True)
        sheet.save(grid)
    return {"overall": summary["overall"], "tasks": {t: v["accuracy"] if isinstance(v, dict) else v
                                                      for t, v in summary["tasks"].items()},
            "eval_cpu_s": round(time.process_time() - start, 1)}


def run_variant(name: str, variant: dict, data_root: Path, out_rows: list, grids: Path | None, seed: int,
                synth: int = 0) -> None:
    train_cfg = load_config(TrainConfig, TRAIN_CONFIG, list(variant.get("model", [])))
    torch.manual_seed(seed)
    model = None
    encode = Encodings(train_cfg.text_encoder)
    work = Path(tempfile.mkdtemp(prefix=f"sweep_{name}_"))
    source = f"synth:{synth}" if synth else str(data_root)  # rows say what they trained on
    for index, stage in enumerate(variant["stages"]):
        train_cfg.model.resolution = stage["res"]
        if model is None:
            train_cfg.model.repa.enabled = False
            model = train_cfg.model.build()
            ema_model = copy.deepcopy(model)
        else:
            model.cfg.resolution = stage["res"]
            model.load_state_dict(ema_model.state_dict())  # init_from: the promoted EMA weights
        data = render_samples(synth, stage["res"], seed) if synth else load_samples(data_root, stage["res"])
        ema_model.cfg.resolution = stage["res"]

        def midway(step: int, cpu: float) -> None:
            scores = evaluate(ema_model, train_cfg, stage, work, None)
            row = {"variant": name, "data": source, "stage": index, **stage, "steps": step,
                   "train_cpu_s": round(cpu, 1), **scores}
            out_rows.append(row)
            print(json.dumps(row), flush=True)

        cpu = train_stage(model, ema_model, stage, data, encode, train_cfg.objective, seed + index, midway)
        grid = grids / f"{name}_{index}_{stage['res']}.png" if grids else None
        scores = evaluate(ema_model, train_cfg, stage, work, grid)
        if grids:
            save_weights(grids / f"{name}_{index}_{stage['res']}.safetensors", ema_model, train_cfg.text_encoder)
        row = {"variant": name, "data": source, "stage": index, **stage, "train_cpu_s": round(cpu, 1), **scores}
        out_rows.append(row)
        print(json.dumps(row), flush=True)
    shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(ROOT / "runs" / "demo" / "store" / "curated"))
    parser.add_argument("--variants", default="base", help=f"comma-separated, of: {', '.join(VARIANTS)}")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "demo_sweep.json"))
    parser.add_argument("--grids", default="")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--synth", type=int, default=0,
                        help="train on this many freshly rendered scenes instead of --data (data diversity)")
    args = parser.parse_args()
    unknown = sorted(set(args.variants.split(",")) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    if args.synth < 0:
        parser.error("--synth must be >= 0")
    if not args.synth and not all((Path(args.data) / str(res)).is_dir() for res in (32, 64)):
        parser.error(f"{args.data} holds no 32/ and 64/ datasets (run `make demo` first, or pass --synth N)")
    torch.set_num_threads(args.threads)
    rows: list[dict] = []
    for name in args.variants.split(","):
        run_variant(name, VARIANTS[name], Path(args.data), rows, Path(args.grids) if args.grids else None, args.seed,
                    args.synth)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.read_text()) if out.exists() else {"rows": []}
    rerun = {(row["variant"], row["data"]) for row in rows}
    kept = [r for r in previous["rows"] if (r["variant"], r.get("data")) not in rerun]
    out.write_text(json.dumps({"rows": kept + rows, "torch_threads": args.threads}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
