"""Starting the ranks of a training job.

- `deco train --nproc N`: this process starts N local ranks itself, torchrun-style (MASTER_ADDR
  127.0.0.1, a free port, RANK / LOCAL_RANK / WORLD_SIZE / LOCAL_WORLD_SIZE), forwards SIGTERM and
  SIGINT to them, and stops the others when one fails.
- Under torchrun or the deepspeed launcher their environment is present and the process joins.
- Plain `deco train` is a one-rank job.
- `deco launch`: the multi-node command, for the deepspeed launcher with a hostfile or as an sbatch
  script (torchrun on every node, c10d rendezvous on the first).

A rank that dies is named in one line on stderr ("rank 1 (pid 1234) was killed by SIGKILL"), here
and, per node, under torchrun (`python -m deco.orchestration.launch -m torch.distributed.run ...`,
what the sbatch script runs); the exit code is the rank's status, or 128 + N for signal N. A rank
that exits 2 has already said why ("deco: error: ...") and is not reported twice.

The sbatch script: every value that came from a user (run dir, config path, `--set` values) is
shell-quoted, so it reaches the ranks as one literal argument. #SBATCH lines are read by sbatch, not
by a shell, and cannot be quoted: they hold only numbers and plain tokens. A partition or time limit
that is not a plain token is refused in one line, the job name (from the config file's name) has
every other character replaced by `_`, and the job's output goes to `<run dir>/slurm-<job id>.out`
through a quoted shell redirection (the run dir is created on the first node: there is no shared
filesystem) instead of an `#SBATCH --output` line. Across nodes the deepspeed launcher goes through
pdsh and a remote shell that gets the arguments unquoted: what that shell would misread is refused.
"""
from __future__ import annotations

