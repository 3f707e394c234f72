"""The `deco` command: `main` and `build_parser` live in main.py; one module per CLI area.

Each area module has `register(commands)` adding its subcommands. A subcommand sets `handler=`
(a function of the parsed args returning an exit code) with `set_defaults`. Handlers import heavy
modules lazily so `deco --help` stays fast.
"""
from deco.pipeline.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
