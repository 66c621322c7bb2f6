"""Whether a model group's actor hides store latency behind model work (``runner.ACTOR_CALLS``): the same
sample videos curated with ``--runner ray`` into a real S3 API (moto on loopback, ``bench_map_io``) reached
through a loopback proxy that adds ``LATENCY_S`` to every request, once with one batch per actor at a time
and once with two (the second batch's pack downloads and uploads overlap the first one's models):

- ``io_overlap_wall_s_calls1`` / ``io_overlap_wall_s_calls2``: the whole run's wall time (map and global
  phase); ``io_overlap_speedup``: their ratio (calls1 / calls2; goal > 1); ``io_overlap_map_*``: the same
  for the map phase alone (the only phase ``ACTOR_CALLS`` changes);
- ``io_overlap_store_requests_calls1`` / ``_calls2``: the HTTP requests the proxy passed on (each one
  delayed once), ``io_overlap_latency_s`` the delay;
- ``io_overlap_same_shards``: 1 when both runs published byte-identical shards;
- ``io_overlap_batches_per_group`` / ``io_overlap_actors_per_group``: the fewest batches any model group
  gets and the most actors any of its pools may start (one actor and several batches: a second call has
  something to run);
- from Ray's task timeline: ``io_overlap_actors_seen`` (model group actors that ran calls),
  ``io_overlap_actor_calls_per_group`` (the fewest calls any of them got: Ray Data hands an actor a bundle
  of blocks per call and runs its batches one after another in that call, so one call leaves nothing to
  overlap), ``io_overlap_most_calls_at_once_calls1`` / ``_calls2`` (goal 1 / 2),
  ``io_overlap_two_calls_s_calls2`` (seconds an actor held two calls at once) and
  ``io_overlap_actor_busy_s_calls1`` / ``_calls2`` (seconds an actor held any call), summed over the actors:
  busy_s calls1 with latency less the same with none is the store latency the model groups wait out, what
  the overlap can hide at most.

``BENCH_IO_OVERLAP_LATENCY_S`` sets the delay; ``BENCH_IO_OVERLAP_NO_LATENCY=1`` also runs the pair with no
delay (``*_no_latency`` figures), so a speedup can be told apart from noise."""

from __future__ import annotations

import contextlib
import math
import os
import socket
import tempfile
import threading
import time
import uuid

from bench.bench_map_io import REPO, CountingS3, s3_env, sample_rows_in_store, shard_members

LATENCY_S = 0.15  # added once per store request: a round trip to a remote bucket, not loopback's ~0
VIDEOS = ("gen01", "gen02", "gen03", "gen04", "gen05", "gen06")  # 3 batches of the default's batch_size 2
CALLS = (1, 2)  # runner.ACTOR_CALLS of the pair's two runs
HTTP_METHODS = (b"GET ", b"PUT ", b"POST ", b"HEAD ", b"DELETE ")
CHUNK = 1 << 16


class LatencyProxy:
    """A loopback TCP proxy in front of ``upstream`` (``http://host:port``) that holds back the first bytes
    of each response (server bytes that follow client bytes) for ``delay_s``: one added round trip per
    request, whatever the size of its body (a PUT that waits for ``100 Continue`` pays two, as on a real
    link). Counts the requests it passes on (client bytes that open with an HTTP method after a response)."""

    def __init__(self, upstream: str, delay_s: float = 0.0):
        host, port = upstream.removeprefix("http://").rstrip("/").rsplit(":", 1)
        self.upstream = (host, int(port))
        self.delay_s = delay_s
        self.requests = 0
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self.url = ""

    def start(self) -> LatencyProxy:
        self._listener = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=self._accept, daemon=True).start()
        host, port = self._listener.getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self

    def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for s in conns:
            with contextlib.suppress(OSError):
                s.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # the listener was closed
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            server = socket.create_connection(self.upstream)
        except OSError:
            client.close()
            return
        for s in (client, server):  # no Nagle wait on top of the injected delay
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._conns |= {client, server}
        asked = threading.Event()  # the client sent bytes the server has not answered yet
        back = threading.Thread(target=self._responses, args=(server, client, asked), daemon=True)
        back.start()
        try:
            while data := client.recv(CHUNK):
                if not asked.is_set():
                    with self._lock:
                        self.requests += data.startswith(HTTP_METHODS)
                    asked.set()  # before the bytes go on: the answer cannot overtake the flag
                server.sendall(data)
            server.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        back.join()
        with self._lock:
            self._conns -= {client, server}
        for s in (client, server):
            s.close()

    def _responses(self, server: socket.socket, client: socket.socket, asked: threading.Event) -> None:
        try:
            while data := server.recv(CHUNK):
                if asked.is_set():
                    asked.clear()
                    if self.delay_s > 0:
                        time.sleep(self.delay_s)
                client.sendall(data)
            client.shutdown(socket.SHUT_WR)
        except OSError:
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)


