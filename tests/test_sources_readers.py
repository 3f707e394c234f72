"""Input readers over a local directory and over S3 (moto's server): every sample exactly once, in a
fixed order, with its id; missing parts and unreadable files counted, never dropped."""
import io
import json
import tarfile
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deco.data.object_store import open_store
from deco.data.filters import Reject
from deco.data.sources import Partition, SourceConfig, SourceError, plan_partitions, plan_sources, read_partition
from deco.data.synthetic_faults import synthetic_samples, write_synthetic_dataset


def read_all(cfg):
    partitions = plan_partitions(cfg)
    return partitions, [s for p in partitions for s in read_partition(p, cfg)]


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    # conftest's bucket names are cut to 40 characters, so parametrized tests share a bucket
    return str(tmp_path / "data") if request.param == "local" else f"{request.getfixturevalue('s3_bucket')}/{uuid.uuid4().hex}"


@pytest.mark.parametrize("layout", ["webdataset", "parquet", "folder"])
def test_every_layout_reads_back_every_sample_in_order(root, layout):
    write_synthetic_dataset(root, 45, 1, layout, 0.3, per_file=20)
    expected = synthetic_samples(45, 1, 0.3)
    partitions, samples = read_all(SourceConfig(uris=[root], partition_size=16))
    assert [s.id for s in samples] == [e.id for e in expected]
    for sample, truth in zip(samples, expected):
        assert sample.image == truth.image and sample.reject is None
        assert sample.caption in (truth.caption, truth.caption.decode("utf-8", "replace"))
    kinds = {p.kind for p in partitions}
    assert kinds == {layout}
    assert len(partitions) == {"webdataset": 3, "parquet": 5, "folder": 3}[layout]
    assert plan_partitions(SourceConfig(uris=[root], partition_size=16)) == partitions  # deterministic


def test_parquet_row_ranges_cross_row_groups(tmp_path):
    rows = [{"image": bytes([i]), "caption": f"caption {i}"} for i in range(23)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "x.parquet", row_group_size=7)
    partitions, samples = read_all(SourceConfig(uris=[str(tmp_path)], partition_size=5))
    assert [(p.start, p.stop) for p in partitions] == [(0, 5), (5, 10), (10, 15), (15, 20), (20, 23)]
    assert [s.id for s in samples] == [f"x:{i}" for i in range(23)]
    assert [s.image for s in samples] == [bytes([i]) for i in range(23)]


def test_hugging_face_image_structs_and_missing_columns(tmp_path):
    table = pa.table({"img": [{"bytes": b"abc", "path": "a.jpg"}, None], "text": ["one two", None], "key": [7, 8]})
    pq.write_table(table, tmp_path / "hf.parquet")
    cfg = SourceConfig(uris=[str(tmp_path)], image_column="img", caption_column="text", id_column="key")
    _, samples = read_all(cfg)
    assert [(s.id, s.image, s.caption) for s in samples] == [("7", b"abc", "one two"), ("8", None, None)]
    with pytest.raises(SourceError, match="no column 'image'.*sources.image_column"):
        plan_partitions(SourceConfig(uris=[str(tmp_path)], caption_column="text"))


