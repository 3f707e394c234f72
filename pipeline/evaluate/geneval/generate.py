"""GenEval generation: N images per prompt in the official layout, from exported weights.

- Seeds are fixed per (prompt index, image number): image_seed(seed, index, n). Noise is drawn per
  image on the CPU, so an image does not depend on batching, rank count or device.
- Work is spread over every rank of a torchrun / deepspeed / SLURM launch (RANK, WORLD_SIZE,
  LOCAL_RANK): prompt i goes to rank i % world_size, each rank on its own GPU (cuda:LOCAL_RANK).
  Ranks do not talk to each other; the launcher returns when the last one is done.
- Resumable: a complete prompt folder made by the same weights and settings is kept; one made by
  other weights or settings is an error rather than a silent mix of two models' images.

Launch on 8 GPUs: torchrun --nproc_per_node 8 -m deco.pipeline.cli geneval generate --weights W.safetensors --out DIR
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from deco.model.sampling import SamplerConfig, initial_noise, sample
from deco.orchestration.progress import Progress
from deco.pipeline.config import ConfigError
from deco.pipeline.evaluate.geneval.layout import is_complete, read_generation, write_prompt_folder
from deco.pipeline.evaluate.geneval.prompts import Prompt

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class GenerationConfig:
    images_per_prompt: int = 4
    seed: int = 0
    resolution: int = 0                 # 0: the model's own resolution (the stage's)
    batch_size: int = 16                # images per model call
    sampler: SamplerConfig = field(default_factory=SamplerConfig)  # the paper's T2I sampler
    autocast: str = "bfloat16"          # on CUDA: bfloat16 | float16 | none (the ODE runs in float32)
    nproc: int = 1                      # ranks the gate launches (torchrun, one per GPU)

    def validate(self) -> None:
        if self.images_per_prompt < 1 or self.batch_size < 1 or self.nproc < 1 or self.resolution < 0:
            raise ValueError("generation: images_per_prompt, batch_size and nproc must be >= 1, resolution >= 0")
        if self.autocast not in ("bfloat16", "float16", "none"):
            raise ValueError(f"generation.autocast must be bfloat16, float16 or none, got {self.autocast!r}")
        if self.sampler.start_time != 0.0:
            raise ValueError("generation.sampler.start_time must be 0: GenEval generates from pure noise")


def image_seed(seed: int, index: int, n: int) -> int:
    digest = hashlib.sha256(f"geneval/{seed}/{index}/{n}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63 - 1)


def dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun / deepspeed, or SLURM; (0, 1, 0) alone."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def weights_fingerprint(path: str | Path) -> str:
    """Identifies a weights file cheaply: its size plus 64 KiB at 64 places spread over it (two
    checkpoints of one model differ everywhere, so this tells them apart without reading GBs)."""
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        for i in range(64):
            f.seek(size * i // 64)
            digest.update(f.read(65536))
    return digest.hexdigest()[:16]


def run_key(fingerprint: str, cfg: GenerationConfig, resolution: int) -> str:
    """What decides the pixels; images_per_prompt and batching do not."""
    parts = {"weights": fingerprint, "seed": cfg.seed, "resolution": resolution, "sampler": asdict(cfg.sampler)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def default_device(local_rank: int) -> str:
    return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"


@torch.no_grad()
def sample_images(model, encoder, texts: list[str], seeds: list[int], sampler: SamplerConfig, resolution: int,
                  autocast: str = "none") -> torch.Tensor:
    """(len(texts), 3, R, R) in [-1, 1]; image i starts from noise of seeds[i] alone."""
    device = next(model.parameters()).device
    text, mask = encoder.encode(texts)
    empty_text, empty_mask = encoder.empty_encoding()
    uncond = (empty_text.expand_as(text).to(device), empty_mask.expand_as(mask).to(device))
    noise = torch.cat([initial_noise((1, 3, resolution, resolution), s, device, torch.float32) for s in seeds])
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(autocast)
    use_autocast = dtype is not None and device.type == "cuda"

    def velocity(x, t, cond):
        with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=use_autocast):
            return model(x, t, cond[0], cond[1]).float()

    return sample(velocity, noise, sampler, (text.to(device), mask.to(device)), uncond).clamp(-1, 1)


@functools.lru_cache(maxsize=1)
def _text_encoder(config_json: str, device: str):
    """The frozen text encoder, kept between evaluations: a watcher gates many checkpoints of one
    stage with the same encoder, whose loading can cost more than scoring a checkpoint."""
    from deco.model.text_encoder import TextEncoderConfig
    from deco.pipeline.config import from_dict

    return from_dict(TextEncoderConfig, json.loads(config_json)).build(device=device)


def generate_layout(weights: str | Path, prompts: list[Prompt], out_dir: str | Path, cfg: GenerationConfig,
                    rank: int = 0, world_size: int = 1, device: str | None = None,
                    show_progress: bool = True) -> dict:
    """Generate this rank's share of the prompts into `out_dir`; returns counts and timing.

    Rank 0 shows its prompts done, with rate and ETA (deco.orchestration.progress) unless
    show_progress is False."""
    from deco.pipeline.sample import to_pil
    from deco.pipeline.weights import load_weights

    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is outside world size {world_size}")
    cfg.validate()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = device or default_device(dist_env()[2])
    start = time.perf_counter()
    model, text_cfg = load_weights(weights, device=device)
    resolution = cfg.resolution or model.cfg.resolution
    key = run_key(weights_fingerprint(weights), cfg, resolution)
    k = cfg.images_per_prompt
    mine = [p for p in prompts if p.index % world_size == rank]
    todo = []
    for prompt in mine:
        if is_complete(out_dir, prompt.index, prompt.metadata, k):
            made_by = (read_generation(out_dir, prompt.index) or {}).get("run_key")
            if made_by != key:
                raise ConfigError(f"{out_dir} already holds images for prompt {prompt.index} made by other weights or "
                                  f"settings (run {made_by}, this run {key}): use a new --out or remove it")
            continue
        todo.append(prompt)
    log.info("rank %d/%d: %d prompts, %d already complete, %d to generate at %d px on %s",
             rank, world_size, len(mine), len(mine) - len(todo), len(todo), resolution, device)
    if todo:
        encoder = _text_encoder(json.dumps(asdict(text_cfg), sort_keys=True), str(device))
        per_call = max(1, cfg.batch_size // k)
        bar = Progress("geneval generate", len(todo), unit="prompt", enabled=show_progress, rank=rank)
        for first in range(0, len(todo), per_call):
            chunk = todo[first:first + per_call]
            texts = [p.text for p in chunk for _ in range(k)]
            seeds = [image_seed(cfg.seed, p.index, n) for p in chunk for n in range(k)]
            images = sample_images(model, encoder, texts, seeds, cfg.sampler, resolution, cfg.autocast)
            for j, prompt in enumerate(chunk):
                record = {"run_key": key, "seeds": seeds[j * k:(j + 1) * k], "rank": rank, "world_size": world_size,
                          "resolution": resolution, "sampler": asdict(cfg.sampler), "weights": str(weights)}
                write_prompt_folder(out_dir, prompt.index, prompt.metadata,
                                    [to_pil(images[j * k + n]) for n in range(k)], generation=record)
            bar.update(len(chunk), images=len(chunk) * k)
        bar.close()
    seconds = time.perf_counter() - start
    return {"rank": rank, "world_size": world_size, "prompts": len(mine), "generated": len(todo),
            "kept": len(mine) - len(todo), "images": len(todo) * k, "resolution": resolution,
            "seconds": round(seconds, 2), "run_key": key}


def weights_from_checkpoint(checkpoint_uri: str, cache_dir: str | Path, rank: int = 0, timeout_s: float = 3600) -> Path:
    """Export a checkpoint's EMA weights once per machine: local rank 0 exports (through the
    trainer's deco.pipeline.train.export.export_checkpoint), the other ranks wait for the file."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    name = hashlib.sha256(checkpoint_uri.encode()).hexdigest()[:16] + ".safetensors"
    final = cache_dir / name
    if final.is_file():
        return final
    if rank == 0:
        try:
            from deco.pipeline.train.export import export_checkpoint
        except ImportError as err:
            raise ConfigError(f"--checkpoint needs deco.pipeline.train.export.export_checkpoint ({err}); "
                              "export the weights yourself and pass --weights") from None
        partial = cache_dir / f".{name}.partial.safetensors"
        export_checkpoint(checkpoint_uri, partial, ema=True)
        os.replace(partial, final)
        return final
    deadline = time.monotonic() + timeout_s
    while not final.is_file():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s:.0f} s for local rank 0 to export {checkpoint_uri}")
        time.sleep(2)
    return final
