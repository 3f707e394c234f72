"""Training step under DeepSpeed ZeRO-3 (our parallelize + EMA + objective), JSON out.

CPU (always): the tiny config's optimizer step on the same fixed batches (same images, text
features, times and noise): a plain torch loop (AdamW, clip 1.0) in one process, the baseline; then
ZeRO-3 + EMA on 1 and 2 ranks (each half of the batch) with the engine as it was (one gather per
Linear/RMSNorm: `per_module`) and as it is (one gather per transformer block: `per_block`), at
persistence threshold 0 and at the production 100,000, and compiled per block (1 rank). Each
`*_vs_plain` is a ratio of median step times (lower is better; 1.0 = no overhead); compile time is
reported apart. A last run adds the streaming loader (2 ranks, synthetic MDS shards with cached
text embeddings) and reports the share of step time spent waiting for data.

GPU (when CUDA is present; not run on the CPU-only development machine): t2i_xxl16 through that
same full step (streaming loader, ZeRO-3 in bf16 with DeepSpeed's FusedAdam, REPA against a
DINOv2-B-shaped teacher, EMA) on every local GPU; 256 px (batch 64) and 512 px (batch 16) per GPU,
eager and compiled: samples/s, MFU (pipeline/train/metrics.py's datasheet table: 989 TFLOP/s dense bf16 on
H100/H200) and the data-wait share, beside the reference's 331.7 img/s compiled at 256 px on an
H200 (goal: at least 1.3x).

    python benchmarks/train_step.py [--out benchmarks/results/train_step.json] [--steps 10]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_H200_COMPILED_256 = 331.7


def fixed_batches(cfg, batch: int, count: int, seed: int = 0) -> list[tuple]:
    """The same batches for every variant: images, text features + mask, t and noise."""
    from deco.data.shard_schema import image_to_tensor
    from deco.data.synthetic import synthetic_pairs
    from deco.model.flow import sample_train_t
    from deco.model.text_encoder import TextEncoderConfig

    encoder = TextEncoderConfig(kind="encoder", path="minilm", max_length=cfg.dit.text_len, dtype="float32").build()
    pairs = synthetic_pairs(batch * count, cfg.resolution, seed)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        chunk = pairs[i * batch:(i + 1) * batch]
        images = torch.stack([image_to_tensor(im) for im, _ in chunk])
        text, mask = encoder.encode([c for _, c in chunk])
        out.append((images, text, mask, sample_train_t(batch, 1.0, generator=gen), torch.randn(images.shape, generator=gen)))
    return out


def tiny_config():
    from deco.model.config import ModelConfig
    from deco.pipeline.config import load_config

    return load_config(ModelConfig, ROOT / "configs" / "model" / "tiny.yaml")


def plain_loop(batch: int, steps: int, warmup: int) -> dict:
    from deco.model.objective import ObjectiveConfig, training_loss

    cfg = tiny_config()
    batches = fixed_batches(cfg, batch, steps + warmup)
    torch.manual_seed(0)
    model = cfg.build()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    objective = ObjectiveConfig(time_shift=1.0)
    times = []
    for images, text, mask, t, noise in batches:
        start = time.perf_counter()
        loss = training_loss(model, images, text, mask, objective, t=t, noise=noise)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        times.append(time.perf_counter() - start)
    return {"variant": "plain torch loop", "ranks": 1, "step_ms": _ms(times[warmup:]), "threads": torch.get_num_threads()}


def zero3_worker(batch: int, steps: int, warmup: int, out: str, engine_json: str) -> None:
    """One rank of the ZeRO-3 variant (started by spawn_local): its share of the same batches."""
    import torch.distributed as dist

    from deco.model.objective import ObjectiveConfig, training_loss
    from deco.orchestration.launch import joined_world
    from deco.orchestration.zero3.engine import (EngineConfig, OptimizerConfig, build_model, build_optimizer,
                                                deepspeed_config, init_distributed, parallelize)
    from deco.orchestration.zero3.ema import EmaConfig, ShardedEma

    world = joined_world()
    device = torch.device("cpu")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    engine_cfg = EngineConfig(precision="fp32", **json.loads(engine_json))
    init_distributed(engine_cfg, device)
    cfg = tiny_config()
    batches = fixed_batches(cfg, batch, steps + warmup)
    share = batch // world.world_size
    ds_config = deepspeed_config(engine_cfg, share, "fp32")
    torch.manual_seed(0)
    model = build_model(cfg, ds_config, engine_cfg)
    engine = parallelize(model, build_optimizer(model.parameters(), OptimizerConfig(lr=1e-3), device), ds_config, engine_cfg)
    ema = ShardedEma(engine, EmaConfig(decay=0.9999), world.rank, world.world_size)
    objective = ObjectiveConfig(time_shift=1.0)
    times = []
    lo, hi = world.rank * share, (world.rank + 1) * share
    first_step_s = None
    for images, text, mask, t, noise in batches:
        dist.barrier()
        start = time.perf_counter()
        loss = training_loss(engine, images[lo:hi], text[lo:hi], mask[lo:hi], objective, t=t[lo:hi], noise=noise[lo:hi])["loss"]
        engine.backward(loss)
        engine.step()
        ema.update(len(times) + 1)
        times.append(time.perf_counter() - start)
    if world.rank == 0:
        Path(out).write_text(json.dumps({"variant": "ZeRO-3 + EMA", "ranks": world.world_size,
                                         "engine": json.loads(engine_json), "step_ms": _ms(times[warmup:]),
                                         "first_step_s": round(times[0], 2), "threads": torch.get_num_threads()}))
    dist.destroy_process_group()


def zero3(nproc: int, batch: int, steps: int, warmup: int, **engine) -> dict:
    from deco.orchestration.launch import spawn_local

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        code = spawn_local(nproc, [sys.executable, __file__, "--worker", str(out), "--batch", str(batch),
                                   "--steps", str(steps), "--warmup", str(warmup), "--engine", json.dumps(engine)])
        if code != 0:
            raise RuntimeError(f"ZeRO-3 worker on {nproc} ranks failed with exit code {code}")
        return json.loads(out.read_text())


def _ms(times: list[float]) -> float:
    ordered = sorted(times)
    return round(1000 * ordered[len(ordered) // 2], 2)  # median: robust to a noisy shared machine


# ---------------------------------------------------------------------------------------------
# GPU: t2i_xxl16 through the real loader (written here, exercised only where CUDA exists)
# ---------------------------------------------------------------------------------------------


def write_shards(root: Path, resolution: int, count: int, text_tokens: int, text_dim: int) -> Path:
    """Synthetic MDS shards with cached text embeddings (random features of the encoder's width)."""
    import io

    from streaming import MDSWriter

    from deco.data.shard_schema import columns, encode_text_emb
    from deco.data.synthetic import synthetic_pairs

    gen = torch.Generator().manual_seed(0)
    with MDSWriter(out=str(root / str(resolution)), columns=columns(True), compression="zstd") as writer:
        for index, (image, caption) in enumerate(synthetic_pairs(count, resolution, 0)):
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=95)
            writer.write({"id": f"g{index:06d}", "image": buffer.getvalue(), "caption": caption, "width": resolution,
                          "height": resolution, "orig_width": resolution, "orig_height": resolution,
                          "text_emb": encode_text_emb(torch.randn(text_tokens, text_dim, generator=gen)),
                          "text_emb_dim": text_dim})
    return root