import ctypes
import os
import re
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
    """Run `argv` as `nproc` ranks of one job on this machine; returns the job's exit code: 0, the
    first failed rank's status, or 128 + N when it was killed by signal N."""
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
        told.append(signum)
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    told: list[int] = []  # the signals this launcher was sent and forwarded: the ranks' exits are expected
    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _wait(procs, told)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def exit_code(returncode: int) -> int:
    """A process's exit code as a shell reports it: killed by signal N -> 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def how_it_ended(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


# The CLI's exit status for "deco: error: ..." already printed (rank 0 says it; the others exit 2 quietly).
REPORTED_ERROR = 2


def _wait(procs: list[subprocess.Popen], told: list[int] = ()) -> int:
    while True:
        codes = [p.poll() for p in procs]
        failed = [(rank, code) for rank, code in enumerate(codes) if code not in (None, 0)]
        if failed:
            # One rank is gone: the others would wait forever in their next collective.
            rank, code = failed[0]
            if not told and code != REPORTED_ERROR:
                others = "; stopping the other ranks" if len(procs) > 1 else ""
                print(f"deco: error: rank {rank} (pid {procs[rank].pid}) {how_it_ended(code)}{others}",
                      file=sys.stderr, flush=True)
            _stop(procs)
            return exit_code(code)
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


# Across nodes the deepspeed launcher runs pdsh, which joins the arguments into one remote shell
# command: one with a space is put in double quotes (only `"` escaped), any other goes in bare.
# What survives that unchanged and runs nothing: no $ ` \ " % (pdsh's own %n, %h) ! or control
# characters at all, and without a space only these.
_PDSH_NEVER = set('$`\\"%!')
_PDSH_BARE = re.compile(r"[\w@+=:,./-]+")


def _check_pdsh_arg(arg: str, nodes: int) -> None:
    bad = any(c in _PDSH_NEVER or not c.isprintable() for c in arg)
    if bad or (" " not in arg and not _PDSH_BARE.fullmatch(arg)):
        raise ValueError(f"{arg!r} cannot go through the deepspeed launcher to {nodes} nodes (its pdsh hands the "
                         "arguments to a remote shell unquoted): leave out $ ` \\ \" % ! and control characters, "
                         "and without a space anything but letters, digits and _ @ + = : , . / -; or use --slurm")


def deepspeed_command(hostfile: str, train_args: list[str], master_port: int = 29500) -> list[str]:
    """The deepspeed launcher reads the hosts and slots from `hostfile` and starts every rank.

    On one node it starts them without a shell; across nodes through pdsh and a remote shell, so
    arguments that shell would read differently are refused (ValueError, one line)."""
    hosts = read_hostfile(hostfile)
    if len(hosts) > 1:
        for arg in train_args:
            _check_pdsh_arg(arg, len(hosts))
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


# What an #SBATCH line may carry: sbatch splits these lines itself (no shell quoting; whitespace,
# quotes and `#` are its syntax, and a newline would start a directive of the user's choosing).
DIRECTIVE_TOKEN = re.compile(r"[A-Za-z0-9_.,:+-]+")


def _directive_value(flag: str, value: str) -> str:
    if not DIRECTIVE_TOKEN.fullmatch(value):
        raise ValueError(f"--{flag} {value!r} cannot go into an #SBATCH line: use letters, digits and _ . , : + - only")
    return value


def sbatch_script(job: SlurmJob, train_args: list[str], run_dir: str) -> str:
    """One torchrun per node (c10d rendezvous on the first node), each starting gpus_per_node ranks.

    #SBATCH lines hold only numbers and plain tokens; every user value below them is shell-quoted."""
    if job.nodes < 1 or job.gpus_per_node < 1:
        raise ValueError("--nodes and --gpus-per-node must be at least 1")
    if not (isinstance(job.master_port, int) and isinstance(job.signal_before_end_s, int)):
        raise ValueError("master_port and signal_before_end_s must be integers")
    job_name = re.sub(r"[^A-Za-z0-9_.-]", "_", job.job_name) or "deco-train"
    lines = ["#!/bin/bash", f"#SBATCH --job-name={job_name}", f"#SBATCH --nodes={int(job.nodes)}",
             "#SBATCH --ntasks-per-node=1", f"#SBATCH --gpus-per-node={int(job.gpus_per_node)}",
             f"#SBATCH --signal=TERM@{job.signal_before_end_s}", "#SBATCH --requeue"]
    if job.partition:
        lines.append(f"#SBATCH --partition={_directive_value('partition', job.partition)}")
    if job.time:
        lines.append(f"#SBATCH --time={_directive_value('time', job.time)}")
    train = " ".join(shlex.quote(a) for a in train_args)
    lines += [
        "set -euo pipefail",
        # The job's output in the run dir, on the first node (no shared filesystem: create it here).
        f"run_dir={shlex.quote(run_dir)}",
        'mkdir -p -- "$run_dir"',
        'exec >>"$run_dir/slurm-$SLURM_JOB_ID.out" 2>&1',
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        # Slurm's SIGTERM comes signal_before_end_s before the time limit; torchrun forwards it to the
        # ranks, which checkpoint, and would SIGKILL them after its default 30 s.
        f"export TORCH_ELASTIC_SHUTDOWN_TIMEOUT={job.signal_before_end_s}",
        # --resume auto in train_args: a requeued job continues from its newest complete checkpoint.
        # torchrun runs inside our wrapper, which says which rank died and how in one line.
        f"srun --kill-on-bad-exit=1 {shlex.quote(sys.executable)} -m deco.orchestration.launch "
        f"-m torch.distributed.run --nnodes={job.nodes} --nproc_per_node={job.gpus_per_node} --rdzv_backend=c10d "
        f'--rdzv_endpoint="$head_node:{job.master_port}" --rdzv_id="$SLURM_JOB_ID" '
        f"-m deco.pipeline.cli {train}",
    ]
    return "\n".join(lines) + "\n"


def sbatch_command(script_path: str | Path) -> list[str]:
    """What `deco launch --slurm` runs, and its --dry-run prints: every option is in the script."""
    return ["sbatch", str(script_path)]


def torchrun_node(argv: list[str]) -> int:
    """`python -m deco.orchestration.launch -m torch.distributed.run ARGS`: torchrun on this node,
    with its failures in one line instead of a traceback and a ChildFailedError table."""
    if argv[:2] != ["-m", "torch.distributed.run"]:
        print("usage: python -m deco.orchestration.launch -m torch.distributed.run TORCHRUN_ARGS", file=sys.stderr)
        return 2
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.run import parse_args, run

    host = socket.gethostname()
    try:
        run(parse_args(argv[2:]))
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()  # the root cause; the others were stopped because of it
        print(f"deco: error: rank {rank} (local rank {failure.local_rank} on {host}, pid {failure.pid}) "
              f"{how_it_ended(failure.exitcode)}; torchrun stopped the other ranks on this node",
              file=sys.stderr, flush=True)
        return exit_code(failure.exitcode)
    except RendezvousError as err:
        detail = f": {err}" if str(err) else ""
        print(f"deco: error: torchrun on {host}: rendezvous failed ({type(err).__name__}{detail})",
              file=sys.stderr, flush=True)
        return 1
    except SignalException as err:
        # Slurm's SIGTERM before the time limit, or scancel: the ranks were told and have exited.
        print(f"deco: torchrun on {host} stopped by {signal.Signals(err.sigval).name}; its ranks have exited",
              file=sys.stderr, flush=True)
        return 128 + int(err.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(torchrun_node(sys.argv[1:]))
