"""`deco curate`: raw image-caption pairs -> filtered, deduplicated, resized MDS shards + a report.

The story: load the config; check that output and input storage answer before any work (a missing
bucket or bad credentials stop here with what to fix); plan deterministic partitions and check
them against any earlier run in the same output; stage every partition not yet staged (pass 1, on
Ray); decide duplicates once over the whole job (pass 2); write every partition not yet written
(pass 3, on Ray); merge the per-resolution indexes, write rejects.parquet and the report.

samples_in = samples_kept + sum(rejected) is checked before the report is written; every rejected
sample is in rejects.parquet with its reason. Killed at any point, the same command resumes and
ends with the same output as an uninterrupted run.

Inputs added to a finished output (same settings) are curated as a new run: their partitions are
numbered after the existing ones, deduplicated against every earlier sample (an earlier kept sample
is never dropped, earlier shards are never rewritten), and the merged indexes, rejects.parquet and
the report then cover every run. For this a finished run keeps its staged keys, rejects and markers
under _work/stage (about 70 bytes a sample, plus its url); only the staged images are deleted. Inputs
that are gone or changed are refused: a different input set needs a new output. Samples that a
takedown request (pipeline/curate/takedown.py) named by id or URL are `takedown` rejects in every
later run, so an added input never brings one back.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from collections import Counter
from pathlib import Path

from deco.data import dedup
from deco.data.buckets import stream_key, write_bucket_index
from deco.data.errors import ExpectedError
from deco.data.object_store import StorageError, bucket_uri, is_s3, open_store
from deco.data.shards import merge_mds_index, read_table, table_bytes, write_wids_index
from deco.data.sources import Partition, describe_inputs
from deco.orchestration import curation
from deco.orchestration.ray_cluster import check_reachable, ray_cluster, ray_is_connected
from deco.pipeline.config import ConfigError, load_config
from deco.pipeline.curate.config import CurateConfig
from deco.pipeline.curate import takedown
from deco.pipeline.curate.plan import REJECTS_KEY, REPORT_KEY, generations, plan_job, rejects_file_schema, runs_of

log = logging.getLogger(__name__)


def load_curate_config(path: str, overrides: list[str] = (), inputs: list[str] | None = None,
                       output: str | None = None, ray_address: str | None = None) -> CurateConfig:
    extra = list(overrides)
    if inputs:
        extra.append("sources.uris=" + json.dumps(list(inputs)))
    if output:
        extra.append("output.uri=" + json.dumps(output))
    if ray_address:
        extra.append("ray.address=" + json.dumps(ray_address))
    return load_config(CurateConfig, path, extra)


def check_storage(cfg: CurateConfig) -> None:
    """Output writable, input buckets reachable: before any work starts (and before creating anything)."""
    if is_s3(cfg.output.uri):
        open_store(cfg.output.uri).check(create=False)
    else:
        existing = Path(cfg.output.uri).expanduser().resolve()
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir() or not os.access(existing, os.W_OK):
            raise StorageError(f"cannot create or write {cfg.output.uri}: {existing} is not a writable directory")
    output = _normalised(cfg.output.uri)
    for uri in cfg.sources.uris:
        if output.startswith(_normalised(uri)) or _normalised(uri).startswith(output):
            # a rerun would list the job's own output as input
            raise ConfigError(f"the output {cfg.output.uri} and the input {uri} overlap: choose an output outside the inputs")
        if is_s3(uri):
            open_store(bucket_uri(uri)).check(create=False)


def _normalised(uri: str) -> str:
    return (uri.rstrip("/") if is_s3(uri) else str(Path(uri).expanduser().resolve())) + "/"


def _for_tasks(cfg: CurateConfig) -> CurateConfig:
    """The settings the Ray tasks get: no path that only this machine (or its working directory)
    has. A task runs on any node, in that node's working directory: a relative output folder is
    made absolute, and a blocklist file is read here, its terms passed on in captions.blocklist."""
    from deco.data.filters import read_blocklist

    captions = cfg.captions
    if captions.blocklist_file:
        captions = dataclasses.replace(captions, blocklist=[*captions.blocklist, *read_blocklist(captions.blocklist_file)],
                                       blocklist_file="")
    output = cfg.output if is_s3(cfg.output.uri) else dataclasses.replace(
        cfg.output, uri=str(Path(cfg.output.uri).expanduser().resolve()))
    return dataclasses.replace(cfg, captions=captions, output=output)


def _drop_staged_samples(store) -> None:
    """After a finished run: staged samples (the resized images) go; the keys, rejects and markers
    stay (about 70 bytes a sample), so that inputs added later are deduplicated against these."""
    stage = f"{curation.WORK}/stage/"
    for key in [k for k in store.list(stage) if k.endswith(".samples.parquet")]:
        store.delete_prefix(key)


def _decide_duplicates(cfg: CurateConfig, store, partitions: list[Partition], run_of: dict[str, int] | None = None,
                       terms: dict | None = None) -> tuple[dict[str, list[str]], list[dict]]:
    """Pass 2: duplicate ids, then exact and near duplicates over every staged key of the job, then
    the takedown `terms` (takedown.standing_terms).

    Within a run the smallest id of a group is kept. A later run's samples (inputs added to a
    finished output) come after every earlier run's: they can duplicate an earlier kept sample, never
    displace it, so the decisions over earlier runs, and so their shards, stay what they were. A
    sample taken down stays in the dedup (its duplicates stay rejected as duplicates, decisions do not
    move): of the samples no duplicate pass rejects, those whose id or url is a term are `takedown`.
    """
    run_of, terms = run_of or {}, terms or {}
    candidates, first_seen, rejects = [], {}, []
    for partition in partitions:
        keys = read_table(store.get_bytes(curation.stage_key(partition.name, "keys.parquet"))).to_pylist()
        staged_rejects = read_table(store.get_bytes(curation.stage_key(partition.name, "rejects.parquet")),
                                    columns=["id", "position"]).to_pylist()
        rows = sorted([(r["position"], r["id"], None) for r in staged_rejects] +
                      [(k["position"], k["id"], k) for k in keys], key=lambda row: row[0])
        for position, sample_id, key in rows:
            if sample_id in first_seen:
                if key is not None:  # already-rejected repeats keep their own reason
                    rejects.append({"id": sample_id, "reason": "duplicate_id", "detail": f"first in {first_seen[sample_id]}",
                                    "partition": partition.name, "position": position})
                continue
            first_seen[sample_id] = partition.name
            if key is not None:
                candidates.append((partition.name, position, key))
    # find_duplicates keeps the smallest id of a group: a fixed-width run prefix orders runs first
    ranked = [f"{run_of.get(c[0], 0):06d}{c[2]['id']}" for c in candidates]
    found = [dataclasses.replace(d, id=d.id[6:], duplicate_of=d.duplicate_of[6:])
             for d in dedup.find_duplicates(ranked, [c[2]["exact_key"] for c in candidates],
                                            [c[2]["phash"] for c in candidates], exact=cfg.dedup.exact,
                                            near=cfg.dedup.near, threshold=cfg.dedup.hamming_threshold)]
    where = {c[2]["id"]: (c[0], c[1]) for c in candidates}
    drop: dict[str, list[str]] = {p.name: [] for p in partitions}
    for row in rejects:
        drop[row["partition"]].append(row["id"])
    for duplicate in found:
        partition, position = where[duplicate.id]
        drop[partition].append(duplicate.id)
        rejects.append({"id": duplicate.id, "reason": duplicate.reason, "partition": partition, "position": position,
                        "detail": f"of {duplicate.duplicate_of} (distance {duplicate.distance})"})
    duplicates = {d.id for d in found}
    for partition, position, key in candidates if terms else ():
        why = None if key["id"] in duplicates else takedown.match(terms, key["id"], key.get("url"))
        if why is not None:
            drop[partition].append(key["id"])
            rejects.append({"id": key["id"], "reason": why.reason, "detail": why.detail, "partition": partition,
                            "position": position})
    return drop, rejects


def _finish(cfg: CurateConfig, store, partitions: list[Partition], dedup_rejects: list[dict]) -> dict:
    """Pass 4: merged indexes, rejects.parquet, and the counts of the report."""
    resolutions = cfg.transform.resolutions
    written = [json.loads(store.get_bytes(curation.written_key(p.name))) for p in partitions]
    shard_stats = {}
    for r in cfg.transform.streams():  # a resolution, or one of its aspect-ratio buckets (<res>/b<H>x<W>)
        per_partition = [w["resolutions"][str(r)] for w in written]
        if cfg.output.format == "mds":
            merge_mds_index(cfg.output.uri, r, [p.name for p in partitions])
        else:
            write_wids_index(cfg.output.uri, r, [tar for s in per_partition for tar in s["tars"]])
        shard_stats[str(r)] = {"samples": sum(s["samples"] for s in per_partition),
                               "shards": sum(s["shards"] for s in per_partition),
                               "bytes": sum(s["bytes"] for s in per_partition)}
    for r in resolutions if cfg.transform.crop == "buckets" else ():  # where training lists the buckets
        write_bucket_index(store, r, {hw: shard_stats[stream_key(r, hw)]["samples"] for hw in cfg.transform.sizes(r)})
    rejects, samples_in, partition_in = [], 0, {}
    for partition in partitions:
        marker = json.loads(store.get_bytes(curation.stage_key(partition.name, "done.json")))
        samples_in += marker["samples_in"]
        partition_in[partition.name] = marker["samples_in"]
        staged = read_table(store.get_bytes(curation.stage_key(partition.name, "rejects.parquet"))).to_pylist()
        rejects.extend(r | {"partition": partition.name} for r in staged)
    rejects.extend(dedup_rejects)
    order = {p.name: n for n, p in enumerate(partitions)}  # the plan's order: p100000 comes after p99999
    rejects.sort(key=lambda r: (order[r["partition"]], r["position"]))
    per_partition_rejects = Counter(r["partition"] for r in rejects)
    for partition, w in zip(partitions, written):  # shards written by an earlier run agree with today's decisions
        if partition_in[partition.name] != w["kept"] + per_partition_rejects[partition.name]:
            raise RuntimeError(f"{partition.name} of {cfg.output.uri} holds {w['kept']} samples but "
                               f"{partition_in[partition.name] - per_partition_rejects[partition.name]} survive "
                               "curation now: its shards no longer match its staged keys")
    store.put_bytes(REJECTS_KEY, table_bytes(rejects, rejects_file_schema()))
    kept = sum(w["kept"] for w in written)
    rejected = dict(sorted(Counter(r["reason"] for r in rejects).items()))
    if samples_in != kept + sum(rejected.values()):
        raise RuntimeError(f"curation lost track of samples: {samples_in} in, {kept} kept, "
                           f"{sum(rejected.values())} rejected; the staged files under {cfg.output.uri}/_work are kept")
    return {"samples_in": samples_in, "samples_kept": kept, "rejected": rejected,
            "duplicates": {"exact": rejected.get("duplicate_exact", 0), "near": rejected.get("duplicate_near", 0),
                           "id": rejected.get("duplicate_id", 0)},
            "shards": shard_stats}


def curate(cfg: CurateConfig) -> dict:
    """Run (or resume) the curation job; returns the report also written beside the shards."""
    started = time.perf_counter()
    check_storage(cfg)
    if cfg.execution == "ray" and not ray_is_connected():
        check_reachable(cfg.ray)
    store = open_store(cfg.output.uri)
    planned = plan_job(cfg, store)  # creates nothing until the inputs are known good
    partitions, fingerprint = planned.partitions, planned.fingerprint
    inputs = describe_inputs(cfg.sources, partitions)
    for entry in inputs:  # said before any work: a format the user did not expect costs nothing yet
        print(f"deco curate: {entry['uri']}: {entry['format']} ({entry['why']})", flush=True)
    if planned.complete:  # the report covers exactly these inputs
        log.info("%s is already complete", cfg.output.uri)
        if not cfg.output.keep_staging:  # a run killed right after its report leaves staging behind
            _drop_staged_samples(store)
        return json.loads(store.get_bytes(REPORT_KEY)) | {"already_complete": True}
    timings = {}
    task_cfg = _for_tasks(cfg)
    cluster = ray_cluster(cfg.ray) if cfg.execution == "ray" else contextlib.nullcontext(None)
    with cluster as info:
        # a finished run keeps its partitions' keys but not their samples: those are only restaged
        # when still unwritten (or when an output finished before keys were kept gains inputs)
        stage_todo = [p for p in partitions if not store.exists(curation.stage_key(p.name, "done.json"))
                      or (not store.exists(curation.written_key(p.name))
                          and not store.exists(curation.stage_key(p.name, "samples.parquet")))]
        tick = time.perf_counter()
        for _ in curation.run_pass(curation.stage_partition, [(p, task_cfg, task_cfg.output.uri) for p in stage_todo],
                                   cfg, "stage", cpus=cfg.resources.stage_cpus):
            pass
        timings["stage_s"] = time.perf_counter() - tick
        tick = time.perf_counter()
        drop, dedup_rejects = _decide_duplicates(cfg, store, partitions, generations(planned),
                                                 takedown.standing_terms(store))
        timings["dedup_s"] = time.perf_counter() - tick
        write_todo = [p for p in partitions if not store.exists(curation.written_key(p.name))]
        tick = time.perf_counter()
        calls = [(p.name, drop[p.name], task_cfg, task_cfg.output.uri) for p in write_todo]
        for _ in curation.run_pass(curation.write_partition, calls, cfg, "write",
                                   cpus=cfg.resources.write_cpus, gpus=cfg.resources.write_gpus):
            pass
        timings["write_s"] = time.perf_counter() - tick
    tick = time.perf_counter()
    counts = _finish(cfg, store, partitions, dedup_rejects)
    timings["finish_s"] = time.perf_counter() - tick
    wall = time.perf_counter() - started
    report = {**counts, "fingerprint": fingerprint, "output": cfg.output.uri, "format": cfg.output.format,
              "resolutions": cfg.transform.resolutions, "text_emb": cfg.text_emb.enabled,
              "partitions": len(partitions), "partitions_resumed": len(partitions) - len(stage_todo),
              "partitions_added": planned.runs[-1]["partitions"] if len(planned.runs) > 1 else 0,
              "runs": runs_of(planned), "inputs_digest": planned.digest,
              "inputs": inputs,
              "execution": cfg.execution, "ray_address": info.address if info else None,
              "config": dataclasses.asdict(cfg),
              "throughput": {"wall_s": round(wall, 3), "samples_per_s": round(counts["samples_in"] / max(wall, 1e-9), 2),
                             **{k: round(v, 3) for k, v in timings.items()}}}
    earlier = json.loads(store.get_bytes(REPORT_KEY)) if store.exists(REPORT_KEY) else {}
    if earlier.get("takedown"):  # the requests applied to this output stay on record
        report["takedown"] = earlier["takedown"]
    store.put_bytes(REPORT_KEY, json.dumps(report, indent=2, sort_keys=True).encode())
    if not cfg.output.keep_staging:
        _drop_staged_samples(store)
    return report


def format_report(report: dict) -> str:
    """The end-of-run table: counts per reason, and shards per resolution."""
    total = max(report["samples_in"], 1)
    width = 36
    lines = [f"{'samples in':<{width}}{report['samples_in']:>10}",
             f"{'kept':<{width}}{report['samples_kept']:>10}  {100 * report['samples_kept'] / total:6.2f}%"]
    for reason, count in sorted(report["rejected"].items(), key=lambda item: (-item[1], item[0])):
        lines.append(f"{'  rejected: ' + reason:<{width}}{count:>10}  {100 * count / total:6.2f}%")
    for resolution, stats in report["shards"].items():  # "256", or a bucket's "256/b224x288"
        label = resolution.replace("/", " px ", 1) if "/" in resolution else resolution + " px"
        lines.append(f"{label:<{width}}{stats['samples']:>10} samples in {stats['shards']} shards, "
                     f"{stats['bytes'] / 2**20:.1f} MiB")
    throughput = report["throughput"]
    lines.append(f"{'throughput':<{width}}{throughput['samples_per_s']:>10} samples/s over {throughput['wall_s']} s")
    lines.append(f"report: {report['output'].rstrip('/')}/{REPORT_KEY}")
    return "\n".join(lines)


class KeptTooFew(ExpectedError):
    """The job ran and wrote its report, but kept nothing, or under min_kept_fraction of its input."""

    exit_code = 1  # the job ran; its output is not usable


def check_kept(report: dict, cfg: CurateConfig) -> None:
    """Raise KeptTooFew (one line: counts, top reject reasons, the report) when the job kept too few:
    an empty output is almost always wrong input or settings, and must not pass as success."""
    kept, total = report["samples_kept"], report["samples_in"]
    if kept > 0 and kept >= cfg.min_kept_fraction * total:
        return
    top = sorted(report["rejected"].items(), key=lambda item: (-item[1], item[0]))[:3]
    reasons = f"top rejects: {', '.join(f'{reason} {count}' for reason, count in top)}" if top else "nothing rejected"
    floor = f", under min_kept_fraction {cfg.min_kept_fraction}" if kept else ""
    raise KeptTooFew(f"kept {kept} of {total} samples{floor}; {reasons}; report: "
                     f"{report['output'].rstrip('/')}/{REPORT_KEY}")


