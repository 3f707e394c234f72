"""The curation job's plan: which partitions an output holds, checked against any earlier run.

A finished (or unfinished) output accepts more inputs with the same settings: its partitions keep
their names and shards, the new inputs' partitions are numbered after them and become a new run.
Inputs that are gone or changed, or other settings, are refused with one line. The plan lives in
<output>/_work/plan.json; the report records the input set it finished (`inputs_digest`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections import Counter

from deco.data.sources import Partition, SourceError, plan_partitions
from deco.orchestration import curation
from deco.pipeline.config import ConfigError
from deco.pipeline.curate.config import CurateConfig, output_fingerprint

log = logging.getLogger(__name__)

REPORT_KEY = "curation_report.json"
REJECTS_KEY = "rejects.parquet"


def rejects_file_schema():
    """rejects.parquet: id, reason, detail, and where the sample was (partition, position)."""
    import pyarrow as pa

    from deco.data.shards import REJECTS_SCHEMA

    return REJECTS_SCHEMA.append(pa.field("partition", pa.string())).append(pa.field("position", pa.int32()))


@dataclasses.dataclass
class Planned:
    partitions: list[Partition]  # the job's partitions in merge order: earlier runs' first, names unchanged
    fingerprint: str
    runs: list[dict]             # per run that added partitions: its inputs and how many it added
    digest: str                  # the input set (order-free): the report records the one it finished
    complete: bool               # the report already covers exactly these inputs with these settings


def _settings_fingerprint(cfg: CurateConfig) -> str:
    """output_fingerprint without the input list: the plan, not the fingerprint, says which inputs."""
    return output_fingerprint(dataclasses.replace(cfg, sources=dataclasses.replace(cfg.sources, uris=[])))


def _same_settings(recorded: str | None, cfg: CurateConfig, recorded_uris: list[str] | None = None) -> bool:
    """Whether a recorded fingerprint means these settings; outputs made before inputs could be added
    recorded output_fingerprint, which hashes the input list too."""
    if recorded in (_settings_fingerprint(cfg), output_fingerprint(cfg)):
        return True
    return recorded_uris is not None and recorded == output_fingerprint(
        dataclasses.replace(cfg, sources=dataclasses.replace(cfg.sources, uris=list(recorded_uris))))


def _identity(partition: dict) -> str:
    """What a partition reads, whatever its index: kind, file, row range, folder items."""
    return json.dumps([partition["kind"], partition["uri"], partition["start"], partition["stop"], partition["items"]])


def _inputs_digest(partitions: list[dict]) -> str:
    return hashlib.sha256(json.dumps(sorted(_identity(p) for p in partitions)).encode()).hexdigest()[:16]


def _unmatched(partitions: list[dict], others: list[dict]) -> list[dict]:
    """The partitions (in order) that `others` does not plan identically, counted as a multiset."""
    available = Counter(_identity(p) for p in others)
    left = []
    for p in partitions:
        if available[_identity(p)] > 0:
            available[_identity(p)] -= 1
        else:
            left.append(p)
    return left


def _changed(old: list[dict], current: list[dict]) -> list[str]:
    """The inputs of `old` partitions that `current` no longer plans identically: gone, or other rows/files."""
    lost = _unmatched(old, current)
    unmatched = Counter(_identity(p) for p in current) - Counter(_identity(p) for p in old)
    old_uris = {p["uri"] for p in old}
    grown = [p for p in current if p["uri"] in old_uris and unmatched[_identity(p)] > 0]
    now = {p["uri"] for p in current}
    described = dict.fromkeys(f"{p['uri']} {'changed' if p['uri'] in now else 'is gone'}" for p in lost)
    described.update(dict.fromkeys(f"{p['uri']} changed" for p in grown))
    return list(described)


def plan_job(cfg: CurateConfig, store) -> Planned:
    """The job's partitions, checked against what the output already holds.

    A finished (or unfinished) output accepts more inputs with the same settings: its partitions keep
    their names and shards, the new inputs' partitions are numbered after them and become a new run
    that is deduplicated against everything before it. Inputs that are gone or changed, or other
    settings, are refused with one line. Complete only when the report covers exactly these inputs.
    """
    try:
        current = [p.to_dict() for p in plan_partitions(cfg.sources, cfg.metadata.required())]
    except SourceError as err:
        raise ConfigError(str(err)) from None
    fingerprint = _settings_fingerprint(cfg)
    where = cfg.output.uri
    other_inputs = "use a new --output to curate a different input set"
    report = json.loads(store.get_bytes(REPORT_KEY)) if store.exists(REPORT_KEY) else None
    reported_uris = (report or {}).get("config", {}).get("sources", {}).get("uris")
    if report is not None and not _same_settings(report.get("fingerprint"), cfg, reported_uris):
        raise ConfigError(f"{where} already holds a curated dataset made with other settings; "
                          "choose a new --output (or delete it)")
    recorded = json.loads(store.get_bytes(curation.PLAN_KEY)) if store.exists(curation.PLAN_KEY) else None
    if recorded is not None and not _same_settings(recorded.get("fingerprint"), cfg, reported_uris):
        raise ConfigError(f"{where} holds an unfinished run with different settings: rerun with the original "
                          f"config to resume it, or choose a new --output (or delete {where})")
    digest = _inputs_digest(current)
    if report is not None:
        if "inputs_digest" in report:
            complete = report["inputs_digest"] == digest
        elif recorded is not None:  # a report written before inputs could be added
            complete = _inputs_digest(recorded["partitions"]) == digest
        else:
            complete = (report.get("partitions") == len(current)
                        and report.get("config", {}).get("sources", {}).get("uris") == list(cfg.sources.uris))
        if complete:
            partitions = [Partition.from_dict(p) for p in (recorded or {"partitions": current})["partitions"]]
            return Planned(partitions, fingerprint, (recorded or {}).get("runs", []), digest, True)
        if recorded is None:
            raise ConfigError(f"{where} is a finished curation of other inputs ({report.get('partitions')} "
                              f"partitions; these inputs plan {len(current)}) and its {curation.WORK} folder, "
                              f"which adding inputs needs, is gone: {other_inputs}")
    if recorded is None:
        plan = {"fingerprint": fingerprint, "partitions": current,
                "runs": [{"inputs": list(cfg.sources.uris), "partitions": len(current)}]}
    else:
        changed = _changed(recorded["partitions"], current)
        if changed:
            more = f" (+{len(changed) - 3} more)" if len(changed) > 3 else ""
            resume = "rerun with the original inputs to resume it, or " if report is None else ""
            raise ConfigError(f"{where} holds {'an unfinished run of ' if report is None else ''}partitions of inputs "
                              f"that are gone or changed: {'; '.join(changed[:3])}{more}: {resume}{other_inputs}")
        added = _unmatched(current, recorded["partitions"])
        runs = recorded.get("runs") or [{"inputs": None, "partitions": len(recorded["partitions"])}]
        plan = recorded | {"runs": runs, "fingerprint": fingerprint}
        if added:
            first = max((p["index"] for p in recorded["partitions"]), default=-1) + 1
            plan = {"fingerprint": fingerprint,
                    "partitions": recorded["partitions"] + [p | {"index": first + n} for n, p in enumerate(added)],
                    "runs": runs + [{"inputs": list(cfg.sources.uris), "partitions": len(added)}]}
            log.info("%s: adding %d partitions of new inputs after the %d it holds", where, len(added),
                     len(recorded["partitions"]))
    if plan != recorded:
        store.check(create=True)
        store.put_bytes(curation.PLAN_KEY, json.dumps(plan, sort_keys=True).encode())
    return Planned([Partition.from_dict(p) for p in plan["partitions"]], fingerprint, plan["runs"], digest, False)


def generations(planned: Planned) -> dict[str, int]:
    """Partition name -> the run that added it (0 for the first)."""
    owners = [run for run, r in enumerate(planned.runs) for _ in range(r["partitions"])]
    return {p.name: owners[i] if i < len(owners) else 0 for i, p in enumerate(planned.partitions)}


def runs_of(planned: Planned) -> list[dict]:
    """The report's runs: the inputs each gave and the partitions (names) it added."""
    runs, start = [], 0
    for run in planned.runs:
        names = [p.name for p in planned.partitions[start:start + run["partitions"]]]
        start += run["partitions"]
        runs.append({"inputs": run["inputs"], "partitions": len(names),
                     "first": names[0] if names else None, "last": names[-1] if names else None})
    return runs
