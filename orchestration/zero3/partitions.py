"""ZeRO-3 partitions of a live engine: what each rank holds, and setting it from full tensors.

Two kinds of parameter live under ZeRO-3:
- partitioned: the rank holds its slice in `ds_tensor`; the full tensor exists only while a
  module that uses it runs (gathered by DeepSpeed's hooks, then released);
- persistent (numel under engine.param_persistence_threshold): the rank holds the slice in
  `ds_tensor` AND the full tensor as the parameter's own data, all the time. DeepSpeed refreshes
  that full copy from the slices after every optimizer step; whoever else changes the slices (a
  restore, the EMA swap) must refresh it too (`refresh_persistent`), or the model computes with
  stale values for those parameters.
"""
from __future__ import annotations

import torch
from torch import nn

from deco.orchestration.zero3.files import ZeroCheckpointReader


def trainable(engine) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]


def local_fp32(param: nn.Parameter) -> torch.Tensor:
    """This rank's fp32 master partition of `param` (a view into the optimizer's flat group)."""
    from deepspeed.utils import safe_get_local_fp32_param

    return safe_get_local_fp32_param(param)


def is_persistent(param: nn.Parameter) -> bool:
    return bool(getattr(param, "ds_persist", False))


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
    persistent = [p for _, p in params if is_persistent(p)]
    return {"params_total": sum(int(p.ds_numel) for _, p in params),
            "params_local": sum(int(p.ds_tensor.numel()) for _, p in params),
            "tensors": len(params), "persistent_tensors": len(persistent),
            "persistent_params": sum(int(p.ds_numel) for p in persistent)}


@torch.no_grad()
def refresh_persistent(engine) -> None:
    """Rebuild the full copy of every persistent parameter from the ranks' partitions, the way
    DeepSpeed does after an optimizer step (every rank calls: it is an all-gather)."""
    params = [p for _, p in engine.module.named_parameters() if is_persistent(p)]
    if params:
        params[0].partition(params)    # drop the stale full copies (the partitions are the truth)
        params[0].all_gather(params)


@torch.no_grad()
def _create_optimizer_state(zero_opt) -> None:
    """Let the optimizer create its per-tensor state itself (it does so lazily, at its first step):
    one step with zero gradients at learning rate 0 changes no weight, and every state tensor then
    sits where this optimizer puts it. The restore overwrites the values."""
    inner = zero_opt.optimizer
    flats = zero_opt.fp32_partitioned_groups_flat
    if all(inner.state.get(flat) for flat in flats):
        return
    saved_lr = [group["lr"] for group in inner.param_groups]
    for group in inner.param_groups:
        group["lr"] = 0.0
    for index, flat in enumerate(flats):
        # DeepSpeed steps its inner optimizer one flat sub-group at a time, putting the group's
        # tensor into the param group just for that call.
        flat.grad = torch.zeros_like(flat)
        zero_opt._optimizer_step(index)
        flat.grad = None
    for group, lr in zip(inner.param_groups, saved_lr):
        group["lr"] = lr


@torch.no_grad()
def set_full_state(engine, reader: ZeroCheckpointReader, rank: int) -> None:
    """Load the full fp32 weights and optimizer moments of a ZeRO-3 checkpoint of any world size.

    DeepSpeed refuses a ZeRO-3 checkpoint of another world size; this is how one is restored:
    each rank takes its own partition of every full tensor, one parameter at a time.
    """
    from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

    zero_opt = engine.optimizer
    inner = zero_opt.optimizer
    _create_optimizer_state(zero_opt)
    for flat in zero_opt.fp32_partitioned_groups_flat:
        state = inner.state[flat]
        for key, value in reader.step_state["state"].items():
            # Into the optimizer's own tensors: their device and dtype are the optimizer's choice
            # (fused AdamW keeps `step` on the parameters' GPU; the checkpoint was read onto the CPU).
            if torch.is_tensor(state.get(key)) and torch.is_tensor(value):
                state[key].copy_(value)
            else:
                state[key] = value
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
        param.ds_tensor.copy_(local_fp32(param).to(param.ds_tensor.dtype))  # working copy follows
    refresh_persistent(engine)

