"""THE one place that applies activation checkpointing and ZeRO-3 sharding, and knows ZeRO-3's layout.

Order, as in torchtitan's parallelize: activation checkpointing, then (optionally) compile, then
ZeRO-3 sharding by a DeepSpeed engine whose config is generated from our typed EngineConfig. The
frozen text encoder and REPA teacher never enter the engine: no gradients, inference dtype, not
saved.

ZeRO-3 layout (what checkpoints and the EMA rely on): every trainable parameter of numel n is
split over W ranks into partitions of ceil(n / W) elements; rank r holds elements
[r * ceil(n / W), (r + 1) * ceil(n / W)) of the flattened parameter, zero-padded at the end. The
fp32 master partitions of all parameters are concatenated per rank, in the order of the
checkpoint's `param_shapes`, into the flat groups that DeepSpeed's optimizer steps; the Adam
moments have the same layout.
"""
from __future__ import annotations

import logging
import math
import os
import warnings
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "bf16", "fp32")


@dataclass(kw_only=True)
class EngineConfig:
    precision: str = "auto"          # auto: bf16 on GPU, fp32 on CPU (CPU bf16 matmuls are slow)
    grad_clip: float = 1.0
    grad_accum: int = 1              # micro-batches per optimizer step
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    # Parameters smaller than this stay whole on every rank (fewer tiny all-gathers); 0 partitions all.
    param_persistence_threshold: int = 100_000
    reduce_bucket_size: int = 500_000_000
    prefetch_bucket_size: int = 50_000_000
    max_live_parameters: int = 1_000_000_000
    activation_checkpointing: bool = False
    zero_init: bool = True           # partition while building: a 1 B model never exists whole on a rank
    backend: str = "auto"            # torch.distributed backend: nccl on GPU, gloo on CPU
    compile: bool = False            # torch.compile the engine's module (GPU; not exercised on CPU)

    def validate(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"engine.precision={self.precision!r} must be one of {list(PRECISIONS)}")
        if self.grad_accum < 1 or self.grad_clip < 0:
            raise ValueError("engine.grad_accum must be >= 1 and engine.grad_clip >= 0")


@dataclass(kw_only=True)
class OptimizerConfig:
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0            # linear warm-up from 0, then constant (the paper: none)
    impl: str = "auto"               # auto: DeepSpeed FusedAdam on GPU if it compiles, else torch AdamW

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step `step` (1-based)."""
        if self.warmup_steps > 0 and step <= self.warmup_steps:
            return self.lr * step / self.warmup_steps
        return self.lr


def device_for(local_rank: int) -> torch.device:
    # Said before DeepSpeed is first imported, which otherwise warns that it fell back to the CPU.
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def resolve_precision(cfg: EngineConfig, device: torch.device) -> str:
    if cfg.precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return cfg.precision


def init_distributed(cfg: EngineConfig, device: torch.device) -> None:
    """Join the job described by RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT (launch.py sets them)."""
    import deepspeed

    # On CPU DeepSpeed would JIT-compile a shared-memory all-reduce op (about a minute); gloo suffices.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # streaming announces its defaults, and warns about them again on every resume state it writes.
    logging.getLogger("streaming").setLevel(logging.ERROR)
    # DeepSpeed calls torch.distributed functions that torch 2.14 renamed; one warning per call.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)


def deepspeed_config(cfg: EngineConfig, micro_batch: int, precision: str) -> dict:
    """The DeepSpeed config for our EngineConfig; nothing else writes one."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.grad_clip,
        "bf16": {"enabled": precision == "bf16"},
        "zero_optimization": {
            "stage": 3,
            "overlap_comm": cfg.overlap_comm,
            "contiguous_gradients": cfg.contiguous_gradients,
            "stage3_param_persistence_threshold": cfg.param_persistence_threshold,
            "reduce_bucket_size": cfg.reduce_bucket_size,
            "stage3_prefetch_bucket_size": cfg.prefetch_bucket_size,
            "stage3_max_live_parameters": cfg.max_live_parameters,
        },
        # Our AdamW is a torch optimizer (or FusedAdam passed as an object), not one named in here.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


