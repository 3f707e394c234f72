"""`deco data synth` (the synthetic dataset) and `deco curate` (the curation job, and takedowns from its output)."""
from __future__ import annotations

import json
import logging
import sys

from deco.pipeline.config import ConfigError


def register(commands) -> None:
    data = commands.add_parser("data", help="datasets")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    synth = data_commands.add_parser("synth", help="write the synthetic shapes dataset (+ truth.jsonl, GenEval prompts)")
    synth.add_argument("--out", required=True, help="output folder or s3://bucket/prefix")
    synth.add_argument("--n", type=int, required=True, help="number of samples")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--format", default="webdataset", choices=["webdataset", "parquet", "folder"])
    synth.add_argument("--bad-fraction", type=float, default=0.0,
                       help="fraction of samples carrying a crawl fault (recorded in truth.jsonl)")
    synth.set_defaults(handler=synth_dataset)

    curate = commands.add_parser("curate", help="filter, deduplicate and shard image-caption data on Ray; "
                                                 "--takedown FILE --output URI removes samples from an output")
    curate.add_argument("--config", default=None, help="a configs/data/*.yaml file (required unless --takedown)")
    curate.add_argument("--input", dest="inputs", action="append", default=None, metavar="URI",
                        help="input file, folder or s3:// prefix (repeatable; replaces sources.uris)")
    curate.add_argument("--output", default=None, metavar="URI", help="output folder or s3://bucket/prefix")
    curate.add_argument("--ray-address", default=None,
                        help="a running Ray cluster (host:port, ray://host:10001, auto); default: a local one")
    curate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set dedup.hamming_threshold=4 (repeatable)")
    curate.add_argument("--takedown", default=None, metavar="FILE",
                        help="a file of sample ids or URLs, one a line: remove them from the finished --output "
                             "(and from every later run on it) instead of curating")
    curate.set_defaults(handler=run_curate)


def synth_dataset(args) -> int:
    from deco.data.synthetic_faults import write_synthetic_dataset

    if args.n < 1:
        raise ConfigError("--n must be at least 1")
    if not 0.0 <= args.bad_fraction < 1.0:
        raise ConfigError("--bad-fraction must be in [0, 1)")
    summary = write_synthetic_dataset(args.out, args.n, args.seed, args.format, args.bad_fraction)
    print(json.dumps(summary, indent=2))
    return 0


def run_curate(args) -> int:
    from deco.pipeline.curate.job import check_kept, format_report, load_curate_config
    from deco.pipeline.curate.job import curate as run

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.takedown is not None:
        return run_takedown(args)
    if args.config is None:
        raise ConfigError("deco curate needs --config (or --takedown FILE --output URI)")
    cfg = load_curate_config(args.config, args.overrides, args.inputs, args.output, args.ray_address)
    report = run(cfg)  # an unreachable Ray cluster is a ConnectionError: one line (cli/main.py)
    if report.get("already_complete"):
        print(f"{cfg.output.uri} is already complete; nothing to do", file=sys.stderr)
    print(format_report(report))
    check_kept(report, cfg)  # KeptTooFew, exit 1: the report is written, but the output is not usable
    return 0


def run_takedown(args) -> int:
    from deco.pipeline.curate.takedown import takedown

    if not args.output:
        raise ConfigError("--takedown needs --output: the curated output to remove the samples from")
    extra = [flag for flag, value in (("--config", args.config), ("--input", args.inputs), ("--set", args.overrides),
                                      ("--ray-address", args.ray_address)) if value]
    if extra:
        raise ConfigError(f"--takedown takes only --output; drop {', '.join(extra)}")
    summary = takedown(args.output, args.takedown)
    print(json.dumps(summary, indent=2))
    return 0
