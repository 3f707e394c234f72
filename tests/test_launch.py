"""Launch commands you can trust.

- The sbatch script: every value that came from a user (run dir, config path, `--set` values) reaches
  the ranks as one literal argument; the script is executed by bash with Slurm's commands (`srun`,
  `scontrol`, `sbatch`) as tiny stand-ins on PATH that record their argv. #SBATCH lines cannot be
  quoted, so they hold only numbers and plain tokens: a partition or time limit that is not one is
  refused with one line, the job name is made one.
- `deco launch --dry-run` prints exactly what the same call without it runs, and starts and writes
  nothing.
- `deco train --nproc N` (spawn_local) and the per-node torchrun wrapper name a dead rank and how it
  died, in one line; the exit code is the rank's status, or 128 + N for signal N.
"""
import os
import shlex
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from deco.orchestration.launch import (SlurmJob, deepspeed_command, free_port, sbatch_command, sbatch_script,
                                       spawn_local, train_argv)
from deco.pipeline.cli import main
from deco.pipeline.cli import train as train_commands

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = ROOT / "configs" / "model" / "tiny.yaml"
TINY_TRAIN = ROOT / "configs" / "train" / "tiny_cpu.yaml"

# Records its argv, one NUL-terminated element each, in $RECORD/<name>.argv.
RECORDER = """#!/bin/sh
printf '%s\\0' "$@" > "$RECORD/$(basename "$0").argv"
"""
SCONTROL = RECORDER + "printf 'node-1\\nnode-2\\n'\n"       # `scontrol show hostnames ...`
SBATCH = RECORDER + 'exec bash "$1"\n'                       # runs the script, as Slurm would on node-1


def hostile(mark: Path, tag: str) -> str:
    """Spaces, both quotes, $(...), backticks, ; and a newline: any of them run by a shell leaves a file in mark."""
    return (f"{tag} 'q\" $(touch {mark}/{tag}-subst) `touch {mark}/{tag}-tick`; touch {mark}/{tag}-semi\n"
            f"touch {mark}/{tag}-newline")


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """Stand-ins for Slurm's commands on PATH, a record folder, and a folder a shell would leave marks in."""
    bin_dir, record, mark = tmp_path / "bin", tmp_path / "record", tmp_path / "mark"
    for folder in (bin_dir, record, mark):
        folder.mkdir()
    for name, body in (("srun", RECORDER), ("scontrol", SCONTROL), ("sbatch", SBATCH)):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "RECORD": str(record), "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "node-[1-2]"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)

    class Sandbox:
        root, marks = tmp_path, mark

        @staticmethod
        def argv(name: str) -> list[str] | None:
            path = record / f"{name}.argv"
            return path.read_bytes().decode().split("\0")[:-1] if path.exists() else None

        @staticmethod
        def run_script(script: str) -> subprocess.CompletedProcess:
            path = tmp_path / "job.sbatch"
            path.write_text(script)
            return subprocess.run(["bash", str(path)], capture_output=True, text=True, cwd=tmp_path, timeout=60)

    return Sandbox


def srun_argv(nodes: int, gpus: int, train_args: list[str], port: int = 29500) -> list[str]:
    return ["--kill-on-bad-exit=1", sys.executable, "-m", "deco.orchestration.launch", "-m", "torch.distributed.run",
            f"--nnodes={nodes}", f"--nproc_per_node={gpus}", "--rdzv_backend=c10d",
            f"--rdzv_endpoint=node-1:{port}", "--rdzv_id=4242", "-m", "deco.pipeline.cli", *train_args]


# --- the sbatch script ---------------------------------------------------------------------------------------

def test_hostile_values_reach_the_ranks_as_single_literal_arguments(sandbox):
    marks = sandbox.marks
    run_dir = str(sandbox.root / hostile(marks, "rundir"))
    config = hostile(marks, "config") + ".yaml"
    overrides = [f"checkpoint.uri={hostile(marks, 'set1')}", f"note={hostile(marks, 'set2')}", "a=b c", "x="]
    train_args = train_argv(config, run_dir, "auto", overrides)
    job = SlurmJob(nodes=2, gpus_per_node=4, partition="gpu", time="48:00:00", job_name="deco-tiny")
    result = sandbox.run_script(sbatch_script(job, train_args, run_dir))

    assert result.returncode == 0, result.stderr
    assert sandbox.argv("srun") == srun_argv(2, 4, train_args)
    assert sandbox.argv("scontrol") == ["show", "hostnames", "node-[1-2]"]
    assert list(marks.iterdir()) == []  # nothing a user typed was run
    # The job's output lands in the run dir, created on the first node (no shared filesystem).
    assert (Path(run_dir) / "slurm-4242.out").is_file()


