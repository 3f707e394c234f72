"""Every `deco` command ends an expected failure with one line, `deco: error: ...`, and a non-zero exit;
`--debug` (or DECO_DEBUG=1) adds the traceback. Run in this process where that is the same thing
(the handler and the wrapper are the CLI's own), as subprocesses where the process is the point."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deco.pipeline.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]

# One bad input per command: (argv with {tmp} for the test's folder, what the one line must say).
BAD_INPUTS = {
    ("model", "summary"): ("model summary --config {tmp}/none.yaml", "config file not found"),
    ("model", "import-reference"): ("model import-reference --checkpoint {tmp}/none.ckpt --out {tmp}/w.safetensors",
                                    "not found"),
    ("sample",): ("sample --weights {tmp}/garbage.safetensors --prompt x --out {tmp}/g.png",
                  "not a readable .safetensors file"),
    ("demo",): ("demo --out {tmp}/demo --set stages=3", "expected list"),
    ("pipeline", "run"): ("pipeline run {tmp}/pipeline.yaml", "stage 'c': config file not found"),
    ("pipeline", "status"): ("pipeline status {tmp}/invalid.yaml", "invalid YAML"),
    ("train",): ("train --config {tmp}/none.yaml --nproc 1", "config file not found"),
    ("launch",): ("launch --config {tmp}/none.yaml --hostfile {tmp}/hosts --dry-run", "config file not found"),
    ("export",): ("export --checkpoint {tmp}/stage --out {tmp}/w.safetensors", "neither a complete checkpoint"),
    ("data", "synth"): ("data synth --out {tmp}/synth --n 0", "--n must be at least 1"),
    ("curate",): ("curate --config configs/data/curate_demo.yaml --input {tmp}/none --output {tmp}/curated",
                  "does not exist"),
    ("geneval", "generate"): ("geneval generate --weights {tmp}/garbage.safetensors --out {tmp}/images",
                              "not a readable .safetensors file"),
    ("geneval", "score"): ("geneval score --images {tmp}/none --out {tmp}/r.jsonl --detector synthetic",
                           "image directory not found"),
    ("geneval", "summary"): ("geneval summary {tmp}/garbage.jsonl", "invalid JSON"),
    ("geneval", "report"): ("geneval report --results {tmp}/none.jsonl --out {tmp}/r.html", "results file not found"),
    ("geneval", "synthetic-prompts"): ("geneval synthetic-prompts --out {tmp}/p.jsonl --per-task -1", "--per-task"),
    ("gate", "run"): ("gate run --config demo_32 --checkpoint {tmp}/stage/checkpoints/step_00000001",
                      "never evaluated"),
    ("gate", "watch"): ("gate watch --stage no_such_gate", "no gate config 'no_such_gate'"),
}


def _leaves(parser, path=()):
    children = next((a.choices for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"), {})
    if not children:
        yield path
    for name, child in children.items():
        yield from _leaves(child, path + (name,))


def test_every_command_has_a_bad_input_case():
    assert set(_leaves(build_parser())) == set(BAD_INPUTS)


@pytest.fixture
def bad_files(tmp_path, monkeypatch):
    """Unreadable inputs in tmp_path; the working directory is the repository (configs/ paths)."""
    (tmp_path / "garbage.safetensors").write_bytes(b"not a safetensors file\x00\x01")
    (tmp_path / "garbage.jsonl").write_text("not json\n")
    (tmp_path / "invalid.yaml").write_text("stages: [\n")
    (tmp_path / "pipeline.yaml").write_text("name: p\nstages:\n  - {name: s, kind: synth, samples: 1}\n"
                                            "  - {name: c, kind: curate, config: none.yaml, inputs: [s]}\n")
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("DECO_DEBUG", "0")  # and restored afterwards: `--debug` sets it for child processes
    return tmp_path


@pytest.mark.parametrize("command", sorted(BAD_INPUTS), ids=" ".join)
def test_a_bad_input_ends_in_one_error_line(command, bad_files, capsys):
    argv, says = BAD_INPUTS[command]
    code = main(argv.format(tmp=bad_files).split())
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("deco: error: ") and says in err, err


def test_debug_shows_the_traceback_with_the_same_line_and_exit(bad_files, capsys, monkeypatch):
    argv = ["pipeline", "status", str(bad_files / "invalid.yaml")]
    assert main(argv) == 2
    line = capsys.readouterr().err
    assert main(["--debug", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last)") and "ConfigError" in err and err.endswith(line)
    assert os.environ["DECO_DEBUG"] == "1"  # what the stages and ranks it starts inherit
    monkeypatch.setenv("DECO_DEBUG", "1")
    assert main(argv) == 2 and "Traceback" in capsys.readouterr().err


def run_deco(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "deco.pipeline.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, **kwargs)


def test_the_installed_command_says_one_line_or_with_debug_the_traceback(tmp_path):
    missing = str(tmp_path / "none.yaml")
    env = {k: v for k, v in os.environ.items() if k != "DECO_DEBUG"}
    out, err = run_deco("pipeline", "status", missing, env=env).communicate(timeout=60)
    assert err == f"deco: error: config file not found: {missing}\n"
    debug = run_deco("--debug", "pipeline", "status", missing, env=env)
    out, err = debug.communicate(timeout=60)
    assert debug.returncode == 2 and "Traceback (most recent call last)" in err
    assert err.endswith(f"deco: error: config file not found: {missing}\n")


def test_ctrl_c_is_one_line_and_exit_130_and_the_stage_shows_interrupted(tmp_path, capsys):
    path = tmp_path / "p.yaml"
    path.write_text(f"name: p\nroot: {tmp_path / 'store'}\nwork_dir: {tmp_path / 'work'}\n"
                    "stages:\n  - {name: synth, kind: synth, samples: 20000}\n")
    # A terminal's Ctrl-C reaches a process whose SIGINT is not ignored; a test run started in the
    # background (`make test &`, nohup) inherits SIGINT ignored, and so would the pipeline, which then
    # ran to its end (exit 0). 20,000 samples: the stage runs for minutes, so the signal lands while
    # it runs even when this process is descheduled for a while on a loaded machine.
    pipeline = run_deco("pipeline", "run", str(path), start_new_session=True,
                        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        import psutil

        deadline = time.monotonic() + 60
        while not psutil.Process(pipeline.pid).children() and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)  # past the fork (a signal during one is lost), while the command imports (~2 s)
        pipeline.send_signal(signal.SIGINT)
        out, err = pipeline.communicate(timeout=60)
    finally:
        if pipeline.poll() is None:
            os.killpg(pipeline.pid, signal.SIGKILL)
    assert pipeline.returncode == 130 and err == "deco: error: interrupted\n", err
    assert main(["pipeline", "status", "--json", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)[0]["state"] == "interrupted"  # a rerun resumes it
