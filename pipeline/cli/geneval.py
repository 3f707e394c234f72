"""`deco geneval generate|score|summary|report|synthetic-prompts` and `deco gate run|watch`.

Settings beyond the flags live in a gate config (configs/gates/*.yaml, `--config NAME|FILE`) and its
`--set key=value` overrides, e.g. `--set generation.images_per_prompt=2 --set detector.hf.device=cuda:1`.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from deco.pipeline.cli.model import add_set_flag
from deco.pipeline.config import ConfigError


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (it may be swapped after setup, e.g. by pytest)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _logging() -> None:
    """Progress of long commands on stderr, unless the caller configured logging itself."""
    root = logging.getLogger()
    if not root.handlers:
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)


def _config_flags(parser, what: str) -> None:
    parser.add_argument("--config", default=None, help=f"gate config: a configs/gates name or a YAML file ({what})")
    add_set_flag(parser)


def register(commands) -> None:
    geneval = commands.add_parser("geneval", help="GenEval: generate, score, summarise, report")
    sub = geneval.add_subparsers(dest="geneval_command", required=True)

    gen = sub.add_parser("generate", help="images for every prompt in the official layout (torchrun-aware)")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--weights", help="exported weights .safetensors")
    source.add_argument("--checkpoint", help="a checkpoint URI (<stage>/checkpoints/step_N), exported first")
    gen.add_argument("--prompts", default=None, help="official | synthetic | an evaluation_metadata.jsonl-format file "
                                                     "(default: the config's, official)")
    gen.add_argument("--out", required=True, help="output directory (official layout; resumed if it exists)")
    _config_flags(gen, "its generation and prompt settings")
    gen.set_defaults(handler=generate)

    score = sub.add_parser("score", help="score an official-layout directory into results JSON lines")
    score.add_argument("--images", required=True, help="official-layout directory")
    score.add_argument("--out", required=True, help="results .jsonl to write")
    score.add_argument("--detector", choices=["synthetic", "hf", "mmdet"], default=None,
                       help="detector backend (default: the config's); with --detections, used only for colours")
    score.add_argument("--detections", default=None, help="precomputed detections (JSON lines, see detections.py)")
    score.add_argument("--save-detections", default=None, help="also write the detections used, in that format")
    _config_flags(score, "its detector settings")
    score.set_defaults(handler=score_images)

    summary = sub.add_parser("summary", help="print the official summary of a results file and write it as JSON")
    summary.add_argument("results", help="results .jsonl (ours or the reference evaluator's)")
    summary.add_argument("--out", default=None, help="summary JSON (default: <results>_summary.json)")
    summary.set_defaults(handler=summarize)

    report = sub.add_parser("report", help="an HTML report of a results file")
    report.add_argument("--results", required=True)
    report.add_argument("--out", required=True, help="HTML file to write")
    report.set_defaults(handler=html_report)

    prompts = sub.add_parser("synthetic-prompts", help="write a GenEval-format prompt set over the synthetic vocabulary")
    prompts.add_argument("--out", required=True)
    prompts.add_argument("--per-task", type=int, default=0, help="prompts per task (0: every combination)")
    prompts.add_argument("--seed", type=int, default=0)
    prompts.set_defaults(handler=synthetic_prompts)

    gate = commands.add_parser("gate", help="stage gates: evaluate checkpoints, promote or reject")
    gate_sub = gate.add_subparsers(dest="gate_command", required=True)
    run = gate_sub.add_parser("run", help="gate one checkpoint by hand (exit 0 promoted, 3 rejected)")
    run.add_argument("--checkpoint", required=True, help="<stage_uri>/checkpoints/step_XXXXXXXX")
    run.add_argument("--force", action="store_true", help="re-evaluate and overwrite an existing verdict")
    _config_flags(run, "required")
    run.set_defaults(handler=gate_run)

    watch = gate_sub.add_parser("watch", help="gate every new complete checkpoint of a stage, exactly once")
    watch.add_argument("--stage", required=True, help="stage name; its gate config is configs/gates/<NAME>.yaml "
                                                      "unless --config says otherwise")
    watch.add_argument("--stage-uri", default=None, help="where the stage's checkpoints land (default: the config's)")
    watch.add_argument("--watcher-id", default=None,
                       help="a label for this watcher in claims, verdicts and logs (default "
                            "<stage>@<host>:<pid>:<random>, unique per process). Run as many watchers as you like: "
                            "ownership goes by each claim's token, not this id, so watchers given the same id "
                            "still never take each other's running evaluations")
    watch.add_argument("--once", action="store_true", help="one poll, then exit")
    watch.add_argument("--max-polls", type=int, default=None, help="stop after this many polls")
    _config_flags(watch, "default: the --stage name")
    watch.set_defaults(handler=gate_watch)


def _gate_config(name: str | None, overrides: list[str]):
    from deco.pipeline.evaluate.gate_config import load_gate_config

    return load_gate_config(name, overrides)


def generate(args) -> int:
    from deco.pipeline.evaluate.geneval.generate import dist_env, generate_layout, weights_from_checkpoint
    from deco.pipeline.evaluate.geneval.prompts import resolve_prompts

    _logging()
    cfg = _gate_config(args.config, args.overrides)
    rank, world, local_rank = dist_env()
    prompts = resolve_prompts(args.prompts or cfg.prompts, cfg.synthetic_per_task, cfg.synthetic_seed)
    out = Path(args.out)
    if args.checkpoint:
        weights = weights_from_checkpoint(args.checkpoint, out.parent / f".{out.name}.weights", rank=local_rank)
    else:
        weights = Path(args.weights)
        if not weights.is_file():
            raise FileNotFoundError(f"weights file not found: {weights}")

    # Progress (bar on a terminal, periodic lines in logs) comes from generate_layout itself.
    stats = generate_layout(weights, prompts, out, cfg.generation, rank=rank, world_size=world)
    print(json.dumps(stats))
    return 0


def score_images(args) -> int:
    from deco.pipeline.evaluate.geneval.detectors import build_detector
    from deco.pipeline.evaluate.geneval.score import score_images as score, write_results

    _logging()
    cfg = _gate_config(args.config, args.overrides)
    detector = None
    if args.detector or args.detections is None:
        cfg.detector.backend = args.detector or cfg.detector.backend
        detector = build_detector(cfg.detector)

    results = score(args.images, detector, args.detections, args.save_detections)
    path = write_results(results, args.out)
    print(f"{sum(r['correct'] for r in results)}/{len(results)} images correct -> {path}")
    return 0


def summarize(args) -> int:
    from deco.pipeline.evaluate.geneval.score import read_results
    from deco.pipeline.evaluate.geneval.summary import default_summary_path, format_summary, summarize as summarise, write_summary

    results = read_results(args.results)
    if not results:
        raise ConfigError(f"{args.results} holds no results")
    summary = summarise(results)
    print(format_summary(summary))
    write_summary(summary, args.out or default_summary_path(args.results))
    return 0


def html_report(args) -> int:
    from deco.pipeline.evaluate.geneval.report import write_html_report
    from deco.pipeline.evaluate.geneval.score import read_results
    from deco.pipeline.evaluate.geneval.summary import summarize as summarise

    results = read_results(args.results)
    if not results:
        raise ConfigError(f"{args.results} holds no results")
    print(write_html_report(results, summarise(results), args.out, title=f"GenEval: {args.results}"))
    return 0


def synthetic_prompts(args) -> int:
    from deco.pipeline.evaluate.geneval.synthetic_prompts import write_synthetic_prompts

    if args.per_task < 0:
        raise ConfigError("--per-task must be >= 0")
    print(write_synthetic_prompts(args.out, args.per_task, args.seed))
    return 0


def gate_run(args) -> int:
    from deco.pipeline.evaluate.decision import GateRejected, rejection_line
    from deco.pipeline.evaluate.gate import evaluate_checkpoint, read_verdict

    _logging()
    if args.config is None:
        raise ConfigError("deco gate run needs --config (a configs/gates name or file)")
    cfg = _gate_config(args.config, args.overrides)
    existing = None if args.force else read_verdict(args.checkpoint)
    verdict = existing or evaluate_checkpoint(args.checkpoint, cfg, force=args.force)
    if existing is not None:
        print("a verdict exists (use --force to re-evaluate):", file=sys.stderr)
    print(json.dumps(verdict, indent=2))
    if verdict["decision"] != "promote":  # the verdict on stdout; why, in one line, on stderr
        raise GateRejected(f"gate {verdict.get('stage') or cfg.stage or args.config} rejected: {rejection_line(verdict)}")
    return 0


def gate_watch(args) -> int:
    from deco.pipeline.evaluate.watcher import GateWatcher

    _logging()
    cfg = _gate_config(args.config or args.stage, args.overrides)
    cfg.stage = args.stage
    cfg.stage_uri = args.stage_uri or cfg.stage_uri
    if not cfg.stage_uri:
        raise ConfigError(f"gate config for {args.stage!r} has no stage_uri: pass --stage-uri")
    if args.max_polls is not None and args.max_polls < 1:
        raise ConfigError("--max-polls must be >= 1")
    watcher = GateWatcher(cfg, watcher_id=args.watcher_id)

    def show(verdict: dict) -> None:
        print(json.dumps({"step": verdict["checkpoint"]["step"], "decision": verdict["decision"],
                          "overall": (verdict.get("scores") or {}).get("overall"), "reasons": verdict["reasons"]}),
              flush=True)

    import signal

    def terminate(signum, frame):  # SIGTERM (systemd, Kubernetes, Slurm) ends a watcher as Ctrl-C does
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    try:
        watcher.run(max_polls=1 if args.once else args.max_polls, on_verdict=show)
    except KeyboardInterrupt:  # an evaluation cut here is marked interrupted: the next watcher redoes it at once
        print("deco: watcher stopped", file=sys.stderr)
        return 130
    return 0
