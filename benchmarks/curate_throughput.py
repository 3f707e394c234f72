"""Curation throughput: samples/s on Ray with 1 and 2 workers against a plain single-process loop
doing the same work (execution: local, the same partition functions in this process) on the same
input, as ratios; and the peak memory of each.

    python benchmarks/curate_throughput.py [--n 1600] [--size 256] [--partition-size 200] [--repeats 3]

Writes benchmarks/results/curate_throughput.json. The Ray cluster (2 CPUs) is started once and
both sides are warmed up before timing, so the numbers are steady-state throughput; the cluster's
start-up time and the first (cold) runs are reported separately. Memory is the peak resident set size, sampled every
50 ms: of this process for the loop, and of this process plus every Ray process for the Ray runs.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "data" / "curate_demo.yaml"
RESULTS = ROOT / "benchmarks" / "results" / "curate_throughput.json"


class PeakMemory:
    """Peak summed RSS of this process and its descendants (the local Ray cluster), in MiB."""

    def __init__(self, include_children: bool):
        self.include_children, self.peak, self._stop = include_children, 0.0, threading.Event()

    def _sample(self) -> float:
        me = psutil.Process()
        processes = [me] + (me.children(recursive=True) if self.include_children else [])
        total = 0
        for process in processes:
            try:
                total += process.memory_info().rss
            except psutil.Error:
                pass
        return total / 2**20

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            time.sleep(0.05)

    def __enter__(self) -> "PeakMemory":
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._sample())


def run_once(source: str, work: Path, label: str, overrides: list[str], children: bool) -> dict:
    from deco.pipeline.curate.job import curate, load_curate_config

    output = work / label
    shutil.rmtree(output, ignore_errors=True)
    cfg = load_curate_config(str(CONFIG), overrides, [source], str(output))
    with PeakMemory(include_children=children) as memory:
        started = time.perf_counter()
        report = curate(cfg)
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "samples_per_s": report["samples_in"] / seconds, "peak_rss_mb": memory.peak,
            "samples_in": report["samples_in"], "samples_kept": report["samples_kept"]}


def best_of(runs: list[dict]) -> dict:
    best = max(runs, key=lambda r: r["samples_per_s"])
    return {"samples_per_s": round(best["samples_per_s"], 2),
            "samples_per_s_runs": [round(r["samples_per_s"], 2) for r in runs],
            "median_samples_per_s": round(statistics.median(r["samples_per_s"] for r in runs), 2),
            "peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs), 1),
            "samples_in": best["samples_in"], "samples_kept": best["samples_kept"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1600, help="samples in the synthetic input")
    parser.add_argument("--size", type=int, default=256, help="side of the synthetic images")
    parser.add_argument("--partition-size", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from deco.data.synthetic_faults import write_synthetic_dataset
    from deco.orchestration.ray_cluster import RayConfig, ray_cluster

    work = Path(tempfile.mkdtemp(prefix="deco-curate-bench-"))
    source = str(work / "input")
    write_synthetic_dataset(source, args.n, 0, "parquet", 0.1, size=args.size, per_file=args.partition_size * 4)
    # Production-like work per sample: two resolutions, JPEG re-encode, every filter and both dedups.
    common = ["progress=false", f"sources.partition_size={args.partition_size}", "transform.resolutions=[128,256]",
              "transform.format=jpeg", "images.min_side=128", "output.size_limit_mb=16"]

    load_at_start = os.getloadavg()[0]
    started = time.perf_counter()
    with ray_cluster(RayConfig(num_cpus=2, object_store_mb=512)):
        cluster_start_s = time.perf_counter() - started
        # Both sides are timed warm: the first run of each pays one-off imports (torch, langid's model).
        loop_cold = run_once(source, work, "loop-cold", common + ["execution=local"], children=False)
        cold = run_once(source, work, "ray-cold", common + ["num_workers=2"], children=True)
        # Interleaved, so that load from other processes during the run falls on all three alike.
        loop, ray_runs = [], {1: [], 2: []}
        for i in range(args.repeats):
            loop.append(run_once(source, work, f"loop{i}", common + ["execution=local"], children=False))
            for workers in (1, 2):
                ray_runs[workers].append(run_once(source, work, f"ray{workers}-{i}", common + [f"num_workers={workers}"],
                                                  children=True))
    shutil.rmtree(work, ignore_errors=True)

    baseline, one, two = best_of(loop), best_of(ray_runs[1]), best_of(ray_runs[2])
    result = {
        "benchmark": "curate_throughput",
        "input": {"samples": args.n, "image_side": args.size, "bad_fraction": 0.1, "format": "parquet",
                  "partition_size": args.partition_size, "resolutions": [128, 256], "output": "local directory"},
        "machine": {"cpus": os.cpu_count(), "load_average_1m": [round(load_at_start, 2), round(os.getloadavg()[0], 2)],
                    "python": platform.python_version(), "platform": platform.platform()},
        "single_process_loop": baseline,
        "ray_1_worker": one,
        "ray_2_workers": two,
        "ratios": {"ray_1_worker_vs_loop": round(one["samples_per_s"] / baseline["samples_per_s"], 3),
                   "ray_2_workers_vs_loop": round(two["samples_per_s"] / baseline["samples_per_s"], 3),
                   "ray_2_vs_1_workers": round(two["samples_per_s"] / one["samples_per_s"], 3)},
        "ray_cluster_start_s": round(cluster_start_s, 2),
        "cold_first_runs": {"loop": {"samples_per_s": round(loop_cold["samples_per_s"], 2), "seconds": round(loop_cold["seconds"], 2)},
                            "ray_2_workers": {"samples_per_s": round(cold["samples_per_s"], 2), "seconds": round(cold["seconds"], 2)}},
        "notes": "best of interleaved repeats (all runs listed); the loop runs in the driver while the idle "
                 "cluster waits; Ray peak memory includes the raylet, GCS and idle workers of the local cluster",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
