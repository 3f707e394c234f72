"""Saving and restoring a ZeRO-3 engine's whole training state (weights, optimizer, EMA) in a local
directory: the interface the trainer's checkpointer uses without knowing DeepSpeed's files.

- `save_state` writes this rank's files and returns their keys with the checksum of each, computed
  while writing (DeepSpeed's shards) or right after (the EMA shard).
- `restore_keys` says which of a checkpoint's files this rank must have locally to restore it.
- `restore_state` loads them: DeepSpeed's own load on the same world size (bit-exact), or full
  tensors re-partitioned on another (elastic).
- `full_state` reads a checkpoint of any world size into full tensors (export, tests, audits).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from deco.data.checksum import file_checksum
from deco.orchestration.zero3.ema import ShardedEma
from deco.orchestration.zero3.files import (DS_DIR, ZeroCheckpointReader, ema_key, ema_keys, model_key,
                                            optim_key, optim_keys)
from deco.orchestration.zero3.partitions import set_full_state

log = logging.getLogger(__name__)


def estimated_bytes(engine, with_ema: bool) -> int:
    """About what `save_state` writes for this rank: fp32 master + two Adam moments (+ EMA), plus
    the working copy DeepSpeed keeps in its module record. Used to check free space first."""
    zero_opt = engine.optimizer
    local = sum(int(flat.numel()) for flat in zero_opt.fp32_partitioned_groups_flat)
    per_element = 4 * (3 + (1 if with_ema else 0)) + 2
    return local * per_element + (1 << 20)


def save_state(engine, ema: ShardedEma | None, root: Path, rank: int, world_size: int) -> dict[str, str]:
    """Every rank calls (DeepSpeed's save is collective). Returns {key: checksum} of this rank's
    files; a full disk raises DiskFullError after every rank has left DeepSpeed's save."""
    saved = engine.checkpoint_engine.checksums
    saved.clear()
    engine.checkpoint_engine.error = None
    engine.save_checkpoint(str(root), tag=DS_DIR, save_latest=False)
    if engine.checkpoint_engine.error is not None:
        raise engine.checkpoint_engine.error
    bf16 = engine.bfloat16_enabled()
    checksums = {}
    for key in (model_key(rank), optim_key(rank, bf16)):
        checksums[key] = saved.pop(os.path.abspath(root / key))
    if ema is not None:
        key = ema_key(rank, world_size)
        ema.save(root / key)
        checksums[key] = file_checksum(root / key)
    for script in ("zero_to_fp32.py", "zero_to_torch.py"):  # DeepSpeed's convenience copies
        (root / script).unlink(missing_ok=True)
    return checksums


def restore_keys(files, rank: int, saved_world: int, world_size: int) -> list[str]:
    """The state files this rank needs: its own on the same world size, all of them otherwise."""
    if saved_world == world_size:
        keys = [model_key(rank), *optim_keys(files, rank)]
        own_ema = ema_key(rank, saved_world)
        return keys + ([own_ema] if own_ema in files else [])
    return [model_key(0), *optim_keys(files), *ema_keys(files)]


def restore_state(engine, ema: ShardedEma | None, root: Path, files, saved_world: int, rank: int,
                  world_size: int) -> None:
    """Every rank calls, with the keys of `restore_keys` present under `root`."""
    ema_files = [root / key for key in ema_keys(files) if saved_world != world_size or key == ema_key(rank, saved_world)]
    if saved_world == world_size:
        load_path, _ = engine.load_checkpoint(str(root), tag=DS_DIR, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the ZeRO-3 state under {root}")
        if ema is not None and ema_files:
            ema.load_local(ema_files[0])
    else:
        log.info("elastic restore: checkpoint of %d ranks onto %d", saved_world, world_size)
        set_full_state(engine, ZeroCheckpointReader(root, files, saved_world), rank)
        if ema is not None and ema_files:
            ema.load_full(ShardedEma.read_full(ema_files))
    if ema is not None and not ema_files:
        log.warning("the checkpoint holds no EMA: the EMA starts from the restored weights")


def state_keys(files, *, weights: bool = True, ema: bool = False) -> list[str]:
    """Keys `full_state` reads: the shards for the weights and/or the EMA shards."""
    keys = [model_key(0), *optim_keys(files)] if weights else []
    return keys + (ema_keys(files) if ema else [])


def has_ema(files) -> bool:
    return bool(ema_keys(files))


def full_state(root: Path, files, world_size: int, *, weights: bool = True, moments: bool = False,
               ema: bool = False) -> dict:
    """Full tensors of a checkpoint by parameter name: {"weights", "exp_avg", "exp_avg_sq",
    "adam_step", "ema"}, as asked."""
    out: dict = {}
    if weights or moments:
        reader = ZeroCheckpointReader(root, files, world_size, moments=("exp_avg", "exp_avg_sq") if moments else ())
        if moments:
            out.update(weights={}, exp_avg={}, exp_avg_sq={}, adam_step=reader.step_state)
            for name, parts in reader:
                out["weights"][name] = parts["fp32"]
                out["exp_avg"][name] = parts["exp_avg"]
                out["exp_avg_sq"][name] = parts["exp_avg_sq"]
        else:
            out["weights"] = reader.weights()
    if ema:
        paths = [root / key for key in ema_keys(files)]
        if not paths:
            raise FileNotFoundError(f"{root} holds no EMA (ema.enabled was false)")
        out["ema"] = ShardedEma.read_full(paths)
    return out

