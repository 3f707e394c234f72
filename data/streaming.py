"""Training data: MDS shards (data/shard_schema.py) streamed per rank with mosaicml-streaming.

Each stream is a curation output (`<uri>/<resolution>/index.json`, local path or s3://) or an MDS
dataset directory itself. With `crop: buckets` each stream is a bucketed curation output instead
(`<uri>/<resolution>/buckets.json`, data/buckets.py): every bucket becomes a streaming Stream of its
own, and streaming's `per_stream` batching draws each global batch (one micro-batch on every rank)
from a single bucket, so a batch stacks into one (B, 3, H, W) tensor. Streams are copied shard by
shard into a local cache as they are needed and mixed by proportion. Images are decoded and
normalised to [-1, 1] in the loader's worker processes; cached text embeddings (bf16) are decoded there too, else the caption travels on to the
trainer's frozen encoder. Any other columns of a row (curation's provenance: source, url, licence,
scores; data/metadata.py) pass through as the sample's `provenance` dict, the batch's list of them.

Sample order is streaming's elastically deterministic order: with the global batch fixed, step k
sees the same global set of samples whatever the number of ranks, nodes or workers, as long as the
canonical node count stays the one fixed at the first launch (it is kept in the loader state).
With buckets the same holds, and the bucket of each global batch comes from the same state: per
epoch, streaming orders every bucket's full global batches by the shuffle seed and epoch alone
(the batch counts per bucket do not depend on the world size), and a bucket's partial last batch
is left out of that epoch. (Chosen over one loader per bucket with a schedule of our own: one
loader, one resume state, no extra worker processes per bucket.) With engine.grad_accum > 1 each
micro-batch is one bucket; the micro-batches of one step may come from different buckets.
The loader state (epoch, samples seen) goes into every checkpoint; resuming continues at the exact
next sample.

A sample that cannot be used (its image does not decode, has the wrong size, or its row does not
parse) is skipped: its slot takes the next good sample of the same stream, chosen from the sample
index alone (so the order stays elastically deterministic and resumes exactly; the stand-in is
seen once more that epoch). Each skip is counted with its shard in the batch (`skipped`,
`skipped_shards`); each process warns once per shard. MAX_BAD_RUN bad samples in a row is an error
naming the shard: that is corrupt data, not bit rot.
"""
from __future__ import annotations

import hashlib
import logging
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

import torch

from deco.data.buckets import INDEX as BUCKET_INDEX, read_bucket_index
from deco.data.errors import DatasetError
from deco.data.object_store import join, open_store
from deco.data.shard_schema import COLUMNS, TEXT_EMB_COLUMNS, decode_image, decode_text_emb, image_to_tensor

log = logging.getLogger(__name__)

SHUFFLE_ALGOS = ("py1e", "py1br", "py1b", "py1s", "py2s", "naive")
MAX_BAD_RUN = 64                  # bad samples in a row that stop training with an error
_WARNED_SHARDS: set[str] = set()  # shards this process has warned about
# What a damaged MDS row raises when read (a missing shard is streaming's RuntimeError: not skipped).
_ROW_ERRORS = (ValueError, KeyError, IndexError, TypeError, struct.error)


@dataclass(kw_only=True)
class StreamConfig:
    uri: str                     # curation output (holds <resolution>/index.json) or an MDS dataset dir
    proportion: float = 0.0      # share of each epoch drawn from this stream; 0 on every stream = by size
    name: str = ""               # label in logs and the cache directory name


