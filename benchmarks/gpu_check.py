"""The one-call GPU check: DeCo XXL/16 training under our ZeRO-3 engine, and sampling; JSON out.

For a GPU machine whose python3 has torch but no registry: `make gpu-wheels` (here) fills .whl/,
`make gpu-check` (there) installs it into /tmp/site and runs this file. One process, world size 1;
each measurement in its own try/except, the JSON rewritten after each:
  card        name, versions, measured bf16 matmul TFLOP/s, the datasheet peak (metrics.py's table)
  train       256 px batch 64 ("low") and 512 px batch 16 ("high"), bf16 ZeRO-3 + EMA (+ REPA with a
              DINOv2-B-shaped random teacher), GPU-resident batches: samples/s, MFU, peak memory.
              Eager first, then sampling, compiled last: compile time is what may overrun, and a
              deadline must not cost the cheap numbers.
  sampling    512 px, 25 steps, guidance 4.0 (one batched cond/uncond call), batch 16, bf16
  goals       each number beside the issue's goal (1.3x the reference DeCo on one H200)
A watchdog writes the JSON and exits (code 3) at --deadline-s, so an 8-minute call always leaves a
file. --smoke runs the same path on a CPU: tiny config, 32/64 px, batch 4, fp32, gloo.

    PYTHONPATH=/tmp/site python3 benchmarks/gpu_check.py --out $OUT/gpu_check.json
    python benchmarks/gpu_check.py --smoke --out /tmp/gpu_check.json [--compile]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import socket
import sys
import threading
import time
import types
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# The goals; the reference numbers were measured on one H200 (shared/design.md, GPU).
REFERENCE_COMPILED_256 = 331.7     # img/s, 256 px batch 64 (39% MFU against the datasheet peak)
REFERENCE_EAGER_512 = 43.6         # img/s, 512 px batch 16
SPEEDUP_GOAL = 1.3
MFU_GOAL = 0.50
SAMPLING_GOAL = 2.0                # img/s at 512 px, 25 steps, guided
H100_USABLE_GIB = 78.0             # what an 80 GB H100 gives a process (device README: about 78 GiB)


@dataclass(kw_only=True)
class Plan:
    """Sizes and budgets of one run: the defaults are the issue's GPU run, SMOKE its CPU rehearsal."""
    smoke: bool = False
    model: str = "t2i_xxl16"
    cases: dict = field(default_factory=lambda: {"low": (256, 64), "high": (512, 16)})  # role: (px, batch)
    precision: str = "bf16"
    backend: str = "nccl"
    persistence: int = 100_000          # stage3_param_persistence_threshold
    warmup: int = 2                     # eager; on a GPU the first step also compiles FlexAttention
    warmup_compiled: int = 3            # the first step compiles the blocks, the next may recompile once
    steps: int = 10
    max_timed_s: float = 30.0           # a timed loop stops early past this
    matmul_n: int = 8192
    sample_steps: int = 25
    sample_batch: int = 16
    sample_rounds: int = 2
    compile: bool = True
    min_compile_s: float = 100.0        # a compiled case with less time left than this is skipped
    deadline_s: float = 440.0           # leaves the 8-minute call time to install the wheels and exit


# persistence 0: every parameter is really partitioned, as in the project's CPU tests.
SMOKE = dict(smoke=True, model="tiny", cases={"low": (32, 4), "high": (64, 4)}, precision="fp32", backend="gloo",
             persistence=0, warmup=1, warmup_compiled=1, steps=2, matmul_n=512, sample_steps=2, sample_batch=4,
             sample_rounds=1, compile=False, min_compile_s=0.0, deadline_s=600.0)


