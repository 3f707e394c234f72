"""Training data: MDS shards (data/shard_schema.py) streamed per rank with mosaicml-streaming.

Each stream is a curation output (`<uri>/<resolution>/index.json`, local path or s3://) or an MDS
dataset directory itself. Streams are copied shard by shard into a local cache as they are needed
and mixed by proportion. Images are decoded and normalised to [-1, 1] in the loader's worker
processes; cached text embeddings (bf16) are decoded there too, else the caption travels on to the
trainer's frozen encoder.

Sample order is streaming's elastically deterministic order: with the global batch fixed, step k
sees the same global set of samples whatever the number of ranks, nodes or workers, as long as the
canonical node count stays the one fixed at the first launch (it is kept in the loader state).
The loader state (epoch, samples seen) goes into every checkpoint; resuming continues at the exact
next sample.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from deco.data.object_store import join, open_store
from deco.data.shard_schema import decode_image, decode_text_emb, image_to_tensor

log = logging.getLogger(__name__)

SHUFFLE_ALGOS = ("py1e", "py1br", "py1b", "py1s", "py2s", "naive")


@dataclass(kw_only=True)
class StreamConfig:
    uri: str                     # curation output (holds <resolution>/index.json) or an MDS dataset dir
    proportion: float = 0.0      # share of each epoch drawn from this stream; 0 on every stream = by size
    name: str = ""               # label in logs and the cache directory name


@dataclass(kw_only=True)
class DataConfig:
    streams: list[StreamConfig] = field(default_factory=list)
    resolution: int = 0          # 0 = the model's resolution; picks <uri>/<resolution>/
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
    raise FileNotFoundError(f"no MDS dataset at {join(uri, str(resolution), 'index.json')} (curation writes one "
                            f"per resolution) nor at {join(uri, 'index.json')}")


def decode_sample(raw: dict[str, Any], resolution: int) -> dict[str, Any]:
    """Raw MDS row -> tensors. A sample that cannot be used keeps its id with `image` None."""
    sample = {"id": str(raw["id"]), "caption": str(raw.get("caption") or ""), "image": None, "text_emb": None}
    try:
        image = decode_image(raw["image"])
    except Exception as err:  # PIL raises many types for broken files; the id is what matters
        log.warning("sample %s: undecodable image (%s); skipped", sample["id"], err)
        return sample
    if image.size != (resolution, resolution):
        log.warning("sample %s: image is %sx%s, expected %s px; skipped", sample["id"], *image.size, resolution)
        return sample
    sample["image"] = image_to_tensor(image)
    if raw.get("text_emb") is not None and raw.get("text_emb_dim"):
        sample["text_emb"] = decode_text_emb(raw["text_emb"], int(raw["text_emb_dim"])).float()
    return sample


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack a batch. Unusable samples are replaced by a usable one of the same batch (counted), so
    the batch size, and with it the step's sample accounting, never changes."""
    usable = [s for s in samples if s["image"] is not None]
    if not usable:
        raise RuntimeError(f"every sample of a batch is unusable: {[s['id'] for s in samples]}")
    skipped = [s["id"] for s in samples if s["image"] is None]
    filled = [s if s["image"] is not None else usable[0] for s in samples]
    return {
        "ids": [s["id"] for s in samples],        # what the loader delivered, skipped ones included
        "images": torch.stack([s["image"] for s in filled]),
        "captions": [s["caption"] for s in filled],
        "text_emb": [s["text_emb"] for s in filled],
        "skipped": skipped,
    }


def _dataset_class():
    from streaming import StreamingDataset

    class DecodedStreamingDataset(StreamingDataset):
        """StreamingDataset whose items are decoded in the loader worker that fetches them."""

        def __init__(self, *, resolution: int, **kwargs):
            super().__init__(**kwargs)
            self.resolution = resolution

        def get_item(self, sample_id: int, retry: int = 7) -> dict[str, Any]:
            return decode_sample(super().get_item(sample_id, retry), self.resolution)

    return DecodedStreamingDataset


def cache_dir_for(cache_root: str | Path, uri: str, index: int, name: str) -> str:
    digest = hashlib.sha1(uri.encode()).hexdigest()[:10]
    return str(Path(cache_root) / f"{index:02d}-{name or 'stream'}-{digest}")


class TrainLoader:
    """Endless iterator of batches over epochs, with streaming's exact-resume state."""

    def __init__(self, cfg: DataConfig, resolution: int, batch_size: int, cache_root: str | Path,
                 pin_memory: bool = False):
        """`pin_memory`: batches in page-locked memory, so the copy to a GPU can be asynchronous."""
        from streaming import Stream, StreamingDataLoader

        self.cfg, self.resolution, self.batch_size = cfg, resolution, batch_size
        streams = []
        for index, stream in enumerate(cfg.streams):
            remote = resolve_stream_uri(stream.uri, resolution)
            # Local remotes are copied into the cache too: streaming writes decompressed shards next
            # to the index it reads, and a curation output must stay untouched (and may be shared).
            kwargs = {"remote": remote, "local": cache_dir_for(cache_root, remote, index, stream.name)}
            if stream.proportion > 0:
                kwargs["proportion"] = stream.proportion
            streams.append(Stream(**kwargs))
        self.dataset = _dataset_class()(
            resolution=resolution, streams=streams, batch_size=batch_size, shuffle=cfg.shuffle,
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
