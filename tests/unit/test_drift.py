"""Input drift (lmpipe.monitor.drift): PSI by hand, the reference the export writes, the window."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from lmpipe.core.errors import LmpipeError
from lmpipe.monitor import drift

CFG = SimpleNamespace(length_bins=4, window=100, min_window=50, psi_alert=0.25)


def test_psi_by_hand():
    # (0.5 - 0.25) ln(0.5 / 0.25) + (0.5 - 0.75) ln(0.5 / 0.75)
    expected = 0.25 * math.log(2) - 0.25 * math.log(2 / 3)
    assert drift.psi([0.25, 0.75], [0.5, 0.5]) == pytest.approx(expected, rel=1e-12)
    assert drift.psi([0.3, 0.7], [0.3, 0.7]) == 0.0
    # an empty bin is floored, not infinite
    assert math.isfinite(drift.psi([1.0, 0.0], [0.5, 0.5]))
    with pytest.raises(ValueError, match="2 reference bins against 3"):
        drift.psi([0.5, 0.5], [0.2, 0.3, 0.5])


def test_bins_and_quantile_edges_merge_ties():
    assert drift.bin_index([10.5, 20.5], [3, 10, 11, 20, 21, 99]).tolist() == [0, 0, 1, 1, 2, 2]
    lengths = np.asarray([5] * 90 + list(range(100, 110)), dtype=float)  # 90% ties at 5
    edges = drift.length_edges(lengths, 10)
    assert edges == sorted(set(edges)) and edges[0] == 5.5
    assert len(edges) < 9  # the tied deciles merged into one edge


def test_text_stats_counts_unknown_tokens():
    lengths, unknown = drift.text_stats([[1, 2, 0, 0], [3], []], unk_id=0)
    assert lengths.tolist() == [4, 1, 0]
    assert unknown.tolist() == [0.5, 0.0, 0.0]
    assert drift.text_stats([[0, 0]], unk_id=None)[1].tolist() == [0.0]


def reference(rng: np.random.Generator) -> drift.Reference:
    raw = [[7] * int(n) for n in rng.integers(20, 200, size=1000)]
    labels = rng.integers(0, 2, size=1000)
    return drift.Reference.build(raw, 0, labels, ["neg", "pos"], rng.integers(0, 2, size=300), CFG)


def test_reference_round_trips_and_rejects_other_formats():
    ref = reference(np.random.default_rng(0))
    assert len(ref.length_shares) == len(ref.length_edges) + 1 == 4
    assert sum(ref.length_shares) == pytest.approx(1.0, abs=1e-5)
    assert ref.unknown_shares[0] == 1.0  # no unknown token in the reference
    text = json.dumps(ref.to_json(), sort_keys=True)
    assert drift.Reference.from_json(json.loads(text)) == ref
    with pytest.raises(LmpipeError, match="d.json: unknown drift reference format 9"):
        drift.Reference.from_json({**ref.to_json(), "format": 9}, "d.json")
    with pytest.raises(LmpipeError, match="not a drift reference"):
        drift.Reference.from_json({"format": 1, "labels": []}, "d.json")
    with pytest.raises(LmpipeError, match="train split is empty"):
        drift.Reference.build([], 0, [], ["neg", "pos"], [0], CFG)
    with pytest.raises(LmpipeError, match="no held-out predictions"):
        drift.Reference.build([[1]], 0, [0], ["neg", "pos"], [], CFG)


def test_class_drift_is_measured_against_the_models_own_predictions_not_the_prior():
    # a model that leans to "pos" (80 %) on a 50/50 split: its in-domain windows must stay quiet
    rng = np.random.default_rng(4)
    raw = [[7] * int(n) for n in rng.integers(20, 200, size=1000)]
    leaning = (rng.random(1000) < 0.8).astype(int)
    ref = drift.Reference.build(raw, 0, np.arange(1000) % 2, ["neg", "pos"], leaning, CFG)
    assert ref.class_prior == [0.5, 0.5] and ref.predicted_shares == pytest.approx([0.2, 0.8], abs=0.03)
    window = drift.DriftWindow(ref)
    lengths = np.asarray([len(r) for r in raw[:100]], dtype=float)
    assert window.observe(lengths, np.zeros(100), (rng.random(100) < 0.8).astype(int)) == []
    assert window.figures()["class"] < 0.1
    assert drift.psi(ref.class_prior, [0.2, 0.8]) > 0.25  # what comparing with the prior would have said


def test_window_stays_quiet_in_domain_and_alerts_once_on_shift():
    rng = np.random.default_rng(1)
    ref = reference(rng)
    window = drift.DriftWindow(ref)
    assert (window.window, window.min_window, window.threshold) == (100, 50, 0.25)
    same = rng.integers(20, 200, size=40).astype(float)
    assert window.observe(same, np.zeros(40), rng.integers(0, 2, size=40)) == []
    assert window.figures() is None  # 40 < min_window
    for _ in range(3):
        same = rng.integers(20, 200, size=40).astype(float)
        assert window.observe(same, np.zeros(40), rng.integers(0, 2, size=40)) == []
    quiet = window.figures()
    assert quiet is not None and max(quiet.values()) < 0.25, quiet
    # long texts full of unknown tokens, all predicted "pos": every statistic moves
    crossed = []
    for _ in range(3):
        crossed += window.observe(np.full(40, 900.0), np.full(40, 0.3), np.ones(40, dtype=int))
    assert sorted(crossed) == ["class", "length", "unknown"]  # each crossing counted once
    assert len(window.rows) == 100  # the window slides
    loud = window.figures()
    assert all(v > 0.25 for v in loud.values()) and all(window.above.values())
    assert drift.level(loud["length"]) == "major" and drift.level(0.05) == "none" and drift.level(0.2) == "moderate"


def test_window_overrides_from_the_server():
    ref = reference(np.random.default_rng(2))
    window = drift.DriftWindow(ref, window=20, min_window=10, threshold=0.5)
    assert (window.window, window.min_window, window.threshold, window.rows.maxlen) == (20, 10, 0.5, 20)