@dataclass(kw_only=True)
class DataConfig:
    streams: list[StreamConfig] = field(default_factory=list)
    resolution: int = 0          # 0 = the model's resolution; picks <uri>/<resolution>/
    # "square": <uri>/<resolution>/ holds one dataset of centre crops (the paper). "buckets": the
    # aspect-ratio buckets listed in <uri>/<resolution>/buckets.json, each global batch from one bucket.
    crop: Literal["square", "buckets"] = "square"
    cache_dir: str = ""          # "" = <run_dir>/data_cache; local shard cache of remote streams
    shuffle: bool = True
    shuffle_algo: str = "py1e"
    shuffle_seed: int = 9176
    shuffle_block_size: int = 0  # 0 = streaming's default
    # Fixed at the first launch and kept in the loader state: changing it changes the sample order.
    # 0 = the number of nodes of the first launch.
    num_canonical_nodes: int = 0
    num_workers: int = 2         # decode processes per rank
    prefetch_factor: int = 2     # batches each worker keeps ready
    predownload: int = 0         # samples to download ahead; 0 = 8 x batch
    cache_limit: str = ""        # e.g. "200gb"; "" = unlimited
    download_retry: int = 2
    download_timeout: float = 60.0
    # streaming's shared memory left by a killed run blocks the next one; cleaning it assumes this
    # job owns streaming on its nodes, as a training job does.
    clean_stale_shared_memory: bool = True

    def validate(self) -> None:
        if not self.streams:
            raise ValueError("data.streams is empty: name at least one MDS location (or pass --data URI)")
        if self.shuffle_algo not in SHUFFLE_ALGOS:
            raise ValueError(f"data.shuffle_algo={self.shuffle_algo!r} must be one of {list(SHUFFLE_ALGOS)}")
        proportions = [s.proportion for s in self.streams]
        if any(p < 0 for p in proportions) or (any(p > 0 for p in proportions) and not all(p > 0 for p in proportions)):
            raise ValueError(f"data.streams proportions {proportions}: set a positive proportion on every stream, or on none")
        if self.num_workers < 0 or self.num_canonical_nodes < 0:
            raise ValueError("data.num_workers and data.num_canonical_nodes must be >= 0")


def resolve_stream_uri(uri: str, resolution: int) -> str:
    """The MDS dataset to read: `<uri>/<resolution>` (curation's layout) or `uri` itself."""
    store = open_store(uri)
    if store.exists(f"{resolution}/index.json"):
        return join(uri, str(resolution))
    if store.exists("index.json"):
        return uri
    if store.exists(f"{resolution}/{BUCKET_INDEX}"):
        raise FileNotFoundError(f"{join(uri, str(resolution))} holds aspect-ratio buckets ({BUCKET_INDEX}), not "
                                f"square crops: set data.crop=buckets")
    raise FileNotFoundError(f"no MDS dataset at {join(uri, str(resolution), 'index.json')} (curation writes one "
                            f"per resolution) nor at {join(uri, 'index.json')}")


def resolve_buckets(uri: str, resolution: int) -> list[tuple[str, tuple[int, int], int]]:
    """(MDS dataset, (H, W), samples) of every bucket listed by `<uri>/<resolution>/buckets.json`
    (curation's layout) or `<uri>/buckets.json`."""
    store = open_store(uri)
    for base, prefix in ((join(uri, str(resolution)), str(resolution)), (uri, "")):
        if store.exists(f"{prefix}/{BUCKET_INDEX}" if prefix else BUCKET_INDEX):
            return [(join(base, b["name"]), (int(b["height"]), int(b["width"])), int(b["samples"]))
                    for b in read_bucket_index(store, prefix)]
    raise FileNotFoundError(f"no aspect-ratio buckets at {join(uri, str(resolution), BUCKET_INDEX)} (curation "
                            f"with transform.crop: buckets writes one) nor at {join(uri, BUCKET_INDEX)}")


