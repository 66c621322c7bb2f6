"""The storage layer on a local folder and on a real S3 API on loopback (moto's server)."""

import os

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


# -- the download cache's size cap -------------------------------------------------------------------------


def _cache_bytes(root) -> int:
    """Bytes of downloaded objects under the cache root (not scratch/ or curation.download's folder, not the
    count, the lock or temp files)."""
    import os

    total = 0
    for folder, dirs, names in os.walk(root):
        if folder == str(root):
            dirs[:] = [d for d in dirs if d not in ("scratch", "phantom-download")]
            continue  # the count and the lock live at the top; objects one folder down
        total += sum(os.path.getsize(os.path.join(folder, n)) for n in names if not n.endswith(".tmp"))
    return total


@pytest.fixture
def capped_cache(tmp_path, monkeypatch):
    """A fresh cache root; the test sets its cap through PHANTOM_CACHE_MAX_GB (the route to workers)."""
    root = tmp_path / "cache"
    monkeypatch.setenv("PHANTOM_CACHE_DIR", str(root))
    monkeypatch.delenv("PHANTOM_CACHE_MAX_GB", raising=False)
    return root


def _objects(n: int) -> dict[str, bytes]:
    """n objects of different sizes (1.0 to 3.9 kB) and different bytes."""
    return {f"obj/{i:03d}.bin": bytes([i]) * (1000 + 100 * i) for i in range(n)}


def test_the_cache_cap_is_honoured_under_a_run_of_many_videos(s3_bucket, capped_cache, monkeypatch):
    """30 objects read through local_path with a 10 kB cap: after every read the cache holds at most the cap
    plus the object just read, the returned file has the object's bytes, an object re-read after every
    download stays a hit all along (the same file, never downloaded again: least recently used, not first in
    first out), an old one is evicted and fetched again, and scratch/ is never touched."""
    import os

    from curation.storage import cache_limit_bytes

    cap = 10_000
    monkeypatch.setenv("PHANTOM_CACHE_MAX_GB", str(cap / 1e9))
    assert cache_limit_bytes() == cap
    store = Store(s3_bucket + "/videos")
    objs = _objects(30)
    for rel, data in objs.items():
        store.write_bytes(rel, data)
    scratch = scratch_dir(store)
    kept = os.path.join(scratch, "clip.mp4")
    with open(kept, "wb") as f:
        f.write(b"s" * 50_000)  # alone over the cap: must survive every eviction
    other = capped_cache / "phantom-download" / "part.mp4"  # curation.download's folder under the same root
    other.parent.mkdir()
    other.write_bytes(b"d" * 20_000)
    largest = max(len(d) for d in objs.values())
    peak = 0
    evicted_any = False
    first_paths: dict[str, str] = {}
    hot, *rest = objs
    hot_path = store.local_path(hot)
    hot_ino = os.stat(hot_path).st_ino
    for rel in rest:
        data = objs[rel]
        p = store.local_path(rel)
        with open(p, "rb") as f:
            assert f.read() == data, rel
        size = _cache_bytes(capped_cache)
        peak = max(peak, size)
        assert size <= cap + len(data), (rel, size)
        first_paths[rel] = p
        # the hot object, used after every download, is never the least recently used: a hit every time
        assert store.local_path(hot) == hot_path and os.stat(hot_path).st_ino == hot_ino
        assert _cache_bytes(capped_cache) == size  # a hit neither downloads nor evicts
        evicted_any |= any(not os.path.exists(q) for q in first_paths.values())
    assert evicted_any and peak <= cap + largest
    assert open(hot_path, "rb").read() == objs[hot]
    assert os.path.getsize(kept) == 50_000 and other.stat().st_size == 20_000
    # the first object was evicted long ago: read again, it comes back with its bytes
    first = rest[0]
    assert not os.path.exists(first_paths[first])
    with open(store.local_path(first), "rb") as f:
        assert f.read() == objs[first]
    assert _cache_bytes(capped_cache) <= cap + largest


