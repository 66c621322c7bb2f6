"""Clip bytes do not depend on the load or on what the encoding process did before: the same span encoded
in several busy processes, several times in each, gives one sha256."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from curation.demo.footage import build_sample

REPO = Path(__file__).resolve().parents[2]

# One worker: encode gen07's three clips REPS times in this one process (the earlier encodes are the
# "history" a resumed run does not share), print one line of sha256s per time.
WORKER = """
import hashlib, sys
from curation.video_io import ClipJob, encode_clips
src, out, reps = sys.argv[1], sys.argv[2], int(sys.argv[3])
for rep in range(reps):
    jobs = [ClipJob(a, b, f"{out}-{a}.mp4") for a, b in ((0, 88), (92, 178), (182, 260))]
    encode_clips(src, jobs)
    assert not any(j.error for j in jobs), [j.error for j in jobs]
    print(" ".join(hashlib.sha256(open(j.out_path, "rb").read()).hexdigest() for j in jobs), flush=True)
"""


def test_clip_bytes_match_across_busy_processes_and_repeats(tmp_path):
    src = str(build_sample(REPO / "data/sample").videos_dir) + "/gen07.mp4"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(REPO)])),
    }
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    workers: list[subprocess.Popen] = []
    try:
        workers += [
            subprocess.Popen(
                [sys.executable, "-c", WORKER, src, str(tmp_path / f"w{i}"), "3"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
                cwd=tmp_path,
            )
            for i in range(4)
        ]
        results = [w.communicate(timeout=240) for w in workers]
    finally:
        for p in burners + workers:
            if p.poll() is None:
                p.kill()
            p.wait()
    for w, (_, err) in zip(workers, results):
        assert w.returncode == 0, err[-2000:]
    shas = [sha for out, _ in results for sha in out.split()]  # per line: clip 0, 1, 2
    assert len(shas) == 4 * 3 * 3
    per_clip = [set(shas[k::3]) for k in range(3)]
    assert all(len(s) == 1 for s in per_clip), [len(s) for s in per_clip]
