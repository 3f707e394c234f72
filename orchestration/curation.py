"""Curation work per partition, and its execution as Ray tasks (or a plain loop, for comparison).

Pass 1, `stage_partition` (one task per partition, stage_cpus each): read, check captions, decode
and check images, optional CLIP score, dedup keys, resize + re-encode to every resolution. It leaves
under <output>/_work/stage/ the partition's keys, samples and rejects, then its `.done.json`
marker: a partition with a marker is complete and is never redone.
Pass 2 runs once on the driver (pipeline/curate.py): the job-wide dedup over every staged key.
Pass 3, `write_partition` (write_cpus, write_gpus each): the partition's surviving samples (plus
text embeddings) into shards under <output>/<res>/pNNNNN/ (<res>/b<H>x<W>/pNNNNN/ per aspect-ratio
bucket) and its kept index (<output>/kept/pNNNNN.parquet: id, position, provenance), then its
`_work/written/` marker.
Anything a killed task left without a marker is overwritten by the rerun; all outputs are
deterministic, so a rerun writes the same bytes.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Any, Callable, Iterable, Iterator

from deco.data import dedup, shards
from deco.data.clip_filter import ClipScoreFilter, build_scorer
from deco.data.filters import CaptionFilters, ImageFilters, Reject
from deco.data.object_store import open_store
from deco.data.sources import Partition, read_partition
from deco.data.transforms import TextEmbedder, encode_image, image_extension, render
from deco.orchestration.progress import Progress

log = logging.getLogger(__name__)

WORK = "_work"
PLAN_KEY = f"{WORK}/plan.json"


def stage_key(partition: str, part: str) -> str:
    return f"{WORK}/stage/{partition}.{part}"


def written_key(partition: str) -> str:
    return f"{WORK}/written/{partition}.json"


def _with_position(schema):
    import pyarrow as pa

    return schema.append(pa.field("position", pa.int32()))


# Staged rows carry their position in the partition: the job-wide pass orders samples by it.
KEYS_SCHEMA = _with_position(shards.KEYS_SCHEMA)
REJECTS_SCHEMA = _with_position(shards.REJECTS_SCHEMA)

# Built once per worker process, not once per task: langid's model, CLIP, the text encoder.
_BUILT: dict[tuple[str, str], Any] = {}


def _built(kind: str, section: Any, build: Callable[[Any], Any]) -> Any:
    key = (kind, json.dumps(dataclasses.asdict(section), sort_keys=True))
    if key not in _BUILT:
        _BUILT[key] = build(section)
    return _BUILT[key]


def stage_partition(partition: Partition, cfg, output_uri: str) -> dict:
    """Pass 1 for one partition; returns its counts (also stored in its marker).

    Each image is decoded once for every resolution (a large JPEG at reduced scale: draft mode),
    resampled to each resolution and encoded once; the encoded bytes go to the staged samples file,
    streamed a row group at a time, and the write pass copies them into the shards unchanged. The
    dedup keys (exact and perceptual) are taken from the smallest resolution's image, so that no
    full-size pass is spent on hashing.
    """
    started = time.perf_counter()
    store = open_store(output_uri)
    captions = _built("captions", cfg.captions, CaptionFilters)
    images = ImageFilters(cfg.images, cfg.min_side)
    draft_side, key_resolution = max(cfg.transform.resolutions), min(cfg.transform.resolutions)
    clip = None
    spec = cfg.metadata  # metadata filters (a stored CLIP score among them) and provenance
    if cfg.clip.enabled and not cfg.clip.stored:
        clip = _built("clip", cfg.clip, lambda c: ClipScoreFilter(build_scorer(c), c.min_score, c.batch_size))
    keys, rejects, pending = [], [], []
    seen = 0
    samples = shards.StagedSamplesWriter(cfg.transform.resolutions)

    def reject(position: int, sample_id: str, why: Reject) -> None:
        rejects.append({"id": sample_id, "reason": why.reason, "detail": why.detail, "position": position})

    def accept(position: int, sample_id: str, caption: str, decoded, raw) -> None:
        try:
            small = render(decoded, cfg.transform)
            key = {"id": sample_id, "exact_key": dedup.exact_key(small[key_resolution], caption),
                   "phash": dedup.phash(small[key_resolution]), "url": raw.url, "position": position}
            encoded = {r: encode_image(image, cfg.transform) for r, image in small.items()}
        except Exception as err:  # noqa: BLE001 - one odd image must not fail the partition
            reject(position, sample_id, Reject("processing_error", f"{type(err).__name__}: {str(err)[:160]}"))
            return
        keys.append(key)
        provenance = spec.provenance_row(raw.meta, raw.url, partition.uri)
        samples.add({"id": sample_id, "caption": caption, "orig_width": decoded.width, "orig_height": decoded.height,
                     "position": position, "provenance": json.dumps(provenance),
                     **{f"image_{r}": data for r, data in encoded.items()}})

    def score_pending() -> None:
        try:
            verdicts = clip.check_batch([p[3].oriented() for p in pending], [p[2] for p in pending])
        except Exception as err:  # noqa: BLE001 - a failed batch is counted, sample by sample
            failure = Reject("processing_error", f"clip: {type(err).__name__}: {str(err)[:160]}")
            verdicts = [failure] * len(pending)
        for (position, sample_id, caption, image, raw), verdict in zip(pending, verdicts):
            if verdict is None:
                accept(position, sample_id, caption, image, raw)
            else:
                reject(position, sample_id, verdict)
        pending.clear()

    with samples:  # its local file goes whatever happens
        for position, raw in enumerate(read_partition(partition, cfg.sources, spec)):
            seen += 1
            try:
                if raw.reject is not None:
                    reject(position, raw.id, raw.reject)
                    continue
                caption, why = captions.check(raw.caption)
                if why is None:
                    image, why = images.check_decoded(raw.image, draft_side)
                if why is not None:
                    reject(position, raw.id, why)
                elif clip is not None:
                    pending.append((position, raw.id, caption, image, raw))
                else:
                    accept(position, raw.id, caption, image, raw)
            except Exception as err:  # noqa: BLE001 - counted and reported, never silently lost
                log.warning("sample %s of %s: %s", raw.id, partition.name, err)
                reject(position, raw.id, Reject("processing_error", f"{type(err).__name__}: {str(err)[:160]}"))
            if clip is not None and len(pending) >= clip.batch_size:
                score_pending()
        if pending:
            score_pending()

        store.put_bytes(stage_key(partition.name, "keys.parquet"), shards.table_bytes(keys, KEYS_SCHEMA))
        samples.upload(store, stage_key(partition.name, "samples.parquet"))
    store.put_bytes(stage_key(partition.name, "rejects.parquet"), shards.table_bytes(rejects, REJECTS_SCHEMA))
    rejected: dict[str, int] = {}
    for row in rejects:
        rejected[row["reason"]] = rejected.get(row["reason"], 0) + 1
    counts = {"partition": partition.name, "samples_in": seen, "candidates": len(keys), "rejected": rejected,
              "seconds": round(time.perf_counter() - started, 3)}
    store.put_bytes(stage_key(partition.name, "done.json"), json.dumps(counts, sort_keys=True).encode())
    return counts


def write_partition(partition: str, drop: list[str], cfg, output_uri: str) -> dict:
    """Pass 3 for one partition: its samples minus `drop` into shards; returns per-resolution stats."""
    started = time.perf_counter()
    store = open_store(output_uri)
    resolutions = cfg.transform.resolutions
    if cfg.output.format == "mds":  # whatever a killed earlier attempt left
        for key in cfg.transform.streams():  # a resolution, or one of its aspect-ratio buckets
            store.delete_prefix(shards.partition_dir(key, partition))
    else:
        for r in resolutions:
            if store.exists(f"{r}/{partition}-00000.tar"):  # list the folder only when there is something
                for key in list(store.list(f"{r}/")):
                    if key.rsplit("/", 1)[-1].startswith(f"{partition}-"):
                        store.delete_prefix(key)
    with_emb, kept, provenance = cfg.text_emb.enabled, [], cfg.provenance.types
    # Streamed: one staged row group (and one text-embedding batch) in memory at a time; the encoded
    # images go into the shards as the stage pass made them.
    with store.open(stage_key(partition, "samples.parquet")) as handle:
        samples = shards.read_staged_samples(handle, resolutions, set(drop))
        if with_emb:
            samples = _with_text_emb(samples, cfg.text_emb)
        samples = _recording(samples, kept)
        if cfg.output.format == "mds":
            stats = shards.write_mds_partition(output_uri, partition, samples, resolutions, cfg.output, with_emb,
                                               provenance, cfg.transform.buckets_per_resolution())
        else:
            stats = shards.write_webdataset_partition(output_uri, partition, samples, resolutions, cfg.output,
                                                      with_emb, image_extension(cfg.transform), provenance)
    store.put_bytes(shards.kept_key(partition), shards.kept_table_bytes(kept, provenance))
    ids = [row["id"] for row in kept]
    record = {"partition": partition, "kept": len(ids), "ids": ids,
              "resolutions": {str(r): s for r, s in stats.items()}, "seconds": round(time.perf_counter() - started, 3)}
    store.put_bytes(written_key(partition), json.dumps(record, sort_keys=True).encode())
    return record


def _recording(samples: Iterable[dict], kept: list[dict]) -> Iterator[dict]:
    """The samples, noting each one's id, position and provenance for the kept index."""
    for sample in samples:
        kept.append({k: sample.get(k) for k in ("id", "position", "provenance")})
        yield sample


