"""Object storage: the same behaviour from a local directory and from S3 (moto's server over HTTP)."""
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from deco.data.object_store import Location, StorageError, bucket_uri, is_s3, open_store, parse_uri, store_and_key


@pytest.fixture(params=["local", "s3"])
def store_uri(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_bucket") + "/prefix"


def test_put_get_list_delete(store_uri, tmp_path):
    store = open_store(store_uri)
    store.check(create=True)
    store.put_bytes("a/one.json", b"1")
    source = tmp_path / "big.bin"
    source.write_bytes(b"x" * 100_000)
    store.put_file("a/b/two.bin", source)
    assert store.get_bytes("a/one.json") == b"1"
    assert store.get_file("a/b/two.bin", tmp_path / "out.bin").read_bytes() == b"x" * 100_000
    assert list(store.list("a")) == ["a/b/two.bin", "a/one.json"]
    assert store.list_sizes("a") == {"a/b/two.bin": 100_000, "a/one.json": 1}
    assert store.exists("a/one.json") and not store.exists("a/none")
    with pytest.raises(FileNotFoundError, match="none"):
        store.get_bytes("a/none")
    store.delete_prefix("a/b")
    assert list(store.list("a")) == ["a/one.json"]


def test_missing_bucket_is_a_clear_error(s3_server):
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
        open_store("s3://no-such-bucket/x").check()


def test_uri_without_bucket_is_rejected():
    with pytest.raises(StorageError, match="names no bucket"):
        open_store("s3:///x")


# ---- prefixes are folders in both backends -----------------------------------------------------

def _put_all(store, *keys):
    for key in keys:
        store.put_bytes(key, key.encode())


def test_delete_prefix_deletes_the_folder_not_its_string_siblings(store_uri):
    store = open_store(store_uri)
    _put_all(store, "256/p10000/a", "256/p100000/a", "256/p100001/a", "256/p10000.json")
    store.delete_prefix("256/p10000")
    assert list(store.list("")) == ["256/p10000.json", "256/p100000/a", "256/p100001/a"]
    store.delete_prefix("256/p10000/")  # a trailing slash names the same folder; nothing left there
    assert list(store.list("256")) == ["256/p10000.json", "256/p100000/a", "256/p100001/a"]


def test_list_of_a_prefix_is_the_folder_or_the_single_file(store_uri):
    store = open_store(store_uri)
    _put_all(store, "stage/x", "stage/y/z", "stage2/x", "stage.json", "f/a", "f/ab", "f/a.json")
    assert list(store.list("stage")) == ["stage/x", "stage/y/z"]
    assert list(store.list("stage/")) == ["stage/x", "stage/y/z"]
    assert store.list_sizes("stage") == {"stage/x": 7, "stage/y/z": 9}
    assert list(store.list("f/a")) == ["f/a"]
    assert store.list_sizes("f/a") == {"f/a": 3}
    assert list(store.list("f/a.js")) == [] and list(store.list("stag")) == []
    assert list(store.list("")) == ["f/a", "f/a.json", "f/ab", "stage.json", "stage/x", "stage/y/z", "stage2/x"]


def test_delete_prefix_of_a_file_key_deletes_that_file_only(store_uri):
    store = open_store(store_uri)
    _put_all(store, "f/a", "f/ab", "f/a.json")
    store.delete_prefix("f/a")
    assert list(store.list("")) == ["f/a.json", "f/ab"]
    store.delete_prefix("f/none")  # nothing there: nothing to do
    assert list(store.list("f")) == ["f/a.json", "f/ab"]


def test_a_store_rooted_at_a_prefix_never_sees_a_sibling_prefix(store_uri):
    stage, stage2 = open_store(store_uri + "/stage"), open_store(store_uri + "/stage2")
    stage2.put_bytes("x", b"2")
    stage2.put_bytes("y/z", b"22")
    assert list(stage.list("")) == [] and stage.list_sizes("") == {}
    stage.put_bytes("x", b"1")
    assert stage.list_sizes("") == {"x": 1} and list(stage.list()) == ["x"]
    stage.delete_prefix("")  # the whole store, and nothing of its sibling
    assert list(stage.list("")) == []
    assert stage2.list_sizes("") == {"x": 1, "y/z": 2}


def test_delete_prefix_raises_on_every_object_s3_refused(s3_bucket):
    """A bucket policy that denies deleting some keys: S3 answers 200 with per-key Errors."""
    import json

    import boto3

    bucket = s3_bucket[len("s3://"):]
    policy = {"Version": "2012-10-17", "Statement": [{
        "Effect": "Deny", "Principal": "*", "Action": "s3:DeleteObject",
        "Resource": f"arn:aws:s3:::{bucket}/root/keep/*"}]}
    boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT_URL"]).put_bucket_policy(
        Bucket=bucket, Policy=json.dumps(policy))
    store = open_store(s3_bucket + "/root")
    _put_all(store, "gone/1", "keep/1", "keep/2", "keep/3", "keep/4")
    with pytest.raises(StorageError, match=r"could not delete 4 of 5 objects.*keep/1.*AccessDenied"):
        store.delete_prefix("")
    assert list(store.list("")) == ["keep/1", "keep/2", "keep/3", "keep/4"]


