"""Curation throughput on photo-like JPEGs against the plain PIL loop a user would write, per core.

    python benchmarks/curate_throughput.py [--n 800] [--partition-size 200] [--repeats 3] [--quick]

Input: N deterministic photo-like JPEGs (data/synthetic.py photo_like_jpeg: 768x576, gradients,
soft-edged objects, texture and noise, q90, 60-110 KB) with short English captions, in webdataset
tars of --partition-size samples (a tar is one partition). Work: configs/data/curate.yaml as shipped
(256 and 512 px JPEG q95 MDS, every caption filter with langid, both dedups), output to a local dir.

Timed, interleaved in each repeat so that load from other processes falls on all alike:
- baseline: the plain single-process loop of the issue, in this process: read the tars, decode with
  PIL (Image.open(...).convert("RGB")), SHA-1 of the bytes, and per resolution a Lanczos resize of
  the centre square + JPEG q95 encode (a full decode every time: no draft mode, no reduce);
- curate() with execution=local (1 core, this process), and on a local Ray cluster (2 CPUs) with
  num_workers 1 and 2.
Reported: best-of samples/s, every run, and ratios to the baseline per core (2 workers: divided by 2,
and also undivided, the issue's ">= 1.8 with 2 workers on 2 cores"); and samples per CPU second
(user + system time of every process involved: this one, and for Ray every Ray process), the
per-core cost that load from other processes does not distort the way it does wall time.

Memory, at two dataset sizes (N and --memory-factor x N), to show that it is bounded by a
partition, not by the dataset: execution=local in a fresh process (its exact peak RSS), and Ray with
2 workers (this process plus every Ray process, sampled every 50 ms). The timed runs' peaks are
listed too (sampled; the loop and local runs share this process).

Writes benchmarks/results/curate_throughput.json (--out). Generated inputs are cached under
--cache (deterministic for --seed), so reruns skip generation.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "data" / "curate.yaml"
RESULTS = ROOT / "benchmarks" / "results" / "curate_throughput.json"
RESOLUTIONS = (256, 512)


class PeakMemory:
    """Peak summed RSS of this process and, optionally, its descendants (the local Ray cluster), in
    MiB, sampled every 50 ms; and the CPU seconds (user + system) they used meanwhile, which other
    load on the machine does not inflate the way it does wall time."""

    def __init__(self, include_children: bool):
        self.include_children, self.peak, self._stop = include_children, 0.0, threading.Event()
        self._cpu_start: dict[int, float] = {}
        self._cpu_last: dict[int, float] = {}

    def _sample(self) -> float:
        me = psutil.Process()
        processes = [me] + (me.children(recursive=True) if self.include_children else [])
        total = 0
        for process in processes:
            try:
                with process.oneshot():
                    total += process.memory_info().rss
                    times = process.cpu_times()
            except psutil.Error:
                continue
            self._cpu_last[process.pid] = times.user + times.system
            self._cpu_start.setdefault(process.pid, 0.0 if self._started else times.user + times.system)
        return total / 2**20

    def _run(self) -> None:
        started = time.thread_time()
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self._sample())
        self._sampler_cpu_s = time.thread_time() - started  # the measuring is not the work measured

    def __enter__(self) -> "PeakMemory":
        self._started = False
        self.start = self._sample()
        self._started = True  # processes first seen later started during the run: all their CPU counts
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._sample())
        self.cpu_s = sum(last - self._cpu_start[pid] for pid, last in self._cpu_last.items()) - self._sampler_cpu_s


# ------------------------------------------------------------------------------------------------
# Input
# ------------------------------------------------------------------------------------------------

def _sample(index: int, seed: int) -> tuple[bytes, bytes]:
    from deco.data.synthetic import photo_caption, photo_like_jpeg

    return photo_like_jpeg(seed * 1_000_003 + index), photo_caption(seed * 1_000_003 + index).encode()


def write_input(folder: Path, n: int, partition_size: int, seed: int) -> dict:
    """N samples in tars of partition_size; generated in parallel, cached by its parameters."""
    done = folder / "done.json"
    if done.exists():
        return json.loads(done.read_text())
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "tars").mkdir(parents=True)
    sizes = []
    with multiprocessing.get_context("spawn").Pool(os.cpu_count() or 1) as pool:
        for start in range(0, n, partition_size):
            indices = range(start, min(n, start + partition_size))
            samples = pool.starmap(_sample, [(i, seed) for i in indices], chunksize=8)
            with tarfile.open(folder / "tars" / f"shard-{start // partition_size:05d}.tar", "w") as tar:
                for i, (jpeg, caption) in zip(indices, samples):
                    sizes.append(len(jpeg))
                    for ext, data in (("jpg", jpeg), ("txt", caption)):
                        info = tarfile.TarInfo(f"{i:07d}.{ext}")
                        info.size, info.mtime = len(data), 0
                        tar.addfile(info, io.BytesIO(data))
    meta = {"samples": n, "jpeg_kb_mean": round(statistics.mean(sizes) / 1024, 1),
            "jpeg_kb_min": round(min(sizes) / 1024, 1), "jpeg_kb_max": round(max(sizes) / 1024, 1)}
    done.write_text(json.dumps(meta))
    return meta


# ------------------------------------------------------------------------------------------------
# The two sides
# ------------------------------------------------------------------------------------------------

def baseline_loop(tars: Path) -> dict:
    """The issue's plain loop: decode, SHA-1, and per resolution Lanczos resize + crop and JPEG encode."""
    from PIL import Image

    count, digest, out_bytes = 0, hashlib.sha1(), 0
    started = time.perf_counter()
    with PeakMemory(include_children=False) as memory:
        for path in sorted(tars.glob("*.tar")):
            with tarfile.open(path) as tar:
                for member in tar:
                    if not member.name.endswith(".jpg"):
                        continue
                    data = tar.extractfile(member).read()
                    digest.update(hashlib.sha1(data).digest())
                    with Image.open(io.BytesIO(data)) as image:
                        image = image.convert("RGB")
                    side = min(image.size)
                    left, top = (image.width - side) / 2, (image.height - side) / 2
                    for r in RESOLUTIONS:
                        small = image.resize((r, r), Image.Resampling.LANCZOS, box=(left, top, left + side, top + side))
                        buffer = io.BytesIO()
                        small.save(buffer, format="JPEG", quality=95)
                        out_bytes += buffer.tell()
                    count += 1
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "samples_per_s": count / seconds, "peak_rss_mb": memory.peak, "samples_in": count,
            "samples_kept": count, "output_mb": out_bytes / 2**20, "cpu_s": memory.cpu_s,
            "samples_per_cpu_s": count / memory.cpu_s}


