"""`deco train`, `deco launch`, `deco export`."""
from __future__ import annotations

import logging
import shlex
import subprocess
import sys
import time
from pathlib import Path

from deco.pipeline.cli.model import add_set_flag
from deco.pipeline.config import ConfigError


def register(commands) -> None:
    train = commands.add_parser("train", help="train under DeepSpeed ZeRO-3 (N local ranks, or join torchrun/deepspeed)")
    train.add_argument("--config", required=True, help="a configs/train/*.yaml file")
    train.add_argument("--nproc", type=int, default=None,
                       help="start this many local ranks (this process stays their launcher); without it: one rank")
    train.add_argument("--run-dir", default="", help="metrics, logs and (without checkpoint.uri) checkpoints")
    train.add_argument("--data", default="", help="stream this one MDS location (local or s3://) instead of the config's")
    train.add_argument("--max-steps", type=int, default=None)
    train.add_argument("--checkpoint-every", type=int, default=None)
    train.add_argument("--resume", default="",
                       help="'auto' (newest intact checkpoint; corrupt ones are skipped), 'none', or a checkpoint URI")
    add_set_flag(train)
    train.set_defaults(handler=run_train)

    launch = commands.add_parser("launch", help="multi-node training: deepspeed launcher with a hostfile, or sbatch")
    launch.add_argument("--config", required=True)
    where = launch.add_mutually_exclusive_group(required=True)
    where.add_argument("--hostfile", help="deepspeed hostfile: one 'host slots=N' line per node")
    where.add_argument("--slurm", action="store_true", help="write an sbatch script (torchrun per node) and submit it")
    launch.add_argument("--nodes", type=int, default=1, help="with --slurm")
    launch.add_argument("--gpus-per-node", type=int, default=8, help="with --slurm")
    launch.add_argument("--partition", default="", help="with --slurm")
    launch.add_argument("--time", default="", help="with --slurm, e.g. 48:00:00")
    launch.add_argument("--run-dir", default="")
    launch.add_argument("--dry-run", action="store_true", help="print the command or script, start nothing")
    add_set_flag(launch)
    launch.set_defaults(handler=run_launch)

    export = commands.add_parser("export", help="checkpoint -> .safetensors weights for `deco sample` and the gates")
    export.add_argument("--checkpoint", required=True, help="a checkpoint prefix, or a stage (its newest checkpoint)")
    export.add_argument("--out", required=True, help="output .safetensors")
    export.add_argument("--ema", action="store_true", help="export the EMA weights (else the trained weights)")
    export.set_defaults(handler=run_export)


def _stage_of(args) -> tuple[str, str]:
    """(run_dir, checkpoint stage URI) from the raw config tree: the launcher process only needs
    these, and leaves importing torch and validating the config to the ranks it starts."""
    from deco.pipeline.config import apply_overrides, load_tree

    tree, provenance = load_tree(args.config)
    apply_overrides(tree, provenance, args.overrides)
    run_dir = args.run_dir or tree.get("run_dir") or str(Path("runs") / Path(args.config).stem)
    checkpoint = tree.get("checkpoint") if isinstance(tree.get("checkpoint"), dict) else {}
    return run_dir, checkpoint.get("uri") or str(Path(run_dir).resolve())