def build_optimizer(params: Iterable[nn.Parameter], cfg: OptimizerConfig, device: torch.device) -> torch.optim.Optimizer:
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    params = list(params)
    if cfg.impl in ("auto", "fused") and device.type == "cuda":
        try:
            from deepspeed.ops.adam import FusedAdam

            return FusedAdam(params, adam_w_mode=True, **kwargs)
        except Exception as err:  # the op JIT-compiles with nvcc; a missing toolchain is not fatal
            if cfg.impl == "fused":
                raise
            log.warning("DeepSpeed FusedAdam unavailable (%s); using torch AdamW(fused=True)", err)
            return torch.optim.AdamW(params, fused=True, **kwargs)
    if cfg.impl == "fused":
        raise ValueError("optimizer.impl=fused needs a GPU; use auto or torch")
    return torch.optim.AdamW(params, **kwargs)


def build_model(model_cfg, ds_config: dict, engine_cfg: EngineConfig, init_weights: str | os.PathLike | None = None) -> nn.Module:
    """The DeCo generator, partitioned while it is built when engine.zero_init; parameters named in
    the `init_weights` safetensors take their values from it, the others keep their fresh ones."""
    import deepspeed

    if engine_cfg.zero_init:
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            model = model_cfg.build()
    else:
        model = model_cfg.build()
    if init_weights:
        load_safetensors_into(model, init_weights)
    model.set_activation_checkpointing(engine_cfg.activation_checkpointing)
    return model


def load_safetensors_into(model: nn.Module, path: str | os.PathLike) -> None:
    """Assign a safetensors file's tensors to a module whose parameters may be ZeRO-3 partitioned.

    Every rank calls; one parameter is gathered at a time and only rank 0 reads its tensor, so a
    full model never sits in any rank's memory.
    """
    import deepspeed
    import torch.distributed as dist
    from safetensors import safe_open

    params = dict(model.named_parameters())
    with safe_open(str(path), framework="pt") as weights:
        names = set(weights.keys())
        unknown = sorted(names - set(params))
        if unknown:
            raise ValueError(f"{path} holds tensors this model lacks: {unknown[:5]}")
        for name, param in params.items():
            if name not in names:
                continue
            shape = tuple(weights.get_slice(name).get_shape())
            expected = tuple(getattr(param, "ds_shape", param.shape))
            if shape != expected:
                raise ValueError(f"{path}: {name} is {shape}, the model's is {expected}")
            partitioned = hasattr(param, "ds_id")
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                if not partitioned or dist.get_rank() == 0:
                    with torch.no_grad():
                        param.copy_(weights.get_tensor(name).to(param.dtype))


def parallelize(model: nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict, engine_cfg: EngineConfig):
    """Shard `model` and `optimizer` with a DeepSpeed ZeRO-3 engine."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    engine.checkpoint_engine = _safe_checkpoint_engine()
    if engine_cfg.compile:
        engine.compile()
    return engine


def frozen(module: nn.Module | None, device: torch.device) -> nn.Module | None:
    """A frozen helper network (text encoder, REPA teacher), kept outside ZeRO: no grads, eval."""
    if module is None:
        return None
    module.requires_grad_(False)
    return module.to(device).eval()


def _safe_checkpoint_engine():
    """DeepSpeed's torch checkpoint engine, loading with weights_only=True: a checkpoint in object
    storage is data, and must not be able to run code when read."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeCheckpointEngine(TorchCheckpointEngine):
        def __init__(self):
            super().__init__(None)
            # The zip format can be memory-mapped: an elastic restore reads partitions in place.
            self.zipfile_serialization = True

        def load(self, path: str, map_location=None):
            return safe_torch_load(path, map_location=map_location)

    return SafeCheckpointEngine()


def safe_torch_load(path: str, map_location="cpu", mmap: bool = False):
    """torch.load(weights_only=True) of a DeepSpeed file: two plain-data DeepSpeed classes allowed."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    with torch.serialization.safe_globals([ZeroStageEnum, LossScaler]):
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)


# ---------------------------------------------------------------------------------------------
# ZeRO-3 partitions of a live engine
# ---------------------------------------------------------------------------------------------


def trainable(engine) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]


def partition_numel(numel: int, world_size: int) -> int:
    return math.ceil(numel / world_size)


def local_fp32(param: nn.Parameter) -> torch.Tensor:
    """This rank's fp32 master partition of `param` (a view into the optimizer's flat group)."""
    from deepspeed.utils import safe_get_local_fp32_param

    return safe_get_local_fp32_param(param)


def partition_of(full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """Rank `rank`'s partition of `size` elements of a full tensor, zero-padded past its end."""
    flat = full.reshape(-1)
    start = rank * size
    piece = flat[start:start + size]
    if piece.numel() < size:
        piece = torch.cat([piece, flat.new_zeros(size - piece.numel())])
    return piece


