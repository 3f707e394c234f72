"""`deco pipeline run|status FILE`: the staged resolution pipeline."""
from __future__ import annotations

import json


def register(commands) -> None:
    pipeline = commands.add_parser("pipeline", help="staged pipelines: curate, train, gate, next resolution")
    sub = pipeline.add_subparsers(dest="pipeline_command", required=True)
    run = sub.add_parser("run", help="run a pipeline file; a rerun continues at the first unfinished stage")
    run.add_argument("file", help="a configs/pipelines/*.yaml file")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    run.set_defaults(handler=run_pipeline)
    status = sub.add_parser("status", help="each stage's state, checkpoints, gate verdicts, promoted checkpoint")
    status.add_argument("file")
    status.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status.set_defaults(handler=pipeline_status)


def run_pipeline(args) -> int:
    from deco.pipeline.stages import PipelineRunner, PipelineStopped, format_status, load_pipeline

    runner = PipelineRunner(load_pipeline(args.file, args.overrides))
    try:
        runner.run()
    except PipelineStopped:
        # Where every stage stands (the stopped one, those waiting for it) on stdout; why it
        # stopped is the one `deco: error:` line on stderr (cli/main.py).
        print(format_status(runner.status()), flush=True)
        raise
    print(format_status(runner.status()))
    return 0


def pipeline_status(args) -> int:
    from deco.pipeline.stages import PipelineRunner, format_status, load_pipeline

    rows = PipelineRunner(load_pipeline(args.file, args.overrides)).status()
    print(json.dumps(rows, indent=2) if args.json else format_status(rows))
    return 0