def curate_once(tars: Path, output: Path, overrides: list[str], children: bool, config: Path = CONFIG) -> dict:
    from deco.pipeline.curate.job import curate, load_curate_config

    shutil.rmtree(output, ignore_errors=True)
    cfg = load_curate_config(str(config), overrides, [str(tars)], str(output))
    with PeakMemory(include_children=children) as memory:
        started = time.perf_counter()
        report = curate(cfg)
        seconds = time.perf_counter() - started
    shutil.rmtree(output, ignore_errors=True)
    return {"seconds": seconds, "samples_per_s": report["samples_in"] / seconds, "peak_rss_mb": memory.peak,
            "cpu_s": memory.cpu_s, "samples_per_cpu_s": report["samples_in"] / memory.cpu_s,
            "rss_at_start_mb": memory.start, "samples_in": report["samples_in"], "samples_kept": report["samples_kept"],
            "phases_s": {k: v for k, v in report["throughput"].items() if k.endswith("_s")}}


def memory_in_child(tars: Path, output: Path, overrides: list[str], config: Path) -> dict:
    """execution=local in a fresh process: its exact peak RSS (ru_maxrss), imports included, and
    none of this process's history."""
    import subprocess

    code = ("import json, resource, sys, time; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
            "import curate_throughput as b; r = b.curate_once(Path(sys.argv[2]), Path(sys.argv[3]), json.loads(sys.argv[4]), "
            "False, Path(sys.argv[5])); r['peak_rss_mb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024; "
            "print(json.dumps(r))")
    done = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), str(tars), str(output),
                           json.dumps(overrides), str(config)], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def code_locations(ray_too: bool) -> dict:
    """Where the curation code ran from (this process, a Ray worker): a run against another checkout
    (PYTHONPATH) says so."""
    import deco.orchestration.curation as curation

    where = {"driver": str(Path(curation.__file__).parent.parent)}
    if ray_too:
        import ray

        @ray.remote(num_cpus=0)
        def _where() -> str:
            import deco.orchestration.curation as module

            return str(Path(module.__file__).parent.parent)

        where["ray_worker"] = ray.get(_where.remote())
    return where


