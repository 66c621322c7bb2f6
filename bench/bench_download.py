"""Benchmark of the download step: videos/s through Ray tasks with 8 downloads in flight vs 1, against the
loopback server of the tests (real sample MP4s, each connection paced to ``THROTTLE_BPS`` like a remote
site's per-connection bandwidth, so the figure measures the concurrency of the step, not the loopback).
Rates count from when the download workers are up (``download_source``'s own videos/s), as in a long run
where their start-up is amortised."""

from __future__ import annotations

import os
import shutil
import tempfile

N_ONE, N_EIGHT = 8, 24  # three full waves at 8 in flight
THROTTLE_BPS = 300_000  # per connection: ~2 s per 588 kB sample video


def _run_once(srv, tmp: str, tag: str, concurrency: int, n: int) -> tuple[float, dict]:
    from pathlib import Path

    from curation.config import SourceSpec
    from curation.download import download_source
    from tests.curation.test_download import write_csv

    rows = [(f"{tag}{i}", srv.url("ok", f"{tag}{i}")) for i in range(n)]
    spec = SourceSpec(kind="panda70m", csv=write_csv(Path(tmp) / f"{tag}.csv", rows))
    params = {"allowed_hosts": ["127.0.0.1"], "concurrency": concurrency, "per_host_concurrency": concurrency,
              "per_host_rate_per_s": 1000.0, "max_attempts": 1, "socket_timeout_s": 30.0,
              "progress_every_s": 3600.0}
    s = download_source(spec, os.path.join(tmp, tag), params=params, runner="ray", progress=None)
    if s["downloaded"] != n:
        raise RuntimeError(f"{tag}: {s['downloaded']} of {n} downloaded: {s['failures_by_reason']}")
    return s["videos_per_s"], s  # counted from when the download workers are up (as in a long run)


def run() -> dict[str, float]:
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray

    from tests.curation.test_download import LoopbackVideoServer

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
                 configure_logging=False)
    tmp = tempfile.mkdtemp(prefix="bench-download-")
    try:
        with LoopbackVideoServer(throttle_bps=THROTTLE_BPS) as srv:
            vps1, _ = _run_once(srv, tmp, "one", 1, N_ONE)
            vps8, s8 = _run_once(srv, tmp, "eight", 8, N_EIGHT)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if started:
            ray.shutdown()
    return {
        "download_videos_per_s_ratio": round(vps8 / vps1, 2),
        "download_videos_per_s_1": round(vps1, 3),
        "download_videos_per_s_8": round(vps8, 3),
        "download_mb_per_s_8": round(s8["bytes_per_s"] / 1e6, 2),
    }


if __name__ == "__main__":
    print(run())
