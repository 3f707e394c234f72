"""The trainer: DeCo under a DeepSpeed ZeRO-3 engine, streaming MDS shards, checkpointing to storage.

One rank's story, top to bottom:
  1. join the job (launch.py set the environment) and seed everything;
  2. open the data streams (this rank's share of each global batch);
  3. build the frozen text encoder and REPA teacher, outside ZeRO;
  4. build the model partitioned (from `init_from` weights when there is nothing to resume), the
     optimizer, the ZeRO-3 engine and the sharded EMA;
  5. resume from a checkpoint (exactly, or on another number of ranks);
  6. loop: batch -> text features -> per-sample noise, time and caption dropout -> DeCo loss ->
     backward -> step -> EMA -> metrics; checkpoint every N steps and on SIGTERM;
  7. save the final checkpoint.

Every random draw of the objective is seeded by (run seed, step, sample id): a sample gets the same
noise, time and dropout at a given step whatever the number of ranks, and a resumed run draws
exactly what the uninterrupted one would have.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import random
import signal
import socket
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml

from deco.data.errors import ExpectedError
from deco.data.streaming import TrainLoader, clean_stale_shared_memory
from deco.model.config import identity_differences
from deco.model.flops import deco_flops
from deco.model.objective import draw_times, drop_text, training_loss
from deco.orchestration.launch import DistWorld
from deco.orchestration.zero3.ema import ShardedEma
from deco.orchestration.zero3.engine import (build_model, build_optimizer, deepspeed_config, device_for, frozen,
                                             init_distributed, parallelize, resolve_precision)
from deco.orchestration.zero3.partitions import partition_stats
from deco.orchestration.zero3.state import estimated_bytes
from deco.pipeline.config import ConfigError, to_dict
from deco.pipeline.train.checkpoint import CONFIG, Checkpointer, no_intact_checkpoint, resolve_resume
from deco.pipeline.train.config import TrainConfig, train_config_from_yaml
from deco.pipeline.train.manifest import CheckpointError
from deco.pipeline.train.init_from import init_weights_file
from deco.pipeline.train.metrics import MetricsLogger, memory_gib, peak_flops
from deco.pipeline.train.peers import RankStatus, peer_failure
from deco.pipeline.train.preflight import check_storage, rank0_decides

log = logging.getLogger(__name__)
SIGTERM_EXIT = 143


class NonFiniteLossError(RuntimeError):
    pass


def sample_seed(seed: int, step: int, sample_id: str) -> int:
    digest = hashlib.blake2b(f"{seed}/{step}/{sample_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class Trainer:
    def __init__(self, cfg: TrainConfig, world: DistWorld, resume: str = "", status: RankStatus | None = None):
        self.cfg, self.world = cfg, world
        # What this rank is doing, and every rank's liveness port: named when a collective fails.
        self.status = status or RankStatus(world.rank, world.world_size, world.local_world_size)
        self.run_dir = Path(cfg.run_dir)
        self.stage_uri = cfg.checkpoint.uri or str(self.run_dir.resolve())
        clock = _Clock()
        # From the first moment: a SIGTERM during start-up is honoured after the first step.
        self._stop_requested = False
        if cfg.checkpoint.on_sigterm:
            signal.signal(signal.SIGTERM, self._on_sigterm)
        # 1. the job
        self.device = device_for(world.local_rank)
        init_distributed(cfg.engine, self.device)
        self.status.publish()
        _seed_all(cfg.seed)
        self.precision = resolve_precision(cfg.engine, self.device)
        self.micro_batch = cfg.micro_batch(world.world_size)
        ds_config = deepspeed_config(cfg.engine, self.micro_batch, self.precision)
        # Storage answers before anything is built: a missing bucket, no credentials or an
        # unwritable directory is one line now, not a failure at the first checkpoint.
        rank0_decides(lambda: check_storage(cfg, self.stage_uri), world.rank)
        self.resume_candidates = rank0_decides(lambda: resolve_resume(resume, self.stage_uri), world.rank)
        clock.lap("join")
        # 2. data
        if cfg.data.clean_stale_shared_memory:
            clean_stale_shared_memory()
        # The shard cache is per node (streaming coordinates the ranks of one node through /tmp).
        self.loader = TrainLoader(cfg.data, cfg.resolution, self.micro_batch,
                                  Path(cfg.data.cache_dir or self.run_dir / "data_cache") / socket.gethostname(),
                                  pin_memory=self.device.type == "cuda", world_size=world.world_size,
                                  multiple=cfg.model.dit.patch_size)
        clock.lap("data")
        # 3. frozen networks
        self.encoder = frozen(cfg.text_encoder.build(self.device), self.device)
        if self.encoder.feature_dim != cfg.model.dit.text_dim:
            raise ConfigError(f"text encoder features are {self.encoder.feature_dim}-d, model.dit.text_dim is "
                              f"{cfg.model.dit.text_dim}")
        self.empty_text = self.encoder.empty_encoding()
        self.teacher = frozen(cfg.repa_teacher.build(self.device), self.device) if cfg.model.repa.enabled else None
        clock.lap("frozen networks")
        # 4. model, optimizer, engine, EMA
        init_weights = None
        if cfg.init_from and not self.resume_candidates:
            init_weights = init_weights_file(cfg, self.run_dir, world)
        elif cfg.init_from and world.rank == 0:
            log.info("resuming %s: init_from %s is not used", self.resume_candidates[0].uri, cfg.init_from)
        _seed_all(cfg.seed)  # the same fresh parameters on every rank and every world size
        model = build_model(cfg.model, ds_config, cfg.engine, init_weights)
        self.engine = parallelize(model, build_optimizer(model.parameters(), cfg.optimizer, self.device),
                                  ds_config, cfg.engine)
        self.ema = ShardedEma(self.engine, cfg.ema, world.rank, world.world_size) if cfg.ema.enabled else None
        self.checkpointer = Checkpointer(cfg.checkpoint, self.stage_uri, self.run_dir, world.rank,
                                         world.world_size, world.local_rank)
        clock.lap("engine")
        # 5. resume
        self.step, self.samples_seen, self.nonfinite_total, self.corrupt_total = 0, 0, 0, 0
        self.corrupt_by_shard: dict[str, int] = {}  # bad samples skipped, per shard, all ranks
        self.last_saved_step = -1
        if self.resume_candidates:
            self.status.activity = "start-up (restoring a checkpoint)"
            self._resume(self.resume_candidates, explicit=resume not in ("auto", ""))
        self.first_step = self.step + 1
        # A location that cannot hold one checkpoint fails now, not after hours of training.
        self.checkpointer.ensure_space(self.first_step, estimated_bytes(self.engine, self.ema is not None),
                                       "a checkpoint of this run")
        clock.lap("resume")
        if world.rank == 0:
            log.info("ready in %s", clock)
        self.flops_per_sample = deco_flops(cfg.model, resolution=cfg.resolution,
                                           text_tokens=cfg.text_encoder.max_length).train
        self.peak = peak_flops(self.device, cfg.logging.peak_tflops)
        self._write_rank_record()
        self.metrics = MetricsLogger(cfg.logging, self.run_dir, world.rank, to_dict(cfg), cfg.max_steps, self.first_step)

    # -- the loop ---------------------------------------------------------------------------------

    def run(self) -> int:
        """Train to max_steps; returns 0, or SIGTERM_EXIT after the checkpoint a SIGTERM asked for."""
        nonfinite_in_a_row = 0
        try:
            while self.step < self.cfg.max_steps:
                self.step += 1
                self.status.activity = f"step {self.step}"
                record, stop = self.train_step(self.step)
                self.metrics.log_step(record)
                if record["skipped_nonfinite"]:
                    nonfinite_in_a_row += 1
                    if nonfinite_in_a_row >= self.cfg.max_nonfinite_steps:
                        raise NonFiniteLossError(
                            f"{nonfinite_in_a_row} steps in a row had a non-finite loss (last at step {self.step}); "
                            f"stopping. Resume from the last checkpoint with a lower optimizer.lr, or check the data.")
                else:
                    nonfinite_in_a_row = 0
                # A step whose loss was not finite is not checkpointed: its weights may be poisoned.
                if self.cfg.checkpoint.every and self.step % self.cfg.checkpoint.every == 0 and not nonfinite_in_a_row:
                    self.save()
                if self.cfg.logging.sample_every and self.step % self.cfg.logging.sample_every == 0:
                    self.sample_grid()
                if stop:
                    if self.last_saved_step != self.step and not nonfinite_in_a_row:
                        self.save()
                    if self.world.rank == 0:
                        print(f"stopped by SIGTERM at step {self.step}; checkpoint saved", flush=True)
                    return SIGTERM_EXIT
            if self.last_saved_step != self.step and self.step > 0 and not nonfinite_in_a_row:
                self.save()  # a run always leaves a checkpoint of its final state in its stage
            return 0
        finally:
            self.metrics.close()

    def train_step(self, step: int) -> tuple[dict, bool]:
        cfg, engine = self.cfg, self.engine
        lr = cfg.optimizer.lr_at(step)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        start = time.perf_counter()
        data_wait, parts_sum, skipped, stop, ids = 0.0, {}, False, False, []
        for _ in range(cfg.engine.grad_accum):
            tick = time.perf_counter()
            batch = next(self.loader)
            data_wait += time.perf_counter() - tick
            ids += batch["ids"]
            with self._autocast():
                parts = self.loss(batch, step)
            # One collective per micro-batch: loss parts, and whether any rank saw a non-finite
            # loss, was told to stop, or met unusable samples.
            names = sorted(parts)
            flags = [float(not torch.isfinite(parts["loss"]).item()), float(self._stop_requested),
                     float(len(batch["skipped"]))]
            stats = torch.tensor([parts[n].detach().float().item() for n in names] + flags, device=self.device)
            dist.all_reduce(stats)
            values = stats.tolist()
            for name, value in zip(names, values):
                parts_sum[name] = parts_sum.get(name, 0.0) + value / self.world.world_size
            nonfinite, stop_votes, corrupt = values[len(names):]
            stop = stop or stop_votes > 0
            if corrupt > 0:  # the same on every rank (all-reduced): all enter the gather, on such steps only
                self.corrupt_total += int(corrupt)
                self._count_corrupt(batch.get("skipped_shards", []))
            if nonfinite > 0:
                skipped = True
            if not skipped:
                engine.backward(parts["loss"])
            if not (skipped and cfg.engine.grad_accum == 1):
                # With accumulation a skipped micro-batch contributes no gradient; DeepSpeed's
                # boundary bookkeeping still needs its step() call.
                engine.step()
        if skipped:
            self.nonfinite_total += 1
        else:
            if self.ema is not None:
                self.ema.update(step)
        self.samples_seen += cfg.global_batch
        if cfg.logging.record_sample_ids:
            self.metrics.log_sample_ids(step, _gather_ids(ids, self.world.world_size))
        return self._record(step, parts_sum, lr, start, data_wait, skipped), stop

    def _count_corrupt(self, shards: list[str]) -> None:
        gathered: list[list[str]] = [None] * self.world.world_size  # type: ignore[list-item]
        dist.all_gather_object(gathered, list(shards))
        for shard in (s for part in gathered for s in part):
            self.corrupt_by_shard[shard] = self.corrupt_by_shard.get(shard, 0) + 1

    def loss(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        # Asynchronous only from pinned memory (the loader pins on a GPU): from pageable memory a
        # non_blocking copy is synchronous anyway, and on some drivers unsafe to reuse.
        images = batch["images"].to(self.device, non_blocking=batch["images"].is_pinned())
        text, mask = self.text_features(batch)
        t, noise, text, mask = self.draws(batch["ids"], step, images, text, mask)
        teacher = None
        if self.teacher is not None:
            teacher = lambda clean: self.teacher.features(clean, dit_patch=self.cfg.model.dit.patch_size)  # noqa: E731
        # DeepSpeed's backward divides by the accumulation steps itself.
        return training_loss(self.engine, images, text, mask, self.cfg.objective, teacher=teacher, t=t, noise=noise)

    def text_features(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached embeddings where the shards carry them, the frozen encoder for the rest."""
        length, dim = self.cfg.text_encoder.max_length, self.cfg.model.dit.text_dim
        size = len(batch["captions"])
        text = torch.zeros(size, length, dim, device=self.device)
        mask = torch.zeros(size, length, dtype=torch.bool, device=self.device)
        todo = [i for i, emb in enumerate(batch["text_emb"]) if emb is None]
        if todo:
            features, valid = self.encoder.encode([batch["captions"][i] for i in todo])
            text[todo], mask[todo] = features.to(text), valid
        for i, emb in enumerate(batch["text_emb"]):
            if emb is not None:
                if emb.shape[-1] != dim:
                    raise ConfigError(f"cached text embeddings are {emb.shape[-1]}-d, model.dit.text_dim is {dim}")
                tokens = min(len(emb), length)
                text[i, :tokens], mask[i, :tokens] = emb[:tokens].to(text), True
        return text, mask

    def draws(self, ids: list[str], step: int, images, text, mask):
        """Caption dropout, time and noise per sample, from a generator seeded by (seed, step, id)."""
        ts, noises, texts, masks = [], [], [], []
        for i, sample_id in enumerate(ids):
            gen = torch.Generator(device=self.device).manual_seed(sample_seed(self.cfg.seed, step, sample_id))
            t_i, m_i = drop_text(text[i:i + 1], mask[i:i + 1], self.empty_text, self.cfg.objective.text_dropout, gen)
            ts.append(draw_times(self.cfg.objective, 1, gen, self.device))
            noises.append(torch.randn((1, *images.shape[1:]), generator=gen, device=self.device, dtype=images.dtype))
            texts.append(t_i)
            masks.append(m_i)
        return torch.cat(ts), torch.cat(noises), torch.cat(texts), torch.cat(masks)

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _record(self, step: int, parts: dict, lr: float, start: float, data_wait: float, skipped: bool) -> dict:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        samples_per_s = self.cfg.global_batch / seconds
        grad_norm = None
        if not skipped:
            norm = self.engine.get_global_grad_norm()
            grad_norm = float(norm) if norm is not None else None
        record = {"step": step, **{k: round(v, 6) if np.isfinite(v) else None for k, v in parts.items()},
                  "grad_norm": grad_norm, "lr": lr, "samples_per_s": round(samples_per_s, 3),
                  "samples_seen": self.samples_seen, "step_time_s": round(seconds, 4),
                  "data_wait_share": round(data_wait / seconds, 4),
                  "mfu": (round(samples_per_s / self.world.world_size * self.flops_per_sample / self.peak, 4)
                          if self.peak else None),
                  "memory_gib": memory_gib(self.device), "skipped_nonfinite": skipped,
                  "nonfinite_steps": self.nonfinite_total, "corrupt_samples": self.corrupt_total,
                  "corrupt_by_shard": dict(sorted(self.corrupt_by_shard.items())), "first_step": self.first_step}
        # The exact loss, for bit-for-bit comparisons of runs (the rounded one is for reading).
        record["loss_exact"] = parts["loss"].hex() if np.isfinite(parts["loss"]) else None
        return record

    # -- checkpoints ------------------------------------------------------------------------------

    def save(self) -> None:
        self.status.activity = f"the checkpoint of step {self.step}"
        trainer_state = {"step": self.step, "samples_seen": self.samples_seen, "world_size": self.world.world_size,
                         "global_batch": self.cfg.global_batch, "micro_batch": self.micro_batch,
                         "nonfinite_steps": self.nonfinite_total, "corrupt_samples": self.corrupt_total,
                         "corrupt_by_shard": self.corrupt_by_shard, "config_digest": self.cfg.digest(),
                         "model": to_dict(self.cfg.model)}
        self.checkpointer.save(self.step, self.engine, self.ema, self.loader.state_dict(), trainer_state,
                               self.cfg.to_yaml())
        self.last_saved_step = self.step
        self.metrics.write_loss_curve()  # a picture of the run so far, beside its metrics.jsonl

    def _resume(self, candidates: list, explicit: bool) -> None:
        """Restore the first intact checkpoint of `candidates` (newest first). A checkpoint whose
        files fail their checksum is skipped with a warning (`auto`), or refused (named URI)."""
        for index, ref in enumerate(candidates):
            manifest, root, problem = self.checkpointer.fetch_verified(ref)
            if problem is None:
                break
            self.checkpointer.discard_fetched(ref, root)
            if explicit or index == len(candidates) - 1:
                raise CheckpointError(problem if explicit else no_intact_checkpoint(self.stage_uri, problem))
            if self.world.rank == 0:
                print(f"deco: warning: {problem}; resuming from {candidates[index + 1].uri} instead", flush=True)
        saved_yaml = (root / CONFIG).read_text()
        saved_cfg = train_config_from_yaml(saved_yaml, f"{ref.uri}/{CONFIG}")
        # Compared as written, not as parsed: parsing fills fields the checkpoint predates with
        # today's defaults, which would hide a checkpoint of another architecture variant.
        differences = identity_differences(yaml.safe_load(saved_yaml)["model"], to_dict(self.cfg.model), sections=None)
        if differences:
            raise ConfigError(f"{ref.uri} was trained with another model config ({'; '.join(differences)}); "
                              f"to start a new stage from its weights, export them and set init_from")
        if saved_cfg.global_batch != self.cfg.global_batch:
            raise ConfigError(f"{ref.uri} was trained with global_batch={saved_cfg.global_batch}, this run has "
                              f"{self.cfg.global_batch}: resuming needs the same global batch (it fixes the data order)")
        state = self.checkpointer.restore(ref, manifest, root, self.engine, self.ema, self.loader)
        self.step, self.samples_seen = state["step"], state["samples_seen"]
        self.nonfinite_total, self.corrupt_total = state["nonfinite_steps"], state["corrupt_samples"]
        self.corrupt_by_shard = dict(state.get("corrupt_by_shard", {}))  # absent from older checkpoints
        if ref.uri.rstrip("/").startswith(self.stage_uri.rstrip("/") + "/"):
            self.last_saved_step = self.step
        if self.world.rank == 0:
            print(f"resumed from {ref.uri} (step {self.step}, written by {state['world_size']} ranks, "
                  f"now {self.world.world_size})", flush=True)

    def _on_sigterm(self, signum, frame) -> None:
        self._stop_requested = True

    # -- observability ----------------------------------------------------------------------------

    def _write_rank_record(self) -> None:
        record = {"rank": self.world.rank, "world_size": self.world.world_size, "device": str(self.device),
                  "precision": self.precision, "micro_batch": self.micro_batch, **partition_stats(self.engine)}
        path = self.run_dir / "ranks" / f"rank_{self.world.rank:05d}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record))

    def sample_grid(self) -> Path | None:
        """A grid of EMA samples (every rank computes: parameters are gathered collectively)."""
        from deco.model.sampling import SamplerConfig
        from deco.pipeline.sample import generate, save_grid

        self.status.activity = f"the sample grid of step {self.step}"
        logging_cfg = self.cfg.logging
        sampler = SamplerConfig(steps=logging_cfg.sample_steps, cfg_scale=logging_cfg.sample_cfg,
                                time_shift=logging_cfg.sample_time_shift)
        module = self.engine.module
        module.eval()
        with (self.ema.applied() if self.ema is not None else contextlib.nullcontext()), self._autocast():
            images = generate(module, self.encoder, logging_cfg.sample_prompts, sampler, seed=self.cfg.seed,
                              resolution=self.cfg.resolution)
        module.train()
        if self.world.rank != 0:
            return None
        path = save_grid(images.float(), self.run_dir / "samples" / f"step_{self.step:08d}.png")
        self.metrics.log_images(self.step, path, logging_cfg.sample_prompts)
        return path


