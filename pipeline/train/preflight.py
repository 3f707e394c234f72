"""What a training job checks before it builds anything: that it can write its checkpoints and read
its data. A missing bucket, absent credentials or an unwritable directory is then one line at
start-up, not a failure at the first checkpoint hours later with the training since lost.
"""
from __future__ import annotations

from typing import Callable, TypeVar

import torch.distributed as dist

from deco.data.object_store import StorageError, is_s3, open_store
from deco.data.streaming import resolve_buckets, resolve_stream_uri
from deco.pipeline.config import ConfigError
from deco.pipeline.train.checkpoint import check_writable
from deco.pipeline.train.manifest import CheckpointError

T = TypeVar("T")
# The errors a user can act on; rank 0 meets them once and every rank leaves with the same line.
EXPECTED = (ConfigError, CheckpointError, StorageError, FileNotFoundError)


def check_storage(cfg, stage_uri: str) -> None:
    """Rank 0: the checkpoint location takes a write and a delete; every stream has its index (or
    its bucket index)."""
    check_writable(stage_uri)
    for stream in cfg.data.streams:
        try:
            if is_s3(stream.uri):
                open_store(stream.uri).check(create=False)
            resolve = resolve_buckets if cfg.data.crop == "buckets" else resolve_stream_uri
            resolve(stream.uri, cfg.resolution)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"cannot read training data: {err}") from None
        except Exception as err:  # StorageError, and boto3's errors (credentials, endpoint) of many types
            raise StorageError(f"cannot read training data {stream.uri}: {err}") from None


def rank0_decides(decide: Callable[[], T], rank: int) -> T:
    """Rank 0 runs `decide`; every rank gets its answer, or raises the same expected error."""
    box: list = [None]
    if rank == 0:
        try:
            box = [("ok", decide())]
        except EXPECTED as err:
            box = [(type(err).__name__, str(err))]
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "ok":
        return value
    kind = next((k for k in EXPECTED if k.__name__ == status), StorageError)
    raise kind(value)
