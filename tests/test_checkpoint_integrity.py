"""Checkpoints you can trust, and storage that is checked before training starts, as a user meets
them through `deco train` / `deco export` (subprocesses, 1 rank under ZeRO-3):

- a flipped byte, a truncated file, a corrupt manifest: `--resume auto` falls back to the newest
  intact checkpoint and says so; a named corrupt checkpoint and its export are one line, exit 2;
- a missing bucket, no credentials, a read-only directory, missing data: one line before step 1;
- a full disk: a location that cannot hold one checkpoint fails before step 1; old checkpoints are
  pruned first when the next one would not fit; a write that runs out of space names the file.
Full-disk and read-only cases use real small tmpfs mounts (they need root to mount).
"""
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from train_helpers import ROOT, TINY_CPU, read_jsonl, run_deco, write_mds

COMMON = ["--set", "logging.wandb=false", "--set", "logging.sample_every=0", "--set", "data.num_workers=1",
          "--set", "global_batch=8", "--nproc", "1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    write_mds(root, 32, 32, seed=3)
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory, data):
    """A finished 1-rank run with intact checkpoints at steps 2 and 4."""
    run_dir = tmp_path_factory.mktemp("run")
    result = run_deco(*train_args(run_dir, data, run_dir / "stage", "--max-steps", "4", "--checkpoint-every", "2",
                                  "--set", "checkpoint.keep_last=0"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir / "stage"


def train_args(run_dir, data, stage, *extra):
    return ["train", "--config", str(TINY_CPU), "--run-dir", str(run_dir), "--data", str(data),
            "--set", f"checkpoint.uri={stage}", *COMMON, *extra]


def copy_stage(stage: Path, into: Path) -> Path:
    shutil.copytree(stage, into)
    return into


def optim_file(checkpoint: Path) -> Path:
    return next((checkpoint / "deepspeed").glob("*optim_states.pt"))


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0x01]))