def decode_sample(raw: dict[str, Any], resolution: int | tuple[int, int]) -> dict[str, Any]:
    """Raw MDS row -> tensors. A sample that cannot be used keeps its id with `image` None and the
    reason in `error` (logged at debug level: the caller decides what to warn about)."""
    sample = {"id": str(raw["id"]), "caption": str(raw.get("caption") or ""), "image": None, "text_emb": None,
              "error": None, "provenance": {k: v for k, v in raw.items() if k not in COLUMNS and k not in TEXT_EMB_COLUMNS}}
    try:
        image = decode_image(raw["image"])
    except Exception as err:  # PIL raises many types for broken files; the id is what matters
        sample["error"] = f"undecodable image ({err})"
        log.debug("sample %s: %s", sample["id"], sample["error"])
        return sample
    height, width = (resolution, resolution) if isinstance(resolution, int) else resolution
    if image.size != (width, height):
        expected = f"{resolution} px" if isinstance(resolution, int) else f"{width}x{height} (its bucket)"
        sample["error"] = f"image is {image.size[0]}x{image.size[1]}, expected {expected}"
        log.debug("sample %s: %s", sample["id"], sample["error"])
        return sample
    if raw.get("text_emb") is not None and raw.get("text_emb_dim"):
        try:
            sample["text_emb"] = decode_text_emb(raw["text_emb"], int(raw["text_emb_dim"])).float()
        except (ValueError, RuntimeError) as err:  # bytes that are no whole (tokens, dim) bf16 matrix
            sample["error"] = f"undecodable text_emb ({err})"
            log.debug("sample %s: %s", sample["id"], sample["error"])
            return sample
    sample["image"] = image_to_tensor(image)
    return sample


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack a batch of usable samples (the dataset has already drawn stand-ins for bad ones)."""
    unusable = [s["id"] for s in samples if s["image"] is None]
    if unusable:
        raise ValueError(f"collate got unusable samples {unusable}: the dataset replaces them before collating")
    return {
        "ids": [s["id"] for s in samples],
        "images": torch.stack([s["image"] for s in samples]),
        "captions": [s["caption"] for s in samples],
        "text_emb": [s["text_emb"] for s in samples],
        "provenance": [s.get("provenance") or {} for s in samples],  # per sample: source, url, ... (if curated with)
        # The bad samples these slots were drawn for, with their shards, in slot order.
        "skipped": [skip for s in samples for skip, _ in s.get("skipped", ())],
        "skipped_shards": [shard for s in samples for _, shard in s.get("skipped", ())],
    }


def _dataset_class():
    from streaming import StreamingDataset

    class DecodedStreamingDataset(StreamingDataset):
        """StreamingDataset whose items are decoded in the loader worker that fetches them, a bad
        sample replaced by the next good one of its stream."""

        def __init__(self, *, sizes: list[int | tuple[int, int]], stream_labels: list[str], **kwargs):
            super().__init__(**kwargs)
            # each stream's image size: a square's side, or a bucket's (H, W)
            self.sizes, self.stream_labels = sizes, stream_labels
            self._bad: dict[int, tuple[str, str]] = {}  # index -> (id, reason), known bad in this process

        def get_item(self, sample_id: int, retry: int = 7) -> dict[str, Any]:
            sample = self._decoded(sample_id, retry)
            if sample["image"] is not None:
                return sample
            # The stand-in depends on the index alone. A run of bad samples takes the next good
            # ones in order (the r-th bad of a run the r-th good after it), so a batch of bad
            # samples is not filled with copies of one sample.
            first, last = self._stream_range(sample_id)
            limit = min(MAX_BAD_RUN, last - first)
            run_start = sample_id
            while run_start > first and sample_id - run_start < limit:
                before = self._decoded(run_start - 1, retry)
                if before["image"] is not None:
                    break
                run_start -= 1
            wanted = run = sample_id - run_start + 1
            index, run_from, bad = sample_id, self._decoded(run_start, retry), sample
            while True:
                if run >= limit:
                    raise RuntimeError(
                        f"the data at {self.shard_name(self.spanner[run_start][0])} is corrupt from sample "
                        f"{run_from['id']}: {run} samples in a row cannot be used (the last, {bad['id']} in "
                        f"{self.shard_name(self.spanner[index][0])}: {bad['error']}); check the stream's "
                        f"shards, or curate it again")
                index = first + (index + 1 - first) % (last - first)
                candidate = self._decoded(index, retry)
                if candidate["image"] is not None:
                    run, wanted = 0, wanted - 1
                    if not wanted:
                        break
                    continue
                bad = candidate
                if run:
                    run += 1
                else:
                    run, run_start, run_from = 1, index, candidate
            shard_id = self.spanner[sample_id][0]
            shard = self.shard_name(shard_id)
            if shard not in _WARNED_SHARDS:
                _WARNED_SHARDS.add(shard)
                log.warning("stream %s, shard %s: sample %s cannot be used (%s); skipped, the next good sample "
                            "drawn instead. Further bad samples of this shard are counted in the metrics, not "
                            "logged.", self.stream_labels[self.stream_per_shard[shard_id]], shard, sample["id"],
                            sample["error"])
            candidate["skipped"] = [(sample["id"], shard)]
            return candidate

        def _decoded(self, index: int, retry: int) -> dict[str, Any]:
            if index in self._bad:
                return {"id": self._bad[index][0], "image": None, "error": self._bad[index][1]}
            try:
                stream = int(self.stream_per_shard[self.spanner[index][0]])
                sample = decode_sample(super().get_item(index, retry), self.sizes[stream])
            except _ROW_ERRORS as err:
                shard_id, row = self.spanner[index]
                sample = {"id": f"{self.shards[shard_id].file_pairs[0][0].basename}#{row}", "image": None,
                          "error": f"unreadable row ({type(err).__name__}: {err})"}
            if sample["image"] is None:
                if len(self._bad) >= 1 << 16:
                    self._bad.clear()  # a memo of recent bad samples, not a record of all
                self._bad[index] = (sample["id"], sample["error"])
            return sample

        def _stream_range(self, index: int) -> tuple[int, int]:
            stream = int(self.stream_per_shard[self.spanner[index][0]])
            first = int(self.sample_offset_per_stream[stream])
            return first, first + int(self.samples_per_stream[stream])

        def shard_name(self, shard_id: int) -> str:
            """The shard's file where the stream keeps it (remote, else local)."""
            stream = self.streams[self.stream_per_shard[shard_id]]
            raw, zipped = self.shards[shard_id].file_pairs[0]
            return join(stream.remote or stream.local, stream.split or "", (zipped or raw).basename)

    return DecodedStreamingDataset


