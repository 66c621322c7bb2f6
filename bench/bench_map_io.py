"""The map phase's local disk and source-video traffic, on the bundled sample curated into a real S3 API
(moto's server on loopback, every request counted at the server), sequential runner:

- ``scratch_bytes_left_after_run``: bytes of the files under every local scratch root (``PHANTOM_CACHE_DIR``:
  the per-store scratch folder and the download cache) after the run (goal 0: no download cache is kept);
- ``source_video_fetches_per_video``: downloads of a source video object per video (GETs from its first
  byte; goal 1: only the group that reads the source video fetches it, once);
- ``map_io_store_requests_per_video``: every request the server answered, per video (for comparison);
- ``objects_written_per_clip`` / ``store_requests_per_clip``: distinct objects written under the run's prefix
  (map and global phase) and every request, per clip the map phase cut (goal <= 4), on the whole sample;
- ``map_objects_written_per_clip`` / ``map_objects_written_per_video``: the map phase's share (the packs,
  manifests and tables: grows with the videos), ``map_store_requests_per_video`` its requests (with the
  source video's download; the rest are the global phase's per-bucket listings and reads), and
  ``global_objects_written``: the global phase's and the shards' (grows with the hash buckets and
  partitions, not with the clips)."""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

VIDEOS = ("gen01", "gen02")  # the tests' two videos
SAMPLE = ("gen01", "gen02", "gen03", "gen04", "gen05", "gen06", "gen07", "gen08", "bikes", "carphone",
          "bigbuckbunny")  # the bench's: the whole bundled sample
REPO = Path(__file__).resolve().parents[1]
GLOBAL_FOLDERS = ("global", "shards", "shards_eval")  # what the global phase writes under the run's prefix


class CountingS3:
    """moto's S3 server on loopback behind a WSGI layer that counts every request by (method, path)."""

    def __init__(self):
        self.requests: Counter = Counter()
        self.fetches: Counter = Counter()  # path -> downloads of it (GETs from its first byte)
        self._lock = threading.Lock()
        self._server = None
        self.url = ""

    def _app(self, inner):
        def app(environ, start_response):
            with self._lock:
                path = environ.get("PATH_INFO", "")
                self.requests[(environ["REQUEST_METHOD"], path)] += 1
                rng = environ.get("HTTP_RANGE") or ""
                if environ["REQUEST_METHOD"] == "GET" and (not rng or rng.startswith("bytes=0-")):
                    self.fetches[path] += 1  # a download starts here (its later ranged GETs continue it)
            return inner(environ, start_response)

        return app

    def start(self) -> CountingS3:
        from moto.moto_server.threaded_moto_server import MotoRequestHandler
        from moto.server import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import make_server

        class Quiet(MotoRequestHandler):
            def log_request(self, *args, **kwargs):  # one line per request would flood the bench's output
                pass

        inner = DomainDispatcherApplication(create_backend_app)
        self._server = make_server("127.0.0.1", 0, self._app(inner), True, request_handler=Quiet)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        host, port = self._server.server_address[:2]
        self.url = f"http://{host}:{port}"
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()

    def objects_written_under(self, prefix: str) -> int:
        """Distinct objects under ``prefix`` that were written (a PUT, or a multipart upload's POSTs)."""
        with self._lock:
            return len({p for (m, p) in self.requests if m in ("PUT", "POST") and p.startswith(prefix)})

    def written_by_folder(self, prefix: str) -> Counter:
        """Distinct objects written under ``prefix``, by the first folder below it."""
        with self._lock:
            paths = {p for (m, p) in self.requests if m in ("PUT", "POST") and p.startswith(prefix)}
        return Counter(p[len(prefix):].split("/", 1)[0] for p in paths)

    def requests_under(self, prefix: str, but: tuple[str, ...] = ()) -> int:
        """Requests whose path is under ``prefix``, but not under ``prefix`` + one of ``but``."""
        with self._lock:
            return sum(n for (_, p), n in self.requests.items()
                       if p.startswith(prefix) and p[len(prefix):].split("/", 1)[0] not in but)

    def fetches_under(self, prefix: str) -> int:
        """Downloads of objects whose path (``/bucket/key``) starts with ``prefix``: GETs without a range or
        from byte 0 (a client reads a large object as consecutive ranged GETs, one download)."""
        with self._lock:
            return sum(n for p, n in self.fetches.items() if p.startswith(prefix))


