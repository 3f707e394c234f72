"""ZeRO-3 training end to end, as a user runs it (`python -m deco.pipeline.cli ...` subprocesses):
2 ranks over gloo, data streamed from and checkpoints written to moto's S3 server on 127.0.0.1.

One uninterrupted reference run (2 ranks, 12 steps, a checkpoint every 4) is the yardstick for:
partitioning and a falling loss; the checkpoint layout and pruning; a run killed with SIGKILL after
a checkpoint and resumed with `--resume auto` (bit for bit, same samples); elastic resume 2 -> 1 -> 2
ranks (torchrun; our launcher, stopped by SIGTERM; the deepspeed launcher); export then
`deco sample`; a corrupt checkpoint.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
import torch

from deco.data.object_store import join, open_store
from deco.pipeline.checkpoint_manifest import CheckpointRef, read_manifest

from train_helpers import (ROOT, TINY_CPU, checkpoint_tensors, last_per_step, local_checkpoint, read_jsonl, run_deco,
                           start_deco, upload_dir, write_mds)

SAMPLES = 80          # 10 global batches of 8: steps 11-12 are the second epoch
STEPS = 12
COMMON = ["--set", "logging.wandb=false", "--set", "logging.sample_every=0", "--set", "logging.record_sample_ids=true",
          "--set", "data.num_workers=1", "--set", "global_batch=8", "--set", "checkpoint.keep_last=2",
          "--set", "ema.decay=0.9", "--set", "logging.console_every=4"]


@pytest.fixture(scope="module")
def bucket(s3_server):
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="train-resume")
    return "s3://train-resume"


@pytest.fixture(scope="module")
def data_uri(tmp_path_factory, bucket):
    local = tmp_path_factory.mktemp("shards")
    write_mds(local, SAMPLES, 32, seed=0)
    upload_dir(local / "32", f"{bucket}/shards/32")
    return f"{bucket}/shards"


def train(run_dir: Path, stage: str, data: str, *extra: str, nproc: int | None = 2, steps: int = STEPS):
    args = ["train", "--config", str(TINY_CPU), "--run-dir", str(run_dir), "--data", data, "--max-steps", str(steps),
            "--checkpoint-every", "4", "--set", f"checkpoint.uri={stage}", *COMMON, *extra]
    if nproc:
        args += ["--nproc", str(nproc)]
    return args


def history(run_dir: Path) -> tuple[dict, dict]:
    return last_per_step(read_jsonl(run_dir / "metrics.jsonl")), last_per_step(read_jsonl(run_dir / "samples.jsonl"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, bucket, data_uri):
    run_dir = tmp_path_factory.mktemp("reference")
    stage = f"{bucket}/reference"
    result = run_deco(*train(run_dir, stage, data_uri), timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics, samples = history(run_dir)
    return {"run_dir": run_dir, "stage": stage, "metrics": metrics, "samples": samples, "stdout": result.stdout}


def test_parameters_are_partitioned_over_the_ranks_and_the_loss_falls(reference):
    ranks = [json.loads(p.read_text()) for p in sorted((reference["run_dir"] / "ranks").glob("*.json"))]
    assert [r["rank"] for r in ranks] == [0, 1]
    total = ranks[0]["params_total"]
    assert total > 7_000_000
    for r in ranks:  # each rank holds about half of every parameter, not the whole model
        assert r["world_size"] == 2 and abs(r["params_local"] - total / 2) < r["tensors"]
    metrics = reference["metrics"]
    assert sorted(metrics) == list(range(1, STEPS + 1))
    first = sum(metrics[s]["loss"] for s in (1, 2, 3)) / 3
    last = sum(metrics[s]["loss"] for s in (STEPS - 2, STEPS - 1, STEPS)) / 3
    assert last < 0.85 * first
    record = metrics[STEPS]
    assert record["loss"] == pytest.approx(record["mse"] + record["freq"], rel=1e-5)
    assert record["grad_norm"] > 0 and record["lr"] == 1e-3 and record["samples_per_s"] > 0
    assert 0 <= record["data_wait_share"] < 1 and record["memory_gib"] > 0 and record["mfu"] is None  # CPU: no peak
    assert record["samples_seen"] == 8 * STEPS and "step 12/12 | loss" in reference["stdout"]


def test_every_sample_is_seen_once_per_epoch(reference):
    samples = reference["samples"]
    epoch = [i for step in range(1, 11) for i in samples[step]["ids"]]
    assert sorted(epoch) == [f"s{i:05d}" for i in range(SAMPLES)]
    assert all(len(samples[step]["ids"]) == 8 for step in samples)


def test_checkpoints_follow_the_layout_and_only_the_last_two_are_kept(reference):
    stage = reference["stage"]
    keys = list(open_store(stage).list("checkpoints"))
    assert {k.split("/")[1] for k in keys} == {"step_00000008", "step_00000012"}
    manifest = read_manifest(join(stage, "checkpoints", "step_00000012"))
    assert manifest.step == 12 and manifest.world_size == 2
    assert set(manifest.files) == {
        "deepspeed/zero_pp_rank_0_mp_rank_00_model_states.pt", "deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "deepspeed/zero_pp_rank_1_mp_rank_00_model_states.pt", "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "ema/rank_00000-of-00002.safetensors", "ema/rank_00001-of-00002.safetensors",
        "rng/rank_00000.json", "rng/rank_00001.json", "loader.json", "trainer.json", "config.yaml"}
    loader = json.loads(open_store(join(stage, "checkpoints", "step_00000012")).get_bytes("loader.json"))
    assert loader["epoch"] == 1 and loader["sample_in_epoch"] == 16 and loader["num_canonical_nodes"] == 1


def test_run_killed_after_a_checkpoint_resumes_bit_for_bit(reference, bucket, data_uri, tmp_path):
    stage = f"{bucket}/killed"
    proc = start_deco(*train(tmp_path, stage, data_uri), log_path=tmp_path / "killed.log")
    first = open_store(join(stage, "checkpoints", "step_00000004"))
    deadline = time.monotonic() + 300
    while not first.exists("manifest.json"):
        assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job, launcher and ranks, as a node failure would
    proc.wait()
    killed_at = max(last_per_step(read_jsonl(tmp_path / "metrics.jsonl")))
    assert killed_at < STEPS

    result = run_deco(*train(tmp_path, stage, data_uri, "--resume", "auto"), timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "resumed from s3://train-resume/killed/checkpoints/step_0000000" in result.stdout
    metrics, samples = history(tmp_path)
    reference_metrics, reference_samples = reference["metrics"], reference["samples"]
    assert sorted(metrics) == list(range(1, STEPS + 1))
    assert [metrics[s]["loss_exact"] for s in metrics] == [reference_metrics[s]["loss_exact"] for s in metrics]
    assert [samples[s]["ids"] for s in samples] == [reference_samples[s]["ids"] for s in samples]
    final, ref_final = (checkpoint_tensors(join(s, "checkpoints", "step_00000012"), tmp_path / name)
                        for s, name in ((stage, "k"), (reference["stage"], "r")))
    for kind in ("weights", "exp_avg", "exp_avg_sq", "ema"):
        assert all(torch.equal(final[kind][n], ref_final[kind][n]) for n in ref_final[kind]), kind


def test_elastic_resume_two_to_one_to_two_ranks(reference, data_uri, tmp_path):
    """2 ranks -> 1 rank (torchrun, then our launcher until SIGTERM) -> 2 ranks (deepspeed
    launcher): the same samples every step; the same weights, Adam state and EMA after a restore."""
    stage = str(tmp_path / "stage")
    source = join(reference["stage"], "checkpoints", "step_00000008")
    # Restore the 2-rank checkpoint on 1 rank (under torchrun) and save it again, training nothing.
    result = run_module("torch.distributed.run", "--nproc_per_node", "1", "-m", "deco.pipeline.cli",
                        *train(tmp_path / "c1", stage, data_uri, "--resume", source, nproc=None, steps=8))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "written by 2 ranks, now 1" in result.stdout
    two, one = (checkpoint_tensors(uri, tmp_path / name) for uri, name in
                ((source, "two"), (join(stage, "checkpoints", "step_00000008"), "one")))
    assert (two["world_size"], one["world_size"]) == (2, 1)
    for kind in ("weights", "exp_avg", "exp_avg_sq", "ema"):
        assert two[kind].keys() == one[kind].keys()
        assert all(torch.equal(two[kind][n], one[kind][n]) for n in two[kind]), kind
    assert torch.equal(two["adam_step"]["state"]["step"], one["adam_step"]["state"]["step"])

    # One rank under our launcher, told to stop (SIGTERM) as soon as it is ready: it checkpoints the
    # step it is on and exits 143.
    log = tmp_path / "c2.log"
    proc = start_deco(*train(tmp_path / "c2", stage, data_uri, "--resume", "auto", nproc=1), log_path=log)
    deadline = time.monotonic() + 300
    while "ready in" not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 143, log.read_text()[-3000:]
    stopped = max(history(tmp_path / "c2")[0])
    assert stopped < STEPS and f"stopped by SIGTERM at step {stopped}; checkpoint saved" in log.read_text()
    assert "resumed from " + join(stage, "checkpoints", "step_00000008") in log.read_text()
    assert read_manifest(join(stage, "checkpoints", f"step_{stopped:08d}")).world_size == 1

    # An unfinished checkpoint (no manifest) newer than the complete one is ignored, then pruned.
    partial = Path(stage) / "checkpoints" / "step_00000011"
    (partial / "deepspeed").mkdir(parents=True)
    (partial / "deepspeed" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"half written")

    # 1 -> 2 ranks through the deepspeed launcher (`deco launch` resumes with --resume auto).
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    launch = ["launch", "--hostfile", str(hostfile), "--config", str(TINY_CPU), "--run-dir", str(tmp_path / "d"),
              "--set", f"checkpoint.uri={stage}", "--set", f"data.streams=[{{uri: '{data_uri}'}}]",
              "--set", f"max_steps={STEPS}", "--set", "checkpoint.every=4", *COMMON]
    result = run_deco(*launch, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"step_{stopped:08d} (step {stopped}, written by 1 ranks, now 2)" in result.stdout
    assert not partial.exists()

    reference_metrics, reference_samples = reference["metrics"], reference["samples"]
    for run in ("c2", "d"):
        metrics, samples = history(tmp_path / run)
        for step in metrics:
            assert samples[step]["ids"] == reference_samples[step]["ids"], (run, step)
            # Same samples, noise and weights; only the order of float sums differs between world sizes.
            assert metrics[step]["loss"] == pytest.approx(reference_metrics[step]["loss"], rel=1e-4), (run, step)
    assert sorted(history(tmp_path / "c2")[0]) + sorted(history(tmp_path / "d")[0]) == list(range(9, STEPS + 1))
    final, ref_final = (checkpoint_tensors(join(s, "checkpoints", f"step_{STEPS:08d}"), tmp_path / name)
                        for s, name in ((stage, "f"), (reference["stage"], "rf")))
    assert final["world_size"] == 2
    for kind in ("weights", "exp_avg", "ema"):
        for name, tensor in ref_final[kind].items():
            torch.testing.assert_close(final[kind][name], tensor, rtol=1e-3, atol=2e-5, msg=f"{kind} {name}")


def run_module(module: str, *args: str, timeout: float = 400):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}, cwd=ROOT)


def test_export_then_sample_from_the_exported_weights(reference, tmp_path):
    from safetensors.torch import load_file

    from deco.pipeline.export import export_checkpoint
    from deco.pipeline.weights import load_weights, read_metadata

    ema_path = tmp_path / "ema.safetensors"
    result = run_deco("export", "--checkpoint", reference["stage"], "--out", str(ema_path), "--ema")  # newest
    assert result.returncode == 0, result.stderr
    assert json.loads(read_metadata(ema_path)["deco.step"]) == STEPS
    model, text_cfg = load_weights(ema_path)
    assert text_cfg.path == "minilm" and model.repa_projector is None

    newest = CheckpointRef(STEPS, join(reference["stage"], "checkpoints", f"step_{STEPS:08d}"))
    raw = load_file(str(export_checkpoint(newest.uri, tmp_path / "raw.safetensors", ema=False)))
    state = checkpoint_tensors(newest.uri, tmp_path / "ckpt")
    assert raw.keys() == state["weights"].keys()
    assert all(torch.equal(raw[k], state["weights"][k]) for k in raw)
    ema = load_file(str(ema_path))
    assert all(torch.equal(ema[k], state["ema"][k]) for k in ema)
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)
    # DeepSpeed's own converter agrees with ours (our reader never unpickles: it is the one we use).
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    theirs = get_fp32_state_dict_from_zero_checkpoint(str(local_checkpoint(newest.uri, tmp_path / "ckpt")), tag="deepspeed")
    assert all(torch.equal(theirs[k].float(), raw[k]) for k in raw)

    grid = tmp_path / "grid.png"
    result = run_deco("sample", "--weights", str(ema_path), "--prompt", "a photo of a red circle", "--n", "4",
                      "--steps", "3", "--out", str(grid))
    assert result.returncode == 0, result.stderr
    from PIL import Image

    assert Image.open(grid).size == (2 * 34 + 2, 2 * 34 + 2)


def test_a_corrupt_checkpoint_fails_with_a_clear_error(reference, tmp_path):
    stage = tmp_path / "stage"
    shutil.copytree(local_checkpoint(join(reference["stage"], "checkpoints", "step_00000008"), tmp_path / "c8"),
                    stage / "checkpoints" / "step_00000008")
    newest = stage / "checkpoints" / "step_00000012"
    newest.mkdir(parents=True)
    (newest / "manifest.json").write_text('{"step": 12, "world_size": 2, "files": {"loader.json": 12')
    args = ["train", "--config", str(TINY_CPU), "--run-dir", str(tmp_path / "run"), "--resume", "auto",
            "--set", f"checkpoint.uri={stage}", "--nproc", "2"]
    result = run_deco(*args)
    assert result.returncode == 2 and "step_00000012/manifest.json is corrupt" in result.stderr
    assert "Traceback" not in result.stderr
    (newest / "manifest.json").write_text(json.dumps({"step": 12, "world_size": 2, "files": {"loader.json": 12}}))
    result = run_deco(*args)
    assert result.returncode == 2 and "listed files missing" in result.stderr
    result = run_deco("export", "--checkpoint", str(newest), "--out", str(tmp_path / "x.safetensors"))
    assert result.returncode == 2 and "corrupt" in result.stderr