@contextlib.contextmanager
def actor_calls(n: int):
    """``runner.ACTOR_CALLS`` set to ``n`` in this process (the driver builds the pools) for the duration."""
    from curation import runner

    old = runner.ACTOR_CALLS
    runner.ACTOR_CALLS = n
    try:
        yield
    finally:
        runner.ACTOR_CALLS = old


@contextlib.contextmanager
def proxy_delay(proxy: LatencyProxy, delay_s: float):
    old = proxy.delay_s
    proxy.delay_s = delay_s
    try:
        yield
    finally:
        proxy.delay_s = old


def fresh_ray(cfg) -> None:
    """A new local Ray whose workers inherit this process's environment now (the proxy's endpoint, a fresh
    scratch root): a Ray started earlier hands its workers the environment of its own start."""
    import ray

    from curation.execute import init_ray

    if ray.is_initialized():
        ray.shutdown()
    init_ray(cfg.ray)


def curate(cfg, rows: list[dict], out: str, proxy: LatencyProxy, delay_s: float, calls: int) -> dict:
    """One Ray run of ``rows`` into ``out`` through ``proxy`` with ``delay_s`` per request and
    ``ACTOR_CALLS = calls``, on a fresh Ray and a fresh scratch root; its wall times, requests, model group
    actors (``actor_calls_seen``) and shard members."""
    import ray

    from curation.runner import run_pipeline
    from curation.stage import StageContext

    with (tempfile.TemporaryDirectory(prefix="bench-io-overlap-cache-") as cache, s3_env(proxy.url, cache),
          actor_calls(calls)):
        fresh_ray(cfg)
        try:
            with proxy_delay(proxy, delay_s):
                n0, t0 = proxy.requests, time.time()
                res = run_pipeline(cfg, "default", rows, StageContext(out_dir=out, models_dir=cfg.models_dir),
                                   runner="ray", out=out)
                wall, n_req = time.time() - t0, proxy.requests - n0
            members = shard_members(out)
            actors = actor_calls_seen(ray.timeline())
        finally:
            ray.shutdown()
    print(f"bench_io_overlap: latency {delay_s:g} s, ACTOR_CALLS {calls}: {wall:.1f} s "
          f"(map {res.map_wall_s:.1f} s), {n_req} requests, {res.videos_committed} videos, "
          f"{res.totals.get('clips', 0)} clips, {len(members)} shard members; model group actors: "
          f"{[{k: round(v, 1) for k, v in a.items()} for a in actors]}", flush=True)
    return {"wall_s": wall, "map_wall_s": res.map_wall_s, "requests": n_req, "members": members,
            "actors": actors}


def actor_calls_seen(events: list[dict]) -> list[dict]:
    """Per map group actor, from Ray's task timeline (``ray.timeline()``: one complete event per actor call,
    ``tid`` the actor's worker): its ``calls``, the ``most`` it held at once, the seconds it held two or more
    (``both_s``) and one or more (``busy_s``)."""
    spans: dict[str, list[tuple[float, float]]] = {}
    for e in events:
        if "_GroupActor" in str(e.get("cat")) and e.get("name") == "submit" and e.get("ph") == "X":
            t0 = float(e["ts"]) / 1e6
            spans.setdefault(str(e.get("tid")), []).append((t0, t0 + float(e.get("dur") or 0) / 1e6))
    out = []
    for calls in spans.values():
        edges = sorted([(t0, 1) for t0, _ in calls] + [(t1, -1) for _, t1 in calls])  # an end before a start
        running = most = 0
        both_s = busy_s = last = 0.0
        for t, step in edges:
            both_s += (t - last) * (running >= 2)
            busy_s += (t - last) * (running >= 1)
            running, last = running + step, t
            most = max(most, running)
        out.append({"calls": len(calls), "most": most, "both_s": both_s, "busy_s": busy_s})
    return out


