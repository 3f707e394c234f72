"""benchmarks/gpu_check.py end to end on the CPU (--smoke), and the Makefile's install-offline recipe.

The GPU machine has no registry, so the check must run from .whl/ alone: a smoke run here walks the
same code path (ZeRO-3 engine, EMA, REPA teacher, sampler, JSON after each measurement) on the
tiny config; the real numbers come only from `make gpu-check` on a GPU.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_run_writes_every_measurement(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--out", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["mode"] == "smoke" and report["status"] == "complete"
    assert report["errors"] == []
    assert report["card"]["measured_tflops"] > 0
    for role, resolution in (("low", 32), ("high", 64)):
        case = report["train"][f"{role}_eager"]
        assert "error" not in case
        assert case["resolution"] == resolution and case["mode"] == "eager"
        assert case["samples_per_s"] > 0 and case["timed_steps"] == 2
        assert case["repa"] is True and case["train_flops_per_sample"] > 0
        assert "skipped" in report["train"][f"{role}_compiled"]  # compile is opt-in on a CPU
    sampling = report["sampling"]
    assert "error" not in sampling and sampling["images_per_s"] > 0 and sampling["cfg_scale"] == 4.0
    # Goals are stated but not judged on a tiny CPU model.
    assert report["goals"]["sampling_images_per_s"]["goal"] == 2.0
    assert all(goal["pass"] is None for name, goal in report["goals"].items() if name != "note")


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_gpu_check_recipe_installs_only_from_local_wheels():
    proc = subprocess.run(["make", "-n", "gpu-check"], cwd=ROOT, capture_output=True, text=True, check=True)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    install = next(line for line in lines if "pip install" in line)
    assert "--no-index" in install and "--no-deps" in install and "--target /tmp/site" in install
    assert ".whl/*.whl" in install
    run = next(line for line in lines if "gpu_check.py" in line)
    assert run.startswith("PYTHONPATH=/tmp/site python3 benchmarks/gpu_check.py")
    assert "gpu_check.json" in run
    # Nothing there may build a venv or reach a registry.
    assert "venv" not in proc.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_gpu_wheels_recipe_builds_deepspeed_without_ops_for_the_gpu_python():
    proc = subprocess.run(["make", "-n", "gpu-wheels"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "DS_BUILD_OPS=0" in proc.stdout and "deepspeed==0.19.8" in proc.stdout
    assert "--python-version 3.12" in proc.stdout and "manylinux_2_17_x86_64" in proc.stdout
    assert "pydantic-core==" in proc.stdout  # the one compiled wheel, fetched for the GPU machine's Python