@contextlib.contextmanager
def s3_env(url: str, cache_dir: str):
    """The AWS variables pointing at ``url`` and ``PHANTOM_CACHE_DIR`` (every local scratch root) at
    ``cache_dir`` for the duration; restored after."""
    env = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1", "PHANTOM_CACHE_DIR": cache_dir}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def files_under(root: str) -> dict[str, int]:
    """Relative path -> size of every file under ``root``."""
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            with contextlib.suppress(OSError):
                out[os.path.relpath(p, root)] = os.path.getsize(p)
    return out


def sample_rows_in_store(src_uri: str, videos=VIDEOS) -> list[dict]:
    """The bundled sample's ``videos`` as source rows whose videos are objects under ``src_uri``/videos/
    (uploaded here)."""
    from curation.config import load_config
    from curation.demo.footage import build_sample
    from curation.sources import load_source
    from curation.storage import Store

    spec = load_config(str(REPO / "pipelines.yaml")).sources["sample"]
    paths = build_sample(REPO / spec.sample_dir)
    src = Store(src_uri)
    rows = []
    for r in load_source(spec, str(REPO / "output" / "sample")):
        if r["video_id"] in videos:
            name = os.path.basename(r["video_path"])
            src.put_file(f"videos/{name}", os.path.join(paths.videos_dir, name))
            rows.append({**r, "video_path": src.uri_of(f"videos/{name}")})
    return rows


def shard_members(uri: str) -> dict[str, bytes]:
    """``<shard>/<member>`` -> bytes of every member of every shard tar under ``uri``."""
    import io
    import tarfile

    from curation.storage import Store

    store, out = Store(uri), {}
    for rel in store.list("", suffix=".tar"):
        if rel.startswith(("shards/", "shards_eval/")):
            with tarfile.open(fileobj=io.BytesIO(store.read_bytes(rel))) as tf:
                for m in tf.getmembers():
                    out[f"{rel}/{m.name}"] = tf.extractfile(m).read()
    return out


def measure(videos=VIDEOS, runner: str = "sequential") -> dict:
    """The sample's ``videos`` curated from and into a fresh bucket on a counting moto server, with a fresh
    local scratch root; returns the figures, the files left and the run's result."""
    import boto3

    from curation.config import load_config
    from curation.runner import run_pipeline
    from curation.stage import StageContext

    cfg = load_config(str(REPO / "pipelines.yaml"))
    server = CountingS3().start()
    cache = tempfile.mkdtemp(prefix="bench-map-io-cache-")
    try:
        with s3_env(server.url, cache):
            bucket = f"bench-{uuid.uuid4().hex[:12]}"
            boto3.client("s3", endpoint_url=server.url, region_name="us-east-1").create_bucket(Bucket=bucket)
            rows = sample_rows_in_store(f"s3://{bucket}/src", videos)
            out = f"s3://{bucket}/run"
            server.requests.clear()
            server.fetches.clear()
            t0 = time.time()
            res = run_pipeline(cfg, "default", rows, StageContext(out_dir=out, models_dir=cfg.models_dir),
                               runner=runner, out=out)
            wall = time.time() - t0
            left = files_under(cache)
            n_req = sum(server.requests.values())
            fetches = server.fetches_under(f"/{bucket}/src/videos/")
            written = server.objects_written_under(f"/{bucket}/run/")
            by_folder = server.written_by_folder(f"/{bucket}/run/")
            map_req = server.requests_under(f"/{bucket}/run/", but=GLOBAL_FOLDERS)
            map_req += server.requests_under(f"/{bucket}/src/")
            members = shard_members(out)  # after the counts: what the shards hold, for the tests to check
    finally:
        server.stop()
    n = max(1, len(rows))
    clips = max(1, int(res.totals.get("clips", 0)))
    global_written = sum(v for k, v in by_folder.items() if k in GLOBAL_FOLDERS)
    return {
        "figures": {
            "scratch_bytes_left_after_run": sum(left.values()),
            "source_video_fetches_per_video": fetches / n,
            "map_io_store_requests_per_video": n_req / n,
            "objects_written_per_clip": round(written / clips, 2),
            "store_requests_per_clip": round(n_req / clips, 1),
            "map_objects_written_per_clip": round((written - global_written) / clips, 2),
            "map_objects_written_per_video": round((written - global_written) / n, 2),
            "map_store_requests_per_video": round(map_req / n, 1),
            "global_objects_written": global_written,
            "map_io_sample_wall_s": wall,
        },
        "files_left": left,
        "written_by_folder": dict(by_folder),
        "shard_members": members,
        "result": res,
        "rows": rows,
        "n_videos": len(rows),
    }


def run() -> dict[str, float]:
    return measure(videos=SAMPLE)["figures"]


if __name__ == "__main__":
    for k, v in run().items():
        print(f"{k:42s} {v}")
