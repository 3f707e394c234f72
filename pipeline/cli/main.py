"""The `deco` command. Thin: each area's module in pipeline/cli registers its subcommands.

New capabilities add config fields rather than flags; tests/test_cli.py freezes the flag set.

Failures end here, in one place. An expected failure (deco.data.errors.ExpectedError and its
subclasses: ConfigError, StorageError, SourceError, CheckpointError, ClusterError, KeptTooFew, the
pipeline's StageBlocked/StageRejected/StageFailed, the gate's GateRejected; and OSError: a missing,
unreadable or unwritable file, a refused connection) is one line on stderr, `deco: error: ...`,
and a non-zero exit status (the error's exit_code; 2 for OSError; Ctrl-C 130). Anything else is a
bug and keeps its traceback. `deco --debug ...` or DECO_DEBUG=1 prints the traceback of an expected
failure too, in this process and in every `deco` process it starts (stages, ranks).
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback

from deco.data.errors import ExpectedError
from deco.pipeline.cli import data as data_commands
from deco.pipeline.cli import geneval as geneval_commands
from deco.pipeline.cli import model as model_commands
from deco.pipeline.cli import pipeline as pipeline_commands
from deco.pipeline.cli import train as train_commands

# Each module's register(commands) adds its subcommands; add a module here to add an area.
COMMAND_MODULES = (model_commands, train_commands, geneval_commands, data_commands, pipeline_commands)
DEBUG_ENV = "DECO_DEBUG"
INTERRUPTED_EXIT = 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deco", description="DeCo pixel-diffusion pretraining pipeline")
    parser.add_argument("--debug", action="store_true",
                        help=f"show the traceback of an expected failure too (or set {DEBUG_ENV}=1)")
    commands = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        module.register(commands)
    return parser


def debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def error_line(message: str) -> str:
    """The one line of an expected failure: a message spanning lines is joined into one."""
    return "deco: error: " + " ".join(str(message).split())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.debug:
        os.environ[DEBUG_ENV] = "1"  # inherited by the stages, launchers and ranks this command starts
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        return _expected("interrupted", INTERRUPTED_EXIT)
    except ExpectedError as err:
        return _expected(err, err.exit_code)
    except OSError as err:  # the environment said no (no such file, permission, disk full, refused)
        return _expected(err, 2)


def _expected(err, code: int) -> int:
    if debugging():
        traceback.print_exc()
    print(error_line(str(err) or type(err).__name__), file=sys.stderr, flush=True)
    return code
