"""Training metrics: one JSON object per optimizer step in <run_dir>/metrics.jsonl, the same to wandb
(offline unless the user is logged in), sample grids every K steps, a progress line on rank 0,
and the loss curve <run_dir>/loss_curve.png (pipeline/train/loss_curve.py).

MFU = achieved training FLOP/s per device / the device's dense bf16 peak, with the model's FLOPs
from deco.model.flops (generator + REPA projector, forward + backward; frozen encoders excluded).
The peak is the card's datasheet number, looked up by its name (logging.peak_tflops overrides it);
on a CPU, or a GPU not in the table, MFU is null: there is no meaningful peak to divide by.
"""
from __future__ import annotations

import json
import logging
import netrc
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

from deco.orchestration.progress import Progress
from deco.pipeline.train.loss_curve import LOSS_CURVE, LossHistory, save_loss_curve

log = logging.getLogger(__name__)

# Dense (not 2:4 sparse) bf16 tensor-core peaks in FLOP/s, from the vendors' datasheets, matched
# against torch.cuda.get_device_name() as whole words, most specific first: "H100 PCIe" before
# "H100", "H200" never matching "H20".
PEAK_BF16_FLOPS = (
    ("GH200", 989e12), ("H200", 989e12), ("H100 NVL", 835e12), ("H100 PCIe", 756e12), ("H100", 989e12),
    ("H800", 989e12), ("H20", 148e12), ("GB200", 2500e12), ("B200", 2250e12), ("B100", 1750e12),
    ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L40", 181e12), ("A10G", 70e12), ("A10", 125e12),
    ("RTX 4090", 165e12), ("L4", 121e12),
)


@dataclass(kw_only=True)
class LoggingConfig:
    wandb: bool = True
    project: str = "deco"
    entity: str = ""
    name: str = ""                 # "" = the run directory's name
    # Rank 0 shows progress (deco.orchestration.progress): a bar on a terminal, a line with the
    # latest metrics every DECO_PROGRESS_EVERY seconds (30) in a log.
    progress: bool = True
    console_every: int = 0         # besides, a full metrics line every N steps (0 = never)
    sample_every: int = 0          # EMA sample grid every N steps (0 = never)
    sample_prompts: list[str] = field(default_factory=lambda: [
        "a photo of a red circle", "a photo of a blue square",
        "a photo of a green triangle left of a yellow circle", "a photo of two purple squares"])
    sample_steps: int = 25
    sample_cfg: float = 4.0
    sample_time_shift: float = 3.0
    # Global sample ids of every step in <run_dir>/samples.jsonl: an audit of what the model saw.
    record_sample_ids: bool = False
    # Dense bf16 peak of one accelerator in TFLOP/s for MFU; 0 = the datasheet value for the card.
    peak_tflops: float = 0.0


def peak_flops(device: torch.device, override_tflops: float = 0.0) -> float | None:
    """This device's dense bf16 peak in FLOP/s: the override when set, else the datasheet's."""
    if override_tflops > 0:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    return peak_for_name(torch.cuda.get_device_name(device))


def peak_for_name(name: str) -> float | None:
    for key, peak in PEAK_BF16_FLOPS:
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])", name):
            return peak
    log.warning("no datasheet bf16 peak known for %r: MFU is not reported (set logging.peak_tflops)", name)
    return None


def memory_gib(device: torch.device) -> float:
    """Peak accelerator memory since the last step, or this process's resident memory on CPU."""
    if device.type == "cuda":
        value = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
        return round(value, 3)
    import psutil

    return round(psutil.Process().memory_info().rss / 2**30, 3)