def model_config(name: str, resolution: int):
    from deco.model.config import ModelConfig
    from deco.pipeline.config import load_config

    return load_config(ModelConfig, ROOT / "configs" / "model" / f"{name}.yaml", [f"resolution={resolution}"])


def loader_worker(name: str, resolution: int, batch: int, steps: int, warmup: int, compiled: bool, out: str) -> None:
    """One rank of the full step: streaming loader -> ZeRO-3 (+ REPA teacher when the model has it)
    -> EMA; bf16 with FusedAdam on a GPU, fp32 with torch AdamW on a CPU."""
    import torch.distributed as dist
    import transformers

    from deco.data.streaming import DataConfig, StreamConfig, TrainLoader
    from deco.model.flops import deco_flops
    from deco.model.objective import ObjectiveConfig, training_loss
    from deco.model.repa import RepaTeacher
    from deco.orchestration.launch import joined_world
    from deco.orchestration.zero3.engine import (EngineConfig, OptimizerConfig, build_model, build_optimizer,
                                                deepspeed_config, device_for, frozen, init_distributed, parallelize,
                                                resolve_precision)
    from deco.orchestration.zero3.ema import EmaConfig, ShardedEma
    from deco.pipeline.train.metrics import peak_flops

    world = joined_world()
    device = device_for(world.local_rank)
    engine_cfg = EngineConfig(activation_checkpointing=resolution >= 512, compile=compiled,
                              param_persistence_threshold=0 if name == "tiny" else 100_000)
    precision = resolve_precision(engine_cfg, device)
    init_distributed(engine_cfg, device)
    cfg = model_config(name, resolution)
    ds_config = deepspeed_config(engine_cfg, batch, precision)
    model = build_model(cfg, ds_config, engine_cfg)
    engine = parallelize(model, build_optimizer(model.parameters(), OptimizerConfig(), device), ds_config, engine_cfg)
    ema = ShardedEma(engine, EmaConfig(decay=0.9999), world.rank, world.world_size)
    teacher = None
    if cfg.repa.enabled:  # DINOv2-B's shape with random weights: the real teacher's cost, no download
        dinov2 = transformers.Dinov2Model(transformers.Dinov2Config(hidden_size=cfg.repa.teacher_dim))
        teacher = frozen(RepaTeacher(dinov2.to(torch.bfloat16 if precision == "bf16" else torch.float32)), device)
    data_root = Path(os.environ["DECO_BENCH_DATA"])
    loader = TrainLoader(DataConfig(streams=[StreamConfig(uri=str(data_root))], num_workers=min(8, os.cpu_count() or 1),
                                    clean_stale_shared_memory=False), resolution, batch,
                         data_root / "cache")  # one cache per node: streaming shares it between ranks
    objective = ObjectiveConfig(time_shift=2.0 if resolution <= 256 else 4.0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    step_s, wait_s = [], []
    for step in range(steps + warmup):
        tick = time.perf_counter()
        data = next(loader)
        waited = time.perf_counter() - tick
        images = data["images"].to(device, non_blocking=True)
        text = torch.zeros(batch, cfg.dit.text_len, cfg.dit.text_dim, device=device)
        mask = torch.zeros(batch, cfg.dit.text_len, dtype=torch.bool, device=device)
        for i, emb in enumerate(data["text_emb"]):
            text[i, :len(emb)], mask[i, :len(emb)] = emb[:cfg.dit.text_len].to(device), True
        with autocast:
            repa = (lambda x: teacher.features(x, dit_patch=cfg.dit.patch_size)) if teacher else None
            loss = training_loss(engine, images, text, mask, objective, teacher=repa)["loss"]
        engine.backward(loss)
        engine.step()
        ema.update(step + 1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            step_s.append(time.perf_counter() - tick)
            wait_s.append(waited)
    seconds = sum(step_s)
    samples_per_s = batch * len(step_s) / seconds
    peak = peak_flops(device)
    if world.rank == 0:
        result = {"variant": "ZeRO-3 + EMA + streaming loader", "model": name, "resolution": resolution,
                  "batch_per_rank": batch, "ranks": world.world_size, "precision": precision,
                  "mode": "compiled" if compiled else "eager", "step_ms": _ms(step_s),
                  "samples_per_s_per_rank": round(samples_per_s, 2),
                  "mfu": round(samples_per_s * deco_flops(cfg).train / peak, 4) if peak else None,
                  "data_wait_share": round(sum(wait_s) / seconds, 4)}
        if device.type == "cuda":
            result.update(peak_memory_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                          gpu=torch.cuda.get_device_name())
        Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


def loader_run(name: str, resolution: int, batch: int, nproc: int, steps: int, warmup: int, compiled: bool) -> dict:
    from deco.orchestration.launch import spawn_local

    cfg = model_config(name, resolution)
    with tempfile.TemporaryDirectory() as tmp:
        data = write_shards(Path(tmp) / "data", resolution, count=max(4 * batch * nproc, 64),
                            text_tokens=min(64, cfg.dit.text_len), text_dim=cfg.dit.text_dim)
        out = Path(tmp) / "result.json"
        code = spawn_local(nproc, [sys.executable, __file__, "--loader-worker", str(out), "--model", name,
                                   "--resolution", str(resolution), "--batch", str(batch), "--steps", str(steps),
                                   "--warmup", str(warmup)] + (["--compiled"] if compiled else []),
                           env={"DECO_BENCH_DATA": str(data)})
        if code != 0:
            return {"model": name, "resolution": resolution, "compiled": compiled, "error": f"exit code {code}"}
        return json.loads(out.read_text())


def gpu_runs(steps: int) -> list[dict]:
    runs = []
    for resolution, batch in ((256, 64), (512, 16)):
        for compiled in (False, True):
            run = loader_run("t2i_xxl16", resolution, batch, torch.cuda.device_count(), steps, 3, compiled)
            if resolution == 256 and compiled and "samples_per_s_per_rank" in run:
                run["reference_h200_compiled_samples_per_s"] = REFERENCE_H200_COMPILED_256
                run["ratio_vs_reference"] = round(run["samples_per_s_per_rank"] / REFERENCE_H200_COMPILED_256, 3)
            runs.append(run)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_step.json"))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--compiled", action="store_true")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--engine", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--loader-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return zero3_worker(args.batch, args.steps, args.warmup, args.worker, args.engine)
    if args.loader_worker:
        return loader_worker(args.model, args.resolution, args.batch, args.steps, args.warmup, args.compiled,
                             args.loader_worker)

    plain = plain_loop(args.batch, args.steps, args.warmup)
    variants = {
        "1rank_per_module_t0": (1, dict(gather_per_block=False, param_persistence_threshold=0)),
        "1rank_per_block_t0": (1, dict(gather_per_block=True, param_persistence_threshold=0)),
        "1rank_per_block_t100k": (1, dict(gather_per_block=True, param_persistence_threshold=100_000)),
        "1rank_per_block_t100k_compiled": (1, dict(gather_per_block=True, param_persistence_threshold=100_000,
                                                   compile=True)),
        "2ranks_per_module_t0": (2, dict(gather_per_block=False, param_persistence_threshold=0)),
        "2ranks_per_block_t0": (2, dict(gather_per_block=True, param_persistence_threshold=0)),
        "2ranks_per_block_t100k": (2, dict(gather_per_block=True, param_persistence_threshold=100_000)),
    }
    runs = {name: zero3(nproc, args.batch, args.steps, args.warmup, **engine) for name, (nproc, engine) in variants.items()}
    streamed = loader_run("tiny", 32, args.batch // 2, 2, args.steps, args.warmup, compiled=False)
    results = {
        "cpu": {"model": "tiny", "resolution": 32, "global_batch": args.batch, "steps_timed": args.steps,
                "plain": plain, "zero3": runs, "streamed": streamed,
                **{f"{name}_vs_plain": round(run["step_ms"] / plain["step_ms"], 3) for name, run in runs.items()},
                "compiled_vs_eager_1rank": round(runs["1rank_per_block_t100k_compiled"]["step_ms"]
                                                 / runs["1rank_per_block_t100k"]["step_ms"], 3),
                "compile_first_step_s": runs["1rank_per_block_t100k_compiled"]["first_step_s"]},
        "gpu": gpu_runs(args.steps) if torch.cuda.is_available() else "no CUDA device here: GPU path not run",
        "torch": torch.__version__,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