class Report:
    """The JSON document, written whole (tmp file + rename) after every measurement and at the deadline."""

    def __init__(self, path: Path, plan: Plan):
        self.path, self.plan, self.start = path, plan, time.monotonic()
        self.lock, self.current = threading.Lock(), "startup"
        self.data = {"mode": "smoke" if plan.smoke else "gpu", "status": "running", "elapsed_s": 0.0,
                     "plan": asdict(plan), "environment": {}, "card": {}, "train": {}, "sampling": {},
                     "goals": {}, "errors": []}

    def remaining(self) -> float:
        return self.plan.deadline_s - (time.monotonic() - self.start)

    def write(self) -> None:
        with self.lock:
            self.data["elapsed_s"] = round(time.monotonic() - self.start, 1)
            self.data["goals"] = goals(self.data, self.plan)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.data, indent=2, default=str))
            os.replace(tmp, self.path)

    def measure(self, section: str, name: str | None, fn) -> None:
        """Run one measurement; an exception becomes an error entry, never the end of the run."""
        self.current = f"{section}.{name}" if name else section
        print(f"[gpu_check {time.monotonic() - self.start:6.1f}s] {self.current} ...", flush=True)
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001 - recorded; the next measurement still runs
            result = {"error": f"{type(err).__name__}: {str(err)[:800]}"}
            self.data["errors"].append({"measurement": self.current, "error": result["error"]})
        free_memory()
        if name:
            self.data[section][name] = result
        else:
            self.data[section] = result
        self.write()
        print(f"[gpu_check {self.data['elapsed_s']:6.1f}s] {self.current}: {json.dumps(result, default=str)}",
              flush=True)

    def watchdog(self) -> None:
        def expire():
            self.data["status"] = f"deadline of {self.plan.deadline_s:.0f} s reached during {self.current}"
            self.write()
            print(f"[gpu_check] {self.data['status']}; partial results in {self.path}", flush=True)
            os._exit(3)
        timer = threading.Timer(max(self.remaining(), 1.0), expire)
        timer.daemon = True
        timer.start()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gib(value: int) -> float:
    return round(value / 2**30, 2)


def transformers_or_stub() -> tuple[bool, str]:
    """REPA's teacher needs transformers, and deco.model imports it at module level even with REPA
    off: where it is missing, a stub module stands in and REPA is switched off."""
    try:
        import transformers
        return True, transformers.__version__
    except Exception as err:  # noqa: BLE001
        sys.modules["transformers"] = types.ModuleType("transformers")
        sys.modules["transformers"].__version__ = "0"
        return False, f"not importable ({type(err).__name__}: {err})"


