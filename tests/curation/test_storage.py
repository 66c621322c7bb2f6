"""The storage layer on a local folder and on a real S3 API on loopback (moto's server)."""

import pytest

from curation.storage import Store, is_uri, scratch_dir


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return Store(tmp_path / "root")
    return Store(request.getfixturevalue("s3_bucket") + "/run")


def test_roundtrip_list_local_path(store, tmp_path):
    store.write_bytes("a/b/x.bin", b"hello")
    store.write_json("a/c.json", {"k": 1})
    assert store.exists("a/b/x.bin") and not store.exists("a/b/missing")
    assert store.read_bytes("a/b/x.bin") == b"hello"
    assert store.read_json("a/c.json") == {"k": 1}
    assert store.read_json("nope.json", default={}) == {}
    assert list(store.list("a")) == ["a/b/x.bin", "a/c.json"]
    assert list(store.list("", suffix=".json")) == ["a/c.json"]
    with open(store.local_path("a/b/x.bin"), "rb") as f:
        assert f.read() == b"hello"
    src = tmp_path / "src.bin"
    src.write_bytes(b"12345")
    store.put_file("up/src.bin", src)
    assert store.size("up/src.bin") == 5
    with store.writer("w/out.bin") as f:
        f.write(b"abc")
    assert store.read_bytes("w/out.bin") == b"abc"
    store.delete("w/out.bin")
    assert not store.exists("w/out.bin")


def test_failed_writer_leaves_nothing(store):
    with pytest.raises(RuntimeError), store.writer("w/broken.bin") as f:
        f.write(b"partial")
        raise RuntimeError("killed")
    assert not store.exists("w/broken.bin")
    assert list(store.list("w")) == []


def test_paths_are_confined(store):
    with pytest.raises(ValueError, match="escapes"):
        store.path("../outside")


def test_uri_and_pickle(s3_bucket, tmp_path):
    import pickle

    s = Store(s3_bucket + "/p")
    assert is_uri(s.uri) and not s.is_local
    assert s.uri_of("x/y") == s3_bucket + "/p/x/y"
    s2 = pickle.loads(pickle.dumps(s))
    s2.write_bytes("k", b"v")
    assert s.read_bytes("k") == b"v"
    assert scratch_dir(Store(tmp_path)) == str(tmp_path)
    assert scratch_dir(s) != scratch_dir(Store(s3_bucket + "/q"))


def test_a_killed_writers_temp_file_is_removed_by_the_next_write(tmp_path):
    store = Store(tmp_path)
    stale = tmp_path / ".summary.json.abc123.tmp"  # what a SIGKILL during an atomic write leaves
    stale.write_bytes(b"partial")
    other = tmp_path / ".other.json.def456.tmp"
    other.write_bytes(b"not ours")
    store.write_json("summary.json", {"ok": True})
    assert not stale.exists() and other.exists()
    assert store.read_json("summary.json") == {"ok": True}


def test_a_gs_store_keeps_its_scheme():
    """Paths and URIs of a gs:// store (built without touching the network): its own scheme everywhere,
    never s3's."""
    import pickle

    s = Store("gs://bucket/run/")
    assert s.uri == "gs://bucket/run" and is_uri(s.uri) and not s.is_local
    assert s.path("shards/x.tar") == "bucket/run/shards/x.tar"
    assert s.uri_of("shards/x.tar") == "gs://bucket/run/shards/x.tar" and s.uri_of() == "gs://bucket/run"
    assert s.sub("shards") == Store("gs://bucket/run/shards")
    assert s.sub("shards").uri_of("x.tar") == "gs://bucket/run/shards/x.tar"
    assert pickle.loads(pickle.dumps(s)).uri_of("k") == "gs://bucket/run/k"
    with pytest.raises(ValueError, match="escapes"):
        s.uri_of("../other")


def test_a_failed_local_write_publishes_nothing(tmp_path):
    """write_bytes and put_file that fail mid-write leave the destination as it was (absent, or the old
    content) and no temporary file."""
    store = Store(tmp_path / "root")
    with pytest.raises(TypeError):
        store.write_bytes("a/new.bin", object())  # not bytes: the write itself fails
    with pytest.raises(IsADirectoryError):
        store.put_file("a/new.bin", tmp_path)  # the source cannot be read
    assert not store.exists("a/new.bin")
    store.write_bytes("a/old.bin", b"old")
    with pytest.raises(TypeError):
        store.write_bytes("a/old.bin", object())
    with pytest.raises(IsADirectoryError):
        store.put_file("a/old.bin", tmp_path)
    assert store.read_bytes("a/old.bin") == b"old"
    assert sorted(p.name for p in (tmp_path / "root" / "a").iterdir()) == ["old.bin"]  # no temp file left