def test_a_zero_cap_keeps_only_the_file_in_use_and_a_pinned_file_survives(s3_bucket, capped_cache,
                                                                          monkeypatch):
    """cache_max_gb 0: each download evicts every other cached file, except one held by local_path_ctx."""
    import os

    monkeypatch.setenv("PHANTOM_CACHE_MAX_GB", "0")
    store = Store(s3_bucket + "/zero")
    objs = _objects(6)
    for rel, data in objs.items():
        store.write_bytes(rel, data)
    rels = list(objs)
    with store.local_path_ctx(rels[0]) as pinned:
        for rel in rels[1:]:
            p = store.local_path(rel)
            assert open(p, "rb").read() == objs[rel]
            assert _cache_bytes(capped_cache) == len(objs[rel]) + len(objs[rels[0]])  # this one + the pin
            assert open(pinned, "rb").read() == objs[rels[0]]
    last = store.local_path(rels[1])  # a download after the pin was released evicts the old pin
    assert not os.path.exists(pinned) and _cache_bytes(capped_cache) == len(objs[rels[1]])
    assert open(last, "rb").read() == objs[rels[1]]
    os.unlink(last)  # what the runner does with the files it fetches: then the root holds no file at all
    assert [p for p in capped_cache.rglob("*") if p.is_file()] == []


def test_processes_sharing_a_capped_cache_read_the_right_bytes(s3_bucket, capped_cache, monkeypatch):
    """Two processes read the same 20 objects in opposite orders through one capped cache at once, each
    object pinned while it is checked: no read fails or sees wrong bytes, no eviction race raises, and the
    cache ends within its cap plus what one read per process holds."""
    import subprocess
    import sys

    cap = 6_000
    monkeypatch.setenv("PHANTOM_CACHE_MAX_GB", str(cap / 1e9))
    store = Store(s3_bucket + "/shared")
    objs = _objects(20)
    for rel, data in objs.items():
        store.write_bytes(rel, data)
    code = (
        "import sys\n"
        "from curation.storage import Store\n"
        "store = Store(sys.argv[1])\n"
        "rels = [f'obj/{i:03d}.bin' for i in range(20)]\n"
        "if sys.argv[2] == 'rev':\n"
        "    rels.reverse()\n"
        "for _ in range(2):\n"
        "    for rel in rels:\n"
        "        i = int(rel[4:7])\n"
        "        with store.local_path_ctx(rel) as p:\n"
        "            assert open(p, 'rb').read() == bytes([i]) * (1000 + 100 * i), rel\n"
        "print('ok')\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, store.uri, order], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for order in ("fwd", "rev")]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0 and out.strip() == "ok", err[-2000:]
    largest = max(len(d) for d in objs.values())
    assert _cache_bytes(capped_cache) <= cap + 2 * largest


def test_the_cache_cap_from_pipelines_yaml_reaches_storage_and_child_processes(tmp_path, monkeypatch):
    """run.cache_max_gb in pipelines.yaml is validated (>= 0), and set_cache_limit_gb passes it to this
    process's downloads and to the processes it starts (as Ray's local workers are)."""
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    from curation.config import ConfigError, RunConfig, load_config
    from curation.storage import cache_limit_bytes, set_cache_limit_gb

    monkeypatch.delenv("PHANTOM_CACHE_MAX_GB", raising=False)
    assert cache_limit_bytes() == round(RunConfig().cache_max_gb * 1e9)  # unset: the config's default
    repo = Path(__file__).resolve().parents[2]
    raw = yaml.safe_load((repo / "pipelines.yaml").read_text())
    assert "cache_max_gb" in raw["run"]
    raw["run"]["cache_max_gb"] = 0.25
    cfg_path = tmp_path / "p.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    cfg = load_config(cfg_path)
    assert cfg.run.cache_max_gb == 0.25
    set_cache_limit_gb(cfg.run.cache_max_gb)
    assert cache_limit_bytes() == 250_000_000
    code = "from curation.storage import cache_limit_bytes; print(cache_limit_bytes())"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=repo)
    assert child.stdout.strip() == "250000000", child.stderr[-2000:]
    raw["run"]["cache_max_gb"] = -1
    cfg_path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="cache_max_gb"):
        load_config(cfg_path)
    monkeypatch.setenv("PHANTOM_CACHE_MAX_GB", "lots")
    with pytest.raises(ValueError):
        cache_limit_bytes()


