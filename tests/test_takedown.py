"""Takedown requests against a finished curation output: the named samples (by id or URL) leave the
shards, only the shards that held them are rewritten (every other file byte-identical), streaming
reads the result, the report, kept index and rejects say what went, a rerun removes nothing more,
and re-curating or extending the output never brings a removed sample back. Real tars, the job run
in-process (execution=local), locally and on moto's S3 server."""
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import uuid
from pathlib import Path

import pytest

from deco.data.object_store import open_store
from deco.data.shards import read_table
from deco.data.synthetic_faults import synthetic_samples
from deco.pipeline.config import ConfigError
from deco.pipeline.curate.job import curate, load_curate_config
from deco.pipeline.curate.takedown import takedown

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "data" / "curate_demo.yaml")
LOCAL = ["progress=false", "execution=local", "captions.language.enabled=false", "output.size_limit_mb=0.02"]


def run(inputs, output, *overrides):
    return curate(load_curate_config(DEMO, [*LOCAL, *overrides], [str(i) for i in inputs], str(output)))


def write_tar(path: Path, samples) -> None:
    """img2dataset layout: <key>.png, <key>.txt, <key>.json with the url."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, sample, url in samples:
            meta = json.dumps({"key": key, "url": url}).encode()
            for name, data in ((f"{key}.png", sample.image), (f"{key}.txt", sample.caption), (f"{key}.json", meta)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def url(n: int) -> str:
    return f"https://example.com/img/{n}.png"


@pytest.fixture(scope="module")
def pool():
    return synthetic_samples(20, seed=3)


@pytest.fixture(scope="module")
def inputs(pool, tmp_path_factory):
    """in/a.tar (a00-a05), in/b.tar (b06-b11); later/c.tar: new samples, one of them at the URL of b08
    under a new id."""
    root = tmp_path_factory.mktemp("takedown")
    write_tar(root / "in" / "a.tar", [(f"a{n:02d}", pool[n], url(n)) for n in range(6)])
    write_tar(root / "in" / "b.tar", [(f"b{n:02d}", pool[n], url(n)) for n in range(6, 12)])
    write_tar(root / "later" / "c.tar", [(f"c{n:02d}", pool[n], url(n)) for n in range(12, 16)] +
              [("c99", pool[16], url(8))])
    return root


def streamed_ids(output: str, resolution: int, cache: Path) -> list[str]:
    from streaming import StreamingDataset
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()
    dataset = StreamingDataset(remote=f"{output}/{resolution}", local=str(cache / uuid.uuid4().hex),
                               shuffle=False, batch_size=1)
    return [s["id"] for s in dataset]


def files(output: Path) -> dict[str, bytes]:
    return {str(p.relative_to(output)): p.read_bytes() for p in output.rglob("*") if p.is_file()}


def request(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(["# takedown request 2024-05", *lines, ""]))
    return path


@pytest.fixture(scope="module")
def taken_down(inputs, tmp_path_factory):
    out = inputs / "out"
    first = run([inputs / "in"], out)
    before = files(out)
    req = request(tmp_path_factory.mktemp("req") / "request.txt", ["b07", url(8), "nobody", "b07"])
    summary = takedown(str(out), str(req))
    return out, first, before, req, summary


def test_takedown_removes_ids_and_urls_rewriting_only_their_shards(taken_down, tmp_path):
    out, first, before, req, summary = taken_down
    assert first["samples_kept"] == 12 and first["partitions"] == 2
    assert summary["removed"] == 2 and summary["unmatched"] == 1
    after = files(out)
    a_shards = {k: v for k, v in before.items() if "/p00000/" in k}
    assert a_shards and {k: after.get(k) for k in a_shards} == a_shards  # p00000 untouched, byte for byte
    changed = sorted(k for k in after if "/p00001/shard" in k and after[k] != before.get(k))
    assert changed and all(k.split("/")[0] in ("32", "64") for k in changed)
    untouched_b = [k for k in before if "/p00001/shard" in k and k in after and after[k] == before[k]]
    assert untouched_b  # the shards of p00001 that held neither sample are not rewritten either
    kept = [f"a{n:02d}" for n in range(6)] + ["b06", "b09", "b10", "b11"]
    for resolution in (32, 64):
        assert streamed_ids(str(out), resolution, tmp_path) == kept
    report = json.loads((out / "curation_report.json").read_text())
    assert report["samples_kept"] == 10 and report["rejected"]["takedown"] == 2
    assert report["samples_in"] == report["samples_kept"] + sum(report["rejected"].values())
    assert all(report["shards"][r]["samples"] == 10 for r in ("32", "64"))
    section = report["takedown"]
    digest = hashlib.sha256(req.read_bytes()).hexdigest()
    assert section["removed"] == 2 and section["requests"][0]["digest"] == digest
    assert section["requests"][0]["terms"] == 3 and section["requests"][0]["removed"] == 2
    assert sum(section["requests"][0]["per_shard"].values()) == 4  # 2 samples x 2 resolutions
    rejects = read_table((out / "rejects.parquet").read_bytes()).to_pylist()
    assert [(r["id"], r["reason"], r["partition"]) for r in rejects] == [("b07", "takedown", "p00001"),
                                                                         ("b08", "takedown", "p00001")]
    assert rejects[0]["detail"] == f"request {digest[:12]}"
    index = read_table((out / "kept" / "p00001.parquet").read_bytes()).to_pylist()
    assert [k["id"] for k in index] == ["b06", "b09", "b10", "b11"]


def test_takedown_again_removes_nothing_and_changes_no_file(taken_down):
    out, _, _, req, _ = taken_down
    now = files(out)
    again = takedown(str(out), str(req))
    assert again["removed"] == 0 and files(out) == now


def test_recurating_or_extending_never_brings_a_removed_sample_back(taken_down, inputs, tmp_path):
    out, _, _, _, _ = taken_down
    same = run([inputs / "in"], out)
    assert same["already_complete"] and same["samples_kept"] == 10
    extended = run([inputs / "in", inputs / "later" / "c.tar"], out)
    assert extended["samples_kept"] == 10 + 4 and extended["rejected"] == {"takedown": 3}
    rejects = {r["id"]: r["reason"] for r in read_table((out / "rejects.parquet").read_bytes()).to_pylist()}
    assert rejects == {"b07": "takedown", "b08": "takedown", "c99": "takedown"}  # c99: b08's URL again
    assert extended["takedown"]["removed"] == 2  # the history of requests is kept
    ids = streamed_ids(str(out), 64, tmp_path)
    assert "b07" not in ids and "b08" not in ids and "c99" not in ids and len(ids) == 14


def test_missing_output_is_one_line(tmp_path):
    req = request(tmp_path / "r.txt", ["x"])
    with pytest.raises(ConfigError) as err:
        takedown(str(tmp_path / "nothing"), str(req))
    assert "\n" not in str(err.value) and "nothing" in str(err.value) and not (tmp_path / "nothing").exists()
    result = subprocess.run([sys.executable, "-m", "deco.pipeline.cli", "curate", "--takedown", str(req),
                             "--output", str(tmp_path / "nothing")], capture_output=True, text=True, timeout=120,
                            cwd=ROOT, env={**os.environ})
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "curation_report.json" in result.stderr


def test_takedown_on_s3(s3_bucket, pool, tmp_path):
    write_tar(tmp_path / "in" / "a.tar", [(f"a{n:02d}", pool[n], url(n)) for n in range(5)])
    output = f"{s3_bucket}/curated"
    run([tmp_path / "in"], output, "output.size_limit_mb=0.005")  # about a sample a shard
    store = open_store(output)
    before = {k: store.get_bytes(k) for k in store.list("64/")}
    summary = takedown(output, str(request(tmp_path / "r.txt", [url(1), "a03"])))
    assert summary["removed"] == 2
    assert streamed_ids(output, 64, tmp_path) == ["a00", "a02", "a04"]
    after = {k: store.get_bytes(k) for k in store.list("64/")}
    assert any(after.get(k) == v for k, v in before.items() if "shard" in k)  # some shards untouched
    assert json.loads(store.get_bytes("curation_report.json"))["rejected"] == {"takedown": 2}


def test_a_takedown_cut_short_is_finished_by_running_it_again(pool, tmp_path, monkeypatch):
    from deco.pipeline.curate import takedown as module

    write_tar(tmp_path / "in" / "a.tar", [(f"a{n:02d}", pool[n], url(n)) for n in range(5)])
    out = tmp_path / "out"
    run([tmp_path / "in"], out)
    req = request(tmp_path / "r.txt", ["a01", url(3)])

    def killed(table):
        raise KeyboardInterrupt("killed before the kept index was written")

    monkeypatch.setattr(module, "_parquet", killed)
    with pytest.raises(KeyboardInterrupt):
        takedown(str(out), str(req))  # shards, indexes, rejects and report written; kept index not
    monkeypatch.undo()
    summary = takedown(str(out), str(req))
    report = json.loads((out / "curation_report.json").read_text())
    assert report["rejected"] == {"takedown": 2} and report["takedown"]["removed"] == 2 and summary["removed"] == 0
    assert [k["id"] for k in read_table((out / "kept" / "p00000.parquet").read_bytes()).to_pylist()] == [
        "a00", "a02", "a04"]
    assert streamed_ids(str(out), 32, tmp_path) == ["a00", "a02", "a04"]
    assert takedown(str(out), str(req))["removed"] == 0


def test_a_takedown_cut_after_an_index_was_rewritten_leaves_no_old_shard(pool, tmp_path, monkeypatch):
    """Cut between rewriting a partition's index and deleting the shards it no longer lists: the rerun
    finds nothing left to drop from the new index, yet the old shards (still holding the removed
    samples) must go."""
    from deco.pipeline.curate import takedown as module

    write_tar(tmp_path / "in" / "a.tar", [(f"a{n:02d}", pool[n], url(n)) for n in range(5)])
    out = tmp_path / "out"
    run([tmp_path / "in"], out)
    req = request(tmp_path / "r.txt", ["a01"])

    def killed(merged, partition, entries):
        raise KeyboardInterrupt("killed after the partition index was rewritten")

    monkeypatch.setattr(module, "replace_merged_entries", killed)
    with pytest.raises(KeyboardInterrupt):
        takedown(str(out), str(req))
    monkeypatch.undo()
    takedown(str(out), str(req))
    for resolution in ("32", "64"):
        folder = out / resolution / "p00000"
        index = json.loads((folder / "index.json").read_text())
        listed = {"index.json"} | {i["basename"] for e in index["shards"] for i in (e["raw_data"], e.get("zip_data")) if i}
        present = {p.name for p in folder.iterdir()}
        assert present <= listed and len(present) == 1 + len(index["shards"])  # the old shard of a01 is gone
    assert streamed_ids(str(out), 32, tmp_path) == ["a00", "a02", "a03", "a04"]
