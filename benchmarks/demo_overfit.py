"""Can the demo's tiny DeCo draw the dataset's shapes at all? Memorise a handful of curated samples.

Trains the demo's model (pooled text, data prediction) on a fixed set of `--samples` curated images
with their captions, in one process as benchmarks/demo_sweep.py does, then samples the same
captions with several sampler settings and asks the synthetic detector whether each sample holds
what its training image holds (same classes with the same counts). Separates "cannot draw crisp
shapes" (a defect) from "has not learned them from the data yet" (sample efficiency), and shows
what guidance does to an under-trained model's samples.

    python benchmarks/demo_overfit.py --data runs/demo/store/curated --res 64 --steps 400 \
        [--out benchmarks/results/demo_overfit.json] [--grid /tmp/overfit.png]

The grid's first row holds the training images, then one row per sampler setting.
"""
from __future__ import annotations

import argparse
import copy
import json
import re
from pathlib import Path

import torch

from demo_sweep import ROOT, TRAIN_CONFIG, Encodings, load_samples, train_stage
from deco.model.sampling import SamplerConfig
from deco.pipeline.config import load_config
from deco.pipeline.evaluate.geneval.detectors.synthetic import SyntheticDetector
from deco.pipeline.evaluate.geneval.rules import keep
from deco.pipeline.sample import generate, save_grid, to_pil
from deco.pipeline.train.config import TrainConfig

# Captions of one kind of object: "a photo of a triangle", "... of a red circle", "... of three squares".
ONE_KIND = re.compile(r"an? photo of (an?|one|two|three|four) (\w+ )?(circle|square|triangle)s?")
DEMO_MODEL = ["model.dit.pooled_text=true", "model.decoder.predicts=data"]
# (name, sampler): the demo gate's sampler with and without guidance, and a fine Euler grid.
SAMPLERS = {
    "adams2_10_cfg1": dict(method="adams2", steps=10, cfg_scale=1.0),
    "adams2_10_cfg4": dict(method="adams2", steps=10, cfg_scale=4.0),
    "euler_50_cfg1": dict(method="euler", steps=50, cfg_scale=1.0),
}


def contents(detections: dict) -> dict[str, int]:
    """Counts per class of the detections GenEval's rules keep outside its counting task."""
    counts = {name: len(keep(found, "single_object")) for name, found in sorted(detections.items())}
    return {name: n for name, n in counts.items() if n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(ROOT / "runs" / "demo" / "store" / "curated"))
    parser.add_argument("--res", type=int, default=64)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--bf16", action="store_true", help="train under bf16 autocast (~1.4x faster at 64 px here)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "demo_overfit.json"))
    parser.add_argument("--grid", default="")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if not (Path(args.data) / str(args.res)).is_dir():
        parser.error(f"{args.data} holds no {args.res}/ dataset (a curation output, e.g. runs/demo/store/curated)")
    if args.samples < 1 or args.steps < 1:
        parser.error("--samples and --steps must be at least 1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    train_cfg = load_config(TrainConfig, TRAIN_CONFIG, DEMO_MODEL)
    train_cfg.model.resolution, train_cfg.model.repa.enabled = args.res, False
    model = train_cfg.model.build()
    ema_model = copy.deepcopy(model)
    images, captions = load_samples(Path(args.data), args.res)
    picked = [i for i, caption in enumerate(captions) if ONE_KIND.fullmatch(caption)][: args.samples]
    if not picked:
        parser.error(f"no one-kind captions (e.g. 'a photo of two circles') in {args.data}/{args.res}")
    images, captions = images[picked], [captions[i] for i in picked]
    encode = Encodings(train_cfg.text_encoder)

    # The sweep's training step (text dropout, EMA rule with warm-up, clipping, bf16 autocast), with
    # every batch drawn from the picked samples only.
    stage = dict(steps=args.steps, lr=args.lr, warmup=0, batch=len(captions), ema=0.95, shift=1.0, bf16=args.bf16)
    losses: list[float] = []
    train_cpu_s = train_stage(model, ema_model, stage, (images, captions), encode, train_cfg.objective, seed=0,
                              losses=losses)

    detector = SyntheticDetector()
    truth = [contents(d) for d in detector.detect([to_pil(image) for image in images])]
    rows, results = [images], {}
    shift = 3.0 if args.res >= 64 else 1.0  # the demo gates' sampler shift per resolution
    for name, settings in SAMPLERS.items():
        samples = generate(ema_model, encode.encoder, captions, SamplerConfig(**settings, time_shift=shift), seed=1)
        found = [contents(d) for d in detector.detect([to_pil(image) for image in samples])]
        results[name] = {"same_objects": sum(f == t for f, t in zip(found, truth)), "of": len(truth), "found": found}
        rows.append(samples)
        print(name, results[name]["same_objects"], "/", len(truth), flush=True)
    if args.grid:
        save_grid(torch.cat(rows), args.grid, columns=len(captions))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"res": args.res, "steps": args.steps, "samples": len(captions), "bf16": args.bf16,
                               "captions": captions, "truth": truth, "train_cpu_s": round(train_cpu_s, 1),
                               "loss_first_last_20": [sum(losses[:20]) / 20, sum(losses[-20:]) / 20],
                               "samplers": results, "torch_threads": args.threads}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