def _store_behind(srv, bucket: str, monkeypatch) -> Store:
    """A store in a new bucket of the counting moto server ``srv``, the AWS variables set for this test."""
    import boto3

    env = {"AWS_ENDPOINT_URL": srv.url, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    boto3.client("s3", endpoint_url=srv.url, region_name="us-east-1").create_bucket(Bucket=bucket)
    return Store(f"s3://{bucket}/run")


def test_read_bytes_is_one_get_whatever_the_size(monkeypatch):
    """``Store.read_bytes`` of a 3 MB object on a real S3 API (moto, every request counted at the server):
    one GET (pyarrow's S3 input stream made one per 256 KB: 12 here, 160 for a 40 MB table)."""

    from bench.bench_map_io import CountingS3

    srv = CountingS3().start()
    try:
        store = _store_behind(srv, "read-bytes", monkeypatch)
        data = os.urandom(3 << 20)
        with store.writer("t/table.bin") as f:
            f.write(data)
        srv.requests.clear()
        assert store.read_bytes("t/table.bin") == data
        assert srv.requests[("GET", "/read-bytes/run/t/table.bin")] == 1, dict(srv.requests)
    finally:
        srv.stop()


def test_read_each_keeps_order_overlaps_requests_and_bounds_its_read_ahead(monkeypatch):
    """``Store.read_each`` on a real S3 API (moto behind a layer that holds every GET 50 ms and counts the
    GETs in flight at the server): the objects come back in the order asked, several GETs are in flight at
    once (no more than the threads), a slow consumer never has more than ``2 * threads`` objects read ahead,
    and a missing object raises at its turn, after the ones before it."""
    import threading
    import time

    from bench.bench_map_io import CountingS3

    class SlowS3(CountingS3):
        def __init__(self):
            super().__init__()
            self.now = self.most = 0
            self.gets = 0
            self.gate = threading.Lock()

        def _app(self, inner):
            counted = super()._app(inner)

            def app(environ, start_response):
                if environ["REQUEST_METHOD"] != "GET":
                    return counted(environ, start_response)
                with self.gate:
                    self.now += 1
                    self.gets += 1
                    self.most = max(self.most, self.now)
                try:
                    time.sleep(0.05)
                    return counted(environ, start_response)
                finally:
                    with self.gate:
                        self.now -= 1

            return app

    srv = SlowS3().start()
    try:
        store = _store_behind(srv, "read-each", monkeypatch)
        objs = {f"t/{i:03d}.bin": os.urandom(1000 + i) for i in range(40)}
        for rel, data in objs.items():
            store.write_bytes(rel, data)
        rels = list(objs)[::-1]  # not the listing order: the order asked is the order given back
        srv.gets = srv.most = 0
        assert list(store.read_each(rels, threads=8)) == [objs[r] for r in rels]
        assert srv.gets == 40 and 2 <= srv.most <= 8, (srv.gets, srv.most)

        srv.gets = 0
        it = store.read_each(rels, threads=4)
        assert next(it) == objs[rels[0]]
        time.sleep(0.5)  # a slow consumer: the reads wait for it
        assert srv.gets <= 2 * 4 + 1, srv.gets
        it.close()

        got = []
        with pytest.raises(FileNotFoundError):
            for data in store.read_each([rels[0], rels[1], "t/missing.bin", rels[2]], threads=4):
                got.append(data)
        assert got == [objs[rels[0]], objs[rels[1]]]
    finally:
        srv.stop()


_UPLOAD_CHILD = """
import os, sys, tempfile
from curation.storage import Store

def hwm_mb():
    return next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM:")) / 1024

store = Store(sys.argv[1])
store.write_bytes("warm.bin", b"x")  # the S3 client and its threads exist before the baseline
with tempfile.NamedTemporaryFile() as t:
    for _ in range(160):
        t.write(os.urandom(1 << 20))
    t.flush()
    base = hwm_mb()
    store.put_file("big.bin", t.name)
    after_put = hwm_mb()
    with store.writer("big2.bin") as f, open(t.name, "rb") as src:
        while chunk := src.read(1 << 20):
            f.write(chunk)
    print(after_put - base, hwm_mb() - base, store.size("big.bin"), store.size("big2.bin"))
"""


def test_an_upload_holds_a_window_not_the_file(s3_bucket):
    """A 160 MB file put on a real S3 API (moto), by ``put_file`` and through ``writer``, in a fresh process:
    its peak RSS grows by about ``UPLOAD_WINDOW`` (64 MB), not by the file (pyarrow's stream queued every part
    for its background upload: 158 MB more for this file before ``_upload`` waited every window)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _UPLOAD_CHILD, s3_bucket + "/run"], capture_output=True,
                         text=True, check=True, env=os.environ)
    put_mb, writer_mb, size1, size2 = out.stdout.split()
    assert int(size1) == int(size2) == 160 << 20
    assert float(put_mb) < 120 and float(writer_mb) < 120, out.stdout