# ---- conditional create ------------------------------------------------------------------------

def test_put_if_absent_creates_once(store_uri):
    store = open_store(store_uri)
    assert store.put_if_absent("a/claim.json", b"first") is True
    assert store.put_if_absent("a/claim.json", b"second") is False
    assert store.get_bytes("a/claim.json") == b"first" and list(store.list("a")) == ["a/claim.json"]


def test_put_if_absent_lets_exactly_one_of_racing_writers_win(store_uri):
    store = open_store(store_uri)
    store.check(create=True)
    writers = 8
    barrier = threading.Barrier(writers)

    def write(i):
        own = open_store(store_uri)  # one store (and S3 client) per writer, as separate processes have
        barrier.wait()
        return own.put_if_absent("claims/c.json", f"writer {i}".encode() * 10_000)

    with ThreadPoolExecutor(writers) as pool:
        won = list(pool.map(write, range(writers)))
    assert won.count(True) == 1
    assert store.get_bytes("claims/c.json") == f"writer {won.index(True)}".encode() * 10_000
    assert list(store.list("claims")) == ["claims/c.json"]
    if not is_s3(store_uri):  # no temporary file left behind
        assert os.listdir(os.path.join(store_uri, "claims")) == ["c.json"]


# ---- one URI parser ----------------------------------------------------------------------------

def test_parse_uri(tmp_path):
    assert parse_uri("s3://b/a/k/") == Location("s3", "b", "a/k")
    assert parse_uri("s3://b") == Location("s3", "b", "")
    assert parse_uri("s3://b/").uri == "s3://b"
    local = parse_uri(str(tmp_path / "x" / ".." / "y"))
    assert local == Location("file", "", str(tmp_path / "y")) and local.uri == str(tmp_path / "y")
    for bad in ("s3:///x", "s3://"):
        with pytest.raises(StorageError, match="names no bucket"):
            parse_uri(bad)
    assert bucket_uri("s3://b/a/k") == "s3://b"
    with pytest.raises(ValueError):
        bucket_uri(str(tmp_path))


def test_store_and_key(tmp_path):
    store, key = store_and_key("s3://b/a/k.json")
    assert (store.bucket, store.prefix, key) == ("b", "", "a/k.json")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "k.json").write_bytes(b"1")
    store, key = store_and_key(str(tmp_path / "d" / "k.json"))
    assert key == "k.json" and store.get_bytes(key) == b"1"


def test_get_file_replaces_the_target_instead_of_rewriting_it_in_place(tmp_path):
    """A reader holding the old file (mmap of weights) keeps its bytes: the new copy is a new inode."""
    store = open_store(str(tmp_path / "store"))
    store.put_bytes("w.bin", b"new" * 1000)
    target = tmp_path / "local" / "w.bin"
    target.parent.mkdir()
    target.write_bytes(b"old" * 1000)
    with open(target, "rb") as held:
        before = target.stat().st_ino
        store.get_file("w.bin", target)
        assert held.read() == b"old" * 1000
    assert target.read_bytes() == b"new" * 1000 and target.stat().st_ino != before
    assert [p.name for p in target.parent.iterdir()] == ["w.bin"]
