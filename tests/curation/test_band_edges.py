"""The pairing band's edges are inclusive in both rules the global phase uses (``pairing.classify`` on
searched candidates, ``pairing.band_reason`` on one score): a score of exactly ``low`` or ``high`` pairs.

The edges are exactly representable in float32 (0.5, 0.75), so a float32 score equals the float64 edge and
the test sees ``>`` vs ``>=`` rather than rounding (0.9 in float32 is 0.89999998, below a float64 0.9)."""

from __future__ import annotations

import numpy as np
import pytest

from curation import pairing

LOW, HIGH = 0.5, 0.75
assert float(np.float32(LOW)) == LOW and float(np.float32(HIGH)) == HIGH  # exact in float32


def _row(scores: list[float]) -> pairing.Neighbours:
    s = np.array([scores], np.float32)  # (1, m), best first as a search returns them
    return pairing.Neighbours(idx=np.arange(1, s.shape[1] + 1)[None, :].astype(np.int64), score=s)


def test_classify_pairs_a_score_of_exactly_high_and_exactly_low():
    nb = _row([0.875, HIGH, 0.625, LOW, 0.375])
    v = pairing.classify(nb, LOW, HIGH, top_k=8)
    assert v.tolist() == [
        [pairing.COPY_PASTE, pairing.PAIR, pairing.PAIR, pairing.PAIR, pairing.DIFFERENT_SUBJECT]
    ]


def test_classify_counts_an_edge_score_toward_top_k():
    """A candidate at exactly ``high`` takes the first top-k slot, so the next in-band one is beyond it."""
    v = pairing.classify(_row([HIGH, 0.625]), LOW, HIGH, top_k=1)
    assert v.tolist() == [[pairing.PAIR, pairing.BEYOND_TOP_K]]


@pytest.mark.parametrize(
    ("score", "want"),
    [(HIGH, None), (LOW, None), (0.625, None), (0.875, "copy_paste"), (0.375, "different_subject")],
)
def test_band_reason_edges_with_float32_scores(score, want):
    assert pairing.band_reason(float(np.float32(score)), LOW, HIGH) == want
    assert pairing.band_reason(np.float32(score), LOW, HIGH) == want  # as read back from a score column


def test_classify_and_band_reason_agree_at_every_edge():
    scores = [1.0, 0.875, HIGH, 0.625, LOW, 0.375, -1.0]
    v = pairing.classify(_row(scores), LOW, HIGH, top_k=len(scores))[0]
    for s, code in zip(scores, v.tolist()):
        reason = pairing.band_reason(s, LOW, HIGH)
        assert (pairing.VERDICTS[code] if code != pairing.PAIR else None) == reason, s