def environment(plan: Plan, repa: bool, transformers_version: str) -> dict:
    """Join a world of one without a launcher (the env a launcher would set, then our engine's init)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                           MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)).items():
        os.environ.setdefault(key, value)
    from deco.orchestration.zero3.engine import EngineConfig, device_for, init_distributed

    if not plan.smoke and not torch.cuda.is_available():
        raise RuntimeError("no CUDA device here (--smoke runs the CPU rehearsal)")
    device = torch.device("cpu") if plan.smoke else device_for(0)
    init_distributed(EngineConfig(precision=plan.precision, backend=plan.backend), device)
    import deepspeed

    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "deepspeed": deepspeed.__version__, "transformers": transformers_version, "device": str(device),
            "cpu_threads": torch.get_num_threads(),
            "repa": ("off: transformers is not importable" if not repa else "on: a tiny random DINOv2 teacher"
                     if plan.smoke else "on: DINOv2-B-shaped teacher with random weights (its cost, no download)")}


def card(plan: Plan, device: torch.device) -> dict:
    from deco.pipeline.train.metrics import peak_flops

    dtype, n, reps = torch.bfloat16 if plan.precision == "bf16" else torch.float32, plan.matmul_n, 10
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for index in range(3 + reps):
        if index == 3:  # after 3 warm-ups
            sync(device)
            start = time.perf_counter()
        a @ b
    sync(device)
    info = {"name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "matmul": f"{n}^3 {str(dtype).removeprefix('torch.')}, {reps} timed after 3 warm-ups",
            "measured_tflops": round(2 * n**3 * reps / (time.perf_counter() - start) / 1e12, 2)}
    peak = peak_flops(device)
    info["datasheet_peak_tflops"] = round(peak / 1e12, 1) if peak else None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(total_memory_gib=gib(props.total_memory), multiprocessors=props.multi_processor_count,
                    capability=f"{props.major}.{props.minor}")
    return info


def model_config(plan: Plan, resolution: int, repa: bool):
    from deco.model.config import ModelConfig
    from deco.pipeline.config import load_config

    overrides = [f"resolution={resolution}", f"repa.enabled={str(repa).lower()}"]
    if plan.smoke and repa:
        overrides.append("repa.teacher_dim=32")  # the tiny teacher's width
    return load_config(ModelConfig, ROOT / "configs" / "model" / f"{plan.model}.yaml", overrides)


def repa_teacher(plan: Plan, cfg, device: torch.device):
    import transformers

    from deco.model.repa import RepaTeacher
    from deco.orchestration.zero3.engine import frozen

    if plan.smoke:
        shape = transformers.Dinov2Config(hidden_size=cfg.repa.teacher_dim, num_hidden_layers=1, num_attention_heads=2)
    else:  # Dinov2Config's defaults are DINOv2 ViT-B/14's shape (768 wide, 12 layers, 12 heads)
        shape = transformers.Dinov2Config(hidden_size=cfg.repa.teacher_dim)
    dtype = torch.bfloat16 if plan.precision == "bf16" else torch.float32
    teacher = frozen(RepaTeacher(transformers.Dinov2Model(shape).to(dtype)), device)
    return lambda images: teacher.features(images, dit_patch=cfg.dit.patch_size)


def fixed_batch(cfg, batch: int, device: torch.device, seed: int = 0):
    """Images in [-1, 1] and text features of the encoder's shape, made once and kept on the device
    (the loader is not measured here); caption lengths vary, so the padding mask is a real one."""
    gen = torch.Generator().manual_seed(seed)
    length, width = cfg.dit.text_len, cfg.dit.text_dim
    images = torch.rand(batch, 3, cfg.resolution, cfg.resolution, generator=gen) * 2 - 1
    tokens = torch.randint(max(1, length // 8), length + 1, (batch,), generator=gen)
    mask = torch.arange(length)[None, :] < tokens[:, None]
    text = torch.randn(batch, length, width, generator=gen) * mask[..., None]
    return images.to(device), text.to(device), mask.to(device)


def train_case(plan: Plan, device: torch.device, role: str, compiled: bool, checkpointing: bool, repa: bool) -> dict:
    from deco.model.flops import deco_flops
    from deco.model.objective import ObjectiveConfig, training_loss
    from deco.orchestration.zero3.ema import EmaConfig, ShardedEma
    from deco.orchestration.zero3.engine import (EngineConfig, OptimizerConfig, build_model, build_optimizer,
                                                deepspeed_config, parallelize)
    from deco.pipeline.train.metrics import peak_flops

    resolution, batch = plan.cases[role]
    cfg = model_config(plan, resolution, repa)
    engine_cfg = EngineConfig(precision=plan.precision, param_persistence_threshold=plan.persistence, overlap_comm=True,
                              gather_per_block=True, activation_checkpointing=checkpointing, compile=compiled,
                              backend=plan.backend)
    if compiled:
        torch._dynamo.reset()  # each resolution compiles static shapes, as its own training run would
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    tick = time.perf_counter()
    ds_config = deepspeed_config(engine_cfg, batch, plan.precision)
    torch.manual_seed(0)
    model = build_model(cfg, ds_config, engine_cfg)
    optimizer = build_optimizer(model.parameters(), OptimizerConfig(), device)  # FusedAdam JIT-builds on a GPU
    engine = parallelize(model, optimizer, ds_config, engine_cfg)
    try:
        ema = ShardedEma(engine, EmaConfig(decay=0.9999), 0, 1)
        teacher = repa_teacher(plan, cfg, device) if repa else None
        images, text, mask = fixed_batch(cfg, batch, device)
        objective = ObjectiveConfig(time_shift=2.0 if role == "low" else 4.0)  # the paper's 256 / 512 px shifts
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=plan.precision == "bf16")
        build_s = time.perf_counter() - tick

        def step(number: int) -> float:
            start = time.perf_counter()
            with autocast:  # as the trainer runs it
                loss = training_loss(engine, images, text, mask, objective, teacher=teacher)["loss"]
            engine.backward(loss)
            engine.step()
            ema.update(number)
            sync(device)
            return time.perf_counter() - start

        warmup = plan.warmup_compiled if compiled else plan.warmup
        warmup_s = [step(i + 1) for i in range(warmup)]
        timed, loop_start = [], time.perf_counter()
        while len(timed) < plan.steps and (not timed or time.perf_counter() - loop_start < plan.max_timed_s):
            timed.append(step(warmup + len(timed) + 1))
        samples_per_s = batch * len(timed) / sum(timed)
        flops = deco_flops(cfg, resolution=resolution, text_tokens=cfg.dit.text_len).train
        peak = peak_flops(device)
        result = {"resolution": resolution, "batch": batch, "mode": "compiled" if compiled else "eager",
                  "precision": plan.precision, "activation_checkpointing": checkpointing, "repa": repa,
                  "optimizer": type(optimizer).__name__, "build_s": round(build_s, 1),
                  "warmup_step_s": [round(s, 2) for s in warmup_s], "timed_steps": len(timed),
                  "step_ms_median": round(1000 * sorted(timed)[len(timed) // 2], 1),
                  "samples_per_s": round(samples_per_s, 2), "train_flops_per_sample": flops,
                  "achieved_tflops": round(samples_per_s * flops / 1e12, 2),
                  "mfu_datasheet": round(samples_per_s * flops / peak, 4) if peak else None}
        if device.type == "cuda":
            result.update(peak_memory_allocated_gib=gib(torch.cuda.max_memory_allocated(device)),
                          peak_memory_reserved_gib=gib(torch.cuda.max_memory_reserved(device)))
        return result
    finally:
        engine.destroy()  # its optimizer and hooks hold the partitions: the next case needs the memory


def train(plan: Plan, device: torch.device, role: str, compiled: bool, repa: bool, report: Report) -> dict:
    """Checkpointing stays off at 256 px; at 512 px it is tried off first and switched on after an OOM
    (a compiled case follows what its eager case needed, rather than compile twice)."""
    if compiled and report.remaining() < plan.min_compile_s:
        return {"skipped": f"{report.remaining():.0f} s left to the deadline; compile needs ~{plan.min_compile_s:.0f}"}
    eager = report.data["train"].get(f"{role}_eager", {})
    checkpointing = bool(compiled and eager.get("activation_checkpointing"))
    reason = eager.get("checkpointing_reason") if checkpointing else None
    result = None
    if role == "high" and not checkpointing:
        try:
            result = train_case(plan, device, role, compiled, False, repa)
        except (torch.OutOfMemoryError, RuntimeError) as err:  # DeepSpeed may re-raise an OOM as RuntimeError
            if "out of memory" not in str(err).lower():
                raise
            reason = f"OOM without activation checkpointing: {str(err).splitlines()[0][:200]}"
        free_memory()
        checkpointing = True
    result = result or train_case(plan, device, role, compiled, checkpointing, repa)
    if reason:
        result["checkpointing_reason"] = reason
    measured = report.data["card"].get("measured_tflops")
    achieved = result["samples_per_s"] * result["train_flops_per_sample"] / 1e12
    result["mfu_measured_peak"] = round(achieved / measured, 4) if measured else None
    return result


@torch.no_grad()
def sampling(plan: Plan, device: torch.device) -> dict:
    from deco.model.sampling import SamplerConfig, initial_noise, sample

    resolution, batch = plan.cases["high"][0], plan.sample_batch
    cfg = model_config(plan, resolution, repa=False)  # the REPA projector is training-only
    dtype = torch.bfloat16 if plan.precision == "bf16" else torch.float32
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with device:  # built where it runs: initialising 1.1 B parameters on the CPU takes a while
        model = cfg.build().to(dtype=dtype).eval()
    sampler = SamplerConfig(steps=plan.sample_steps, cfg_scale=4.0)
    _, text, mask = fixed_batch(cfg, batch, device, seed=1)
    empty_mask = torch.zeros_like(mask)
    empty_mask[:, 0] = True  # an empty caption still encodes to one token
    uncond = (torch.zeros_like(text), empty_mask)

    def velocity(x, t, cond):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            return model(x, t, cond[0], cond[1]).float()

    def one_batch(seed: int) -> float:
        start = time.perf_counter()
        sample(velocity, initial_noise((batch, 3, resolution, resolution), seed, device), sampler, (text, mask), uncond)
        sync(device)
        return time.perf_counter() - start

    warmup_s = one_batch(0)
    timed = [one_batch(seed) for seed in range(1, plan.sample_rounds + 1)]
    result = {"resolution": resolution, "batch": batch, "steps": sampler.steps, "method": sampler.method,
              "cfg_scale": sampler.cfg_scale, "dtype": str(dtype).removeprefix("torch."),
              "warmup_batch_s": round(warmup_s, 2), "timed_batches": len(timed),
              "images_per_s": round(batch * len(timed) / sum(timed), 3)}
    if device.type == "cuda":
        result["peak_memory_allocated_gib"] = gib(torch.cuda.max_memory_allocated(device))
    return result


def goals(data: dict, plan: Plan) -> dict:
    """Each goal of the issue beside its number; pass is null in smoke mode or while a number is missing."""
    def value(case: str, key: str):
        return data["train"].get(case, {}).get(key)

    def entry(measured, goal: float, at_most: bool = False, reference: float | None = None) -> dict:
        out = {"value": measured, "goal": round(goal, 2)}
        if reference and measured is not None:
            out["ratio_vs_reference"] = round(measured / reference, 3)
        out["pass"] = None if plan.smoke or measured is None else (measured <= goal if at_most else measured >= goal)
        return out

    memory = [m for m in (value(c, "peak_memory_reserved_gib") for c in ("low_eager", "low_compiled")) if m]
    fast, slow = SPEEDUP_GOAL * REFERENCE_COMPILED_256, SPEEDUP_GOAL * REFERENCE_EAGER_512
    return {"note": "the reference DeCo numbers were measured on one H200; each goal is 1.3x them",
            "low_compiled_samples_per_s": entry(value("low_compiled", "samples_per_s"), fast,
                                                reference=REFERENCE_COMPILED_256),
            "low_compiled_mfu_datasheet": entry(value("low_compiled", "mfu_datasheet"), MFU_GOAL),
            "low_compiled_mfu_measured_peak": entry(value("low_compiled", "mfu_measured_peak"), MFU_GOAL),
            "high_eager_samples_per_s": entry(value("high_eager", "samples_per_s"), slow,
                                              reference=REFERENCE_EAGER_512),
            "high_compiled_samples_per_s": entry(value("high_compiled", "samples_per_s"), slow,
                                                 reference=REFERENCE_EAGER_512),
            "low_peak_memory_reserved_gib_fits_h100_80gb": entry(max(memory) if memory else None, H100_USABLE_GIB,
                                                                 at_most=True),
            "sampling_images_per_s": entry(data["sampling"].get("images_per_s"), SAMPLING_GOAL)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_check.json"))
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU, same code path")
    parser.add_argument("--compile", action="store_true", help="smoke: also the compiled cases (slow on a CPU)")
    parser.add_argument("--no-compile", action="store_true", help="GPU: eager cases only")
    parser.add_argument("--steps", type=int, default=0, help="timed steps per case (default 10, smoke 2)")
    parser.add_argument("--warmup", type=int, default=0, help="warm-up steps per case (default 2 eager, 3 compiled)")
    parser.add_argument("--deadline-s", type=float, default=0.0, help="write the JSON and exit then (default 440)")
    args = parser.parse_args()
    chosen = dict(steps=args.steps, warmup=args.warmup, warmup_compiled=args.warmup, deadline_s=args.deadline_s)
    plan = replace(Plan(**SMOKE) if args.smoke else Plan(), **{k: v for k, v in chosen.items() if v},
                   compile=args.compile if args.smoke else not args.no_compile)
    report = Report(Path(args.out), plan)
    report.watchdog()
    if plan.smoke:
        os.environ["DS_ACCELERATOR"] = "cpu"  # before anything imports deepspeed; a GPU here stays unused
    repa, transformers_version = transformers_or_stub()
    report.measure("environment", None, lambda: environment(plan, repa, transformers_version))
    if "error" in report.data["environment"]:
        report.data["status"] = "failed at startup"
        report.write()
        return 2
    device = torch.device(report.data["environment"]["device"])
    report.measure("card", None, lambda: card(plan, device))
    for role in plan.cases:
        report.measure("train", f"{role}_eager", lambda: train(plan, device, role, False, repa, report))
    report.measure("sampling", None, lambda: sampling(plan, device))
    for role in plan.cases:
        if plan.compile:
            report.measure("train", f"{role}_compiled", lambda: train(plan, device, role, True, repa, report))
        else:
            report.data["train"][f"{role}_compiled"] = {"skipped": "compile not asked for"}
    report.data["status"] = "complete"
    report.write()
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