def test_sbatch_directives_hold_only_plain_tokens(sandbox):
    job = SlurmJob(nodes=2, gpus_per_node=8, partition="gpu,debug", time="2-00:00:00",
                   job_name=f"deco-{hostile(sandbox.marks, 'name')}")
    script = sbatch_script(job, train_argv("c.yaml", "runs/x"), "runs/x")
    directives = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert directives[1:] == ["#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                              "#SBATCH --signal=TERM@300", "#SBATCH --requeue", "#SBATCH --partition=gpu,debug",
                              "#SBATCH --time=2-00:00:00"]
    name = directives[0].removeprefix("#SBATCH --job-name=")
    assert name.startswith("deco-name") and set(name) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                                                             "0123456789_.-")
    # Nothing after the first command line is a directive: sbatch stops reading them there.
    first_command = next(i for i, line in enumerate(script.splitlines()) if line and not line.startswith("#"))
    assert all(not line.startswith("#SBATCH") for line in script.splitlines()[first_command:])


@pytest.mark.parametrize("field, value", [("partition", "gpu\n#SBATCH --wrap=x"), ("partition", "gpu debug"),
                                          ("partition", "gpu#x"), ("time", "48:00:00\n#SBATCH --wrap=x"),
                                          ("time", "1:00 $(touch x)")])
def test_values_slurm_would_misparse_in_a_directive_are_refused(field, value):
    job = SlurmJob(nodes=1, gpus_per_node=1, **{field: value})
    with pytest.raises(ValueError) as err:
        sbatch_script(job, train_argv("c.yaml"), "runs/x")
    message = str(err.value)
    assert "\n" not in message and f"--{field} {value!r}" in message and "#SBATCH" in message


