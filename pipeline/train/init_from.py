"""`init_from`: the weights a stage starts from when it has nothing to resume (usually the previous
stage's promoted EMA export), fetched once per node and checked against this run's model variant."""
from __future__ import annotations

import posixpath
from pathlib import Path

import torch.distributed as dist

from deco.data.object_store import is_s3, store_and_key
from deco.model.config import identity_differences
from deco.orchestration.launch import DistWorld
from deco.pipeline.config import ConfigError, to_dict


def init_weights_file(cfg, run_dir: Path, world: DistWorld) -> Path:
    """The local path of the run's (TrainConfig `cfg`) `init_from`, fetched once per node from object
    storage, checked against this run's model: the DiT and decoder must match; the resolution may
    differ (RoPE positions are computed per grid), and a REPA projector it lacks starts fresh."""
    from deco.pipeline.weights import model_config_tree

    path = Path(cfg.init_from)
    if is_s3(cfg.init_from):
        store, key = store_and_key(cfg.init_from)
        path = run_dir / "init_from" / posixpath.basename(key)
        if world.local_rank == 0:
            store.get_file(key, path)
        dist.barrier()
    differences = identity_differences(model_config_tree(path), to_dict(cfg.model))
    if differences:
        raise ConfigError(f"init_from {cfg.init_from} holds weights of another model variant "
                          f"(weights vs this run's config): {'; '.join(differences)}")
    return path