def one_line_error(result, code: int = 2) -> str:
    assert result.returncode == code, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("deco: error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


def test_a_flipped_byte_is_refused_by_name_and_auto_resume_falls_back(run, data, tmp_path):
    stage = copy_stage(run, tmp_path / "stage")
    newest = stage / "checkpoints" / "step_00000004"
    victim = optim_file(newest)
    flip_byte(victim, victim.stat().st_size // 2)  # same size: only the checksum can tell

    named = run_deco(*train_args(tmp_path / "named", data, stage, "--resume", str(newest), "--max-steps", "4"))
    line = one_line_error(named)
    assert f"{victim.relative_to(newest)} is corrupt: its checksum does not match" in line

    exported = run_deco("export", "--checkpoint", str(newest), "--out", str(tmp_path / "w.safetensors"))
    assert "is corrupt: its checksum does not match" in one_line_error(exported)

    auto = run_deco(*train_args(tmp_path / "auto", data, stage, "--resume", "auto", "--max-steps", "4"))
    assert auto.returncode == 0, auto.stdout[-3000:] + auto.stderr[-3000:]
    assert f"deco: warning: {newest}/{victim.relative_to(newest)} is corrupt" in auto.stdout
    assert f"resuming from {stage / 'checkpoints' / 'step_00000002'} instead" in auto.stdout
    assert "resumed from " + str(stage / "checkpoints" / "step_00000002") + " (step 2" in auto.stdout
    # Steps 3-4 trained again from step 2 give exactly what the intact run computed.
    retrained = {r["step"]: r["loss_exact"] for r in read_jsonl(tmp_path / "auto" / "metrics.jsonl")}
    original = {r["step"]: r["loss_exact"] for r in read_jsonl(run.parent / "metrics.jsonl")}
    assert retrained == {3: original[3], 4: original[4]}


def test_truncated_files_and_a_broken_manifest_are_skipped_by_auto_resume(run, data, tmp_path):
    stage = copy_stage(run, tmp_path / "stage")
    step2, step4 = (stage / "checkpoints" / f"step_{s:08d}" for s in (2, 4))
    with open(optim_file(step4), "r+b") as handle:
        handle.truncate(1000)
    result = run_deco(*train_args(tmp_path / "a", data, stage, "--resume", "auto", "--max-steps", "2"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipping a corrupt checkpoint" in result.stderr and "resumed from " + str(step2) in result.stdout

    (step4 / "manifest.json").write_text('{"step": 4, "world_size": 1, "files": {"loader.json": 1')
    (step2 / "manifest.json").write_text("not json")
    nothing = run_deco(*train_args(tmp_path / "b", data, stage, "--resume", "auto", "--max-steps", "2"))
    line = one_line_error(nothing)
    assert f"no intact checkpoint in {stage}" in line and "--resume none" in line


def test_storage_problems_are_one_line_before_the_first_step(s3_server, data, tmp_path):
    bucket = f"missing-{uuid.uuid4().hex[:8]}"
    result = run_deco(*train_args(tmp_path / "a", data, f"s3://{bucket}/stage", "--max-steps", "2"))
    assert f"bucket '{bucket}' does not exist" in one_line_error(result)
    assert not (tmp_path / "a" / "metrics.jsonl").exists()

    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_EC2_METADATA_DISABLED="true", HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    result = subprocess.run([sys.executable, "-m", "deco.pipeline.cli",
                             *train_args(tmp_path / "b", data, "s3://any-bucket/stage", "--max-steps", "2")],
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert "no AWS credentials" in one_line_error(result)

    result = run_deco(*train_args(tmp_path / "c", tmp_path / "no-data", tmp_path / "stage", "--max-steps", "2"))
    assert "cannot read training data: no MDS dataset at" in one_line_error(result)


@pytest.fixture
def small_disk(tmp_path):
    """Mount a real tmpfs of a given size (MiB), optionally read-only; unmounted afterwards."""
    mounts = []

    def mount(size_mib: int, read_only: bool = False) -> Path:
        where = tmp_path / f"disk{len(mounts)}"
        where.mkdir()
        options = f"size={size_mib}m" + (",ro" if read_only else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
        mounts.append(where)
        return where

    yield mount
    for where in mounts:
        subprocess.run(["umount", str(where)], capture_output=True)


def test_a_read_only_checkpoint_location_is_one_line_before_the_first_step(small_disk, data, tmp_path):
    read_only = small_disk(8, read_only=True)
    result = run_deco(*train_args(tmp_path / "r", data, read_only / "stage", "--max-steps", "2"))
    assert f"cannot write checkpoints to {read_only / 'stage' / 'checkpoints'}" in one_line_error(result)
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_a_disk_too_small_for_one_checkpoint_fails_before_training(small_disk, data, tmp_path):
    tiny = small_disk(40)
    result = run_deco(*train_args(tmp_path / "t", data, tiny / "stage", "--max-steps", "2"))
    line = one_line_error(result)
    assert f"not enough space for a checkpoint of this run at {tiny / 'stage' / 'checkpoints'}" in line
    assert "GiB are free" in line and not (tmp_path / "t" / "metrics.jsonl").exists()


def test_old_checkpoints_are_pruned_first_when_the_next_would_not_fit(small_disk, run, data, tmp_path):
    one = sum(f.stat().st_size for f in (run / "checkpoints" / "step_00000004").rglob("*") if f.is_file())
    disk = small_disk(int(2.6 * one / 2**20))  # room for two checkpoints, not three
    result = run_deco(*train_args(tmp_path / "p", data, disk / "stage", "--max-steps", "6", "--checkpoint-every", "2",
                                  "--set", "checkpoint.keep_last=2"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "pruned checkpoints of steps [2] before writing checkpoint step 6" in result.stderr
    assert sorted(p.name for p in (disk / "stage" / "checkpoints").iterdir()) == ["step_00000004", "step_00000006"]


def test_a_write_that_runs_out_of_space_names_the_file(small_disk):
    from deco.data.checksum import DiskFullError, HashingWriter, file_checksum
    from deco.orchestration.zero3.files import save_torch

    disk = small_disk(1)
    with pytest.raises(DiskFullError, match=f"no space left on the device writing {disk / 'big.pt'}"):
        save_torch({"w": torch.zeros(1 << 20)}, disk / "big.pt")  # 4 MiB into 1 MiB
    os.unlink(disk / "big.pt")
    writer = HashingWriter(disk / "small.bin")
    writer.write(b"x" * 1000)
    assert writer.close() == file_checksum(disk / "small.bin")  # hashed while written = hashed after


def test_a_manifest_records_a_checksum_for_every_file(run):
    from deco.data.checksum import file_checksum
    from deco.pipeline.train.manifest import read_manifest

    checkpoint = run / "checkpoints" / "step_00000004"
    manifest = read_manifest(str(checkpoint))
    assert manifest.format == "deco-checkpoint/2" and manifest.checksums.keys() == manifest.files.keys()
    assert all(file_checksum(checkpoint / k) == v for k, v in manifest.checksums.items())
    assert json.loads((checkpoint / "manifest.json").read_text())["checksums"] == manifest.checksums
