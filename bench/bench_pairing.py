"""Pairing benchmark: exact blocked vs faiss IVF-PQ on 100k synthetic subjects; faiss on 1M (time, recall)."""

from __future__ import annotations

import gc
import os
import time

import numpy as np

from curation import pairing

DIM = 768
LOW, HIGH, TOP_K, CANDIDATES = 0.5, 0.95, 4, 8
SUBJECTS_PER_VIDEO = 4


def synthetic(n: int, seed: int = 0, chunk: int = 65536):
    """Unit embeddings (n, 768) float32 shaped like real ones: around n/500 concept centres (same-concept rows
    score 0.16 +- 0.03, far below the band), with a planted partner for every 20th row at cosine U(0.6, 0.9)
    (rows 2i and 2i+1, i < n/20) and a near-copy (cosine 0.99, above the band) for every 200th. Returns x, the
    planted in-band pairs (P, 2), and groups (four subjects per "video", shuffled)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    k = max(1, n // 500)
    mu = torch.nn.functional.normalize(torch.randn(k, DIM, generator=g), dim=1)
    x = np.empty((n, DIM), np.float32)
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        noise = torch.nn.functional.normalize(torch.randn(b - a, DIM, generator=g), dim=1)
        lab = torch.randint(0, k, (b - a,), generator=g)
        x[a:b] = torch.nn.functional.normalize(0.4 * mu[lab] + 0.84**0.5 * noise, dim=1).numpy()
    n_pairs, n_copies = n // 20, n // 200
    cos = torch.rand(n_pairs, generator=g) * 0.3 + 0.6
    cos = torch.cat([cos, torch.full((n_copies,), 0.99)])
    for a in range(0, len(cos), chunk):
        b = min(len(cos), a + chunk)
        rows = torch.arange(a, b) * 2
        base = torch.from_numpy(x[rows.numpy()])  # (b-a, D)
        noise = torch.randn(b - a, DIM, generator=g)
        noise = torch.nn.functional.normalize(noise - (noise * base).sum(1, keepdim=True) * base, dim=1)
        c = cos[a:b, None]
        x[(rows + 1).numpy()] = (c * base + (1 - c**2).sqrt() * noise).numpy()
    pairs = np.stack([np.arange(n_pairs) * 2, np.arange(n_pairs) * 2 + 1], 1)
    groups = np.random.default_rng(seed).permutation(n) // SUBJECTS_PER_VIDEO
    pairs = pairs[groups[pairs[:, 0]] != groups[pairs[:, 1]]]  # a pair inside one video is not a cross pair
    return x, pairs, groups


def band_pairs(nb: pairing.Neighbours) -> set[tuple[int, int]]:
    pairs, _ = pairing.unordered_pairs(nb, pairing.classify(nb, LOW, HIGH, TOP_K))
    return set(map(tuple, pairs.tolist()))


def recall(found: set, truth: set) -> float:
    return len(found & truth) / max(1, len(truth))


def configured_pair_params(config: str = "pipelines.yaml", pipeline: str = "default"):
    """The pair step's params as ``pipeline`` in ``config`` sets them (its band fitted by `make calibrate` on
    a calibration set the sample is not part of)."""
    from curation.config import from_dict, load_config
    from curation.global_phase import PairParams

    steps = {s.stage: s for s in load_config(config).pipelines[pipeline]}
    return from_dict(PairParams, steps["pair"].params, f"pipelines.{pipeline}[pair].params")


def sample_precision() -> dict[str, float]:
    """Precision / recall of the pair step (the global phase's own steps, through ``pair_rows``) on the
    bundled sample's ground truth, with its true boxes as grounding, the offline embedders and the default
    pipeline's configured band (fitted elsewhere: the sample is not used to choose it)."""
    import tempfile

    from curation.demo.footage import build_sample
    from curation.demo.ground_truth import load_ground_truth, true_cross_pairs
    from curation.global_phase import pair_rows
    from curation.stage import StageContext
    from curation.stages.faces import Faces
    from curation.stages.subject_embed import SubjectEmbed
    from tests.curation.test_pairing import _found, gt_rows

    params = configured_pair_params()
    with tempfile.TemporaryDirectory() as tmp:
        paths = build_sample(os.path.join(tmp, "sample"))
        gt = load_ground_truth(paths)
        ctx = StageContext(out_dir=os.path.join(tmp, "out"))
        rows = Faces(ctx=ctx)(SubjectEmbed(ctx=ctx)(gt_rows(paths.root, gt)))
        rows = pair_rows(rows, params, ctx.out_dir)
    truth, found = true_cross_pairs(gt), _found(rows, "pairs")
    return {
        "pairing_precision_sample": len(found & truth) / max(1, len(found)),
        "pairing_recall_sample": len(found & truth) / max(1, len(truth)),
    }


def run() -> dict[str, float]:
    out: dict[str, float] = {}
    x, planted, groups = synthetic(100_000, seed=1)
    truth = set(map(tuple, planted.tolist()))
    t0 = time.perf_counter()
    exact = pairing.topk_exact(x, groups, CANDIDATES)
    out["pairing_100k_exact_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    approx = pairing.topk_faiss(x, groups, CANDIDATES)  # nprobe auto: 16 of 256 lists
    out["pairing_100k_s"] = time.perf_counter() - t0
    exact_pairs = band_pairs(exact)
    out["pairing_100k_exact_speedup"] = out["pairing_100k_exact_s"] / out["pairing_100k_s"]
    out["pairing_100k_planted_recall_exact"] = recall(exact_pairs, truth)  # 1.0: planted == in-band
    out["pairing_100k_extra_inband_exact"] = float(len(exact_pairs - truth))
    out["pairing_100k_recall"] = recall(band_pairs(approx), exact_pairs)
    del x, exact, approx
    gc.collect()

    x, planted, groups = synthetic(1_000_000, seed=2)
    t0 = time.perf_counter()
    approx = pairing.topk_faiss(x, groups, CANDIDATES)  # nprobe auto: 64 of 1024 lists
    out["pairing_1m_s"] = time.perf_counter() - t0
    out["pairing_1m_recall"] = recall(band_pairs(approx), set(map(tuple, planted.tolist())))
    copies = pairing.classify(approx, LOW, HIGH, TOP_K) == pairing.COPY_PASTE
    out["pairing_1m_copy_paste_found"] = float(copies.sum())
    out.update(sample_precision())
    return out


if __name__ == "__main__":
    for k, v in run().items():
        print(f"{k:40s} {v:.4g}")
