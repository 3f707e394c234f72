"""ZeRO-3 training as 2 nodes x 1 rank with no shared filesystem, started the way clusters start it.

Each "node" is a process tree on this machine with its own working directory, TMPDIR, run directory
(logs only), shard cache and /dev/shm (a private mount namespace: streaming coordinates the ranks of
a node through shared memory named by a per-host registry, which two nodes on one host would
share). Data and checkpoints live only in S3 (moto's server on 127.0.0.1).

- torchrun per node, c10d rendezvous on node 0 (what the sbatch script of `deco launch --slurm`
  runs; --node-rank is passed as well, torchrun ignores it under c10d). Each node's agent announces
  its own address (--local-addr 127.0.0.1 / 127.0.0.2), which orders the ranks: rank 0 on node 0.
- the deepspeed launcher with a 2-host hostfile: its ssh/pdsh fan-out cannot run here (no pdsh, no
  second host), so each node runs the launcher itself (`--no_ssh --node_rank N`), as on clusters
  without passwordless ssh.

One uninterrupted reference run (6 steps, a checkpoint every 2, one epoch of 48 samples) is the
yardstick for: streaming seeing two nodes; node 1 killed with SIGKILL after a checkpoint (node 0
fails with one line naming the lost rank), then both nodes rerun with `--resume auto` (bit for bit,
same samples); the step-4 checkpoint resumed on one node (every sample of the epoch exactly once).
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3
import psutil
import pytest

from deco.data.object_store import join, open_store

from train_helpers import TINY_CPU, last_per_step, read_jsonl, upload_dir, write_mds


def _private_shm_works() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "--", "sh", "-c",
                            "mount -t tmpfs -o size=1m deco-probe /dev/shm"], capture_output=True)
    return probe.returncode == 0


def cluster(test):
    """A test that runs simulated nodes."""
    skip = pytest.mark.skipif(not _private_shm_works(),
                              reason="needs `unshare -m` (root) to give each simulated node its own /dev/shm")
    return pytest.mark.cluster(skip(test))

SAMPLES = 48          # 6 global batches of 8: one epoch
STEPS = 6
EVERY = 2
COMMON = ["--max-steps", str(STEPS), "--checkpoint-every", str(EVERY),
          "--set", "logging.wandb=false", "--set", "logging.sample_every=0", "--set", "logging.record_sample_ids=true",
          "--set", "data.num_workers=1", "--set", "global_batch=8", "--set", "checkpoint.keep_last=0",
          "--set", "logging.console_every=1", "--set", "engine.precision=fp32"]
# A node's private /dev/shm, then the launcher: what the node's job step runs.
PRIVATE_SHM = ["unshare", "-m", "--propagation", "private", "--", "sh", "-c",
               'mount -t tmpfs -o size=1g deco-shm /dev/shm && exec "$@"', "node"]
TORCHRUN_REPORT = re.compile(r"^E\d{4} .*torch/distributed/elastic/multiprocessing/api\.py:\d+\] failed \(exitcode")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Node:
    """One simulated node: its directories, environment, and the launcher process tree it runs."""

    def __init__(self, root: Path, index: int):
        self.index, self.root = index, root / f"node{index}"
        self.cwd, self.tmp, self.run_dir, self.cache = (self.root / name for name in ("cwd", "tmp", "run", "cache"))
        for path in (self.cwd, self.tmp, self.run_dir, self.cache):
            path.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None
        self.attempt = 0

    def train_args(self, stage: str, data: str, *extra: str) -> list[str]:
        return ["train", "--config", str(TINY_CPU), "--run-dir", str(self.run_dir), "--data", data,
                "--set", f"checkpoint.uri={stage}", "--set", f"data.cache_dir={self.cache}", *COMMON, *extra]

    def start(self, launcher: list[str]) -> None:
        self.attempt += 1
        self.out, self.err = (self.root / f"{self.attempt}.{name}" for name in ("stdout", "stderr"))
        env = {**os.environ, "TMPDIR": str(self.tmp), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
               "WANDB_MODE": "offline"}
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen([*PRIVATE_SHM, *launcher], stdout=out, stderr=err, env=env, cwd=self.cwd,
                                         start_new_session=True)

    def torchrun(self, port: int, rdzv_id: str, args: list[str], nnodes: int = 2, nproc: int = 1) -> None:
        self.start([sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes),
                    "--nproc-per-node", str(nproc), "--node-rank", str(self.index), "--rdzv-backend", "c10d",
                    "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", rdzv_id,
                    "--rdzv-conf", f"is_host={int(self.index == 0)}", "--local-addr", f"127.0.0.{self.index + 1}",
                    "-m", "deco.pipeline.cli", *args])

    def deepspeed(self, port: int, hostfile: Path, args: list[str]) -> None:
        self.start([sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--no_ssh",
                    "--node_rank", str(self.index), "--master_addr", "127.0.0.1", "--master_port", str(port),
                    "--no_local_rank", "--module", "deco.pipeline.cli", *args])

    def wait(self, timeout: float = 300) -> int:
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        """SIGKILL to the whole node: launcher, ranks (torchrun starts each in a session of its own)
        and their loader workers."""
        top = psutil.Process(self.proc.pid)
        tree = [top, *top.children(recursive=True)]
        for proc in tree:
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        self.proc.wait()

    def logs(self) -> str:
        return (f"--- node {self.index} stdout\n{self.out.read_text()[-3000:]}\n"
                f"--- stderr\n{self.err.read_text()[-3000:]}")


def run_nodes(nodes: list[Node], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    for node in nodes:
        code = node.wait(timeout=max(1.0, deadline - time.monotonic()))
        assert code == 0, "\n".join(n.logs() for n in nodes)


def history(run_dir: Path) -> tuple[dict, dict]:
    return last_per_step(read_jsonl(run_dir / "metrics.jsonl")), last_per_step(read_jsonl(run_dir / "samples.jsonl"))


def loader_state(stage: str, step: int) -> dict:
    return json.loads(open_store(join(stage, "checkpoints", f"step_{step:08d}")).get_bytes("loader.json"))


@pytest.fixture(scope="module")
def bucket(s3_server):
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="cluster-train")
    return "s3://cluster-train"


@pytest.fixture(scope="module")
def data_uri(tmp_path_factory, bucket):
    local = tmp_path_factory.mktemp("shards")
    write_mds(local, SAMPLES, 32, seed=0)
    upload_dir(local / "32", f"{bucket}/shards/32")
    return f"{bucket}/shards"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, bucket, data_uri):
    root = tmp_path_factory.mktemp("reference")
    stage = f"{bucket}/reference"
    nodes = [Node(root, 0), Node(root, 1)]
    port = free_port()
    for node in nodes:
        node.torchrun(port, "reference", node.train_args(stage, data_uri))
    run_nodes(nodes)
    metrics, samples = history(nodes[0].run_dir)
    return {"nodes": nodes, "stage": stage, "metrics": metrics, "samples": samples}


@cluster
def test_two_nodes_each_stream_their_share_and_streaming_sees_two_nodes(reference):
    nodes = reference["nodes"]
    # Ranks follow the nodes' addresses: rank 0 on node 0, rank 1 on node 1; rank 0 logs.
    assert [[p.name for p in (n.run_dir / "ranks").glob("*.json")] for n in nodes] == [["rank_00000.json"],
                                                                                        ["rank_00001.json"]]
    assert not (nodes[1].run_dir / "metrics.jsonl").exists()
    # streaming counted two physical nodes and fixed the canonical node count at 2 (kept for resumes).
    for step in range(EVERY, STEPS + 1, EVERY):
        state = loader_state(reference["stage"], step)
        assert (state["num_canonical_nodes"], state["initial_physical_nodes"]) == (2, 2), state
    # Each node downloaded into its own cache only the shards its node partition reads.
    shards = [{p.name for p in n.cache.rglob("shard.*.mds")} for n in nodes]
    assert shards[0] != shards[1] and len(shards[0] | shards[1]) == 4, shards
    samples = reference["samples"]
    assert sorted(i for step in range(1, STEPS + 1) for i in samples[step]["ids"]) == \
        [f"s{i:05d}" for i in range(SAMPLES)]
    assert sorted(reference["metrics"]) == list(range(1, STEPS + 1))


@cluster
def test_a_node_killed_mid_run_is_named_by_the_survivor_and_both_nodes_resume_bit_for_bit(
        reference, bucket, data_uri, tmp_path):
    stage = f"{bucket}/killed"
    nodes = [Node(tmp_path, 0), Node(tmp_path, 1)]
    port = free_port()
    for node in nodes:
        node.torchrun(port, "killed", node.train_args(stage, data_uri))
    first = open_store(join(stage, "checkpoints", f"step_{EVERY:08d}"))
    deadline = time.monotonic() + 300
    while not first.exists("manifest.json"):
        assert all(n.proc.poll() is None for n in nodes), "\n".join(n.logs() for n in nodes)
        assert time.monotonic() < deadline
        time.sleep(0.05)
    nodes[1].kill()
    killed = time.monotonic()
    code = nodes[0].wait(timeout=120)  # gloo notices at once: no hang until a collective timeout
    assert code != 0 and time.monotonic() - killed < 60, nodes[0].logs()

    # Node 0's stderr: our ranks' log lines, then torchrun's own failure report (an "E..." log line
    # and its ChildFailedError traceback and summary), which we do not control.
    lines = nodes[0].err.read_text().splitlines()
    cut = next((i for i, line in enumerate(lines) if TORCHRUN_REPORT.match(line)), len(lines))
    ours, torchrun = lines[:cut], "\n".join(lines[cut:])
    errors = [line for line in ours if line.startswith("deco: ")]
    assert len(errors) == 1, nodes[0].logs()
    assert re.fullmatch(r"deco: error: lost contact with rank 1 \(node 1, host \S+\) during "
                        r"(step [3-6]|the checkpoint of step \d): the process or its node is gone; "
                        r"rerun with --resume auto", errors[0]), errors[0]
    assert not any("Traceback" in line or line.startswith("[rank") for line in ours), nodes[0].logs()
    # torchrun's summary carries the same line (the worker's error file) instead of a docs link.
    assert "ChildFailedError" in torchrun and errors[0] in torchrun, torchrun
    assert re.search(r"exitcode\s*: 2 ", torchrun), torchrun  # the rank's: "deco: error:" said why
    killed_at = max(history(nodes[0].run_dir)[0])
    assert killed_at < STEPS

    # Both nodes again with --resume auto, through the deepspeed launcher and a 2-host hostfile.
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port = free_port()
    for node in nodes:
        node.deepspeed(port, hostfile, node.train_args(stage, data_uri, "--resume", "auto"))
    run_nodes(nodes)
    resumed = re.search(rf"resumed from {re.escape(stage)}/checkpoints/step_(\d{{8}}) \(step (\d+), written by 2 "
                        r"ranks, now 2\)", nodes[0].out.read_text())
    # Node 1 died right after the step-2 checkpoint: no later one can have been completed.
    assert resumed and int(resumed.group(2)) == EVERY, nodes[0].logs()
    assert loader_state(stage, STEPS)["num_canonical_nodes"] == 2
    metrics, samples = history(nodes[0].run_dir)
    assert sorted(metrics) == list(range(1, STEPS + 1))
    assert [metrics[s]["loss_exact"] for s in metrics] == [reference["metrics"][s]["loss_exact"] for s in metrics]
    assert [samples[s]["ids"] for s in samples] == [reference["samples"][s]["ids"] for s in samples]


@cluster
def test_resume_on_one_node_loses_and_repeats_no_sample(reference, bucket, data_uri, tmp_path):
    """The reference's step-4 checkpoint (2 nodes) resumed on one node of 2 local ranks: streaming
    keeps the 2 canonical nodes, so the epoch goes on with exactly the samples it had left."""
    stage = f"{bucket}/one-node"
    node = Node(tmp_path, 0)
    source = join(reference["stage"], "checkpoints", "step_00000004")
    node.torchrun(free_port(), "one-node", node.train_args(stage, data_uri, "--resume", source), nnodes=1, nproc=2)
    run_nodes([node])
    assert f"resumed from {source} (step 4, written by 2 ranks, now 2)" in node.out.read_text()
    state = loader_state(stage, STEPS)
    assert (state["num_canonical_nodes"], state["initial_physical_nodes"]) == (2, 2), state
    metrics, samples = history(node.run_dir)
    assert sorted(metrics) == [5, 6]
    reference_metrics, reference_samples = reference["metrics"], reference["samples"]
    epoch = [i for step in range(1, 5) for i in reference_samples[step]["ids"]] + \
        [i for step in (5, 6) for i in samples[step]["ids"]]
    assert sorted(epoch) == [f"s{i:05d}" for i in range(SAMPLES)]  # none lost, none repeated
    for step in (5, 6):
        assert samples[step]["ids"] == reference_samples[step]["ids"], step
        # Same samples, noise and weights; the ranks' shares of the batch may differ: float sums only.
        assert metrics[step]["loss"] == pytest.approx(reference_metrics[step]["loss"], rel=1e-4), step


def test_a_failed_collective_names_the_ranks_that_no_longer_answer(monkeypatch):
    """The survivor's side alone, on a made-up job of 2 nodes x 2 ranks: rank 1 answers, ranks 2-3
    (node 1) are gone."""
    from deco.pipeline.train import peers
    from deco.pipeline.train.peers import Peer, RankStatus, is_collective_failure, peer_failure

    monkeypatch.setattr(peers, "SURVIVOR_GRACE_S", 0.0)
    gloo = RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error "
                        "[127.0.0.1]:57050: Connection reset by peer. This is typically caused by a remote worker "
                        "hanging or bugs in the application. Check the logs of the remote worker before reporting "
                        "an error. GLHF!")
    assert is_collective_failure(gloo)
    assert not is_collective_failure(RuntimeError("read timed out")) and not is_collective_failure(ValueError("gloo"))
    # The launcher stopping a node's ranks kills their loader workers too: that error may surface
    # while gloo's unwinds; gloo's is the cause. An error raised `from None` over it is not.
    loader = RuntimeError("DataLoader worker (pid 21265) is killed by signal: Terminated. ")
    loader.__context__ = gloo
    assert peer_failure(loader) is gloo
    loader.__context__ = None
    assert peer_failure(loader) is loader
    config = ValueError("a config mistake")
    config.__context__, config.__suppress_context__ = gloo, True
    assert peer_failure(config) is None
    with socket.socket() as live:
        live.bind(("127.0.0.1", 0))
        live.listen()
        gone = ("127.0.0.1", free_port())  # nothing listens there any more
        table = [Peer(0, 0, "a", ("127.0.0.1", free_port())), Peer(1, 0, "a", live.getsockname()),
                 Peer(2, 1, "b", gone), Peer(3, 1, "b", gone)]
        err = RankStatus(0, 4, 2, activity="step 7", peers=table).lost(gloo)
        assert str(err) == ("lost contact with ranks 2-3 (node 1, host b) during step 7: the process or its "
                            "node is gone; rerun with --resume auto")
        assert err.report  # the lowest rank still answering says it
        err = RankStatus(1, 4, 2, activity="step 7", peers=table).lost(gloo)  # rank 0 is gone as well
        assert str(err).startswith("lost contact with rank 0 (node 0, host a); ranks 2-3 (node 1, host b) during")
        assert err.report
        table[0] = Peer(0, 0, "a", live.getsockname())
        err = RankStatus(1, 4, 2, activity="step 7", peers=table).lost(gloo)
        assert not err.report  # rank 0 answers: rank 0 says it
        everyone = [Peer(r, 0, "a", live.getsockname()) for r in range(2)]
        err = RankStatus(0, 2, 2, activity="the checkpoint of step 8", peers=everyone).lost(gloo)
        assert str(err) == ("a collective failed during the checkpoint of step 8 although every rank still answers "
                            "(Read error [127.0.0.1]:57050: Connection reset by peer); check the other ranks' logs, "
                            "then rerun with --resume auto")


def test_torchruns_failure_summary_shows_the_line(tmp_path, monkeypatch):
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from deco.pipeline.train.peers import tell_launcher

    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    line = "deco: error: lost contact with rank 1 (node 1, host b) during step 3: the process or its node is gone"
    tell_launcher(line)
    failure = ProcessFailure(local_rank=0, pid=1, exitcode=2, error_file=str(error_file))
    assert f"traceback : {line}\n" in ChildFailedError("deco.pipeline.cli", {0: failure}).format_msg()