def best_of(runs: list[dict]) -> dict:
    best = max(runs, key=lambda r: r["samples_per_s"])
    out = {"samples_per_s": round(best["samples_per_s"], 2),
           "samples_per_s_runs": [round(r["samples_per_s"], 2) for r in runs],
           "median_samples_per_s": round(statistics.median(r["samples_per_s"] for r in runs), 2),
           "samples_per_cpu_s": round(max(r["samples_per_cpu_s"] for r in runs), 2),
           "samples_per_cpu_s_runs": [round(r["samples_per_cpu_s"], 2) for r in runs],
           "peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs), 1),
           "samples_in": best["samples_in"], "samples_kept": best["samples_kept"]}
    if "phases_s" in best:
        out["phases_s_of_best"] = best["phases_s"]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=800, help="samples in the timed input")
    parser.add_argument("--partition-size", type=int, default=200, help="samples per tar (= per partition)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-factor", type=int, default=4, help="the memory check's larger input is this x N")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run (< 1 min on an idle machine, inputs cached): N=64, one repeat, no Ray 1 worker, "
                             "memory of execution=local only")
    parser.add_argument("--no-ray", action="store_true", help="baseline and execution=local only")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "deco-curate-bench-input"))
    parser.add_argument("--config", default=str(CONFIG), help="the curation config (default: configs/data/curate.yaml)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    config = Path(args.config).resolve()
    if args.quick:
        args.n, args.partition_size, args.repeats, args.memory_factor = min(args.n, 64), min(args.partition_size, 32), 1, 2

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from deco.orchestration.ray_cluster import RayConfig, ray_cluster

    cache = Path(args.cache)
    sizes = {args.n: None, args.n * args.memory_factor: None}
    for n in sizes:
        folder = cache / f"n{n}-p{args.partition_size}-s{args.seed}"
        sizes[n] = (folder / "tars", write_input(folder, n, args.partition_size, args.seed))
    tars, input_meta = sizes[args.n]
    work = Path(tempfile.mkdtemp(prefix="deco-curate-bench-"))
    common = ["progress=false", f"sources.partition_size={args.partition_size}"]
    local = common + ["execution=local"]
    worker_counts = () if args.no_ray else ((2,) if args.quick else (1, 2))

    load_at_start = os.getloadavg()[0]
    runs: dict[str, list[dict]] = {"baseline": [], "local": [], **{f"ray_{w}": [] for w in worker_counts}}
    memory: dict[str, dict] = {}
    with ray_cluster(RayConfig(num_cpus=2, object_store_mb=512)) if worker_counts else contextlib.nullcontext():
        code = code_locations(bool(worker_counts))
        # Warm-up (not timed): one-off imports on both sides (langid's model, streaming, Ray workers).
        baseline_loop(tars)
        curate_once(tars, work / "warm-local", local, children=False, config=config)
        for w in worker_counts:
            curate_once(tars, work / f"warm-ray{w}", common + [f"num_workers={w}"], children=True, config=config)
        for i in range(args.repeats):
            runs["baseline"].append(baseline_loop(tars))
            runs["local"].append(curate_once(tars, work / "local", local, children=False, config=config))
            for w in worker_counts:
                runs[f"ray_{w}"].append(curate_once(tars, work / f"ray{w}", common + [f"num_workers={w}"], children=True, config=config))
            print(f"repeat {i}: " + ", ".join(f"{k} {v[-1]['samples_per_s']:.1f}/s ({v[-1]['samples_per_cpu_s']:.1f}/cpu-s)"
                                              for k, v in runs.items()),
                  file=sys.stderr, flush=True)
        # Peak memory at two dataset sizes: bounded by a partition, not the dataset.
        for n, (folder, _meta) in sizes.items():
            memory[f"local_n{n}"] = memory_in_child(folder, work / "mem-local", local, config)
            if worker_counts and not args.quick:
                memory[f"ray_2_n{n}"] = curate_once(folder, work / "mem-ray", common + ["num_workers=2"], children=True, config=config)
    shutil.rmtree(work, ignore_errors=True)

    results = {name: best_of(r) for name, r in runs.items()}
    base = results["baseline"]["samples_per_s"]
    base_cpu = results["baseline"]["samples_per_cpu_s"]
    ratios = {"local_vs_baseline_per_core": round(results["local"]["samples_per_s"] / base, 3)}
    for w in worker_counts:
        total = results[f"ray_{w}"]["samples_per_s"] / base
        ratios[f"ray_{w}_vs_baseline_per_core"] = round(total / w, 3)
        ratios[f"ray_{w}_vs_baseline_total"] = round(total, 3)
    # Per CPU second (user + system of every process involved): per-core cost, robust to other load.
    cpu_ratios = {f"{name}_vs_baseline": round(results[name]["samples_per_cpu_s"] / base_cpu, 3)
                  for name in results if name != "baseline"}
    result = {
        "benchmark": "curate_throughput",
        "input": {**input_meta, "image": "768x576 photo-like JPEG q90", "partition_size": args.partition_size,
                  "format": "webdataset", "config": str(config), "resolutions": list(RESOLUTIONS)},
        "code": code,
        "machine": {"cpus": os.cpu_count(), "load_average_1m": [round(load_at_start, 2), round(os.getloadavg()[0], 2)],
                    "python": platform.python_version(), "platform": platform.platform()},
        **results,
        "ratios": ratios,
        "ratios_per_cpu_second": cpu_ratios,
        "peak_memory_mb": {k: {"samples": v["samples_in"], "peak_rss_mb": round(v["peak_rss_mb"], 1),
                               "rss_at_start_mb": round(v["rss_at_start_mb"], 1),
                               "growth_mb": round(v["peak_rss_mb"] - v["rss_at_start_mb"], 1),
                               "samples_per_s": round(v["samples_per_s"], 2)} for k, v in memory.items()},
        "peak_memory_notes": "local_*: a fresh process running curate (execution=local), exact peak RSS (ru_maxrss) "
                             "including imports (rss_at_start_mb: after imports); ray_2_*: this process plus every "
                             "process of the running local Ray cluster (workers, raylet, GCS), sampled every 50 ms",
        "notes": "best of interleaved repeats (all runs listed); the baseline and local runs are one process on "
                 "one core; Ray peak memory includes the raylet, GCS and idle workers of the local cluster",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
