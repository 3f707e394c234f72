"""From how much noise does a trained demo model still keep a scene? Locates where generation fails.

Renders fresh scenes of the synthetic generator (a seed the demo never trains on), noises each to a
start time t0 (t = 0 is pure noise, 1 the image), integrates the rest of the way with its caption
(SDEdit, no guidance), and asks the synthetic detector whether the result holds the scene's objects
(same classes, same counts). t0 = 0 is plain text-to-image generation. A model that keeps scenes
from t0 = 0.5 but not from 0 renders shapes well and fails to lay them out from noise; one that
loses them even from 0.85 cannot draw them.

    python benchmarks/demo_denoise.py --weights a.safetensors[,b.safetensors] \
        [--starts 0,0.3,0.5,0.7,0.85] [--scenes 32] [--out benchmarks/results/demo_denoise.json] [--grid /tmp/d.png]

The grid's first row holds the scenes, then one row per start time (first weights only).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from demo_overfit import contents
from demo_sweep import ROOT, render_samples
from deco.model.sampling import SamplerConfig
from deco.pipeline.config import ConfigError
from deco.pipeline.evaluate.geneval.detectors.synthetic import SyntheticDetector
from deco.pipeline.sample import generate, save_grid, to_pil
from deco.pipeline.weights import load_weights


def parse_starts(text: str) -> list[float]:
    starts = [float(part) for part in text.split(",")]
    if any(not 0.0 <= s < 1.0 for s in starts):
        raise ValueError(f"start times must be in [0, 1), got {starts}")
    return starts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", required=True, help="comma-separated exported weights (safetensors)")
    parser.add_argument("--starts", default="0,0.3,0.5,0.7,0.85")
    parser.add_argument("--scenes", type=int, default=32)
    parser.add_argument("--scene-seed", type=int, default=777, help="the demo's synth stage uses seed 0")
    parser.add_argument("--steps", type=int, default=20, help="Euler steps from t0 to 1")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "demo_denoise.json"))
    parser.add_argument("--grid", default="")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    try:
        starts = parse_starts(args.starts)
    except ValueError as err:
        parser.error(f"--starts: {err}")
    weights = [Path(w) for w in args.weights.split(",")]
    missing = [str(w) for w in weights if not w.is_file()]
    if missing:
        parser.error(f"no such weights file: {', '.join(missing)}")
    if args.scenes < 1 or args.steps < 1:
        parser.error("--scenes and --steps must be at least 1")
    torch.set_num_threads(args.threads)

    detector = SyntheticDetector()
    results, rows = [], []
    for path in weights:
        try:
            model, text_cfg = load_weights(path)
        except ConfigError as err:  # not a weights file, or not ours: one line, not a traceback
            parser.error(str(err))
        model.eval()
        encoder = text_cfg.build()
        images, captions = render_samples(args.scenes, model.cfg.resolution, args.scene_seed)
        truth = [contents(d) for d in detector.detect([to_pil(image) for image in images])]
        # A scene the detector misses even as rendered would count as kept by an empty sample.
        detectable = [i for i, t in enumerate(truth) if t]
        images, captions, truth = images[detectable], [captions[i] for i in detectable], [truth[i] for i in detectable]
        kept, start_cpu = {}, time.process_time()
        for t0 in starts:
            sampler = SamplerConfig(method="euler", steps=args.steps, cfg_scale=1.0, time_shift=1.0, start_time=t0)
            samples = generate(model, encoder, captions, sampler, seed=1, init_images=images if t0 > 0 else None)
            found = [contents(d) for d in detector.detect([to_pil(image) for image in samples])]
            kept[str(t0)] = sum(f == t for f, t in zip(found, truth))
            print(f"{path.name}: from t0 = {t0}: {kept[str(t0)]} of {len(truth)} scenes kept", flush=True)
            if path == weights[0]:
                rows.append(samples)
        results.append({"weights": str(path), "resolution": model.cfg.resolution, "kept": kept,
                        "of": len(truth), "rendered": args.scenes, "cpu_s": round(time.process_time() - start_cpu, 1)})
        if path == weights[0] and args.grid:
            columns = min(12, len(captions))
            save_grid(torch.cat([images[:columns]] + [r[:columns] for r in rows]), args.grid, columns=columns)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"scene_seed": args.scene_seed, "sampler": f"euler {args.steps} steps, no guidance",
                               "runs": results, "torch_threads": args.threads}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
