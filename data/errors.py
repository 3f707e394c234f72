"""The one base of the failures a user is expected to meet and can act on.

A bad config or key, a missing or unreadable input, storage that says no, an incomplete checkpoint,
a gate that rejected a checkpoint, a stage that cannot start: the `deco` command ends each with one
line, `deco: error: <message>`, and `exit_code` (deco.pipeline.cli.main; `--debug` or DECO_DEBUG=1
shows the traceback too). Anything else that escapes a command is a bug and keeps its traceback.

It lives in the lowest layer that raises one (data: storage, sources), so that every layer's own
error class can derive from it without importing upwards.
"""
from __future__ import annotations


class ExpectedError(Exception):
    """A failure whose message alone tells the user what went wrong and what to fix."""

    exit_code = 2  # the CLI's exit status; subclasses with a meaning of their own override it


class DatasetError(ExpectedError):
    """Training data that cannot serve the configured run (e.g. no aspect-ratio bucket holds a whole
    global batch, or images that are not whole patches of the model)."""
