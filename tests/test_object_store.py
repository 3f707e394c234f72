"""Object storage: the same behaviour from a local directory and from S3 (moto's server over HTTP)."""
import pytest

from deco.data.object_store import StorageError, open_store


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