def cache_dir_for(cache_root: str | Path, uri: str, index: int, name: str) -> str:
    digest = hashlib.sha1(uri.encode()).hexdigest()[:10]
    return str(Path(cache_root) / f"{index:02d}-{name or 'stream'}-{digest}")


def _bucket_parts(cfg: DataConfig, resolution: int, global_batch: int) -> list[tuple]:
    """(remote, (H, W), proportion, label, cache name) of every bucket of every stream that holds a
    full global batch (per_stream batching cannot use the others); a stream's proportion is split
    over its buckets by their sizes."""
    parts = []
    for stream in cfg.streams:
        buckets = resolve_buckets(stream.uri, resolution)
        kept = [b for b in buckets if b[2] >= global_batch]
        small = [f"{uri.rsplit('/', 1)[-1]} ({count})" for uri, _, count in buckets if count < global_batch]
        if small:
            log.warning("stream %s: buckets %s hold fewer samples than a global batch of %d; not trained on",
                        stream.name or stream.uri, ", ".join(small), global_batch)
        total = sum(count for *_, count in kept)
        for uri, size, count in kept:
            bucket = uri.rsplit("/", 1)[-1]
            proportion = stream.proportion * count / total if stream.proportion > 0 else 0.0
            cache_name = f"{stream.name}-{bucket}" if stream.name else bucket
            parts.append((uri, size, proportion, f"{stream.name or stream.uri}/{bucket}", cache_name))
    if not parts:
        raise DatasetError(f"no bucket of {[s.uri for s in cfg.streams]} at {resolution} px holds a global batch of "
                         f"{global_batch} samples")
    return parts


