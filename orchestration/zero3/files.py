"""ZeRO-3 state on disk: DeepSpeed's shard files, our EMA shards, their names, checksums while
writing, and reading them back without DeepSpeed's pickle.

Inside one checkpoint directory (the keys the manifest lists, relative to it):

    deepspeed/zero_pp_rank_<r>_mp_rank_00_model_states.pt   every rank: DeepSpeed's module record
                                                            (parameter shapes; weights live below)
    deepspeed/[bf16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt
                                                            every rank: its fp32 master partition
                                                            and AdamW moments (bf16_ when the run
                                                            trains in bf16)
    ema/rank_<r>-of-<W>.safetensors                         every rank: the EMA of its partitions

Nothing outside orchestration/zero3 knows these names: the trainer's checkpointer asks
`state.py` which keys a rank writes and needs.

Layout of a partition: every trainable parameter of numel n is split over W ranks into partitions
of ceil(n / W) elements; rank r holds elements [r * ceil(n / W), (r + 1) * ceil(n / W)) of the
flattened parameter, zero-padded at the end. The fp32 master partitions of all parameters are
concatenated per rank, in the order of the checkpoint's `param_shapes`, into the flat groups that
DeepSpeed's optimizer steps; the Adam moments have the same layout.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from deco.data.checksum import DiskFullError, HashingWriter

DS_DIR = "deepspeed"
EMA_DIR = "ema"


def model_key(rank: int) -> str:
    return f"{DS_DIR}/zero_pp_rank_{rank}_mp_rank_00_model_states.pt"


def optim_key(rank: int, bf16: bool) -> str:
    """DeepSpeed names its optimizer file with a bf16_ prefix when the run trains in bf16."""
    return f"{DS_DIR}/{'bf16_' if bf16 else ''}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"


def ema_key(rank: int, world_size: int) -> str:
    return f"{EMA_DIR}/rank_{rank:05d}-of-{world_size:05d}.safetensors"


def optim_keys(files, rank: int | None = None) -> list[str]:
    """The optimizer-state files among `files` (of one rank, or of all), whatever the precision."""
    rank_pattern = r"\d+" if rank is None else str(rank)
    pattern = re.compile(rf"{DS_DIR}/(bf16_)?zero_pp_rank_{rank_pattern}_mp_rank_00_optim_states\.pt")
    return sorted(k for k in files if pattern.fullmatch(k))


def ema_keys(files) -> list[str]:
    return sorted(k for k in files if k.startswith(f"{EMA_DIR}/"))


def save_torch(obj, path: str | os.PathLike) -> str:
    """torch.save through a HashingWriter; returns the checksum of the bytes written."""
    writer = HashingWriter(path)
    try:
        torch.save(obj, writer)
    except BaseException:
        writer.abandon()
        if writer.error is not None:  # torch's zip writer turns our OSError into a RuntimeError
            raise writer.error from None
        raise
    return writer.close()


# ---------------------------------------------------------------------------------------------
# DeepSpeed's checkpoint engine: checksums while saving, never unpickles code while loading
# ---------------------------------------------------------------------------------------------


def safe_checkpoint_engine():
    """DeepSpeed's torch checkpoint engine, loading with weights_only=True (a checkpoint in object
    storage is data, and must not be able to run code when read) and checksumming what it saves."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeCheckpointEngine(TorchCheckpointEngine):
        def __init__(self):
            super().__init__(None)
            # The zip format can be memory-mapped: an elastic restore reads partitions in place.
            self.zipfile_serialization = True
            self.checksums: dict[str, str] = {}   # absolute path -> checksum, of this rank's saves
            # A full disk is kept here rather than raised: DeepSpeed's save is collective, and a rank
            # that left it would leave the others waiting; the caller raises it once all are out.
            self.error: DiskFullError | None = None

        def save(self, state_dict, path: str):
            if self.error is not None:
                return
            try:
                self.checksums[os.path.abspath(path)] = save_torch(state_dict, path)
            except DiskFullError as err:
                self.error = err

        def load(self, path: str, map_location=None):
            return safe_torch_load(path, map_location=map_location)

    return SafeCheckpointEngine()


def safe_torch_load(path: str | os.PathLike, map_location="cpu", mmap: bool = False):
    """torch.load(weights_only=True) of a DeepSpeed file: two plain-data DeepSpeed classes allowed."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    with torch.serialization.safe_globals([ZeroStageEnum, LossScaler]):
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)


def partition_numel(numel: int, world_size: int) -> int:
    return -(-numel // world_size)


class ZeroCheckpointReader:
    """Full tensors of a ZeRO-3 checkpoint written by `world_size` ranks, one parameter at a time.

    Shard files are memory-mapped: assembling one parameter pages in only its partitions, so a
    restore never holds more than one full parameter (and its moments) beyond the model itself.
    """

    def __init__(self, root: str | os.PathLike, files, world_size: int,
                 moments: tuple[str, ...] = ("exp_avg", "exp_avg_sq")):
        self.world_size, self.moments = world_size, moments
        root = Path(root)
        optim = [optim_keys(files, rank) for rank in range(world_size)]
        missing = [rank for rank, keys in enumerate(optim) if not keys]
        if missing:
            raise FileNotFoundError(f"{root} has no optimizer state of ranks {missing}")
        self.shapes: dict[str, torch.Size] = {}
        for group in safe_torch_load(root / model_key(0), mmap=True)["param_shapes"]:
            self.shapes.update(group)
        ranks = [safe_torch_load(root / keys[0], mmap=True)["optimizer_state_dict"] for keys in optim]
        counts = {int(c[0]) if isinstance(c, list) else int(c) for c in (r["partition_count"] for r in ranks)}
        if counts != {world_size}:
            raise ValueError(f"{root}: shards say partition count {counts}, the manifest says {world_size}")
        # Per rank and tensor kind: the flat sub-group tensors, in the order parameters were laid out.
        self._groups = [{"fp32": list(r["fp32_flat_groups"]),
                         **{k: [r["optimizer_state_dict"]["state"][i][k] for i in range(len(r["fp32_flat_groups"]))]
                            for k in moments}} for r in ranks]
        first = ranks[0]["optimizer_state_dict"]
        # Adam's step count: in the per-tensor state (torch AdamW) or in the param group (FusedAdam).
        self.step_state = {"state": {k: v for k, v in first["state"][0].items() if k not in moments},
                           "group": {k: v for k, v in first["param_groups"][0].items() if k == "step"}}
        sizes = [g.numel() for g in self._groups[0]["fp32"]]
        self._bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        self._offsets, offset = {}, 0
        for name, shape in self.shapes.items():
            self._offsets[name] = offset
            offset += partition_numel(shape.numel(), world_size)
        if offset != self._bounds[-1]:
            raise ValueError(f"{root}: parameter shapes cover {offset} elements per rank, shards hold {self._bounds[-1]}")

    def tensors(self, name: str, kinds: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
        shape = self.shapes[name]
        size = partition_numel(shape.numel(), self.world_size)
        offset = self._offsets[name]
        group = max(i for i, bound in enumerate(self._bounds[:-1]) if bound <= offset)
        start = offset - self._bounds[group]
        out = {}
        for kind in kinds or ("fp32", *self.moments):
            pieces = [rank[kind][group][start:start + size] for rank in self._groups]
            out[kind] = torch.cat(pieces)[:shape.numel()].reshape(shape).float().clone()
        return out

    def __iter__(self):
        for name in self.shapes:
            yield name, self.tensors(name)

    def weights(self) -> dict[str, torch.Tensor]:
        return {name: self.tensors(name, ("fp32",))["fp32"] for name in self.shapes}
