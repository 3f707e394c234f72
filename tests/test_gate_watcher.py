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
from deco.pipeline.evaluate import watcher as watcher_module
from deco.pipeline.evaluate.watcher import CLAIMS, GateWatcher
from deco.data.checksum import file_checksum
from deco.pipeline.train.manifest import CheckpointRef, Manifest, write_manifest
from deco.pipeline.evaluate.gate import VERDICT, create_exclusive, read_promoted, work_dir
from deco.pipeline.evaluate.gate_config import load_gate_config
from geneval_helpers import ANY_SCORE, FAST_GATE, ROOT, read_store_json, tiny_weights, write_checkpoint


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


# Cheapest real evaluation: 6 prompts x 1 image, 1 sampler step, no reports beyond results.
CHEAP_GATE = ANY_SCORE + ["weights.source=file", "report.wandb=false", "report.html=false", "synthetic_per_task=1",
              "generation.images_per_prompt=1", "generation.sampler.steps=1", "generation.batch_size=16", "poll_s=0.2"]


def watch_command(stage: str, overrides: list[str], *extra: str) -> list[str]:
    return [sys.executable, "-m", "deco.pipeline.cli", "gate", "watch", "--stage", "demo_32", "--stage-uri", stage,
            *extra] + [f"--set={o}" for o in overrides]


