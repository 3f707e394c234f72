"""What a checkpoint's GenEval scores are drawn beside in its gate report: the stage's promoted
checkpoint (the one the regression check compares against), the checkpoint the stage was initialised
from (the previous resolution's promoted EMA), and an untrained model of the stage when someone
recorded one (the demo does) at <stage_uri>/untrained_summary.json.

Every lookup is best effort: a report is for people, and a missing or unreadable record leaves its
bars out rather than failing the gate.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import yaml

from deco.data.object_store import is_s3, open_store
from deco.pipeline.evaluate.gate import checkpoint_ref, read_json, read_promoted, read_verdict

log = logging.getLogger(__name__)

UNTRAINED = "untrained_summary.json"


def record_untrained(stage_uri: str, summary: dict) -> None:
    """Record an untrained model's GenEval summary (same prompts and detector as the stage's gate)."""
    open_store(stage_uri).put_bytes(UNTRAINED, json.dumps(summary, indent=2).encode())


def init_checkpoint(checkpoint_uri: str) -> str | None:
    """The checkpoint whose exported weights started this checkpoint's run (its config's init_from,
    a weights file whose header names the checkpoint it was exported from), or None."""
    from deco.pipeline.train.checkpoint import CONFIG
    from deco.pipeline.weights import read_metadata

    try:
        config = yaml.safe_load(open_store(checkpoint_uri).get_bytes(CONFIG)) or {}
    except FileNotFoundError:
        return None
    init_from = config.get("init_from") or ""
    # Only a local file's header is read: an s3:// one would be a download of the whole weights.
    if not init_from or is_s3(init_from) or not Path(init_from).is_file():
        return None
    source = read_metadata(init_from).get("deco.checkpoint")
    return json.loads(source) if source else None


def reference_scores(checkpoint_uri: str) -> list[tuple[str, dict]]:
    """[(label, {task: accuracy})] to draw beside `checkpoint_uri`'s scores, in a fixed order."""
    stage_uri, ref = checkpoint_ref(checkpoint_uri)
    out: list[tuple[str, dict]] = []
    lookups = (("promoted", lambda: _promoted(stage_uri, ref.step)), ("initialised from", lambda: _init(ref.uri)),
               ("untrained", lambda: _untrained(stage_uri)))
    for what, lookup in lookups:
        try:
            found = lookup()
        except Exception as err:  # noqa: BLE001 - see the module docstring: never fail a gate for a picture
            log.warning("gate report: the %s scores to compare with could not be read: %s", what, err)
            continue
        if found is not None:
            out.append(found)
    return out


def _promoted(stage_uri: str, step: int) -> tuple[str, dict] | None:
    record = read_promoted(stage_uri)
    if record is None or record["step"] == step:
        return None
    return f"promoted step {record['step']}", record["tasks"]


def _init(checkpoint_uri: str) -> tuple[str, dict] | None:
    source = init_checkpoint(checkpoint_uri)
    verdict = read_verdict(source) if source else None
    if not verdict or not verdict.get("scores"):
        return None
    stage = verdict.get("stage") or checkpoint_ref(source)[0].rsplit("/", 1)[-1]
    return f"{stage} step {verdict['checkpoint']['step']} (start)", verdict["scores"]["tasks"]


def _untrained(stage_uri: str) -> tuple[str, dict] | None:
    summary = read_json(stage_uri, UNTRAINED)
    return None if summary is None else ("untrained", summary["tasks"])
