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


def test_transient_and_permanent_errors_are_told_apart():
    from curation.storage import is_transient

    refused = OSError("When reading information for key 'r/a' in bucket 'b': AWS Error NETWORK_CONNECTION "
                      "during HeadObject operation: curlCode: 7, Could not connect to server")
    assert is_transient(refused) and is_transient(ConnectionRefusedError()) and is_transient(TimeoutError())
    assert is_transient(OSError("AWS Error SLOW_DOWN during PutObject: Please reduce your request rate"))
    assert is_transient(OSError("AWS Error SERVICE_UNAVAILABLE during GetObject: HTTP response code: 503"))
    assert not is_transient(FileNotFoundError("Path does not exist 'b/r/missing'"))
    assert not is_transient(OSError("AWS Error ACCESS_DENIED during GetObject operation: Access Denied"))
    assert not is_transient(PermissionError("denied")) and not is_transient(ValueError("escapes"))


def test_store_calls_ride_out_an_s3_outage(tmp_path, monkeypatch):
    """The S3 server stops; a read, a write and a listing started while it is down succeed once it is back
    on the same port within the retry window. A missing key is not retried."""
    import threading
    import time

    import boto3
    from moto.server import ThreadedMotoServer

    import curation.storage as storage

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    for k, v in {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                 "AWS_DEFAULT_REGION": "us-east-1", "PHANTOM_STORE_RETRY_ATTEMPTS": "30",
                 "PHANTOM_STORE_RETRY_TOTAL_S": "60"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(storage, "RETRY_BASE_S", 0.2)
    boto3.client("s3", endpoint_url=url, region_name="us-east-1").create_bucket(Bucket="outage")
    store = Store("s3://outage/run")
    store.write_bytes("a.bin", b"before")
    sleeps: list[float] = []
    real_sleep = time.sleep
    monkeypatch.setattr(storage.time, "sleep", lambda s: (sleeps.append(s), real_sleep(s)))
    with pytest.raises(FileNotFoundError):  # permanent: raised at once, no retry
        store.read_bytes("missing.bin")
    assert sleeps == []

    server.stop()
    results: dict = {}

    def calls():
        try:
            results["read"] = store.read_bytes("a.bin")
            store.write_bytes("b.bin", b"during")
            results["list"] = list(store.list())
        except Exception as e:  # noqa: BLE001 (the test reports it)
            results["error"] = e

    t = threading.Thread(target=calls)
    t.start()
    real_sleep(4.0)  # the calls are failing and retrying now
    assert t.is_alive() and sleeps, "the call should be waiting between retries"
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        t.join(90)
        assert not t.is_alive()
        assert "error" not in results, results.get("error")
        assert results["read"] == b"before" and results["list"] == ["a.bin", "b.bin"]
        assert store.read_bytes("b.bin") == b"during"
    finally:
        server.stop()