@pytest.mark.parametrize("backend,watchers", [("local", 3), ("s3", 4)])
def test_concurrent_watchers_on_one_stage_gate_each_checkpoint_exactly_once(backend, watchers, tmp_path, request):
    """Several watcher processes started at once on one host with their default identities (as a new
    user would): each checkpoint is evaluated once, by one claim, and none is rejected as unevaluable."""
    stage = str(tmp_path / "stage") if backend == "local" else request.getfixturevalue("s3_bucket") + "/stage_32"
    weights = tiny_weights(tmp_path / "tiny.safetensors")
    steps = (10, 20, 30, 40)
    for step in steps:
        write_checkpoint(stage, step, weights)
    write_checkpoint(stage, 50, weights, manifest=False)              # unfinished: never looked at
    overrides = CHEAP_GATE + [f"work_dir={tmp_path / 'work'}"]        # one host: one scratch folder, as users would
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # 2 CPU cores
    procs = [subprocess.Popen(watch_command(stage, overrides, "--max-polls", "3"), cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(watchers)]
    outs = [p.communicate(timeout=400) for p in procs]   # a hang guard: ~30 s on 2 idle cores
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    reported = sorted(json.loads(line)["step"] for out, _ in outs for line in out.splitlines())
    assert reported == list(steps), "\n".join(err[-2000:] for _, err in outs)   # each verdict made (and shown) once

    uri = {step: f"{stage}/checkpoints/step_{step:08d}" for step in (*steps, 50)}
    attempts = {step: [(c["attempt"], c["state"]) for c in claims(uri[step])] for step in (*steps, 50)}
    assert attempts == {**{step: [(1, "done")] for step in steps}, 50: []}
    for step in steps:
        verdict = read_store_json(uri[step], VERDICT)
        (claim,) = claims(uri[step])
        assert verdict["error"] is None and not any("attempts failed" in r for r in verdict["reasons"])
        assert verdict["evaluation"]["attempt"] == 1 and verdict["evaluation"]["watcher_id"] == claim["watcher_id"]
    ids = {c["watcher_id"] for step in steps for c in claims(uri[step])}
    assert all(i.startswith("demo_32@") for i in ids)
    # Nothing is left to do; a poll also completes a promotion two concurrent ones may have left behind.
    cfg = load_gate_config("demo_32", overrides + [f"stage_uri={stage}"])
    assert GateWatcher(cfg).poll_once() == [] and sum(len(claims(uri[s])) for s in steps) == len(steps)
    assert read_promoted(stage)["step"] == 40


def test_a_stalled_watcher_taken_over_records_nothing(tmp_path):
    """A watcher process frozen (SIGSTOP) past lease_s mid-evaluation: another watcher takes the
    checkpoint over as attempt 2 and records its verdict; the frozen one, resumed, drops its result."""
    stage = str(tmp_path / "stage")
    checkpoint = write_checkpoint(stage, 10, tiny_weights(tmp_path / "w.safetensors"))
    overrides = CHEAP_GATE + ["lease_s=6"]          # frozen within ~20 ms of its claim: seconds before its verdict
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    stalled = subprocess.Popen(watch_command(stage, overrides + [f"work_dir={tmp_path / 'a'}"], "--once"), cwd=ROOT,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not claims(checkpoint):
        assert stalled.poll() is None, stalled.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the watcher never claimed step 10"
        time.sleep(0.02)
    stalled.send_signal(signal.SIGSTOP)
    try:
        (frozen,) = claims(checkpoint)
        assert frozen["state"] == "running" and frozen["pid"] == stalled.pid
        cfg = load_gate_config("demo_32", overrides + [f"stage_uri={stage}", f"work_dir={tmp_path / 'b'}"])
        other = GateWatcher(cfg)
        assert other.poll_once() == []                               # its heartbeat is fresh: left alone
        time.sleep(max(0.0, frozen["heartbeat_unix"] + 6.2 - time.time()))
        (verdict,) = other.poll_once()                               # stale: taken over as attempt 2
        assert verdict["evaluation"] == {**verdict["evaluation"], "attempt": 2, "watcher_id": other.id}
    finally:
        stalled.send_signal(signal.SIGCONT)
    out, err = stalled.communicate(timeout=120)
    assert stalled.returncode == 0, err[-3000:]
    assert out == "" and "taken over" in err                         # it reports and records nothing
    assert [(c["attempt"], c["state"], c["watcher_id"]) for c in claims(checkpoint)] == [
        (1, "superseded", frozen["watcher_id"]), (2, "done", other.id)]
    assert read_store_json(checkpoint, VERDICT) == verdict and read_promoted(stage)["step"] == 10
    assert other.poll_once() == [] and len(claims(checkpoint)) == 2


def test_a_watcher_id_is_a_label_not_ownership_and_gone_or_interrupted_holders_are_replaced_at_once(tmp_path):
    stage = str(tmp_path / "stage")
    checkpoint = write_checkpoint(stage, 10, tiny_weights(tmp_path / "w.safetensors"))
    open_store(checkpoint).delete_prefix("weights.safetensors")
    write_manifest(checkpoint, Manifest(step=10, world_size=1, files={}))   # complete, but no weights: fails fast
    store = open_store(checkpoint)
    cfg = load_gate_config("demo_32", FAST_GATE + [f"stage_uri={stage}", f"work_dir={tmp_path / 'w'}",
                                                   "lease_s=600", "max_attempts=5"])
    # A live process (this one) holds attempt 1 under the id "w": another watcher given the same id leaves it.
    live = {"watcher_id": "w", "token": "t", "attempt": 1, "state": "running", **watcher_module._PROCESS,
            "heartbeat_unix": time.time()}
    store.put_bytes(f"{CLAIMS}/0001.json", json.dumps(live).encode())
    assert GateWatcher(cfg, watcher_id="w").poll_once() == [] and len(claims(checkpoint)) == 1
    # Its process is gone (a watcher killed on this host): taken over at once, heartbeat fresh or not.
    gone = subprocess.Popen(["true"])
    gone.wait()
    store.put_bytes(f"{CLAIMS}/0001.json", json.dumps({**live, "pid": gone.pid}).encode())
    assert GateWatcher(cfg, watcher_id="w").poll_once() == []
    assert [(c["attempt"], c["state"]) for c in claims(checkpoint)] == [(1, "running"), (2, "failed")]

    def interrupted(ref):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):                                 # Ctrl-C / SIGTERM mid-evaluation
        GateWatcher(cfg, weights_for=interrupted).poll_once()
    assert claims(checkpoint)[-1]["state"] == "interrupted"
    assert GateWatcher(cfg).poll_once() == []                              # redone at once, not after lease_s
    assert [(c["attempt"], c["state"]) for c in claims(checkpoint)] == [
        (1, "running"), (2, "failed"), (3, "interrupted"), (4, "failed")]