def _with_text_emb(samples: Iterable[dict], cfg) -> Iterator[dict]:
    """Samples with their text embeddings, embedded batch_size captions at a time (the encoder is
    built on the first batch: a partition that keeps nothing never loads it)."""
    batch: list[dict] = []

    def embedded() -> Iterator[dict]:
        embedder = _built("text_emb", cfg, TextEmbedder)
        for sample, emb in zip(batch, embedder.embed([s["caption"] for s in batch])):
            sample["text_emb"], sample["text_emb_dim"] = emb, embedder.dim
            yield sample

    for sample in samples:
        batch.append(sample)
        if len(batch) >= cfg.batch_size:
            yield from embedded()
            batch = []
    if batch:
        yield from embedded()


# ------------------------------------------------------------------------------------------------
# Execution
# ------------------------------------------------------------------------------------------------

def _partitions(total: int, desc: str, enabled: bool) -> Progress:
    return Progress(f"curate {desc}", total, unit="partition", enabled=enabled)


def _done(bar: Progress, result: dict) -> None:
    bar.update(1, samples=result.get("samples_in", result.get("kept", 0)))


def run_local(fn: Callable[..., dict], calls: list[tuple], desc: str, progress: bool) -> Iterator[dict]:
    """The same work in a plain loop in this process."""
    bar = _partitions(len(calls), desc, progress)
    try:
        for args in calls:
            result = fn(*args)
            _done(bar, result)
            yield result
    finally:
        bar.close()