def test_a_hostile_partition_from_the_command_line_is_one_line_and_exit_2(sandbox, capsys):
    code = main(["launch", "--config", str(TINY_TRAIN), "--slurm", "--partition", "gpu\n#SBATCH --wrap=x",
                 "--run-dir", str(sandbox.root / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("deco: error: --partition 'gpu\\n#SBATCH")
    assert sandbox.argv("sbatch") is None and not (sandbox.root / "run").exists()


# --- deco launch: the dry run is what runs -------------------------------------------------------------------

def hostile_config(sandbox) -> Path:
    path = sandbox.root / hostile(sandbox.marks, "cfgdir") / (hostile(sandbox.marks, "cfg") + ".yaml")
    path.parent.mkdir(parents=True)  # (the marks' paths hold slashes: nested folders)
    text = TINY_TRAIN.read_text().replace("base: ../model/tiny.yaml", f"base: {TINY_MODEL}")
    path.write_text(text)
    return path


def test_slurm_dry_run_prints_the_script_and_the_sbatch_command_that_the_real_launch_runs(sandbox, capsys):
    config = hostile_config(sandbox)
    run_dir = str(sandbox.root / hostile(sandbox.marks, "run"))
    overrides = ["--set", f"checkpoint.uri={hostile(sandbox.marks, 'uri')}", "--set", "max_steps=7"]
    args = ["launch", "--config", str(config), "--slurm", "--nodes", "2", "--gpus-per-node", "4",
            "--partition", "gpu", "--time", "01:00:00", "--run-dir", run_dir, *overrides]
    before = sorted(sandbox.root.rglob("*"))

    assert main([*args, "--dry-run"]) == 0
    dry = capsys.readouterr()
    assert sorted(sandbox.root.rglob("*")) == before  # wrote nothing
    assert sandbox.argv("sbatch") is None and sandbox.argv("srun") is None  # started nothing
    comment, printed = dry.err.split("\n", 1)  # (the command may span lines: a quoted newline)
    assert comment.startswith("# ")  # pasted into a shell, the comment line does nothing
    command = shlex.split(printed)
    script_path = Path(run_dir) / "launch.sbatch"
    assert command == ["sbatch", str(script_path)]

    assert main(args) == 0
    assert sandbox.argv("sbatch") == command[1:]
    assert script_path.read_text() == dry.out  # the script printed is the script submitted
    train_args = train_argv(str(config), run_dir, "auto", overrides[1::2])
    assert sandbox.argv("srun") == srun_argv(2, 4, train_args)
    assert "#SBATCH --job-name=deco-" in dry.out and "#SBATCH --partition=gpu" in dry.out
    # And what was printed on stderr, pasted into a shell, runs exactly that argv.
    (sandbox.root / "record" / "sbatch.argv").unlink()
    assert subprocess.run(["bash", "-c", dry.err], capture_output=True, cwd=sandbox.root).returncode == 0
    assert sandbox.argv("sbatch") == command[1:]
    assert list(sandbox.marks.iterdir()) == []


def test_hostfile_dry_run_prints_the_deepspeed_command_that_the_real_launch_runs(sandbox, capsys, monkeypatch):
    config = hostile_config(sandbox)
    hostfile = sandbox.root / hostile(sandbox.marks, "hosts")
    hostfile.parent.mkdir(parents=True)
    hostfile.write_text("localhost slots=2\n")  # one node: deepspeed starts the ranks without a shell
    run_dir = str(sandbox.root / hostile(sandbox.marks, "run"))
    overrides = ["--set", f"checkpoint.uri={hostile(sandbox.marks, 'uri')}"]
    args = ["launch", "--config", str(config), "--hostfile", str(hostfile), "--run-dir", run_dir, *overrides]
    before = sorted(sandbox.root.rglob("*"))

    assert main([*args, "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert printed.endswith("\n") and sorted(sandbox.root.rglob("*")) == before
    command = shlex.split(printed)
    train_args = train_argv(str(config), run_dir, "auto", overrides[1::2])
    assert command == deepspeed_command(str(hostfile), train_args)
    assert command[command.index("--module") + 1:] == ["deco.pipeline.cli", *train_args]

    # Without --dry-run the same argv goes to the OS (caught at subprocess.call: deepspeed needs the nodes).
    called = []
    monkeypatch.setattr(train_commands.subprocess, "call", lambda argv, *a, **k: called.append(argv) or 0)
    assert main(args) == 0
    assert called == [command]
    # And a shell given the printed line runs exactly that argv.
    echo = subprocess.run(["bash", "-c", f"printf '%s\\0' {printed.strip()}"], capture_output=True, text=True)
    assert echo.stdout.split("\0")[:-1] == command
    assert list(sandbox.marks.iterdir()) == []


def test_across_nodes_values_a_remote_shell_would_misread_are_refused(tmp_path, capsys):
    # deepspeed's pdsh runner joins the arguments into one remote shell command, double-quoting
    # only those with a space: what that shell would expand or split is refused in one line.
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node-a slots=8\nnode-b slots=8\n")
    launch = ["launch", "--config", str(TINY_TRAIN), "--hostfile", str(hostfile), "--dry-run",
              "--run-dir", str(tmp_path / "run")]
    for value in ("x;touch", "a b $(touch x)", "a b `x`", "a\nb", 'a "b', "a b\\", "50%n", "s3://b/x*"):
        assert main([*launch, "--set", f"checkpoint.uri={value}"]) == 2, value
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"deco: error: {'checkpoint.uri=' + value!r} cannot go "
                                                       "through the deepspeed launcher to 2 nodes"), err
    # Spaces, quotes and YAML brackets are fine: deepspeed double-quotes an argument with a space.
    fine = "data.streams=[{uri: 's3://bucket/a b;c'}]"
    assert main([*launch, "--set", fine]) == 0
    assert shlex.split(capsys.readouterr().out)[-2:] == ["--set", fine]


def test_sbatch_command_is_the_script_path_alone():
    assert sbatch_command(Path("runs/a b/launch.sbatch")) == ["sbatch", "runs/a b/launch.sbatch"]


# --- a dead rank is named ------------------------------------------------------------------------------------

RANK = textwrap.dedent("""
    import os, signal, sys, time
    rank, out = int(os.environ["RANK"]), sys.argv[1]
    def stopped(signum, frame):
        open(os.path.join(out, f"rank{rank}.stopped"), "w").close()
        sys.exit(0)
    signal.signal(signal.SIGTERM, stopped)
    open(os.path.join(out, f"rank{rank}.{os.getpid()}"), "w").close()
    if rank == 1:
        time.sleep(0.5)
        how = sys.argv[2]
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        sys.exit(int(how))
    time.sleep(60)
""")


def pid_of(folder: Path, rank: int) -> int:
    return int(next(folder.glob(f"rank{rank}.[0-9]*")).suffix[1:])


@pytest.mark.parametrize("how, code, says", [("kill", 128 + signal.SIGKILL, "was killed by SIGKILL"),
                                             ("3", 3, "exited with status 3")])
def test_spawn_local_names_the_dead_rank_and_stops_the_others(tmp_path, capfd, how, code, says):
    assert spawn_local(2, [sys.executable, "-c", RANK, str(tmp_path), how]) == code
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("deco:")]
    assert lines == [f"deco: error: rank 1 (pid {pid_of(tmp_path, 1)}) {says}; stopping the other ranks"]
    assert (tmp_path / "rank0.stopped").exists()  # told to stop (SIGTERM), and it did


def test_a_rank_that_reported_its_own_error_is_not_reported_twice(tmp_path, capfd):
    # Exit 2 is the CLI's "deco: error: ..." already said by the rank: the launcher adds no second line.
    assert spawn_local(2, [sys.executable, "-c", RANK, str(tmp_path), "2"]) == 2
    assert "deco:" not in capfd.readouterr().err
    assert (tmp_path / "rank0.stopped").exists()


def test_torchrun_on_a_node_names_the_dead_rank_in_one_line(tmp_path):
    """What the sbatch script runs on each node: torchrun inside our wrapper. torchrun alone ends in a
    Python traceback and a ChildFailedError table; the wrapper turns it into one line and 128 + N."""
    port = free_port()
    result = subprocess.run([sys.executable, "-m", "deco.orchestration.launch", "-m", "torch.distributed.run",
                             "--nnodes=1", "--nproc_per_node=2", "--rdzv_backend=c10d",
                             f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=t", "--no-python",
                             sys.executable, "-c", RANK, str(tmp_path), "kill"],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 128 + signal.SIGKILL, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("deco:")]
    assert lines == [f"deco: error: rank 1 (local rank 1 on {os.uname().nodename}, pid {pid_of(tmp_path, 1)}) "
                     "was killed by SIGKILL; torchrun stopped the other ranks on this node"], result.stderr[-3000:]
