"""The map and global phase riding out an S3 outage: part of the bundled sample curated from and into moto's
S3 server on loopback, once uninterrupted and once with the server stopped for OUTAGE_S seconds in the middle
of the run (then started again on the same port; moto keeps its objects in this process), rerun while videos
end failed. Both runs read the same source objects and write under their own prefix. Figures:

- ``store_outage_failed_videos``: videos the interrupted run ended ``failed`` (store calls are retried for
  up to ``storage.RETRY_TOTAL_S``, so an outage shorter than that should fail none);
- ``store_outage_reruns``: runs after the interrupted one until no video failed;
- ``store_outage_result_identical``: 1 when every file of the published result (shards, their index and
  records under ``global/results/<hash>/``) has the same bytes as the uninterrupted run's, else 0;
- ``store_outage_s``: how long the server was down."""

from __future__ import annotations

import hashlib
import tempfile
import threading
import time
import uuid

from bench.bench_map_io import REPO, s3_env, sample_rows_in_store

VIDEOS = ("gen01", "gen02", "gen03")
OUTAGE_S = 15.0
MAX_RERUNS = 2


class StoppableS3:
    """moto's threaded server on a fixed loopback port that can be stopped and started again."""

    def __init__(self):
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request would flood the output

        self._cls = ThreadedMotoServer
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
        self.server.start()
        host, self.port = self.server.get_host_and_port()
        self.url = f"http://{host}:{self.port}"

    def outage(self, after_s: float, for_s: float) -> threading.Thread:
        def run():
            time.sleep(after_s)
            self.server.stop()
            time.sleep(for_s)
            self.server = self._cls(ip_address="127.0.0.1", port=self.port)
            self.server.start()

        t = threading.Thread(target=run, daemon=True)
        t.start()
        return t

    def stop(self) -> None:
        self.server.stop()


def result_digests(uri: str) -> dict[str, str]:
    """sha256 of every file of the published result under ``uri``/global/results/, by path below it."""
    from curation.storage import Store

    store = Store(uri)
    return {
        rel[len("global/results/") :]: hashlib.sha256(store.read_bytes(rel)).hexdigest()
        for rel in store.list("global/results/")
    }


def _run(cfg, rows, out):
    from curation.runner import run_pipeline
    from curation.stage import StageContext

    ctx = StageContext(out_dir=out, models_dir=cfg.models_dir)
    return run_pipeline(cfg, "default", list(rows), ctx, runner="sequential", out=out)


def run() -> dict[str, float]:
    import boto3

    from curation.config import load_config

    cfg = load_config(str(REPO / "pipelines.yaml"))
    s3 = StoppableS3()
    cache = tempfile.mkdtemp(prefix="bench-store-outage-")
    try:
        with s3_env(s3.url, cache):
            bucket = f"bench-{uuid.uuid4().hex[:12]}"
            boto3.client("s3", endpoint_url=s3.url, region_name="us-east-1").create_bucket(Bucket=bucket)
            rows = sample_rows_in_store(f"s3://{bucket}/src", VIDEOS)
            t0 = time.time()
            ref = _run(cfg, rows, f"s3://{bucket}/clean")
            wall = time.time() - t0
            want = result_digests(f"s3://{bucket}/clean")
            out = f"s3://{bucket}/outage"
            down = s3.outage(wall / 2, OUTAGE_S)
            res = _run(cfg, rows, out)
            down.join()
            failed = len(res.totals.get("failed_video_ids") or [])
            reruns = 0
            while (res.totals.get("failed_video_ids") or []) and reruns < MAX_RERUNS:
                res = _run(cfg, rows, out)
                reruns += 1
            got = result_digests(out)
    finally:
        s3.stop()
    print(f"bench_store_outage: clean run {wall:.1f} s, {len(want)} result files, "
          f"{ref.totals.get('clips', 0)} clips; outage run failed {failed}, reruns {reruns}")
    return {
        "store_outage_failed_videos": failed,
        "store_outage_reruns": reruns,
        "store_outage_result_identical": int(bool(want) and got == want),
        "store_outage_s": OUTAGE_S,
    }


if __name__ == "__main__":
    for k, v in run().items():
        print(f"{k:40s} {v}")