def run_train(args) -> int:
    from deco.data.errors import ExpectedError
    from deco.orchestration.launch import joined_world, single_process_world, spawn_local

    world = joined_world()
    if world is not None and args.nproc not in (None, world.world_size):
        raise ConfigError(f"--nproc {args.nproc} inside a launcher job of {world.world_size} ranks: drop --nproc")
    if world is None and args.nproc is not None:
        if args.nproc < 1:
            raise ConfigError(f"--nproc must be at least 1, got {args.nproc}")
        from deco.pipeline.train.checkpoint import resolve_resume

        run_dir, stage = _stage_of(args)
        # A named checkpoint that is not complete fails here, before any rank starts; `auto` is
        # resolved by the ranks, which verify checksums and fall back past a corrupt checkpoint.
        if args.resume not in ("", "none", "auto"):
            resolve_resume(args.resume, stage)
        argv = [sys.executable, "-m", "deco.pipeline.cli", "train", "--config", args.config,
                "--run-dir", run_dir, "--resume", args.resume or "none"]
        for flag, value in (("--data", args.data), ("--max-steps", args.max_steps),
                            ("--checkpoint-every", args.checkpoint_every)):
            if value not in ("", None):
                argv += [flag, str(value)]
        for item in args.overrides:
            argv += ["--set", item]
        return spawn_local(args.nproc, argv)
    world = world or single_process_world()
    logging.basicConfig(level=logging.INFO if world.rank == 0 else logging.WARNING,
                        format=f"%(asctime)s rank{world.rank} %(name)s %(levelname)s: %(message)s")
    from deco.pipeline.train.peers import PeerLostError, tell_launcher
    from deco.pipeline.train.trainer import NonFiniteLossError, train
    from deco.pipeline.train.config import load_train_config

    try:
        cfg = load_train_config(args.config, args.overrides, data=args.data, max_steps=args.max_steps,
                                checkpoint_every=args.checkpoint_every, run_dir=args.run_dir)
        return train(cfg, world, args.resume)
    except (ExpectedError, FileNotFoundError):
        # Every rank meets the same mistake: rank 0 says it (cli/main.py, exit 2); the others leave
        # it the time to.
        if world.rank == 0:
            raise
        time.sleep(1.0)
        return 2
    except NonFiniteLossError as err:
        if world.rank == 0:
            print(f"deco: error: training stopped: {err}", file=sys.stderr)
        return 1
    except PeerLostError as err:
        # A rank or node is gone: the lowest rank still answering says so, in one line. Exit 2, as
        # every "deco: error:" exit: the job has said why (launchers do not report it again).
        tell_launcher(f"deco: error: {err}")
        if err.report:
            print(f"deco: error: {err}", file=sys.stderr, flush=True)
        return 2


def launch_plan(args) -> tuple[list[str], Path | None, str]:
    """What `deco launch` does: (the argv it runs, the sbatch script it writes first or None, that
    script's text). The launch runs exactly this and --dry-run prints exactly this."""
    from deco.orchestration.launch import SlurmJob, deepspeed_command, sbatch_command, sbatch_script, train_argv
    from deco.pipeline.train.config import load_train_config

    cfg = load_train_config(args.config, args.overrides, run_dir=args.run_dir)  # fail here, not on 64 nodes
    train_args = train_argv(args.config, cfg.run_dir, "auto", args.overrides)
    try:
        if args.hostfile:
            return deepspeed_command(args.hostfile, train_args), None, ""
        job = SlurmJob(nodes=args.nodes, gpus_per_node=args.gpus_per_node, partition=args.partition,
                       time=args.time, job_name=f"deco-{Path(args.config).stem}")
        script = sbatch_script(job, train_args, cfg.run_dir)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    path = Path(cfg.run_dir) / "launch.sbatch"
    return sbatch_command(path), path, script


def run_launch(args) -> int:
    command, script_path, script = launch_plan(args)
    if args.dry_run:  # starts nothing, writes nothing
        if script_path is None:
            print(shlex.join(command))
        else:
            # stdout: the script, byte for byte; stderr: the command, pasteable (the first line is a comment).
            print(script, end="", flush=True)
            print("# dry run, nothing written: the script above goes to the file this sbatch command names",
                  file=sys.stderr)
            print(shlex.join(command), file=sys.stderr)
        return 0
    if script_path is not None:
        script_path.parent.mkdir(parents=True, exist_ok=True)
        script_path.write_text(script)
    return subprocess.call(command)


def run_export(args) -> int:
    from deco.pipeline.train.export import export_checkpoint

    print(export_checkpoint(args.checkpoint, args.out, ema=args.ema))
    return 0
