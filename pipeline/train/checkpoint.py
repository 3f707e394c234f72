"""Checkpoints of a ZeRO-3 run: save every N steps and on SIGTERM, keep the last K, resume exactly,
and resume on another number of ranks.

Inside a checkpoint prefix (<stage>/checkpoints/step_XXXXXXXX/, the contract of
checkpoint_manifest.py):

    deepspeed/zero_pp_rank_<r>_mp_rank_00_model_states.pt   every rank: DeepSpeed's module record
                                                            (parameter shapes; weights live below)
    deepspeed/zero_pp_rank_<r>_mp_rank_00_optim_states.pt   every rank: its fp32 master partition
                                                            and AdamW moments (bf16_zero_pp_rank_...
                                                            when the run trains in bf16)
    ema/rank_<r>-of-<W>.safetensors                         every rank: the EMA of its partitions
    rng/rank_<r>.json                                       every rank: torch/numpy/python RNG states
    loader.json                                             streaming's resume state (global)
    trainer.json                                            step, samples seen, world size, batch...
    config.yaml                                             the run's full TrainConfig
    manifest.json                                           written LAST by rank 0: every file + size

A local stage is written in place; for an s3:// stage each rank writes to a local staging
directory and uploads its own files (multipart, retried). The manifest commits the checkpoint.
Restore on the same world size: DeepSpeed's load_checkpoint (bit-exact), reading through a
checkpoint engine that never unpickles code (torch.load weights_only=True). On another world size:
the full fp32 weights and Adam moments are assembled per parameter from all ranks' shards and
re-partitioned (parallelize.set_full_state); the EMA likewise; the data order continues from the
global loader state, whose canonical node count never changes.
"""
from __future__ import annotations

import json
import logging
import random
import re
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from deco.data.object_store import StorageError, is_s3, join, open_store
from deco.pipeline.checkpoint_manifest import (MANIFEST, STEP_DIR, CheckpointError, CheckpointRef, Manifest,
                                               checkpoints_uri, latest_complete, list_checkpoints, read_manifest,
                                               step_dir, write_manifest)

log = logging.getLogger(__name__)

DS_TAG = "deepspeed"
LOADER = "loader.json"
TRAINER = "trainer.json"
CONFIG = "config.yaml"


@dataclass(kw_only=True)
class CheckpointConfig:
    every: int = 1000          # optimizer steps between checkpoints (0 = only at the end and on SIGTERM)
    keep_last: int = 3         # complete checkpoints kept (0 = all); the stage's promoted one is never deleted
    uri: str = ""              # stage URI (local path or s3://bucket/prefix); "" = the run directory
    on_sigterm: bool = True    # save before exiting when the job is told to stop
    upload_attempts: int = 3   # per file, on top of boto3's own retries

    def validate(self) -> None:
        if self.every < 0 or self.keep_last < 0 or self.upload_attempts < 1:
            raise ValueError("checkpoint.every and checkpoint.keep_last must be >= 0, upload_attempts >= 1")


def ds_key(rank: int, kind: str, bf16: bool = False) -> str:
    """DeepSpeed's file names: in bf16 mode the optimizer file carries a bf16_ prefix."""
    prefix = "bf16_" if bf16 and kind == "optim" else ""
    return f"{DS_TAG}/{prefix}zero_pp_rank_{rank}_mp_rank_00_{kind}_states.pt"


def ds_optim_keys(files, rank: int | None = None) -> list[str]:
    """The optimizer-state files a manifest lists (of one rank, or of all), whatever the precision."""
    rank_pattern = r"\d+" if rank is None else str(rank)
    pattern = re.compile(rf"{DS_TAG}/(bf16_)?zero_pp_rank_{rank_pattern}_mp_rank_00_optim_states\.pt")
    return sorted(k for k in files if pattern.fullmatch(k))


def ema_key(rank: int, world_size: int) -> str:
    return f"ema/rank_{rank:05d}-of-{world_size:05d}.safetensors"


def rng_key(rank: int) -> str:
    return f"rng/rank_{rank:05d}.json"


