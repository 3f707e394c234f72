"""Input readers over a local directory and over S3 (moto's server): every sample exactly once, in a
fixed order, with its id; missing parts and unreadable files counted, never dropped."""
import io
import tarfile
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deco.data.object_store import open_store
from deco.data.sources import SourceConfig, SourceError, plan_partitions, read_partition
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
    assert importlib.import_module("webdataset.gopen").gopen_schemes["s3"].__module__ == "deco.data.sources"


def test_a_truncated_tar_yields_what_it_can_and_one_unreadable_sample(tmp_path):
    write_synthetic_dataset(str(tmp_path / "full"), 12, 3, "webdataset", 0.0, per_file=12)
    data = (tmp_path / "full" / "shard-00000.tar").read_bytes()
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "shard-00000.tar").write_bytes(data[: len(data) // 2])
    _, samples = read_all(SourceConfig(uris=[str(tmp_path / "cut")]))
    readable = [s for s in samples if s.reject is None]
    assert 0 < len(readable) < 12 and [s.id for s in readable] == [f"{i:06d}" for i in range(len(readable))]
    (broken,) = [s for s in samples if s.reject is not None]
    assert broken.reject.reason == "source_unreadable" and broken.id.endswith(f"@{len(readable)}")


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
