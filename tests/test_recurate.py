"""Inputs added to a finished curation output: curated as a new run into new partitions (earlier shards
untouched, earlier kept samples never displaced), or refused with one line; never 'already complete'
while inputs were skipped. Real webdataset tars of real images, the job run in-process (execution=local)."""
import io
import json
import shutil
import tarfile
import uuid
from pathlib import Path

import pytest

from deco.data.shards import read_table
from deco.data.synthetic_faults import synthetic_samples
from deco.orchestration import curation
from deco.pipeline.config import ConfigError
from deco.pipeline.curate.config import output_fingerprint
from deco.pipeline.curate.job import curate, load_curate_config

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "data" / "curate_demo.yaml")
LOCAL = ["progress=false", "execution=local"]


def config(inputs, output, *overrides):
    return load_curate_config(DEMO, [*LOCAL, *overrides], [str(i) for i in inputs], str(output))


def run(inputs, output, *overrides):
    return curate(config(inputs, output, *overrides))


def write_tar(path: Path, members: list[tuple[str, bytes, str, bytes]]) -> None:
    """A webdataset tar: <id>.<ext> (the image file) and <id>.txt per sample."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for sample_id, image, ext, caption in members:
            for name, data in ((f"{sample_id}.{ext}", image), (f"{sample_id}.txt", caption)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def streamed_ids(output: Path, resolution: int, cache: Path) -> list[str]:
    from streaming import StreamingDataset
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()
    dataset = StreamingDataset(remote=str(output / str(resolution)), local=str(cache / uuid.uuid4().hex),
                               shuffle=False, batch_size=1)
    return [s["id"] for s in dataset]


def shard_files(output: Path) -> dict[str, bytes]:
    """Every shard file (not the merged indexes) under the resolution folders."""
    return {str(p.relative_to(output)): p.read_bytes() for r in (32, 64) for p in (output / str(r)).rglob("*")
            if p.is_file() and p.parent != output / str(r)}


def rejects(output: Path) -> list[dict]:
    return read_table((output / "rejects.parquet").read_bytes()).to_pylist()


@pytest.fixture(scope="module")
def pool():
    """24 clean samples whose images are pairwise far apart (no accidental near duplicates)."""
    return synthetic_samples(24, seed=11)


def members(samples, prefix):
    return [(f"{prefix}{n:02d}", s.image, s.ext, s.caption) for n, s in enumerate(samples)]


@pytest.fixture(scope="module")
def inputs(pool, tmp_path_factory):
    """in/a1.tar + in/a2.tar (run 1), then in/0b.tar (added: it sorts before them). 0b.tar holds 10 new
    samples, an exact copy of a00 under the id 0copy (smaller than a00: a fresh job would keep 0copy),
    and a new image under the id a01 (an id an earlier run already holds)."""
    root = tmp_path_factory.mktemp("recurate")
    a = members(pool[:12], "a")
    write_tar(root / "in" / "a1.tar", a[:6])
    write_tar(root / "in" / "a2.tar", a[6:])
    b = members(pool[12:22], "b")
    b.insert(3, ("0copy", pool[0].image, pool[0].ext, pool[0].caption))
    b.append(("a01", pool[22].image, pool[22].ext, pool[22].caption))
    write_tar(root / "later" / "0b.tar", b)
    return root, [m[0] for m in a], [m[0] for m in b]


@pytest.fixture(scope="module")
def added(inputs):
    """Run 1 on in/ (a1, a2); a copy of that finished output; then 0b.tar added to in/ and run 2."""
    root, _, _ = inputs
    out = root / "out"
    first = run([root / "in"], out)
    before = shard_files(out)
    shutil.copytree(out, root / "first_only")
    shutil.copy(root / "later" / "0b.tar", root / "in" / "0b.tar")
    second = run([root / "in"], out)
    return out, first, before, second


def test_added_tar_is_curated_into_new_partitions_and_earlier_shards_stay(added, inputs, tmp_path):
    out, first, before, second = added
    _, a_ids, b_ids = inputs
    assert first["partitions"] == 2 and first["samples_kept"] == 12 and first["runs"][0]["partitions"] == 2
    assert second["samples_in"] == 12 + 12 and second["samples_kept"] == 12 + 10
    assert second["rejected"] == {"duplicate_exact": 1, "duplicate_id": 1}
    assert second["partitions"] == 3 and second["partitions_added"] == 1 and second["partitions_resumed"] == 2
    assert [(r["partitions"], r["first"], r["last"]) for r in second["runs"]] == [(2, "p00000", "p00001"),
                                                                                (1, "p00002", "p00002")]
    after = shard_files(out)
    assert {k: v for k, v in after.items() if k in before} == before  # byte-identical, none renamed
    assert sorted(set(after) - set(before)) == sorted(k for k in after if "/p00002/" in k) != []
    reasons = {(r["id"], r["partition"]): (r["reason"], r["detail"]) for r in rejects(out)}
    assert reasons[("0copy", "p00002")][0] == "duplicate_exact"  # the earlier kept a00 is not displaced
    assert reasons[("0copy", "p00002")][1].startswith("of a00 ")
    assert reasons[("a01", "p00002")] == ("duplicate_id", "first in p00000")
    kept_b = [i for i in b_ids if i not in ("0copy", "a01")]
    for resolution in (32, 64):
        assert streamed_ids(out, resolution, tmp_path) == a_ids + kept_b
        assert second["shards"][str(resolution)]["samples"] == 22
    plan = json.loads((out / curation.PLAN_KEY).read_text())
    assert [Path(p["uri"]).name for p in plan["partitions"]] == ["a1.tar", "a2.tar", "0b.tar"]
    assert not list((out / "_work" / "stage").glob("*.samples.parquet"))  # the staged images are gone
    assert len(list((out / "_work" / "stage").glob("*.keys.parquet"))) == 3  # the keys stay for later runs


def test_rerun_with_the_same_inputs_is_complete_and_rewrites_nothing(added, inputs):
    out, _, _, second = added
    root = inputs[0]
    files = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}
    again = run([root / "in" / name for name in ("0b.tar", "a2.tar", "a1.tar")], out)  # in any order
    assert again["already_complete"] and again["samples_kept"] == second["samples_kept"]
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()} == files


def test_gone_changed_inputs_and_other_settings_are_refused_in_one_line(added, inputs, tmp_path):
    out, _, _, _ = added
    root = inputs[0]
    with pytest.raises(ConfigError) as gone:
        run([root / "in" / "a1.tar", root / "in" / "0b.tar"], out)
    message = str(gone.value)
    assert "\n" not in message and "a2.tar is gone" in message and "use a new --output" in message
    with pytest.raises(ConfigError, match="already holds a curated dataset made with other settings"):
        run([root / "in"], out, "dedup.hamming_threshold=3")

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = lambda n: pa.table({"id": [f"r{i}" for i in range(n)], "image": [inputs_pool_image(root)] * n,  # noqa: E731
                               "caption": ["a photo of a red circle"] * n})
    pq.write_table(rows(3), tmp_path / "t.parquet")
    run([tmp_path / "t.parquet"], tmp_path / "p")
    pq.write_table(rows(5), tmp_path / "t.parquet")  # the same file with other rows
    with pytest.raises(ConfigError) as changed:
        run([tmp_path / "t.parquet"], tmp_path / "p")
    assert "\n" not in str(changed.value) and "t.parquet changed" in str(changed.value)
    assert "use a new --output" in str(changed.value)


def inputs_pool_image(root: Path) -> bytes:
    with tarfile.open(root / "in" / "a1.tar") as tar:
        member = next(m for m in tar.getmembers() if not m.name.endswith(".txt"))
        return tar.extractfile(member).read()


def test_deleted_work_folder_never_reads_as_complete_with_inputs_skipped(added, inputs):
    root = inputs[0]
    out = root / "first_only"  # finished on a1 + a2 only
    shutil.rmtree(out / "_work")
    with pytest.raises(ConfigError) as refused:
        run([root / "in"], out)  # now with 0b.tar too
    assert "\n" not in str(refused.value) and "use a new --output" in str(refused.value)
    assert "_work" in str(refused.value)
    again = run([root / "in" / "a1.tar", root / "in" / "a2.tar"], out)  # the inputs it was made from
    assert again["already_complete"]


def test_interrupted_addition_resumes_to_the_same_output(added, inputs, monkeypatch, tmp_path):
    out, _, _, second = added
    root = inputs[0]
    resumed = tmp_path / "resumed"
    run([root / "in" / "a1.tar", root / "in" / "a2.tar"], resumed)
    real = curation.write_partition

    def killed(partition, *args):
        raise KeyboardInterrupt(f"killed before writing {partition}")

    monkeypatch.setattr(curation, "write_partition", killed)
    with pytest.raises(KeyboardInterrupt):
        run([root / "in"], resumed)  # staged 0b.tar, then stopped between the passes
    assert (resumed / "_work" / "stage" / "p00002.done.json").exists()
    assert not (resumed / "_work" / "written" / "p00002.json").exists()
    monkeypatch.setattr(curation, "write_partition", real)
    report = run([root / "in"], resumed)
    assert not report.get("already_complete") and report["partitions_resumed"] == 3
    for key in ("samples_in", "samples_kept", "rejected", "shards"):
        assert report[key] == second[key]
    assert [r["partitions"] for r in report["runs"]] == [r["partitions"] for r in second["runs"]] == [2, 1]
    assert shard_files(resumed) == shard_files(out)
    assert (resumed / "rejects.parquet").read_bytes() == (out / "rejects.parquet").read_bytes()
    for r in (32, 64):
        assert (resumed / str(r) / "index.json").read_bytes() == (out / str(r) / "index.json").read_bytes()


def test_partition_names_past_p99999_merge_in_plan_order(inputs, tmp_path):
    """An output whose partitions end at p99999 gains p100000, which lists before p99999 as a string:
    the merged index and rejects.parquet follow the plan, not the listing."""
    root, a_ids, b_ids = inputs
    out = tmp_path / "big"
    cfg = config([root / "in" / "a1.tar", root / "in" / "a2.tar"], out)
    from deco.data.sources import plan_partitions

    planned = [p.to_dict() | {"index": 99998 + n} for n, p in enumerate(plan_partitions(cfg.sources))]
    (out / "_work").mkdir(parents=True)
    (out / curation.PLAN_KEY).write_text(json.dumps({"fingerprint": output_fingerprint(cfg), "partitions": planned}))
    first = curate(cfg)
    assert sorted(p.name for p in (out / "32").iterdir() if p.is_dir()) == ["p99998", "p99999"]
    second = run([root / "in" / "a1.tar", root / "in" / "a2.tar", root / "later" / "0b.tar"], out)
    assert first["samples_kept"] == 12 and second["samples_kept"] == 22
    assert second["runs"][-1] == {"inputs": second["config"]["sources"]["uris"], "partitions": 1,
                                  "first": "p100000", "last": "p100000"}
    assert (out / "64" / "p100000" / "index.json").is_file()
    assert streamed_ids(out, 64, tmp_path) == a_ids + [i for i in b_ids if i not in ("0copy", "a01")]
    index = json.loads((out / "32" / "index.json").read_text())
    folders = [s["raw_data"]["basename"].split("/")[0] for s in index["shards"]]
    assert folders == sorted(folders, key=lambda name: int(name[1:])) and folders[-1] == "p100000"
    assert [r["partition"] for r in rejects(out)] == ["p100000", "p100000"]


def test_output_finished_before_keys_were_kept_gains_inputs_by_restaging(added, inputs, tmp_path):
    """An output as the code before re-curation left it: fingerprint over the input list, no runs or
    inputs digest, _work/stage deleted. Adding 0b.tar restages a1 + a2 for their keys (their shards
    are not rewritten) and ends with the same output as the addition above."""
    out, _, _, second = added
    root = inputs[0]
    legacy = tmp_path / "legacy"
    old_inputs = [root / "in" / "a1.tar", root / "in" / "a2.tar"]
    run(old_inputs, legacy)
    old_fingerprint = output_fingerprint(config(old_inputs, legacy))
    report = json.loads((legacy / "curation_report.json").read_text())
    for key in ("runs", "inputs_digest", "partitions_added"):
        report.pop(key)
    (legacy / "curation_report.json").write_text(json.dumps(report | {"fingerprint": old_fingerprint}))
    plan = json.loads((legacy / curation.PLAN_KEY).read_text())
    (legacy / curation.PLAN_KEY).write_text(json.dumps({"fingerprint": old_fingerprint,
                                                        "partitions": plan["partitions"]}))
    shutil.rmtree(legacy / "_work" / "stage")
    before = {p: p.stat().st_mtime_ns for p in (legacy / "64").rglob("*") if p.is_file() and "p0000" in str(p)}
    again = run(old_inputs, legacy)
    assert again["already_complete"]
    added_report = run([*old_inputs, root / "in" / "0b.tar"], legacy)  # the same file as `added`: same sources
    assert not added_report.get("already_complete") and added_report["partitions_resumed"] == 0
    for key in ("samples_in", "samples_kept", "rejected", "shards"):
        assert added_report[key] == second[key]
    assert {p: p.stat().st_mtime_ns for p in before} == before  # a1's and a2's shards were not rewritten
    assert shard_files(legacy) == shard_files(out)
    assert (legacy / "rejects.parquet").read_bytes() == (out / "rejects.parquet").read_bytes()
