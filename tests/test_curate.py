"""The curation job end to end on a real local Ray cluster, against a local directory and moto's S3
server: every injected fault rejected with its reason and nothing else, counts that add up, shards
that StreamingDataset reads back as exactly the kept ids, and kill -9 then rerun == uninterrupted."""
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from deco.data.object_store import open_store
from deco.data.shard_schema import decode_image
from deco.data.shards import read_table
from deco.data.synthetic_faults import read_truth, write_synthetic_dataset
from deco.orchestration.ray_cluster import RayConfig, ray_cluster
from deco.pipeline.config import ConfigError
from deco.pipeline.curate.job import curate, load_curate_config

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "data" / "curate_demo.yaml")


@pytest.fixture(scope="module")
def ray_address(s3_server):
    """One real local Ray cluster for the module (2 CPUs, small object store); curate() reuses it.
    Started after the S3 server so that its workers inherit the endpoint and credentials."""
    with ray_cluster(RayConfig(num_cpus=2, object_store_mb=256)) as info:
        yield info.address


def run(input_uri, output_uri, *overrides):
    return curate(load_curate_config(DEMO, ["progress=false", *overrides], [input_uri], output_uri))


def streamed(output_uri, resolution, cache):
    """Every sample of <output>/<res> as StreamingDataset yields it."""
    from streaming import StreamingDataset
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()
    dataset = StreamingDataset(remote=f"{output_uri}/{resolution}", local=str(cache / uuid.uuid4().hex),
                               shuffle=False, batch_size=1)
    return list(dataset)


def check_against_truth(truth, output_uri, report, cache):
    store = open_store(output_uri)
    rejects = read_table(store.get_bytes("rejects.parquet")).to_pylist()
    assert {r["id"]: r["reason"] for r in rejects} == {t["id"]: t["reason"] for t in truth if t["fault"]}
    assert len(rejects) == len({r["id"] for r in rejects})
    originals = {t["id"]: t["duplicate_of"] for t in truth if t["duplicate_of"]}
    for row in rejects:
        if row["reason"].startswith("duplicate_"):
            assert row["detail"].startswith(f"of {originals[row['id']]} ")
    clean = [t for t in truth if not t["fault"]]
    assert report["samples_in"] == len(truth) == report["samples_kept"] + sum(report["rejected"].values())
    assert report["samples_kept"] == len(clean) and report["duplicates"]["near"] > 0
    assert json.loads(store.get_bytes("curation_report.json"))["samples_kept"] == len(clean)
    for resolution in report["resolutions"]:
        samples = streamed(output_uri, resolution, cache)
        assert [s["id"] for s in samples] == [t["id"] for t in clean]  # exactly the kept ids, once, in order
        for sample, t in zip(samples, clean):
            assert (sample["width"], sample["height"]) == (resolution, resolution)
            assert (sample["orig_width"], sample["orig_height"]) == (t["width"], t["height"])
            assert sample["caption"].startswith("a photo of ")
            assert decode_image(sample["image"]).size == (resolution, resolution)
        assert report["shards"][str(resolution)]["samples"] == len(clean)


@pytest.fixture(scope="module")
def local_run(ray_address, tmp_path_factory):
    root = tmp_path_factory.mktemp("local")
    write_synthetic_dataset(str(root / "synth"), 150, 0, "webdataset", 0.3, per_file=50)
    return root, run(str(root / "synth"), str(root / "out"))


def test_local_directory_every_fault_rejected_with_its_reason(local_run, tmp_path):
    root, report = local_run
    assert report["partitions"] == 3 and report["execution"] == "ray"
    check_against_truth(read_truth(str(root / "synth")), str(root / "out"), report, tmp_path)
    stage = root / "out" / "_work" / "stage"  # staged images removed after success; keys kept for added inputs
    assert not list(stage.glob("*.samples.parquet")) and len(list(stage.glob("*.keys.parquet"))) == 3
    assert (root / "out" / "32" / "index.json").is_file() and (root / "out" / "64" / "p00002").is_dir()


def test_s3_input_and_output(ray_address, s3_bucket, tmp_path):
    write_synthetic_dataset(f"{s3_bucket}/raw", 120, 1, "parquet", 0.3, per_file=64)
    report = run(f"{s3_bucket}/raw", f"{s3_bucket}/curated", "sources.partition_size=25")
    assert report["partitions"] == 6
    check_against_truth(read_truth(f"{s3_bucket}/raw"), f"{s3_bucket}/curated", report, tmp_path)


