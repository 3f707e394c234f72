"""Building the ZeRO-3 engine: THE one place that applies activation checkpointing, compile and
sharding to the DeCo generator, in torchtitan's order.

    1. activation checkpointing per transformer block (engine.activation_checkpointing);
    2. each block a ZeRO-3 gather unit (engine.gather_per_block): DeepSpeed fetches a block's
       parameters in one all-gather when the block starts, instead of one per Linear/RMSNorm, and
       puts no hooks inside the block;
    3. torch.compile of each block's forward (engine.compile), fullgraph: with (2) no ZeRO hook
       runs inside it, so a block compiles to one graph;
    4. the DeepSpeed ZeRO-3 engine, whose config is generated from our typed EngineConfig.

The frozen text encoder and REPA teacher never enter the engine: no gradients, inference dtype,
not saved.
"""
from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "bf16", "fp32")
OPTIMIZER_IMPLS = ("auto", "fused", "torch", "torch_fused")


@dataclass(kw_only=True)
class EngineConfig:
    # auto: bf16 on GPU, fp32 on CPU (plain-torch bf16 autocast on a 2-core AMX CPU, the tiny model:
    # 0.84x the fp32 rate at 32 px, 1.4x at 64 px; DeepSpeed's bf16 mode on CPU is unmeasured)
    precision: str = "auto"
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
    # One all-gather per transformer block rather than per Linear (the block is DeepSpeed's "leaf"
    # module); needed for compile to see a whole block, and fewer hooks in eager too.
    gather_per_block: bool = True
    zero_init: bool = True           # partition while building: a 1 B model never exists whole on a rank
    backend: str = "auto"            # torch.distributed backend: nccl on GPU, gloo on CPU
    compile: bool = False            # torch.compile each transformer block's forward (fullgraph)

    def validate(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"engine.precision={self.precision!r} must be one of {list(PRECISIONS)}")
        if self.grad_accum < 1 or self.grad_clip < 0:
            raise ValueError("engine.grad_accum must be >= 1 and engine.grad_clip >= 0")
        if self.compile and not self.gather_per_block:
            raise ValueError("engine.compile needs engine.gather_per_block: ZeRO-3's per-Linear hooks would "
                             "break every block into many graphs")


@dataclass(kw_only=True)
class OptimizerConfig:
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0            # linear warm-up from 0, then constant (the paper: none)
    # auto: DeepSpeed's FusedAdam on a GPU if it compiles, else torch's fused AdamW; on a CPU torch's
    # AdamW. fused: DeepSpeed's FusedAdam or fail. torch: torch's AdamW. torch_fused: torch's fused AdamW.
    impl: str = "auto"

    def validate(self) -> None:
        if self.impl not in OPTIMIZER_IMPLS:
            raise ValueError(f"optimizer.impl={self.impl!r} must be one of {list(OPTIMIZER_IMPLS)}")
        if self.lr < 0 or self.warmup_steps < 0:
            raise ValueError("optimizer.lr and optimizer.warmup_steps must be >= 0")

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
            # DeepSpeed's "memory efficient" linear replaces torch.nn.functional.linear for the whole
            # process (frozen encoders too) with an autograd function that adds the bias apart: the
            # engine would then compute another function than the model it exports (bf16 samples of
            # the same weights differ by ~0.05), and the per-block gather already bounds memory.
            "memory_efficient_linear": False,
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
        raise ValueError("optimizer.impl=fused needs a GPU; use auto, torch or torch_fused")
    return torch.optim.AdamW(params, fused=cfg.impl == "torch_fused" or None, **kwargs)


def build_model(model_cfg, ds_config: dict, engine_cfg: EngineConfig, init_weights: str | os.PathLike | None = None) -> nn.Module:
    """The DeCo generator, partitioned while it is built when engine.zero_init; parameters named in
    the `init_weights` safetensors take their values from it, the others keep their fresh ones."""
    import deepspeed

    if engine_cfg.zero_init:
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            model = model_cfg.build()
        # zero.Init creates every tensor in the engine's dtype: in bf16 the derived buffers (the
        # decoder's position code) would be computed in bf16 and differ from the exported model's.
        model.reset_buffers()
    else:
        model = model_cfg.build()
    if init_weights:
        load_safetensors_into(model, init_weights)
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
        # A file may carry a REPA projector (an imported reference checkpoint does); a run without
        # REPA has no use for it.
        unknown = sorted(n for n in names - set(params) if not n.startswith("repa_projector."))
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


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The units that checkpointing, gathering and compile apply to: DeCo's text and image blocks."""
    return [*model.dit.text_blocks, *model.dit.blocks]


def parallelize(model: nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict, engine_cfg: EngineConfig):
    """Activation checkpointing, per-block gathering, per-block compile, then the ZeRO-3 engine."""
    import deepspeed

    from deco.orchestration.zero3.files import safe_checkpoint_engine

    model.set_activation_checkpointing(engine_cfg.activation_checkpointing)
    blocks = transformer_blocks(model)
    if engine_cfg.gather_per_block:
        deepspeed.utils.set_z3_leaf_modules(model, list({type(block) for block in blocks}))
    if engine_cfg.compile:
        compile_blocks(blocks)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    engine.checkpoint_engine = safe_checkpoint_engine()
    return engine


def compile_blocks(blocks: list[nn.Module]) -> None:
    """Compile each block's forward, not its __call__: the ZeRO-3 gather hooks DeepSpeed puts on the
    block stay outside the graph, and blocks of one class share one compiled graph."""
    for block in blocks:
        block.forward = torch.compile(block.forward, fullgraph=True)


def frozen(module: nn.Module | None, device: torch.device) -> nn.Module | None:
    """A frozen helper network (text encoder, REPA teacher), kept outside ZeRO: no grads, eval."""
    if module is None:
        return None
    module.requires_grad_(False)
    return module.to(device).eval()
