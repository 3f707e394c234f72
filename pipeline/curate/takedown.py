"""`deco curate --takedown FILE --output OUT`: remove the samples a takedown request names from a
finished curation output, and keep them out of every later run on it.

The request is a text file (local or s3://), one sample id or source URL a line (blank lines and
`#` comments skipped). Its lines join the output's standing terms (<output>/takedown.parquet: term,
request number, request digest). A kept sample matches when its id or its url is a term: the kept
index (<output>/kept/pNNNNN.parquet) says which partitions hold one, and only the MDS shards that
hold one (in each resolution's dataset, or each of its aspect-ratio buckets') are rewritten (data/shards.py drop_mds_samples: the other samples' bytes unchanged, the
file under a new name); every other file stays as it was, byte for byte. Then the
partition and merged indexes, the written markers, the kept index, rejects.parquet (reason
`takedown`, detail `request <digest[:12]>`) and the report (counts, shard stats, and a `takedown`
section: per request its digest, terms, samples removed and removals per shard) are updated.

Rerunning a request removes nothing more and changes no file. A run cut short is finished by
running it again: the kept index, the last thing written, still lists what is left to do. Inputs
added later (pipeline/curate/plan.py) are matched against the standing terms in the job-wide pass
(job._decide_duplicates): a matching sample is a `takedown` reject and is never written, so a removed
id or URL does not come back. Duplicates of a removed sample stay rejected as duplicates.
"""
from __future__ import annotations

import hashlib
import io
import json
from collections import Counter, defaultdict

import pyarrow as pa
import pyarrow.parquet as pq

from deco.data.filters import Reject
from deco.data.metadata import ProvenanceConfig
from deco.data.object_store import open_store, store_and_key
from deco.data.shards import KEPT_PREFIX, drop_mds_samples, read_table, replace_merged_entries, table_bytes
from deco.orchestration import curation
from deco.pipeline.config import ConfigError
from deco.pipeline.curate.plan import REJECTS_KEY, REPORT_KEY, rejects_file_schema

TAKEDOWN_KEY = "takedown.parquet"
TERMS_SCHEMA = pa.schema([("term", pa.string()), ("request", pa.int32()), ("digest", pa.string())])


def standing_terms(store) -> dict[str, tuple[int, str]]:
    """term -> (request number, request digest) of every takedown applied to the output."""
    if not store.exists(TAKEDOWN_KEY):
        return {}
    return {r["term"]: (r["request"], r["digest"]) for r in read_table(store.get_bytes(TAKEDOWN_KEY)).to_pylist()}


def match(terms: dict[str, tuple[int, str]], sample_id: str, url: str | None) -> Reject | None:
    """The takedown reject of a sample whose id or url is a term (the earliest request naming it)."""
    hits = [terms[t] for t in (sample_id, url) if t and t in terms]
    return Reject("takedown", f"request {min(hits)[1][:12]}") if hits else None


def read_request(uri: str) -> tuple[list[str], str]:
    """(the request's terms in order, once each; the sha256 of the file's bytes)."""
    try:
        store, key = store_and_key(uri)
        data = store.get_bytes(key)
    except FileNotFoundError:
        raise ConfigError(f"takedown request file {uri} not found") from None
    lines = (line.strip() for line in data.decode("utf-8", "replace").splitlines())
    return list(dict.fromkeys(t for t in lines if t and not t.startswith("#"))), hashlib.sha256(data).hexdigest()