class _Clock:
    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.laps: list[tuple[str, float]] = []

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps.append((name, now - self.last))
        self.last = now

    def __str__(self) -> str:
        parts = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in self.laps)
        return f"{time.perf_counter() - self.start:.1f}s ({parts})"


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _gather_ids(ids: list[str], world_size: int) -> list[str]:
    gathered: list[list[str]] = [None] * world_size  # type: ignore[list-item]
    dist.all_gather_object(gathered, ids)
    return sorted(i for part in gathered for i in part)


def train(cfg: TrainConfig, world: DistWorld, resume: str = "") -> int:
    """Run one rank of a training job; returns the process exit code. A collective that fails
    because a rank is gone raises PeerLostError: one line naming that rank, not gloo's traceback."""
    status = RankStatus(world.rank, world.world_size, world.local_world_size)
    try:
        code = Trainer(cfg, world, resume, status).run()
        status.activity = "the final barrier"
        dist.barrier()  # no rank leaves while another still uploads
    except Exception as err:
        cause = peer_failure(err) if world.world_size > 1 else None
        if cause is None:
            if isinstance(err, ExpectedError):
                # Left to interpreter exit, gloo's threads can abort the process ("terminate called
                # without an active exception", exit 134) after the one-line error was printed.
                with contextlib.suppress(Exception):
                    dist.destroy_process_group()
            raise
        # The loader's workers may be dying with the job: no second exception while this rank reports.
        with contextlib.suppress(ValueError):  # ValueError: not the main thread
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        raise status.lost(cause) from None
    dist.destroy_process_group()
    return code
