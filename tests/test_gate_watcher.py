"""The gate watcher gates each complete checkpoint exactly once, with its state in object storage:
across a real SIGKILL and restart mid-evaluation, claims held by other watchers, failures and
crashes between the verdict and the promotion."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from deco.data.object_store import open_store
from deco.pipeline.evaluate.watcher import CLAIMS, GateWatcher
from deco.data.checksum import file_checksum
from deco.pipeline.train.manifest import CheckpointRef, Manifest, write_manifest
from deco.pipeline.evaluate.gate import VERDICT, create_exclusive, read_promoted, work_dir
from deco.pipeline.evaluate.gate_config import load_gate_config
from geneval_helpers import FAST_GATE, ROOT, read_store_json, tiny_weights, write_checkpoint


def claims(checkpoint_uri: str) -> list[dict]:
    store = open_store(checkpoint_uri)
    return [json.loads(store.get_bytes(k)) for k in store.list(CLAIMS)]


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_create_exclusive_lets_exactly_one_writer_win(backend, tmp_path, request):
    uri = str(tmp_path) if backend == "local" else request.getfixturevalue("s3_bucket") + "/x"
    store = open_store(uri)
    assert create_exclusive(store, "a/claim.json", b"first") is True
    assert create_exclusive(store, "a/claim.json", b"second") is False
    assert store.get_bytes("a/claim.json") == b"first" and list(store.list("a")) == ["a/claim.json"]


def test_watcher_killed_mid_evaluation_and_restarted_gates_each_checkpoint_once(s3_bucket, tmp_path):
    weights = tiny_weights(tmp_path / "tiny.safetensors")
    stage = f"{s3_bucket}/demo/stage_32"
    for step in (10, 20):
        write_checkpoint(stage, step, weights)
    write_checkpoint(stage, 30, weights, manifest=False)          # still being written by the trainer
    # One prompt per model call, so generation of a checkpoint takes long enough to be cut.
    overrides = FAST_GATE + [f"work_dir={tmp_path / 'work'}", "synthetic_per_task=1", "generation.batch_size=2",
                             "generation.sampler.steps=8"]
    cfg = load_gate_config("demo_32", overrides)
    command = [sys.executable, "-m", "deco.pipeline.cli", "gate", "watch", "--stage", "demo_32", "--stage-uri", stage,
               "--watcher-id", "watcher-1"] + [f"--set={o}" for o in overrides]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    step20 = f"{stage}/checkpoints/step_00000020"
    first_folder = work_dir(cfg, CheckpointRef(20, step20)) / "images" / "00000" / "metadata.jsonl"

    watcher = subprocess.Popen(command + ["--max-polls", "100000"], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not first_folder.exists():  # step 10 done, step 20 claimed and half generated
        assert watcher.poll() is None, watcher.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the watcher never reached step 20"
        time.sleep(0.02)
    watcher.send_signal(signal.SIGKILL)
    out, _ = watcher.communicate(timeout=30)
    assert watcher.returncode == -signal.SIGKILL
    assert [json.loads(line)["step"] for line in out.splitlines()] == [10]
    assert read_store_json(step20, VERDICT) is None
    assert [(c["attempt"], c["state"], c["watcher_id"]) for c in claims(step20)] == [(1, "running", "watcher-1")]

    # Meanwhile the trainer finishes step 30, and a corrupt 40 and an unfinished 50 appear.
    write_manifest(f"{stage}/checkpoints/step_00000030",
                   Manifest(step=30, world_size=1, files={"weights.safetensors": weights.stat().st_size},
                            checksums={"weights.safetensors": file_checksum(weights)}))
    write_checkpoint(stage, 40, weights, missing_file=True)
    write_checkpoint(stage, 50, weights, manifest=False)
    restarted = subprocess.run(command + ["--once"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    made = {json.loads(line)["step"]: json.loads(line) for line in restarted.stdout.splitlines()}
    assert sorted(made) == [20, 30, 40]                               # 10 is not repeated, 50 not touched
    assert made[40]["decision"] == "reject" and "corrupt checkpoint" in made[40]["reasons"][0]

    attempts = {step: [(c["attempt"], c["state"]) for c in claims(f"{stage}/checkpoints/step_{step:08d}")]
                for step in (10, 20, 30, 40, 50)}
    assert attempts == {10: [(1, "done")], 20: [(1, "running"), (2, "done")], 30: [(1, "done")], 40: [], 50: []}
    verdicts = {step: read_store_json(f"{stage}/checkpoints/step_{step:08d}", VERDICT) for step in (10, 20, 30, 40, 50)}
    assert [verdicts[s]["evaluation"]["attempt"] for s in (10, 20, 30, 40)] == [1, 2, 1, 0] and verdicts[50] is None
    assert verdicts[20]["generation"]["kept"] >= 1     # the prompt folders finished before the kill were kept
    assert read_promoted(stage)["step"] == 30 and read_promoted(stage)["previous"]["step"] == 20

    # A further poll (another watcher process, same storage) finds nothing to do.
    cfg.stage_uri = stage
    assert GateWatcher(cfg, watcher_id="watcher-1").poll_once() == [] and len(claims(step20)) == 2


def test_claims_of_live_watchers_are_left_stale_ones_taken_and_failures_bounded(tmp_path):
    stage = str(tmp_path / "stage")
    checkpoint = write_checkpoint(stage, 10, tiny_weights(tmp_path / "w.safetensors"))
    open_store(checkpoint).delete_prefix("weights.safetensors")
    write_manifest(checkpoint, Manifest(step=10, world_size=1, files={}))   # complete, but no weights to load
    store = open_store(checkpoint)
    other = {"watcher_id": "other", "token": "t", "attempt": 1, "state": "running", "heartbeat_unix": time.time()}
    store.put_bytes(f"{CLAIMS}/0001.json", json.dumps(other).encode())
    cfg = load_gate_config("demo_32", FAST_GATE + [f"stage_uri={stage}", f"work_dir={tmp_path / 'w'}",
                                                   "lease_s=60", "max_attempts=2"])
    watcher = GateWatcher(cfg, watcher_id="me")
    assert watcher.poll_once() == [] and len(claims(checkpoint)) == 1      # alive: left alone
    other["heartbeat_unix"] = time.time() - 120
    store.put_bytes(f"{CLAIMS}/0001.json", json.dumps(other).encode())
    assert watcher.poll_once() == []                                       # abandoned: taken over, and it fails
    assert [(c["attempt"], c["watcher_id"], c["state"]) for c in claims(checkpoint)] == [
        (1, "other", "running"), (2, "me", "failed")]
    assert "weights.safetensors" in claims(checkpoint)[1]["error"]
    (verdict,) = watcher.poll_once()                                       # attempts used up: rejected, not retried
    assert verdict["decision"] == "reject" and verdict["reasons"][0].startswith("2 evaluation attempts failed")
    assert watcher.poll_once() == [] and len(claims(checkpoint)) == 2 and read_promoted(stage) is None


def test_a_promotion_cut_short_by_a_crash_is_completed(tmp_path):
    stage = str(tmp_path / "stage")
    checkpoint = write_checkpoint(stage, 10, tiny_weights(tmp_path / "w.safetensors"))
    verdict = {"checkpoint": {"uri": checkpoint, "step": 10}, "decision": "promote",
               "scores": {"overall": 0.5, "tasks": {"colors": 0.5}}, "prompts": {"digest": "d"}}
    open_store(checkpoint).put_bytes(VERDICT, json.dumps(verdict).encode())   # verdict written, then the crash
    cfg = load_gate_config("demo_32", FAST_GATE + [f"stage_uri={stage}", f"work_dir={tmp_path / 'w'}"])
    assert GateWatcher(cfg, watcher_id="me").poll_once() == []
    assert read_promoted(stage)["checkpoint_uri"] == checkpoint and claims(checkpoint) == []
