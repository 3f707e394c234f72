"""EMA of the weights, sharded like the parameters: each rank keeps the EMA of its own ZeRO-3
partitions (fp32), never a full copy. Saved per rank with the checkpoint; a full EMA is assembled
only offline (export) or when a checkpoint of another world size is restored.

The decay warms up: at optimizer step s the EMA moves by 1 - min(decay, (1 + s) / (10 + s)), so
the EMA of a short run follows the weights instead of staying at the initialisation (with 0.9999
and no warm-up, 1,000 steps move it 10% of the way).
"""
from __future__ import annotations

import errno
import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from deco.data.checksum import DiskFullError

from deco.orchestration.zero3.files import partition_numel
from deco.orchestration.zero3.partitions import local_fp32, partition_of, refresh_persistent, trainable


@dataclass(kw_only=True)
class EmaConfig:
    enabled: bool = True
    decay: float = 0.9999          # the paper: 0.9999, updated every optimizer step
    warmup: bool = True            # decay at step s: min(decay, (1 + s) / (10 + s))

    def validate(self) -> None:
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"ema.decay={self.decay} must be in [0, 1)")

    def decay_at(self, step: int) -> float:
        """The decay applied after optimizer step `step` (1-based)."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1.0 + step) / (10.0 + step))


class ShardedEma:
    def __init__(self, engine, cfg: EmaConfig, rank: int, world_size: int):
        self.engine, self.cfg, self.rank, self.world_size = engine, cfg, rank, world_size
        self.params = trainable(engine)
        self.names = [name for name, _ in self.params]
        views = [local_fp32(p) for _, p in self.params]
        # The fp32 master partitions are views into the optimizer's flat groups (no offload): keep
        # them and update the EMA with one fused op per step instead of a lookup per parameter.
        self._views = views if all(v._base is not None for v in views) else None
        self.shadow = [v.detach().clone().float() for v in views]

    def _sources(self) -> list[torch.Tensor]:
        return self._views if self._views is not None else [local_fp32(p) for _, p in self.params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """After optimizer step `step` (1-based)."""
        torch._foreach_lerp_(self.shadow, [s.float() for s in self._sources()], 1.0 - self.cfg.decay_at(step))

    # -- checkpoints ------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        shapes = {name: list(p.ds_shape) for name, p in self.params}
        metadata = {"rank": str(self.rank), "world_size": str(self.world_size), "decay": str(self.cfg.decay),
                    "shapes": json.dumps(shapes)}
        try:
            save_file({n: s.detach().cpu().contiguous() for n, s in zip(self.names, self.shadow)}, str(path),
                      metadata=metadata)
        except Exception as err:  # safetensors reports the OS error only in its message
            if "os error 28" in str(err) or "os error 122" in str(err):
                raise DiskFullError(errno.ENOSPC, f"no space left on the device writing {path}") from None
            raise
        return path

    @torch.no_grad()
    def load_local(self, path: str | Path) -> None:
        """This rank's own shard, written by the same rank of the same world size."""
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if (int(meta.get("rank", -1)), int(meta.get("world_size", -1))) != (self.rank, self.world_size):
                raise ValueError(f"{path} is the EMA of rank {meta.get('rank')}/{meta.get('world_size')}, "
                                 f"this is rank {self.rank}/{self.world_size}")
            missing = set(self.names) - set(f.keys())
            if missing:
                raise KeyError(f"{path} lacks EMA tensors {sorted(missing)[:5]}")
            for name, shadow in zip(self.names, self.shadow):
                shadow.copy_(f.get_tensor(name).to(shadow.device))

    @torch.no_grad()
    def load_full(self, full: dict[str, torch.Tensor]) -> None:
        """Take this rank's partitions of a full EMA (restoring another world size's checkpoint)."""
        missing = set(self.names) - set(full)
        if missing:
            raise KeyError(f"the checkpoint's EMA lacks {sorted(missing)[:5]}")
        for name, shadow in zip(self.names, self.shadow):
            shadow.copy_(partition_of(full[name].float(), self.rank, shadow.numel()).to(shadow.device))

    @staticmethod
    def read_full(paths: list[str | Path]) -> dict[str, torch.Tensor]:
        """Assemble full EMA tensors from every rank's shard of one checkpoint."""
        shards, world_size, shapes = [], None, None
        for path in paths:
            handle = safe_open(str(path), framework="pt")
            meta = handle.metadata() or {}
            shards.append((int(meta["rank"]), handle))
            world_size = int(meta["world_size"])
            shapes = json.loads(meta["shapes"])
        shards.sort(key=lambda item: item[0])
        if [rank for rank, _ in shards] != list(range(world_size or 0)):
            raise ValueError(f"EMA shards of ranks {[r for r, _ in shards]}, expected 0..{(world_size or 0) - 1}")
        full = {}
        for name, shape in shapes.items():
            numel = int(torch.Size(shape).numel())
            pieces = [handle.get_tensor(name) for _, handle in shards]
            if any(p.numel() != partition_numel(numel, world_size) for p in pieces):
                raise ValueError(f"EMA shard sizes of {name} do not match its shape {shape}")
            full[name] = torch.cat(pieces)[:numel].reshape(shape).clone()
        return full

    # -- evaluation -------------------------------------------------------------------------

    @contextmanager
    def applied(self):
        """Inside, the model computes with the EMA weights, every parameter of it: the partitions
        are swapped, and persistent parameters' full copies rebuilt from them (all ranks enter
        together: the rebuild is an all-gather)."""
        backups = []
        with torch.no_grad():
            for (_, param), shadow in zip(self.params, self.shadow):
                backups.append(param.ds_tensor.detach().clone())
                param.ds_tensor.copy_(shadow.to(param.ds_tensor.dtype))
            refresh_persistent(self.engine)
        try:
            yield
        finally:
            with torch.no_grad():
                for (_, param), backup in zip(self.params, backups):
                    param.ds_tensor.copy_(backup)
                refresh_persistent(self.engine)