def partition_stats(engine) -> dict:
    """How much of the model this rank holds: the observable proof of partitioning."""
    params = trainable(engine)
    return {"params_total": sum(int(p.ds_numel) for _, p in params),
            "params_local": sum(int(p.ds_tensor.numel()) for _, p in params),
            "tensors": len(params)}


def set_full_state(engine, reader: "ZeroCheckpointReader") -> None:
    """Load the full fp32 weights and optimizer moments of a ZeRO-3 checkpoint of any world size.

    DeepSpeed refuses a ZeRO-3 checkpoint of another world size; this is how one is restored:
    each rank takes its own partition of every full tensor, one parameter at a time.
    """
    import torch.distributed as dist
    from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

    rank = dist.get_rank()
    zero_opt = engine.optimizer
    inner = zero_opt.optimizer
    # torch's AdamW creates its state at the first step; create it now so it can be overwritten.
    for flat in zero_opt.fp32_partitioned_groups_flat:
        state = inner.state[flat]
        for key in reader.moments:
            state.setdefault(key, torch.zeros_like(flat))
        for key, value in reader.step_state["state"].items():
            state[key] = value.clone() if torch.is_tensor(value) else value
    for group in inner.param_groups:
        group.update(reader.step_state["group"])
    params = dict(trainable(engine))
    if set(params) != set(reader.shapes):
        raise KeyError(f"checkpoint and model parameters differ: only in the checkpoint "
                       f"{sorted(set(reader.shapes) - set(params))[:5]}, only in the model "
                       f"{sorted(set(params) - set(reader.shapes))[:5]}")
    for name, tensors in reader:
        param = params[name]
        size = param.ds_tensor.numel()
        # DeepSpeed's safe_set_full_* cannot slice the last rank's padded partition of a tensor
        # whose size the world size does not divide; the local setters take our own partition.
        safe_set_local_fp32_param(param, partition_of(tensors["fp32"], rank, size))
        for key in reader.moments:
            safe_set_local_optimizer_state(param, partition_of(tensors[key], rank, size), key)
        with torch.no_grad():  # the working (bf16 or fp32) partition follows the fp32 master
            param.ds_tensor.copy_(local_fp32(param).to(param.ds_tensor.dtype))


# ---------------------------------------------------------------------------------------------
# ZeRO-3 partitions on disk (DeepSpeed's save_checkpoint files), read without DeepSpeed's pickle
# ---------------------------------------------------------------------------------------------


def zero_files(ds_dir: str | os.PathLike, world_size: int) -> tuple[str, list[str]]:
    """DeepSpeed's ZeRO-3 files: rank 0's module record, and every rank's optimizer state (named
    with a bf16_ prefix when the run trained in bf16)."""
    model_states = os.path.join(ds_dir, "zero_pp_rank_0_mp_rank_00_model_states.pt")
    optim = []
    for rank in range(world_size):
        names = [f"{prefix}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" for prefix in ("", "bf16_")]
        found = [os.path.join(ds_dir, n) for n in names if os.path.exists(os.path.join(ds_dir, n))]
        if not found:
            raise FileNotFoundError(f"{ds_dir} has no optimizer state of rank {rank} ({names[0]})")
        optim.append(found[0])
    return model_states, optim


class ZeroCheckpointReader:
    """Full tensors of a ZeRO-3 checkpoint written by `world_size` ranks, one parameter at a time.

    Shard files are memory-mapped: assembling one parameter pages in only its partitions, so a
    restore never holds more than one full parameter (and its moments) beyond the model itself.
    """

    def __init__(self, ds_dir: str | os.PathLike, world_size: int, moments: tuple[str, ...] = ("exp_avg", "exp_avg_sq")):
        self.world_size, self.moments = world_size, moments
        model_file, optim_files = zero_files(ds_dir, world_size)
        self.shapes: dict[str, torch.Size] = {}
        for group in safe_torch_load(model_file, mmap=True)["param_shapes"]:
            self.shapes.update(group)
        ranks = [safe_torch_load(f, mmap=True)["optimizer_state_dict"] for f in optim_files]
        counts = {int(c[0]) if isinstance(c, list) else int(c) for c in (r["partition_count"] for r in ranks)}
        if counts != {world_size}:
            raise ValueError(f"{ds_dir}: shards say partition count {counts}, the manifest says {world_size}")
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
            raise ValueError(f"{ds_dir}: parameter shapes cover {offset} elements per rank, shards hold {self._bounds[-1]}")

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