def run_ray(fn: Callable[..., dict], calls: list[tuple], desc: str, progress: bool, *, num_cpus: float,
            num_gpus: float = 0.0, max_in_flight: int) -> Iterator[dict]:
    """One Ray task per call, at most `max_in_flight` at once; results in completion order.

    Tasks are retried when their worker or node dies (max_retries; on another node if need be) and
    on connection errors; any other error stops the pass and is raised here as its original
    exception, and a task lost past its retries as ClusterError, in one line.
    """
    import ray

    remote = ray.remote(fn).options(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=3,
                                    retry_exceptions=[ConnectionError, TimeoutError])
    bar = _partitions(len(calls), desc, progress)
    queue, in_flight = list(calls), []
    try:
        while queue or in_flight:
            while queue and len(in_flight) < max_in_flight:
                in_flight.append(remote.remote(*queue.pop(0)))
            done, in_flight = ray.wait(in_flight, num_returns=1)
            try:
                result = ray.get(done[0])
            except ray.exceptions.RayTaskError as err:
                cause = getattr(err, "cause", None)
                raise (cause if isinstance(cause, BaseException) else err) from None
            except ray.exceptions.RayError as err:  # its node or worker died past max_retries
                from deco.orchestration.ray_cluster import lost_work

                raise lost_work(err, desc) from None
            _done(bar, result)
            yield result
    finally:
        for ref in in_flight:
            ray.cancel(ref, force=True)
        bar.close()


def run_pass(fn: Callable[..., dict], calls: list[tuple], cfg, desc: str, *, cpus: float, gpus: float = 0.0) -> Iterable[dict]:
    if not calls:
        return iter(())
    if cfg.execution == "local":
        return run_local(fn, calls, desc, cfg.progress)
    import ray

    cluster_cpus = ray.cluster_resources().get("CPU", 1)
    max_in_flight = cfg.num_workers or max(1, int(cluster_cpus // max(cpus, 1e-3)))
    return run_ray(fn, calls, desc, cfg.progress, num_cpus=cpus, num_gpus=gpus, max_in_flight=max_in_flight)
