"""`deco model summary`, `deco model import-reference`, `deco sample`, `deco demo`."""
from __future__ import annotations

import json

from deco.pipeline.config import ConfigError


def add_set_flag(parser) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set dit.depth=8 (repeatable)")


def register(commands) -> None:
    model = commands.add_parser("model", help="inspect model configs")
    model_commands = model.add_subparsers(dest="model_command", required=True)
    summary = model_commands.add_parser("summary", help="parameters and training FLOPs of a model config (JSON)")
    summary.add_argument("--config", required=True, help="a configs/model/*.yaml file")
    add_set_flag(summary)
    summary.set_defaults(handler=model_summary)
    imported = model_commands.add_parser(
        "import-reference", help="convert the authors' Lightning checkpoint (T2I) into our safetensors")
    imported.add_argument("--checkpoint", required=True, help="the reference's .ckpt (e.g. t2i_DeCo.ckpt)")
    imported.add_argument("--out", required=True, help=".safetensors to write (model config in its metadata)")
    imported.add_argument("--ema", action="store_true", help="take the EMA weights (ema_denoiser.) rather than denoiser.")
    imported.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                          help="what the checkpoint does not fix: model.resolution (default 512), model.repa.block "
                               "(default 6), model.dit.attention_backend, text_encoder.* (default Qwen/Qwen3-1.7B)")
    imported.set_defaults(handler=import_reference)

    sample = commands.add_parser("sample", help="generate images from exported weights")
    sample.add_argument("--weights", required=True, help=".safetensors written by `deco export` or the demo")
    sample.add_argument("--prompt", required=True)
    sample.add_argument("--n", type=int, default=4, help="images to generate")
    sample.add_argument("--steps", type=int, default=25)
    sample.add_argument("--cfg", type=float, default=4.0, help="classifier-free guidance scale")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--sampler", default="adams2", choices=["euler", "heun", "adams2"])
    sample.add_argument("--time-shift", type=float, default=None,
                        help="sampling time shift (default: 3.0, or 1.0 below 64 px)")
    sample.add_argument("--size", default=None, metavar="HxW",
                        help="image height x width in pixels, multiples of the patch size (default: the model's square)")
    sample.add_argument("--out", required=True, help="output grid PNG")
    sample.set_defaults(handler=sample_images)

    demo = commands.add_parser("demo", help="run the whole pipeline offline on this machine (configs/pipelines/demo.yaml)")
    demo.add_argument("--out", default="runs/demo", help="local folder for the store, logs and reports")
    add_set_flag(demo)
    demo.set_defaults(handler=run_demo)


def model_summary(args) -> int:
    from deco.model.config import ModelConfig
    from deco.pipeline.config import load_config
    from deco.pipeline.summary import model_summary as summarize

    print(json.dumps(summarize(load_config(ModelConfig, args.config, args.overrides)), indent=2))
    return 0


def import_reference(args) -> int:
    from deco.pipeline.reference_import import import_reference as convert

    print(convert(args.checkpoint, args.out, ema=args.ema, overrides=args.overrides))
    return 0


def sample_images(args) -> int:
    import torch

    from deco.data.buckets import parse_size
    from deco.model.sampling import SamplerConfig
    from deco.pipeline.sample import generate, save_grid
    from deco.pipeline.weights import load_weights

    if args.n < 1 or args.steps < 1:
        raise ConfigError("--n and --steps must be at least 1")
    try:
        size = parse_size(args.size) if args.size else None
    except ValueError as err:
        raise ConfigError(f"--size: {err}") from None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, text_cfg = load_weights(args.weights, device=device)
    patch = model.cfg.dit.patch_size
    if size and (size[0] % patch or size[1] % patch):
        raise ConfigError(f"--size {args.size}: height and width must be multiples of the model's patch size {patch}")
    encoder = text_cfg.build(device=device)
    shift = args.time_shift if args.time_shift is not None else (3.0 if model.cfg.resolution >= 64 else 1.0)
    sampler = SamplerConfig(method=args.sampler, steps=args.steps, cfg_scale=args.cfg, time_shift=shift)
    images = generate(model, encoder, [args.prompt] * args.n, sampler, seed=args.seed, size=size)
    print(save_grid(images, args.out))
    return 0


def run_demo(args) -> int:
    from deco.pipeline.demo import run_demo as demo

    return demo(args.out, args.overrides)
