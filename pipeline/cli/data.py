"""`deco data synth` (the synthetic dataset) and `deco curate` (the curation job)."""
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

    curate = commands.add_parser("curate", help="filter, deduplicate and shard image-caption data on Ray")
    curate.add_argument("--config", required=True, help="a configs/data/*.yaml file")
    curate.add_argument("--input", dest="inputs", action="append", default=None, metavar="URI",
                        help="input file, folder or s3:// prefix (repeatable; replaces sources.uris)")
    curate.add_argument("--output", default=None, metavar="URI", help="output folder or s3://bucket/prefix")
    curate.add_argument("--ray-address", default=None,
                        help="a running Ray cluster (host:port, ray://host:10001, auto); default: a local one")
    curate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set dedup.hamming_threshold=4 (repeatable)")
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
    from deco.pipeline.curate.job import KeptTooFew, check_kept, format_report, load_curate_config
    from deco.pipeline.curate.job import curate as run

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_curate_config(args.config, args.overrides, args.inputs, args.output, args.ray_address)
    try:
        report = run(cfg)
    except ConnectionError as err:  # Ray cluster unreachable
        print(f"deco: error: {err}", file=sys.stderr)
        return 2
    if report.get("already_complete"):
        print(f"{cfg.output.uri} is already complete; nothing to do", file=sys.stderr)
    print(format_report(report))
    try:
        check_kept(report, cfg)
    except KeptTooFew as err:  # the report is written; the exit status says the output is not usable
        print(f"deco: error: {err}", file=sys.stderr)
        return 1
    return 0