def test_rerun_of_a_finished_output_does_nothing_and_other_settings_are_refused(local_run):
    root, report = local_run
    again = run(str(root / "synth"), str(root / "out"))
    assert again["already_complete"] and again["samples_kept"] == report["samples_kept"]
    with pytest.raises(ConfigError, match="already holds a curated dataset made with other settings"):
        run(str(root / "synth"), str(root / "out"), "dedup.hamming_threshold=3")


def test_dedup_is_global_whatever_the_partitioning(ray_address, tmp_path):
    write_synthetic_dataset(str(tmp_path / "synth"), 120, 2, "folder", 0.3)
    outcomes = []
    for size in (7, 1000):
        report = run(str(tmp_path / "synth"), str(tmp_path / f"out{size}"), f"sources.partition_size={size}")
        rejects = read_table((tmp_path / f"out{size}" / "rejects.parquet").read_bytes()).to_pylist()
        outcomes.append(({r["id"]: (r["reason"], r["detail"]) for r in rejects}, report["samples_kept"]))
    assert outcomes[0] == outcomes[1]
    truth = read_truth(str(tmp_path / "synth"))
    across = [t for t in truth if t["duplicate_of"] and int(t["id"]) // 7 != int(t["duplicate_of"]) // 7]
    assert across  # duplicates whose original sits in another partition were found too


def deco_curate(*args):
    return [sys.executable, "-m", "deco.pipeline.cli", "curate", "--config", DEMO, *args]


def kill_when(process, condition, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if condition():
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            return
        time.sleep(0.01)
    raise AssertionError(f"the run ended (rc {process.returncode}) before it could be killed")


def test_kill_9_at_any_point_then_rerun_equals_an_uninterrupted_run(ray_address, tmp_path):
    write_synthetic_dataset(str(tmp_path / "synth"), 160, 3, "parquet", 0.25, per_file=160)
    settings = ["num_workers=1", "sources.partition_size=10", "progress=false"]
    out = tmp_path / "killed"
    command = deco_curate("--input", str(tmp_path / "synth"), "--output", str(out), "--ray-address", ray_address,
                          *[a for s in settings for a in ("--set", s)])
    staged = lambda: len(list((out / "_work" / "stage").glob("*.done.json")))  # noqa: E731
    written = lambda: len(list((out / "_work" / "written").glob("*.json")))  # noqa: E731
    logs = open(tmp_path / "runs.log", "w")
    first = subprocess.Popen(command, stdout=logs, stderr=logs, cwd=ROOT)
    kill_when(first, lambda: staged() >= 3)  # in the middle of staging
    assert first.returncode == -signal.SIGKILL and 3 <= staged() < 16 and written() == 0
    second = subprocess.Popen(command, stdout=logs, stderr=logs, cwd=ROOT)
    kill_when(second, lambda: written() >= 1)  # in the middle of writing shards
    assert second.returncode == -signal.SIGKILL and not (out / "curation_report.json").exists()
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "rejected: duplicate_near" in finished.stdout

    reference = run(str(tmp_path / "synth"), str(tmp_path / "uninterrupted"), *settings)
    resumed = json.loads((out / "curation_report.json").read_text())
    assert resumed["partitions_resumed"] == 16  # the final run staged nothing again
    for key in ("samples_in", "samples_kept", "rejected", "shards"):
        assert resumed[key] == reference[key]
    for resolution in (32, 64):
        files = sorted(p.relative_to(out) for p in (out / str(resolution)).rglob("*") if p.is_file())
        reference_root = tmp_path / "uninterrupted"
        assert files == sorted(p.relative_to(reference_root) for p in (reference_root / str(resolution)).rglob("*")
                               if p.is_file())
        assert all((out / f).read_bytes() == (reference_root / f).read_bytes() for f in files)
        ids = [s["id"] for s in streamed(str(out), resolution, tmp_path)]
        assert len(ids) == len(set(ids)) == reference["samples_kept"]
    assert (out / "rejects.parquet").read_bytes() == (tmp_path / "uninterrupted" / "rejects.parquet").read_bytes()
    check_against_truth(read_truth(str(tmp_path / "synth")), str(out), resumed, tmp_path)


def test_text_embedding_cache_holds_the_encoders_valid_tokens(ray_address, tmp_path):
    import torch

    from deco.data.shard_schema import decode_text_emb
    from deco.model.text_encoder import TextEncoderConfig

    write_synthetic_dataset(str(tmp_path / "synth"), 12, 4, "folder", 0.0)
    run(str(tmp_path / "synth"), str(tmp_path / "out"), "transform.resolutions=[32]", "text_emb.enabled=true",
        "text_emb.kind=encoder", "text_emb.path=minilm", "text_emb.max_length=32", "text_emb.dtype=float32")
    samples = streamed(str(tmp_path / "out"), 32, tmp_path)
    encoder = TextEncoderConfig(kind="encoder", path="minilm", max_length=32, dtype="float32").build()
    features, mask = encoder.encode([s["caption"] for s in samples])
    for sample, f, m in zip(samples, features, mask):
        stored = decode_text_emb(sample["text_emb"], sample["text_emb_dim"])
        assert stored.shape == (int(m.sum()), 384) and stored.dtype == torch.bfloat16
        torch.testing.assert_close(stored.float(), f[m], rtol=1e-2, atol=1e-2)


def test_webdataset_output_and_url_list_input(ray_address, tmp_path):
    import threading
    from functools import partial
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    import pyarrow as pa
    import pyarrow.parquet as pq
    import webdataset as wds

    write_synthetic_dataset(str(tmp_path / "site"), 16, 5, "folder", 0.0)
    handler = partial(SimpleHTTPRequestHandler, directory=str(tmp_path / "site"))
    handler.log_message = lambda *a: None
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        truth = read_truth(str(tmp_path / "site"))
        names = {p.stem: p.name for p in (tmp_path / "site").iterdir() if p.suffix in (".jpg", ".png")}
        base = f"http://127.0.0.1:{httpd.server_address[1]}"
        rows = [{"id": t["id"], "url": f"{base}/{names[t['id']]}",
                 "caption": (tmp_path / "site" / f"{t['id']}.txt").read_text()} for t in truth]
        rows.append({"id": "gone", "url": f"{base}/missing.jpg", "caption": "a photo of a circle"})
        (tmp_path / "list").mkdir()
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "list" / "urls.parquet")
        report = run(str(tmp_path / "list"), str(tmp_path / "out"), "output.format=webdataset",
                     "sources.format=urls", "sources.http.retries=0", "sources.http.allow_networks=[127.0.0.1/32]")
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert report["samples_kept"] == 16 and report["rejected"] == {"fetch_failed": 1}
    index = json.loads((tmp_path / "out" / "64" / "index.wids.json").read_text())
    assert sum(s["nsamples"] for s in index["shardlist"]) == 16
    tars = [str(tmp_path / "out" / "64" / s["url"]) for s in index["shardlist"]]
    samples = list(wds.WebDataset(tars, shardshuffle=False).decode("pil"))
    assert [json.loads(json.dumps(s["json"]))["id"] for s in samples] == [t["id"] for t in truth]
    assert all(s["png"].size == (64, 64) for s in samples)


def test_storage_and_config_errors_stop_before_any_work(s3_server, tmp_path):
    missing_bucket = subprocess.run(deco_curate("--input", str(tmp_path), "--output", "s3://no-such-bucket/x"),
                                    capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert missing_bucket.returncode == 2
    assert "bucket 'no-such-bucket' does not exist" in missing_bucket.stderr and "Traceback" not in missing_bucket.stderr
    no_input = subprocess.run(deco_curate("--input", str(tmp_path / "none"), "--output", str(tmp_path / "out")),
                              capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert no_input.returncode == 2 and "does not exist" in no_input.stderr
    bad_key = subprocess.run(deco_curate("--output", str(tmp_path / "o"), "--set", "dedup.hamming=3"),
                             capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert bad_key.returncode == 2 and "did you mean 'dedup.hamming_threshold'" in bad_key.stderr
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_EC2_METADATA_DISABLED="true")
    no_credentials = subprocess.run(deco_curate("--input", str(tmp_path), "--output", "s3://bucket/x"),
                                    capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert no_credentials.returncode == 2 and "no AWS credentials" in no_credentials.stderr
    (tmp_path / "in").mkdir()
    no_cluster = subprocess.run(deco_curate("--input", str(tmp_path / "in"), "--output", str(tmp_path / "r"),
                                            "--ray-address", "127.0.0.1:1"), capture_output=True, text=True,
                                timeout=120, cwd=ROOT)
    assert no_cluster.returncode == 2 and "cannot reach the Ray cluster at 127.0.0.1:1" in no_cluster.stderr
    inside = subprocess.run(deco_curate("--input", str(tmp_path / "in"), "--output", str(tmp_path / "in" / "r")),
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert inside.returncode == 2 and "overlap" in inside.stderr
    assert not any((tmp_path / name).exists() for name in ("out", "o", "r", "in/r"))
