"""Starting the ranks of a training job.

- `deco train --nproc N`: this process starts N local ranks itself, torchrun-style (MASTER_ADDR
  127.0.0.1, a free port, RANK / LOCAL_RANK / WORLD_SIZE / LOCAL_WORLD_SIZE), forwards SIGTERM and
  SIGINT to them, and stops the others when one fails.
- Under torchrun or the deepspeed launcher their environment is present and the process joins.
- Plain `deco train` is a one-rank job.
- `deco launch`: the multi-node command, for the deepspeed launcher with a hostfile or as an sbatch
  script (torchrun on every node, c10d rendezvous on the first).
"""
from __future__ import annotations

import ctypes
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# When one rank has failed the others cannot finish a collective: they get this long to exit on
# SIGTERM before SIGKILL. (A SIGTERM the launcher itself receives is forwarded, and the ranks take
# the time they need to write their checkpoint.)
FAILURE_GRACE_S = 30.0


@dataclass(frozen=True)
class DistWorld:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def joined_world() -> DistWorld | None:
    """The job this process was started into by torchrun / deepspeed / `--nproc`, if any."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    # The deepspeed launcher says LOCAL_SIZE; streaming reads LOCAL_WORLD_SIZE to count nodes.
    if "LOCAL_WORLD_SIZE" not in os.environ:
        os.environ["LOCAL_WORLD_SIZE"] = os.environ.get("LOCAL_SIZE", os.environ["WORLD_SIZE"])
    return DistWorld(rank=int(os.environ["RANK"]), local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                     world_size=int(os.environ["WORLD_SIZE"]), local_world_size=int(os.environ["LOCAL_WORLD_SIZE"]))


def single_process_world() -> DistWorld:
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})
    return DistWorld(rank=0, local_rank=0, world_size=1, local_world_size=1)


def _die_with_parent() -> None:
    """Linux: a rank receives SIGKILL when the launcher dies, so no orphan holds a port or shard."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def spawn_local(nproc: int, argv: list[str], env: dict[str, str] | None = None) -> int:
    """Run `argv` as `nproc` ranks of one job on this machine; returns the job's exit code."""
    port = free_port()
    threads = max(1, (os.cpu_count() or 1) // nproc)
    procs: list[subprocess.Popen] = []
    for rank in range(nproc):
        rank_env = {**os.environ, **(env or {}), "RANK": str(rank), "LOCAL_RANK": str(rank),
                    "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc),
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        rank_env.setdefault("OMP_NUM_THREADS", str(threads))  # ranks must not fight over cores
        procs.append(subprocess.Popen(argv, env=rank_env, preexec_fn=_die_with_parent))

    def forward(signum, _frame):
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _wait(procs)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _wait(procs: list[subprocess.Popen]) -> int:
    while True:
        codes = [p.poll() for p in procs]
        failed = [c for c in codes if c not in (None, 0)]
        if failed:
            # One rank is gone: the others would wait forever in their next collective.
            _stop(procs)
            return 128 - failed[0] if failed[0] < 0 else failed[0]  # killed by signal N: 128 + N
        if all(c == 0 for c in codes):
            return 0
        time.sleep(0.2)


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + FAILURE_GRACE_S
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def train_argv(config: str, run_dir: str = "", resume: str = "auto", overrides: list[str] = ()) -> list[str]:
    """The `deco train` arguments every rank of a multi-node job runs."""
    args = ["train", "--config", config]
    if run_dir:
        args += ["--run-dir", run_dir]
    if resume:
        args += ["--resume", resume]
    for item in overrides:
        args += ["--set", item]
    return args


def read_hostfile(hostfile: str) -> dict[str, int]:
    """deepspeed's hostfile: `host slots=N` per line, # comments."""
    path = Path(hostfile)
    if not path.is_file():
        raise FileNotFoundError(f"hostfile not found: {hostfile}")
    hosts = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].startswith("slots=") or not parts[1][6:].isdigit():
            raise ValueError(f"{hostfile}:{number}: expected 'hostname slots=N', got {line!r}")
        hosts[parts[0]] = int(parts[1][6:])
    if not hosts:
        raise ValueError(f"{hostfile} names no hosts")
    return hosts


def deepspeed_command(hostfile: str, train_args: list[str], master_port: int = 29500) -> list[str]:
    """The deepspeed launcher reads the hosts and slots from `hostfile` and starts every rank."""
    hosts = read_hostfile(hostfile)
    # `python -m deepspeed.launcher.runner` is the `deepspeed` command, without relying on PATH.
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", hostfile,
               "--master_port", str(master_port), "--no_local_rank"]
    if len(hosts) == 1 and next(iter(hosts)) in ("localhost", "127.0.0.1", socket.gethostname()):
        command += ["--no_ssh_check", "--master_addr", "127.0.0.1"]  # one local node: no ssh at all
    return command + ["--module", "deco.pipeline.cli", *train_args]


@dataclass(kw_only=True)
class SlurmJob:
    nodes: int
    gpus_per_node: int
    partition: str = ""
    time: str = ""                 # e.g. 48:00:00
    job_name: str = "deco-train"
    master_port: int = 29500
    signal_before_end_s: int = 300  # SIGTERM this long before the time limit: the run checkpoints


def sbatch_script(job: SlurmJob, train_args: list[str], run_dir: str) -> str:
    """One torchrun per node (c10d rendezvous on the first node), each starting gpus_per_node ranks."""
    if job.nodes < 1 or job.gpus_per_node < 1:
        raise ValueError("--nodes and --gpus-per-node must be at least 1")
    lines = ["#!/bin/bash", f"#SBATCH --job-name={job.job_name}", f"#SBATCH --nodes={job.nodes}",
             "#SBATCH --ntasks-per-node=1", f"#SBATCH --gpus-per-node={job.gpus_per_node}",
             f"#SBATCH --signal=TERM@{job.signal_before_end_s}", "#SBATCH --requeue",
             f"#SBATCH --output={run_dir}/slurm-%j.out"]
    if job.partition:
        lines.append(f"#SBATCH --partition={job.partition}")
    if job.time:
        lines.append(f"#SBATCH --time={job.time}")
    train = " ".join(shlex.quote(a) for a in train_args)
    lines += [
        "set -euo pipefail",
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        # --resume auto in train_args: a requeued job continues from its newest complete checkpoint.
        f"srun --kill-on-bad-exit=1 {shlex.quote(sys.executable)} -m torch.distributed.run "
        f"--nnodes={job.nodes} --nproc_per_node={job.gpus_per_node} --rdzv_backend=c10d "
        f'--rdzv_endpoint="$head_node:{job.master_port}" --rdzv_id="$SLURM_JOB_ID" '
        f"-m deco.pipeline.cli {train}",
    ]
    return "\n".join(lines) + "\n"