def _parquet(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def _checked_output(store, output_uri: str) -> dict:
    if not store.exists(REPORT_KEY):
        raise ConfigError(f"no curated output at {output_uri}: {REPORT_KEY} not found (a takedown needs a finished "
                          "`deco curate` output)")
    report = json.loads(store.get_bytes(REPORT_KEY))
    if report.get("format", "mds") != "mds":
        raise ConfigError(f"{output_uri} is a {report['format']} output: takedowns rewrite MDS outputs only")
    if store.exists(curation.PLAN_KEY):
        planned = len(json.loads(store.get_bytes(curation.PLAN_KEY))["partitions"])
        if planned != report["partitions"]:
            raise ConfigError(f"{output_uri} has an unfinished curation run ({planned} partitions planned, "
                              f"{report['partitions']} finished): rerun its `deco curate` to finish it first")
    if report["samples_kept"] and next(iter(store.list(f"{KEPT_PREFIX}/")), None) is None:
        raise ConfigError(f"{output_uri} has no kept index ({KEPT_PREFIX}/): it was curated before provenance was "
                          "recorded; curate its inputs again into a new output to take samples down")
    return report


def takedown(output_uri: str, request_uri: str) -> dict:
    """Apply one takedown request to a finished MDS output; returns what it did (also in the report)."""
    store = open_store(output_uri)
    report = _checked_output(store, output_uri)
    lines, digest = read_request(request_uri)
    terms = standing_terms(store)
    number = next((n for n, d in terms.values() if d == digest), 1 + max((n for n, _ in terms.values()), default=0))
    new_terms = [t for t in lines if t not in terms]
    terms.update({t: (number, digest) for t in new_terms})
    url_type = ProvenanceConfig(**report["config"].get("provenance", {"enabled": False})).types.get("url")

    # Which kept samples the terms name, per partition (the kept index: one small file a partition).
    kept_tables, matched, seen = {}, defaultdict(list), set()
    for key in sorted(k for k in store.list(f"{KEPT_PREFIX}/") if k.endswith(".parquet")):
        partition = key.rsplit("/", 1)[1][: -len(".parquet")]
        table = read_table(store.get_bytes(key))
        urls = table.column("url").to_pylist() if "url" in table.column_names else [None] * table.num_rows
        for row, url in zip(table.select(["id", "position"]).to_pylist(), urls):
            url = json.loads(url) if url_type == "json" and url is not None else url
            why = match(terms, row["id"], url if isinstance(url, str) else None)
            if why is not None:
                matched[partition].append({**row, "reason": why.reason, "detail": why.detail, "partition": partition})
                seen.update(t for t in (row["id"], url) if t in terms)
        kept_tables[partition] = table
    removed = sum(len(rows) for rows in matched.values())
    if not removed and not new_terms:
        return {"output": output_uri, "digest": digest, "terms": len(lines), "new_terms": 0, "removed": 0,
                "unmatched": len(lines)}

    # Shards first, then the partition indexes, then the merged ones; old files go last.
    per_shard, stats, obsolete = {}, defaultdict(lambda: defaultdict(Counter)), []
    for r in report["resolutions"]:
        for dataset in _datasets(store, r):
            merged = json.loads(store.get_bytes(f"{dataset}/index.json"))
            for partition, rows in matched.items():
                prefix = f"{dataset}/{partition}"
                index, counts, gone = drop_mds_samples(store, prefix, {row["id"] for row in rows})
                store.put_bytes(f"{prefix}/index.json", json.dumps(index, sort_keys=True).encode())
                merged = replace_merged_entries(merged, partition, index["shards"])
                per_shard.update({f"{prefix}/{name}": n for name, n in counts.items()})
                # Every file the new index does not list, not only this run's: a run cut after it
                # rewrote an index left old shards (with the removed samples) that no index names.
                listed = {"index.json"} | {i["basename"] for e in index["shards"] for i in (e["raw_data"], e.get("zip_data")) if i}
                obsolete += sorted({f"{prefix}/{name}" for name in gone}
                                   | {k for k in store.list(f"{prefix}/") if k.rsplit("/", 1)[1] not in listed})
                stats[partition][dataset].update(_stats(index["shards"]))  # keyed as the markers are: per stream
            store.put_bytes(f"{dataset}/index.json", json.dumps(merged, sort_keys=True).encode())
        _recount_buckets(store, r)
    for key in obsolete:
        store.delete_prefix(key)

    # Terms (with the ids a URL matched, so that they hold for partitions without urls), rejects, report.
    for rows in matched.values():
        terms.update({row["id"]: (number, digest) for row in rows if row["id"] not in terms})
    ordered = sorted(terms.items(), key=lambda item: (item[1][0], item[0]))
    store.put_bytes(TAKEDOWN_KEY, table_bytes([{"term": t, "request": n, "digest": d} for t, (n, d) in ordered],
                                              TERMS_SCHEMA))
    rejects = read_table(store.get_bytes(REJECTS_KEY)).to_pylist() if store.exists(REJECTS_KEY) else []
    present = {(r["partition"], r["id"], r["reason"]) for r in rejects}
    added = [{k: row[k] for k in ("id", "reason", "detail", "partition", "position")}  # a rerun finishing a cut
             for rows in matched.values() for row in rows  # run short counts nothing twice
             if (row["partition"], row["id"], row["reason"]) not in present]
    rejects += added
    rejects.sort(key=lambda r: (int(r["partition"][1:]), r["position"]))
    store.put_bytes(REJECTS_KEY, table_bytes(rejects, rejects_file_schema()))
    store.put_bytes(REPORT_KEY, json.dumps(_updated_report(store, report, rejects, {
        "digest": digest, "file": request_uri, "terms": len(lines), "new_terms": len(new_terms), "removed": len(added),
        "per_shard": dict(sorted(per_shard.items()))}), indent=2, sort_keys=True).encode())

    # Written markers, then the kept index: the record of what is still to do, written last.
    for partition, rows in matched.items():
        gone = {row["id"] for row in rows}
        marker_key = curation.written_key(partition)
        if store.exists(marker_key):
            marker = json.loads(store.get_bytes(marker_key))
            marker["ids"] = [i for i in marker["ids"] if i not in gone]
            marker["kept"] = len(marker["ids"])
            for r, values in stats[partition].items():
                marker["resolutions"][r] = {**marker["resolutions"].get(r, {}), **dict(values)}
            store.put_bytes(marker_key, json.dumps(marker, sort_keys=True).encode())
        table = kept_tables[partition]
        keep = pa.array([i not in gone for i in table.column("id").to_pylist()])
        store.put_bytes(f"{KEPT_PREFIX}/{partition}.parquet", _parquet(table.filter(keep)))
    return {"output": output_uri, "digest": digest, "terms": len(lines), "new_terms": len(new_terms),
            "removed": len(added), "unmatched": len([t for t in lines if t not in seen])}


def _stats(shards: list[dict]) -> dict:
    return {"samples": sum(s["samples"] for s in shards), "shards": len(shards),
            "bytes": sum((s.get("zip_data") or s["raw_data"])["bytes"] for s in shards)}


def _datasets(store, resolution: int) -> list[str]:
    """The MDS datasets of a resolution: `<res>` itself, or each of its aspect-ratio buckets."""
    from deco.data import buckets

    if store.exists(f"{resolution}/{buckets.INDEX}"):
        return [f"{resolution}/{b['name']}" for b in buckets.read_bucket_index(store, str(resolution))]
    return [str(resolution)]


def _recount_buckets(store, resolution: int) -> None:
    """A bucketed resolution's buckets.json with each bucket's samples as its merged index now says."""
    from deco.data import buckets

    key = f"{resolution}/{buckets.INDEX}"
    if store.exists(key):
        index = json.loads(store.get_bytes(key))
        for bucket in index["buckets"]:
            merged = json.loads(store.get_bytes(f"{resolution}/{bucket['name']}/index.json"))["shards"]
            bucket["samples"] = sum(s["samples"] for s in merged)
        store.put_bytes(key, json.dumps(index, sort_keys=True).encode())


def _updated_report(store, report: dict, rejects: list[dict], request: dict) -> dict:
    """The report with counts recounted from rejects.parquet and the merged indexes, and the request
    added to (or, when it is a rerun that finished an interrupted one, merged into) its history."""
    rejected = dict(sorted(Counter(r["reason"] for r in rejects).items()))
    kept = report["samples_in"] - sum(rejected.values())
    shards = {}
    for r in report["resolutions"]:
        held = 0
        for dataset in _datasets(store, r):  # per stream, as the curation report counts them
            stats = _stats(json.loads(store.get_bytes(f"{dataset}/index.json"))["shards"])
            shards[dataset] = {**report["shards"].get(dataset, {}), **stats}
            held += stats["samples"]
        if held != kept:
            raise RuntimeError(f"takedown lost track of samples: {report['output']}/{r} holds "
                               f"{held} samples, the counts say {kept}")
    section = report.get("takedown") or {"requests": [], "removed": 0}
    earlier = next((q for q in section["requests"] if q["digest"] == request["digest"]), None)
    if earlier is None:
        section["requests"].append(request)
    else:
        earlier["removed"] += request["removed"]
        earlier["new_terms"] += request["new_terms"]
        for key, n in request["per_shard"].items():
            earlier["per_shard"][key] = earlier["per_shard"].get(key, 0) + n
    section["removed"] = sum(q["removed"] for q in section["requests"])
    return {**report, "samples_kept": kept, "rejected": rejected, "shards": shards, "takedown": section}