def test_folder_pairs_images_with_sidecars_and_counts_orphans(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.png").write_bytes(b"A")
    (tmp_path / "sub" / "a.txt").write_bytes(b"caption a")
    (tmp_path / "b.jpg").write_bytes(b"B")  # no caption
    (tmp_path / "c.txt").write_bytes(b"caption without image")
    (tmp_path / "d.webp").write_bytes(b"D")
    (tmp_path / "d.json").write_text('{"caption": "from json"}')
    (tmp_path / ".hidden.txt").write_text("ignored")
    _, samples = read_all(SourceConfig(uris=[str(tmp_path)]))
    assert [(s.id, s.image, s.caption) for s in samples] == [
        ("b", b"B", None), ("c", None, b"caption without image"), ("d", b"D", "from json"), ("sub/a", b"A", b"caption a")]


def test_webdataset_from_s3_through_the_gopen_handler(s3_bucket):
    import importlib

    write_synthetic_dataset(s3_bucket + "/wds", 30, 2, "webdataset", 0.0, per_file=30)
    _, samples = read_all(SourceConfig(uris=[s3_bucket + "/wds/shard-{00000..00000}.tar"]))
    assert [s.id for s in samples] == [f"{i:06d}" for i in range(30)]
    assert importlib.import_module("webdataset.gopen").gopen_schemes["s3"].__module__ == "deco.data.source_tars"


def test_a_tar_cut_inside_a_member_yields_what_it_can_and_one_truncated_sample(tmp_path):
    write_synthetic_dataset(str(tmp_path / "full"), 12, 3, "webdataset", 0.0, per_file=12)
    data = (tmp_path / "full" / "shard-00000.tar").read_bytes()
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "shard-00000.tar").write_bytes(data[: len(data) // 2])
    _, samples = read_all(SourceConfig(uris=[str(tmp_path / "cut")]))
    readable = [s for s in samples if s.reject is None]
    assert 0 < len(readable) < 12 and [s.id for s in readable] == [f"{i:06d}" for i in range(len(readable))]
    (broken,) = [s for s in samples if s.reject is not None]
    assert broken.reject.reason == "source_truncated" and broken.id.endswith(f"@{len(readable)}")
    assert broken.reject.detail.startswith(f"shard-00000.tar: ends inside a member at byte {len(data) // 2};")


def test_qualified_ids_keep_restarting_keys_apart(tmp_path):
    for name in ("a", "b"):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for member, payload in (("0.jpg", b"x"), ("0.txt", b"y")):
                info = tarfile.TarInfo(member)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
        (tmp_path / f"{name}.tar").write_bytes(buffer.getvalue())
    _, samples = read_all(SourceConfig(uris=[str(tmp_path)], qualify_ids=True))
    assert [s.id for s in samples] == ["a/0", "b/0"]


def test_a_corrupt_parquet_file_is_one_counted_sample(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    partitions, samples = read_all(SourceConfig(uris=[str(tmp_path)]))
    assert [p.kind for p in partitions] == ["unreadable"]
    assert [s.reject.reason for s in samples] == ["source_unreadable"]


def test_missing_inputs_are_clear_errors(tmp_path, s3_bucket):
    with pytest.raises(SourceError, match="does not exist"):
        plan_partitions(SourceConfig(uris=[str(tmp_path / "nothing")]))
    open_store(s3_bucket).put_bytes("notes/readme.md", b"x")
    with pytest.raises(SourceError, match="holds no folder files"):
        plan_partitions(SourceConfig(uris=[s3_bucket + "/notes"]))
    with pytest.raises(SourceError, match="no input"):
        plan_partitions(SourceConfig(uris=[]))


# ------------------------------------------------------------------------------------------------
# Truncated and damaged archives, odd names and values, formats chosen from what files hold
# ------------------------------------------------------------------------------------------------

DEMO = str(Path(__file__).resolve().parents[1] / "configs" / "data" / "curate_demo.yaml")


def curate_local(input_uri, output_uri, *overrides):
    from deco.pipeline.curate.job import curate, load_curate_config

    return curate(load_curate_config(DEMO, ["progress=false", "execution=local", *overrides], [str(input_uri)],
                                     str(output_uri)))


def rejects_of(output):
    from deco.data.shards import read_table

    return [(r["id"], r["reason"], r["detail"]) for r in read_table((Path(output) / "rejects.parquet").read_bytes()).to_pylist()]


def tar_of(members, **kw) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", **kw) as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


def header_offsets(data: bytes) -> tuple[list[int], int]:
    """Where each member's header starts, and where the end-of-archive marker starts."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        offsets = [m.offset for m in tar.getmembers()]
        return offsets, tar.offset


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    """24 clean samples in one tar: image, txt and json members per sample."""
    root = tmp_path_factory.mktemp("shard")
    write_synthetic_dataset(str(root), 24, 3, "webdataset", 0.0, per_file=24)
    return (root / "shard-00000.tar").read_bytes()


def test_a_tar_cut_at_a_member_boundary_is_truncated_not_complete(tmp_path, shard):
    offsets, end = header_offsets(shard)
    assert len(offsets) == 72
    # a lone zero block is a complete archive; so is the whole file
    for name, data in (("whole", shard), ("one-zero-block", shard[: end + 512])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "a.tar").write_bytes(data)
        _, samples = read_all(SourceConfig(uris=[str(tmp_path / name)]))
        assert len(samples) == 24 and all(s.reject is None for s in samples)
    # cut before sample 10's first member, and after it: the sample in progress (whose members may
    # be missing) is counted in the one truncated record, with every sample before it
    for member, readable in ((30, 9), (31, 10)):
        (tmp_path / f"cut{member}").mkdir()
        (tmp_path / f"cut{member}" / "a.tar").write_bytes(shard[: offsets[member]])
        _, samples = read_all(SourceConfig(uris=[str(tmp_path / f"cut{member}")]))
        assert [s.id for s in samples[:-1]] == [f"{i:06d}" for i in range(readable)]
        assert all(s.reject is None for s in samples[:-1])
        last = samples[-1]
        assert last.id == f"{tmp_path / f'cut{member}' / 'a.tar'}@{readable}"
        assert (last.reject.reason, last.reject.detail) == (
            "source_truncated", f"a.tar: ends without the end-of-archive marker at byte {offsets[member]}; "
                                f"sample '{readable:06d}' and any after it are lost")


def test_a_truncated_tar_through_the_job_counts_every_sample_it_held(tmp_path, shard):
    offsets, _ = header_offsets(shard)
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "a.tar").write_bytes(shard[: offsets[31]])
    report = curate_local(tmp_path / "cut", tmp_path / "out")
    assert (report["samples_in"], report["samples_kept"], report["rejected"]) == (11, 10, {"source_truncated": 1})
    ((sample_id, reason, detail),) = rejects_of(tmp_path / "out")
    assert reason == "source_truncated" and sample_id.endswith("a.tar@10") and f"at byte {offsets[31]}" in detail


def test_gzipped_tars_read_and_cut_or_damaged_ones_are_one_counted_sample(tmp_path, shard):
    import gzip

    packed = gzip.compress(shard, mtime=0)
    damaged = bytearray(packed)
    damaged[len(packed) // 2: len(packed) // 2 + 16] = bytes(16)
    cases = {"whole": (packed, 24, None), "cut": (packed[: len(packed) // 2], None, "source_truncated"),
             "damaged": (bytes(damaged), None, "source_unreadable")}
    for name, (data, count, reason) in cases.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "a.tar.gz").write_bytes(data)
        _, samples = read_all(SourceConfig(uris=[str(tmp_path / name)], qualify_ids=True))
        good = [s for s in samples if s.reject is None]
        assert [s.id for s in good] == [f"a/{i:06d}" for i in range(len(good))]
        if reason is None:
            assert len(samples) == count
        else:
            assert 0 < len(good) < 24 and [s.reject.reason for s in samples[len(good):]] == [reason]


def test_undecodable_or_unprintable_member_names_are_bad_name_rejects(tmp_path):
    members = [("000000.jpg", b"A"), ("000000.txt", b"a caption"), ("caf\udce9.jpg", b"B"), ("caf\udce9.txt", b"b"),
               ("line\nbreak.jpg", b"C"), ("000003.jpg", b"D")]
    (tmp_path / "a.tar").write_bytes(tar_of(members, format=tarfile.USTAR_FORMAT))  # names as raw bytes
    _, samples = read_all(SourceConfig(uris=[str(tmp_path)]))
    assert [(s.id, s.reject.reason if s.reject else None) for s in samples] == [
        ("000000", None), ("caf\\xe9", "bad_name"), ("line\\nbreak", "bad_name"), ("000003", None)]
    assert samples[1].image is None and samples[3].image == b"D"
    # a file name that is not UTF-8 is escaped in ids and details alike; the job writes them all
    (tmp_path / "b\udcff.tar").write_bytes(tar_of([("0.jpg", b"x")])[:512])
    _, samples = read_all(SourceConfig(uris=[str(tmp_path)]))
    assert samples[-1].id == f"{tmp_path}/b\\xff.tar@0"
    assert samples[-1].reject == Reject("source_truncated", "b\\xff.tar: ends inside a member at byte 512; "
                                                            "sample '0' and any after it are lost")
    report = curate_local(tmp_path, tmp_path.parent / f"{tmp_path.name}-out")
    assert report["samples_in"] == 5 and report["rejected"] == {
        "bad_name": 2, "source_truncated": 1, "image_undecodable": 1, "caption_missing": 1}
    assert {r[0] for r in rejects_of(tmp_path.parent / f"{tmp_path.name}-out")} == {
        "caf\\xe9", "line\\nbreak", "000000", "000003", f"{tmp_path}/b\\xff.tar@0"}


def test_one_bad_value_is_one_reject_never_a_failed_job(tmp_path, monkeypatch):
    from deco.data import source_formats

    monkeypatch.setattr(source_formats, "MAX_VALUE_BYTES", 2**16)
    good = synthetic_samples(4, 7)
    images = [s.image for s in good]
    assert all(len(i) < 2**16 for i in images)
    tables = {
        "a": pa.table({"image": pa.array(images[:2], pa.binary()), "caption": [s.caption.decode() for s in good[:2]]}),
        "b": pa.table({"image": ["not bytes"], "caption": ["a photo of a bird"]}),
        "c": pa.table({"image": pa.array([2**40], pa.int64()), "caption": ["a photo of a bird"]}),
        "d": pa.table({"image": pa.array([images[2]], pa.binary()), "caption": pa.array([7], pa.int64())}),
        "e": pa.table({"image": pa.array([b"\xff\xd8\xff" + bytes(2**16)], pa.binary()), "caption": ["a photo of a cat"]}),
        "f": pa.table({"image": [{"bytes": images[3], "path": "x.jpg"}], "caption": [good[3].caption.decode()]}),
    }
    (tmp_path / "in").mkdir()
    for name, table in tables.items():
        pq.write_table(table, tmp_path / "in" / f"{name}.parquet")
    report = curate_local(tmp_path / "in", tmp_path / "out")
    assert (report["samples_in"], report["samples_kept"], report["rejected"]) == (7, 3, {"bad_value": 4})
    assert sorted(rejects_of(tmp_path / "out")) == [
        ("b:0", "bad_value", "image is str, not bytes"), ("c:0", "bad_value", "image is int, not bytes"),
        ("d:0", "bad_value", "caption is int, not text or bytes"),
        ("e:0", "bad_value", f"image is {2**16 + 3} bytes, over {2**16}")]
    # a tar member over the cap is skipped unread, and the next sample still reads
    (tmp_path / "tar").mkdir()
    (tmp_path / "tar" / "t.tar").write_bytes(tar_of([("0.jpg", bytes(2**16 + 1)), ("0.txt", b"x"), ("1.jpg", b"ok")]))
    _, samples = read_all(SourceConfig(uris=[str(tmp_path / "tar")]))
    assert [(s.id, s.image, s.reject) for s in samples] == [
        ("0", None, Reject("bad_value", f"member jpg is {2**16 + 1} bytes, over {2**16}")), ("1", b"ok", None)]


def img2dataset_table(samples, failed=()):
    """img2dataset's parquet layout: key, url, caption, status and the JPEG bytes under `jpg`."""
    return pa.table({"key": [s.id for s in samples], "url": [f"http://192.0.2.1/{s.id}.jpg" for s in samples],
                     "caption": [s.caption.decode() for s in samples],
                     "status": ["failed_to_download" if i in failed else "success" for i in range(len(samples))],
                     "jpg": pa.array([None if i in failed else s.image for i, s in enumerate(samples)], pa.binary())})


def test_image_bytes_under_another_column_are_read_from_it_and_the_report_says_so(tmp_path, capsys):
    samples = synthetic_samples(6, 5)
    (tmp_path / "in").mkdir()
    pq.write_table(img2dataset_table(samples, failed=(0,)), tmp_path / "in" / "00000.parquet")  # a null first
    plan = plan_sources(SourceConfig(uris=[str(tmp_path / "in")]))
    assert [(p.kind, p.column) for p in plan.partitions] == [("parquet", "jpg")]
    assert plan.partitions[0].to_dict()["column"] == "jpg"
    assert Partition.from_dict(plan.partitions[0].to_dict()) == plan.partitions[0]
    assert "column" not in Partition(index=0, kind="parquet", uri="x").to_dict()  # earlier plans still compare equal
    why = "1 parquet file, 6 rows, images from column 'jpg': there is no column 'image', set sources.image_column to choose"
    assert plan.inputs == [{"uri": str(tmp_path / "in"), "format": "parquet", "files": 1, "samples": 6,
                            "image_column": "jpg", "why": why}]
    report = curate_local(tmp_path / "in", tmp_path / "out", "sources.http.retries=0")
    assert (report["samples_in"], report["samples_kept"], report["rejected"]) == (6, 5, {"image_missing": 1})
    assert report["inputs"] == plan.inputs
    assert f"deco curate: {tmp_path / 'in'}: parquet ({why})" in capsys.readouterr().out


def test_url_lists_are_downloaded_only_when_the_config_says_so(tmp_path):
    pq.write_table(pa.table({"url": ["http://192.0.2.1/a.jpg"], "caption": ["a photo of a cat"]}), tmp_path / "l.parquet")
    with pytest.raises(SourceError, match=r"l.parquet holds URLs \(column 'url'\), not images: "
                                          r"set sources.format: urls to download them$"):
        plan_partitions(SourceConfig(uris=[str(tmp_path)]))
    plan = plan_sources(SourceConfig(uris=[str(tmp_path)], format="urls"))
    assert [p.kind for p in plan.partitions] == ["urls"]
    assert plan.inputs[0]["why"] == "1 parquet file, 1 URL in column 'url', downloaded; sources.format: urls"


def test_a_missing_column_names_the_column_most_likely_meant(tmp_path):
    image = synthetic_samples(1, 0)[0].image
    pq.write_table(pa.table({"key": ["k"], "IMG": pa.array([image], pa.binary()), "TEXT": ["a photo of a cat"]}),
                   tmp_path / "a.parquet")
    with pytest.raises(SourceError, match=r"no column 'caption' \(columns: \['key', 'IMG', 'TEXT'\]\); "
                                          r"did you mean 'TEXT'\? set sources.caption_column$"):
        plan_partitions(SourceConfig(uris=[str(tmp_path)]))
    (tmp_path / "a.parquet").unlink()
    pq.write_table(pa.table({"jpg": pa.array([image], pa.binary()), "png": pa.array([image], pa.binary()),
                             "caption": ["x"]}), tmp_path / "b.parquet")
    with pytest.raises(SourceError, match=r"no column 'image', and columns 'jpg' \(JPEG\), 'png' \(JPEG\) all hold "
                                          r"image bytes: set sources.image_column to the one to read$"):
        plan_partitions(SourceConfig(uris=[str(tmp_path)]))
    (tmp_path / "b.parquet").unlink()
    pq.write_table(pa.table({"picture": ["a.jpg"], "captions": ["x"]}), tmp_path / "c.parquet")
    with pytest.raises(SourceError, match=r"no column 'image' .*; set sources.image_column$"):
        plan_partitions(SourceConfig(uris=[str(tmp_path)], caption_column="captions"))
    with pytest.raises(SourceError, match=r"did you mean 'captions'\? set sources.caption_column$"):
        plan_partitions(SourceConfig(uris=[str(tmp_path)], image_column="picture"))


def test_tars_and_parquets_in_one_input_are_refused_under_auto(tmp_path):
    (tmp_path / "a.tar").write_bytes(tar_of([("0.jpg", b"x")]))
    pq.write_table(pa.table({"image": [b"x"], "caption": ["y"]}), tmp_path / "b.parquet")
    with pytest.raises(SourceError, match="holds both tar and parquet files: set sources.format"):
        plan_partitions(SourceConfig(uris=[str(tmp_path)]))
    assert [p.kind for p in plan_partitions(SourceConfig(uris=[str(tmp_path)], format="webdataset"))] == ["webdataset"]


def test_a_job_that_keeps_nothing_exits_non_zero_with_one_line(tmp_path):
    import subprocess

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "in").mkdir()
    for i in range(3):
        (tmp_path / "in" / f"{i}.jpg").write_bytes(b"<html>404</html>")
        (tmp_path / "in" / f"{i}.txt").write_text("a photo of a red circle")
    command = [str(root / ".venv" / "bin" / "deco"), "curate", "--config", DEMO, "--input", str(tmp_path / "in"),
               "--output", str(tmp_path / "out"), "--set", "execution=local", "--set", "progress=false"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=root)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        f"deco: error: kept 0 of 3 samples; top rejects: image_undecodable 3; report: {tmp_path / 'out'}/curation_report.json"]
    assert f"deco curate: {tmp_path / 'in'}: folder (3 images, 3 caption files)" in done.stdout
    assert json.loads((tmp_path / "out" / "curation_report.json").read_text())["samples_kept"] == 0


def test_kept_fraction_floor():
    from deco.pipeline.curate.config import CurateConfig
    from deco.pipeline.curate.job import KeptTooFew, check_kept

    report = {"samples_in": 10, "samples_kept": 6, "rejected": {"caption_empty": 3, "image_too_small": 1},
              "output": "/o/"}
    check_kept(report, CurateConfig(min_kept_fraction=0.6))
    with pytest.raises(KeptTooFew, match=r"^kept 6 of 10 samples, under min_kept_fraction 0.7; top rejects: "
                                         r"caption_empty 3, image_too_small 1; report: /o/curation_report.json$"):
        check_kept(report, CurateConfig(min_kept_fraction=0.7))
    with pytest.raises(KeptTooFew, match="^kept 0 of 0 samples; nothing rejected;"):
        check_kept({"samples_in": 0, "samples_kept": 0, "rejected": {}, "output": "/o"}, CurateConfig())


def test_a_corrupt_row_group_is_counted_row_by_row_and_the_rest_of_the_file_reads(tmp_path):
    samples = synthetic_samples(8, 11)
    table = pa.table({"image": pa.array([s.image for s in samples], pa.binary()),
                      "caption": [s.caption.decode() for s in samples]})
    (tmp_path / "in").mkdir()
    path = tmp_path / "in" / "x.parquet"
    pq.write_table(table, path, row_group_size=4, compression="snappy")
    meta = pq.ParquetFile(path).metadata
    second = meta.row_group(1).column(0)  # the second row group's image column chunk: its bytes garbled
    data = bytearray(path.read_bytes())
    start = second.data_page_offset
    data[start:start + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))
    report = curate_local(tmp_path / "in", tmp_path / "out", "sources.partition_size=4")
    assert (report["samples_in"], report["samples_kept"], report["rejected"]) == (8, 4, {"source_unreadable": 4})
    assert sorted(r[0] for r in rejects_of(tmp_path / "out")) == [f"x:{i}" for i in range(4, 8)]
