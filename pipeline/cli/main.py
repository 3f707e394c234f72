"""The `deco` command. Thin: each area's module in pipeline/cli registers its subcommands.

New capabilities add config fields rather than flags; tests/test_cli.py freezes the flag set.
"""
from __future__ import annotations

import argparse
import sys

from deco.data.object_store import StorageError
from deco.pipeline.cli import data as data_commands
from deco.pipeline.cli import geneval as geneval_commands
from deco.pipeline.cli import model as model_commands
from deco.pipeline.cli import pipeline as pipeline_commands
from deco.pipeline.cli import train as train_commands
from deco.pipeline.config import ConfigError

# Each module's register(commands) adds its subcommands; add a module here to add an area.
COMMAND_MODULES = (model_commands, train_commands, geneval_commands, data_commands, pipeline_commands)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deco", description="DeCo pixel-diffusion pretraining pipeline")
    commands = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        module.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ConfigError, StorageError, FileNotFoundError) as err:
        print(f"deco: error: {err}", file=sys.stderr)
        return 2