def pair(cfg, proxy: LatencyProxy, s3_url: str, delay_s: float, suffix: str = "") -> dict[str, float]:
    """The sample curated into one fresh bucket twice, ``ACTOR_CALLS`` 2 then 1 (each under its own prefix
    and scratch root; the second run reads the page cache the first warmed, which favours calls1: a
    speedup is not a warm-up), with ``delay_s`` per request."""
    import boto3

    bucket = f"bench-io-overlap-{uuid.uuid4().hex[:12]}"
    with tempfile.TemporaryDirectory(prefix="bench-io-overlap-src-") as cache, s3_env(proxy.url, cache):
        boto3.client("s3", endpoint_url=s3_url, region_name="us-east-1").create_bucket(Bucket=bucket)
        rows = sample_rows_in_store(f"s3://{bucket}/src", VIDEOS)
    runs = {n: curate(cfg, rows, f"s3://{bucket}/calls{n}", proxy, delay_s, n)
            for n in sorted(CALLS, reverse=True)}
    one, two = runs[1], runs[2]
    return {
        f"io_overlap_wall_s_calls1{suffix}": one["wall_s"],
        f"io_overlap_wall_s_calls2{suffix}": two["wall_s"],
        f"io_overlap_speedup{suffix}": one["wall_s"] / two["wall_s"],
        f"io_overlap_map_wall_s_calls1{suffix}": one["map_wall_s"],
        f"io_overlap_map_wall_s_calls2{suffix}": two["map_wall_s"],
        f"io_overlap_map_speedup{suffix}": one["map_wall_s"] / two["map_wall_s"],
        f"io_overlap_store_requests_calls1{suffix}": one["requests"],
        f"io_overlap_store_requests_calls2{suffix}": two["requests"],
        f"io_overlap_same_shards{suffix}": int(bool(one["members"]) and one["members"] == two["members"]),
        f"io_overlap_actors_seen{suffix}": len(two["actors"]),
        f"io_overlap_actor_calls_per_group{suffix}": min((a["calls"] for a in two["actors"]), default=0),
        f"io_overlap_most_calls_at_once_calls1{suffix}": max((a["most"] for a in one["actors"]), default=0),
        f"io_overlap_most_calls_at_once_calls2{suffix}": max((a["most"] for a in two["actors"]), default=0),
        f"io_overlap_two_calls_s_calls2{suffix}": sum(a["both_s"] for a in two["actors"]),
        f"io_overlap_actor_busy_s_calls1{suffix}": sum(a["busy_s"] for a in one["actors"]),
        f"io_overlap_actor_busy_s_calls2{suffix}": sum(a["busy_s"] for a in two["actors"]),
    }


def run() -> dict[str, float]:
    from curation.config import load_config
    from curation.runner import plan

    cfg = load_config(str(REPO / "pipelines.yaml"))
    models = [g for g in plan(cfg.pipelines["default"])[0] if g.uses_model]
    delay_s = float(os.environ.get("BENCH_IO_OVERLAP_LATENCY_S") or LATENCY_S)
    server = CountingS3().start()
    proxy = LatencyProxy(server.url).start()
    try:
        figures = pair(cfg, proxy, server.url, delay_s)
        if os.environ.get("BENCH_IO_OVERLAP_NO_LATENCY") == "1":
            figures |= pair(cfg, proxy, server.url, 0.0, suffix="_no_latency")
    finally:
        proxy.stop()
        server.stop()
    return {
        **figures,
        "io_overlap_latency_s": delay_s,
        "io_overlap_videos": len(VIDEOS),
        "io_overlap_batches_per_group": min(math.ceil(len(VIDEOS) / g.batch_size) for g in models),
        "io_overlap_actors_per_group": max(g.pool[1] for g in models),
    }


if __name__ == "__main__":
    for k, v in run().items():
        print(f"{k:42s} {v}")