class TrainLoader:
    """Endless iterator of batches over epochs, with streaming's exact-resume state."""

    def __init__(self, cfg: DataConfig, resolution: int, batch_size: int, cache_root: str | Path,
                 pin_memory: bool = False, *, world_size: int = 1, multiple: int = 1):
        """`pin_memory`: batches in page-locked memory, so the copy to a GPU can be asynchronous.
        `world_size` (ranks): with buckets, one too small for a global batch is left out.
        `multiple` (the model's patch): every image side must be one."""
        from streaming import Stream, StreamingDataLoader

        self.cfg, self.resolution, self.batch_size = cfg, resolution, batch_size
        streams, labels = [], []
        if cfg.crop == "buckets":
            parts = _bucket_parts(cfg, resolution, batch_size * world_size)
        else:  # (remote, size, proportion, label, cache name)
            parts = [(resolve_stream_uri(s.uri, resolution), resolution, s.proportion, s.name or s.uri, s.name)
                     for s in cfg.streams]
        self.sizes = []  # (H, W) of each streaming Stream's images
        for index, (remote, size, proportion, label, name) in enumerate(parts):
            # Local remotes are copied into the cache too: streaming writes decompressed shards next
            # to the index it reads, and a curation output must stay untouched (and may be shared).
            kwargs = {"remote": remote, "local": cache_dir_for(cache_root, remote, index, name)}
            if proportion > 0:
                kwargs["proportion"] = proportion
            streams.append(Stream(**kwargs))
            labels.append(label)
            self.sizes.append((size, size) if isinstance(size, int) else size)
        odd = sorted({hw for hw in self.sizes if hw[0] % multiple or hw[1] % multiple})
        if odd:
            raise DatasetError(f"images of {', '.join(f'{h}x{w}' for h, w in odd)} (HxW) are not whole patches of "
                             f"{multiple} px: curate with transform.buckets.multiple={multiple}")
        self.dataset = _dataset_class()(
            sizes=[size for _, size, *_ in parts], stream_labels=labels, streams=streams, batch_size=batch_size,
            batching_method="per_stream" if cfg.crop == "buckets" else "random", shuffle=cfg.shuffle,
            shuffle_algo=cfg.shuffle_algo, shuffle_seed=cfg.shuffle_seed,
            shuffle_block_size=cfg.shuffle_block_size or None,
            num_canonical_nodes=cfg.num_canonical_nodes or None, partition_algo="relaxed",
            predownload=cfg.predownload or None, cache_limit=cfg.cache_limit or None,
            download_retry=cfg.download_retry, download_timeout=cfg.download_timeout,
        )
        loader_kwargs = {"num_workers": cfg.num_workers, "collate_fn": collate, "drop_last": True,
                         "batch_size": batch_size, "pin_memory": pin_memory}
        if cfg.num_workers > 0:
            loader_kwargs.update(prefetch_factor=cfg.prefetch_factor, persistent_workers=True)
        # drop_last: every rank gets the same number of full batches, so no rank waits on a collective
        # that another rank never reaches at the end of an epoch.
        self.loader = StreamingDataLoader(self.dataset, **loader_kwargs)
        self._iterator: Iterator | None = None

    @property
    def samples_per_epoch(self) -> int:
        return int(self.dataset.epoch_size)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, Any]:
        for _ in range(2):  # an epoch resumed exactly at its end is empty: go on to the next one
            if self._iterator is None:
                self._iterator = iter(self.loader)
            try:
                return next(self._iterator)
            except StopIteration:
                self._iterator = None
        raise RuntimeError(f"the data yields no full batch of {self.batch_size} per rank: the streams hold "
                           f"{self.samples_per_epoch} samples per epoch; add data or lower the global batch")

    def state_dict(self) -> dict[str, Any]:
        """Streaming's resume state (global: the same on every rank)."""
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)
        self._iterator = None


def clean_stale_shared_memory() -> None:
    """Remove streaming shared memory left by killed runs; call on every rank (it holds a barrier)."""
    from streaming.base.util import clean_stale_shared_memory as clean

    clean()