def wandb_mode() -> str:
    """WANDB_MODE when set; online when the user has logged in (API key or netrc entry); else offline."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        if netrc.netrc().authenticators("api.wandb.ai"):
            return "online"
    except (FileNotFoundError, netrc.NetrcParseError):
        pass
    return "offline"


class MetricsLogger:
    """Rank 0 writes; other ranks' calls are no-ops."""

    def __init__(self, cfg: LoggingConfig, run_dir: Path, rank: int, config: dict, max_steps: int, start_step: int):
        """`start_step`: the first step this launch trains; records of later steps left by a run
        that died after its last checkpoint belong to an abandoned timeline and are dropped."""
        self.cfg, self.run_dir, self.enabled, self.max_steps = cfg, Path(run_dir), rank == 0, max_steps
        self._wandb = None
        self._start = time.perf_counter()
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._metrics = _rewound(self.run_dir / "metrics.jsonl", start_step)
        self._samples = _rewound(self.run_dir / "samples.jsonl", start_step) if cfg.record_sample_ids else None
        # Seeded from the steps kept from earlier launches: a resumed run's curve starts at step 1.
        self._history = LossHistory.from_jsonl(self.run_dir / "metrics.jsonl")
        if cfg.wandb:
            self._wandb = self._init_wandb(config, start_step)
        self._progress = Progress("train", max_steps, unit="step", initial=start_step - 1, enabled=cfg.progress)

    def _init_wandb(self, config: dict, start_step: int):
        try:
            import wandb
        except ImportError:
            log.warning("wandb is not installed: metrics go to metrics.jsonl only")
            return None
        # One wandb run per launch, grouped by run directory: wandb drops steps it has seen, and a
        # resumed launch repeats the steps after the checkpoint.
        name = self.cfg.name or self.run_dir.name
        return wandb.init(project=self.cfg.project, entity=self.cfg.entity or None, group=name,
                          name=f"{name}@{start_step}", id=uuid.uuid4().hex[:12], dir=str(self.run_dir),
                          config=config, mode=wandb_mode())

    def log_step(self, record: dict) -> None:
        if not self.enabled:
            return
        self._metrics.write(json.dumps(record) + "\n")
        self._history.add(record)
        if self._wandb is not None:
            self._wandb.log(wandb_values(record), step=record["step"])
        self._progress.update(1, note=metrics_note(record))
        step = record["step"]
        if self.cfg.console_every and (step % self.cfg.console_every == 0 or step == self.max_steps):
            self._progress.print(progress_line(record, self.max_steps, time.perf_counter() - self._start))

    def log_sample_ids(self, step: int, ids: list[str]) -> None:
        if self.enabled and self._samples is not None:
            self._samples.write(json.dumps({"step": step, "ids": ids}) + "\n")

    def log_images(self, step: int, grid_path: Path, prompts: list[str]) -> None:
        if self.enabled and self._wandb is not None:
            import wandb

            self._wandb.log({"samples": wandb.Image(str(grid_path), caption=" | ".join(prompts))}, step=step)

    def write_loss_curve(self) -> Path | None:
        """Redraw <run_dir>/loss_curve.png (rank 0; the trainer calls it at each checkpoint, close()
        at the end). A picture that cannot be drawn is logged, never a reason to stop training."""
        if not self.enabled:
            return None
        try:
            return save_loss_curve(self._history, self.run_dir / LOSS_CURVE, self.cfg.name or self.run_dir.name)
        except Exception as err:  # noqa: BLE001 - see the docstring
            log.warning("loss curve not drawn: %s", err)
            return None

    def close(self) -> None:
        if not self.enabled:
            return
        self._progress.close()
        self.write_loss_curve()
        self._metrics.close()
        if self._samples is not None:
            self._samples.close()
        if self._wandb is not None:
            self._wandb.finish()


def wandb_values(record: dict) -> dict:
    """The record's numbers for wandb; a dict of numbers (corrupt_by_shard) as `<key>/<name>`."""
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    values = {}
    for key, value in record.items():
        if key in ("step", "first_step"):
            continue
        if number(value):
            values[key] = value
        elif isinstance(value, dict):
            values.update({f"{key}/{name}": v for name, v in value.items() if number(v)})
    return values


def _rewound(path: Path, start_step: int):
    """Open a JSONL log for appending, keeping only whole records of steps before `start_step`."""
    kept = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] < start_step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                continue  # the half-written last line of a killed run
        path.write_text("".join(line + "\n" for line in kept))
    return open(path, "a", buffering=1)


def progress_line(record: dict, max_steps: int, elapsed: float) -> str:
    parts = [f"step {record['step']}/{max_steps}", metrics_note(record)]
    done = record["step"] - record.get("first_step", 1) + 1
    remaining = max_steps - record["step"]
    if done > 0 and remaining > 0:
        parts.append(f"eta {remaining * elapsed / done:.0f}s")
    return " | ".join(parts)


def metrics_note(record: dict) -> str:
    """A step's metrics in one line: what training progress shows after its step count."""
    if record["loss"] is None:
        parts = ["loss not finite: step skipped"]
    else:
        parts = [f"loss {record['loss']:.4f}"]
        parts += [f"{k} {record[k]:.4f}" for k in ("mse", "freq", "repa") if record.get(k) is not None]
    if record.get("grad_norm") is not None:
        parts.append(f"gnorm {record['grad_norm']:.3f}")
    parts.append(f"lr {record['lr']:.2e}")
    parts.append(f"{record['samples_per_s']:.1f} img/s")
    parts.append(f"data {100 * record['data_wait_share']:.0f}%")
    if record.get("mfu") is not None:
        parts.append(f"mfu {100 * record['mfu']:.1f}%")
    parts.append(f"mem {record['memory_gib']:.2f} GiB")
    return " | ".join(parts)