def resolve_resume(resume: str, stage_uri: str) -> CheckpointRef | None:
    """`auto`: the newest complete checkpoint of the stage (None if there is none; CheckpointError
    if the newest one is corrupt); a checkpoint URI: that one, which must be complete; ``: none."""
    if not resume or resume == "none":
        return None
    if resume == "auto":
        return latest_complete(stage_uri)
    manifest = read_manifest(resume)
    if manifest is None:
        raise CheckpointError(f"{resume} has no {MANIFEST}: not a complete checkpoint")
    return CheckpointRef(manifest.step, resume.rstrip("/"))


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state().tolist(), "numpy": None, "python": None, "cuda": None}
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state["numpy"] = [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)]
    version, internal, gauss_next = random.getstate()
    state["python"] = [version, list(internal), gauss_next]
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


class Checkpointer:
    def __init__(self, cfg: CheckpointConfig, stage_uri: str, run_dir: Path, rank: int, world_size: int,
                 local_rank: int):
        self.cfg, self.stage_uri, self.run_dir = cfg, stage_uri, Path(run_dir)
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.remote = is_s3(stage_uri)

    def _local_root(self, step: int, purpose: str) -> Path:
        if self.remote:
            return self.run_dir / purpose / step_dir(step)
        return Path(join(checkpoints_uri(self.stage_uri), step_dir(step)))

    # -- save ---------------------------------------------------------------------------------

    def save(self, step: int, engine, ema, loader_state: dict, trainer_state: dict, config_yaml: str) -> CheckpointRef:
        """Every rank calls. Returns when the checkpoint is committed (its manifest written)."""
        start = time.perf_counter()
        uri = join(checkpoints_uri(self.stage_uri), step_dir(step))
        if self.rank == 0:  # leftovers of a run killed while writing this step must not mix in
            open_store(uri).delete_prefix("")
        dist.barrier()
        root = self._local_root(step, "staging")
        engine.save_checkpoint(str(root), tag=DS_TAG, save_latest=False)
        written = [ds_key(self.rank, "model"), ds_key(self.rank, "optim", engine.bfloat16_enabled())]
        if ema is not None:
            ema.save(root / ema_key(self.rank, self.world_size))
            written.append(ema_key(self.rank, self.world_size))
        _write_text(root / rng_key(self.rank), json.dumps(rng_state()))
        written.append(rng_key(self.rank))
        if self.rank == 0:
            for key, text in ((LOADER, json.dumps(loader_state)), (TRAINER, json.dumps(trainer_state)), (CONFIG, config_yaml)):
                _write_text(root / key, text)
                written.append(key)
            for script in ("zero_to_fp32.py", "zero_to_torch.py"):  # DeepSpeed's convenience copies
                (root / script).unlink(missing_ok=True)
        sizes = {key: (root / key).stat().st_size for key in written}
        if self.remote:
            store = open_store(uri)
            for key in written:
                self._upload(store, key, root / key)
        gathered: list[dict] = [None] * self.world_size  # type: ignore[list-item]
        dist.all_gather_object(gathered, sizes)
        if self.remote:
            shutil.rmtree(root, ignore_errors=True)
        if self.rank == 0:
            files = {k: v for part in gathered for k, v in part.items()}
            write_manifest(uri, Manifest(step=step, world_size=self.world_size, files=files, extra=trainer_state))
            self.prune()
        dist.barrier()
        log.info("checkpoint step %d committed at %s in %.1fs", step, uri, time.perf_counter() - start)
        return CheckpointRef(step, uri)

    def _upload(self, store, key: str, path: Path) -> None:
        for attempt in range(1, self.cfg.upload_attempts + 1):
            try:
                store.put_file(key, path)  # multipart above 64 MiB, each part retried by boto3
                return
            except Exception as err:  # network errors come in many types; the last one is raised
                if attempt == self.cfg.upload_attempts:
                    raise StorageError(f"upload of {join(store.uri, key)} failed {attempt} times: {err}") from err
                log.warning("upload of %s failed (%s); retrying", key, err)
                time.sleep(2 ** attempt)

    def prune(self) -> None:
        """Keep the newest `keep_last` complete checkpoints (and the promoted one); remove older
        ones and unfinished leftovers older than the newest complete checkpoint."""
        if self.cfg.keep_last == 0:
            return
        complete = list_checkpoints(self.stage_uri)
        if not complete:
            return
        keep = {ref.step for ref in complete[-self.cfg.keep_last:]} | self._promoted_steps()
        store = open_store(checkpoints_uri(self.stage_uri))
        steps = {int(m.group(1)) for key in store.list() if (m := STEP_DIR.match(key.split("/")[0]))}
        for step in sorted(steps):
            if step < complete[-1].step and step not in keep:
                store.delete_prefix(step_dir(step))

    def _promoted_steps(self) -> set[int]:
        try:
            raw = open_store(self.stage_uri).get_bytes("promoted.json").decode()
        except FileNotFoundError:
            return set()
        # The gate's pointer names its checkpoint's step directory; whatever else it holds.
        return {int(m) for m in re.findall(r"step_(\d{8})", raw)}

    # -- restore ------------------------------------------------------------------------------

    def restore(self, ref: CheckpointRef, engine, ema, loader) -> dict:
        """Every rank calls. Loads weights, optimizer, EMA, loader and RNG; returns trainer.json."""
        from deco.orchestration.parallelize import ZeroCheckpointReader, set_full_state
        from deco.pipeline.ema import ShardedEma

        manifest = read_manifest(ref.uri)
        if manifest is None:
            raise CheckpointError(f"{ref.uri} has no {MANIFEST}")
        saved_world = manifest.world_size
        same_world = saved_world == self.world_size
        if same_world:
            keys = [ds_key(self.rank, "model"), *ds_optim_keys(manifest.files, self.rank), rng_key(self.rank),
                    LOADER, TRAINER]
            keys += [ema_key(self.rank, saved_world)] if ema_key(self.rank, saved_world) in manifest.files else []
        else:
            keys = [ds_key(0, "model"), LOADER, TRAINER, *ds_optim_keys(manifest.files)]
            keys += [k for k in manifest.files if k.startswith("ema/")]
        root = self._fetch(ref, keys, fetch_here=same_world or self.local_rank == 0)
        dist.barrier()  # elastic: the node's local rank 0 has fetched every shard
        trainer_state = json.loads((root / TRAINER).read_text())
        ema_files = [root / k for k in keys if k.startswith("ema/")]
        if same_world:
            load_path, _ = engine.load_checkpoint(str(root), tag=DS_TAG, load_optimizer_states=True,
                                                  load_lr_scheduler_states=False)
            if load_path is None:
                raise CheckpointError(f"DeepSpeed could not load {ref.uri}")
            if ema is not None and ema_files:
                ema.load_local(ema_files[0])
            set_rng_state(json.loads((root / rng_key(self.rank)).read_text()))
        else:
            log.info("elastic restore: checkpoint of %d ranks onto %d", saved_world, self.world_size)
            set_full_state(engine, ZeroCheckpointReader(root / DS_TAG, saved_world))
            if ema is not None and ema_files:
                ema.load_full(ShardedEma.read_full(ema_files))
        if ema is not None and not ema_files:
            log.warning("%s holds no EMA: the EMA starts from the restored weights", ref.uri)
        loader.load_state_dict(json.loads((root / LOADER).read_text()))
        dist.barrier()
        if self.remote and self.local_rank == 0:
            shutil.rmtree(root, ignore_errors=True)
        return trainer_state

    def _fetch(self, ref: CheckpointRef, keys: list[str], fetch_here: bool) -> Path:
        if not is_s3(ref.uri):
            return Path(ref.uri)
        # Per node: the run directory may be on a file system that several nodes share.
        root = self.run_dir / "restore" / socket.gethostname() / step_dir(ref.step)
        if fetch_here:
            store = open_store(ref.uri)
            for key in keys:
                store.get_file(key, root / key)
        return root


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
