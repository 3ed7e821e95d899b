"""Input drift: what the training split looked like, and how far a window of live inputs has moved.

The export stage writes the reference (`models/export/drift.json`) from the train split with the
exported tokenizer, and from the model's predictions on its parity texts; `lmpipe serve` keeps a
sliding window of live inputs and compares it with the reference by the population-stability
index, per statistic:
- `length`: tokens per text before truncation, in the train split's quantile bins (10 by default,
  as PSI is usually computed; equal edges from ties are merged);
- `unknown`: the share of a text's tokens that are the tokenizer's unknown token, in fixed bins
  (none, under 1%, 1-5%, 5-20%, more): a WordPiece vocabulary trained on the corpus has ~0%;
- `class`: the predicted class shares of the window against the exported model's own predicted
  shares on held-out texts (the export's parity sample of the test split). Not against the label
  prior: a model that leans to one class (a tiny one predicted 70/30 on a 50/50 split) would
  alert on its first in-domain window. The train split's label prior is recorded beside it.

PSI = sum over bins of (current - reference) x ln(current / reference), each share floored at
`FLOOR` so an empty bin costs a finite amount. Conventions: below 0.1 no change, 0.1-0.25
moderate, above 0.25 major (the default alert). On a window of n texts and k bins, sampling noise
alone gives about (k - 1) / n (0.018 at 500 texts and 10 bins), hence `min_window`.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lmpipe.core.errors import LmpipeError

FORMAT = 1
REFERENCE_FILE = "drift.json"  # in the export folder, beside hf/ and onnx/
FLOOR = 1e-4  # a share of 0 would make ln(0): 1 in 10,000 is below any window's resolution
UNKNOWN_EDGES = (1e-9, 0.01, 0.05, 0.20)  # bins: 0 | (0, 1%) | [1%, 5%) | [5%, 20%) | >= 20%
STATISTICS = ("length", "unknown", "class")


def psi(reference: Sequence[float], current: Sequence[float]) -> float:
    """Population-stability index of two share vectors over the same bins (each floored at FLOOR)."""
    ref = np.maximum(np.asarray(reference, dtype=np.float64), FLOOR)
    cur = np.maximum(np.asarray(current, dtype=np.float64), FLOOR)
    if ref.shape != cur.shape:
        raise ValueError(f"psi: {ref.shape[0]} reference bins against {cur.shape[0]} current bins")
    return float(np.sum((cur - ref) * np.log(cur / ref)))


def bin_index(edges: Sequence[float], values: Sequence[float]) -> np.ndarray:
    """Bin of each value: 0 below edges[0], i where edges[i-1] <= value < edges[i], len(edges) above."""
    return np.searchsorted(np.asarray(edges, dtype=np.float64), np.asarray(values, dtype=np.float64), side="right")


def shares(bins: np.ndarray, n_bins: int) -> list[float]:
    counts = np.bincount(bins, minlength=n_bins)[:n_bins]
    return (counts / max(1, counts.sum())).tolist()


def text_stats(raw_ids: Sequence[Sequence[int]], unk_id: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(tokens per text, share of unknown tokens per text) of uncut token ids."""
    lengths = np.asarray([len(ids) for ids in raw_ids], dtype=np.float64)
    if unk_id is None:
        return lengths, np.zeros_like(lengths)
    unknown = np.asarray([sum(1 for t in ids if t == unk_id) for ids in raw_ids], dtype=np.float64)
    return lengths, unknown / np.maximum(lengths, 1)


def length_edges(lengths: np.ndarray, n_bins: int) -> list[float]:
    """Interior quantile edges of the reference lengths (ties merged, so maybe fewer than n_bins - 1)."""
    quantiles = np.quantile(lengths, np.arange(1, n_bins) / n_bins, method="lower")
    return sorted({float(q) + 0.5 for q in quantiles})  # integer lengths: x.5 puts ties on one side


@dataclass
class Reference:
    """What the monitor compares live inputs with; written by the export stage as drift.json."""

    length_edges: list[float]
    length_shares: list[float]
    unknown_edges: list[float]
    unknown_shares: list[float]
    labels: list[str]
    class_prior: list[float]
    predicted_shares: list[float]
    predicted_texts: int
    texts: int
    window: int
    min_window: int
    psi_alert: float

    @classmethod
    def build(
        cls,
        raw_ids: Sequence[Sequence[int]],
        unk_id: int | None,
        labels: Sequence[int],
        names: Sequence[str],
        predicted: Sequence[int],
        cfg: Any,
    ) -> Reference:
        """The reference: the train split's uncut token ids and label ids, the label names, the model's
        predicted label ids on held-out texts; `cfg` = export.drift."""
        if len(raw_ids) == 0:
            raise LmpipeError("drift reference: the train split is empty")
        if len(predicted) == 0:
            raise LmpipeError("drift reference: no held-out predictions")
        lengths, unknown = text_stats(raw_ids, unk_id)
        edges = length_edges(lengths, cfg.length_bins)
        prior = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(names)) / len(labels)
        return cls(
            length_edges=edges,
            length_shares=_rounded(shares(bin_index(edges, lengths), len(edges) + 1)),
            unknown_edges=list(UNKNOWN_EDGES),
            unknown_shares=_rounded(shares(bin_index(UNKNOWN_EDGES, unknown), len(UNKNOWN_EDGES) + 1)),
            labels=list(names),
            class_prior=_rounded(prior.tolist()),
            predicted_shares=_rounded(shares(np.asarray(predicted, dtype=np.int64), len(names))),
            predicted_texts=len(predicted),
            texts=len(raw_ids),
            window=cfg.window,
            min_window=cfg.min_window,
            psi_alert=cfg.psi_alert,
        )

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, **self.__dict__}

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = "drift.json") -> Reference:
        if data.get("format") != FORMAT:
            raise LmpipeError(f"{where}: unknown drift reference format {data.get('format')!r} (expected {FORMAT})")
        fields = {k: v for k, v in data.items() if k != "format"}
        try:
            return cls(**fields)
        except TypeError as exc:
            raise LmpipeError(f"{where}: not a drift reference ({exc})") from None


def _rounded(values: Sequence[float]) -> list[float]:
    return [round(float(v), 6) for v in values]  # the same JSON bytes on any machine


@dataclass
class DriftWindow:
    """The last `window` inputs' bins and their PSI against the reference, per statistic.

    `observe` adds texts (bins only, never the text); `figures` is PSI per statistic once the
    window holds `min_window` texts, else None. `crossed` tells which statistics went above the
    threshold at the last `observe` (an edge: one alert per crossing, not one per request).
    """

    reference: Reference
    window: int = 0
    min_window: int = 0
    threshold: float = 0.0
    rows: deque = field(default_factory=deque)
    above: dict[str, bool] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.window = self.window or self.reference.window
        self.min_window = self.min_window or self.reference.min_window
        self.threshold = self.threshold or self.reference.psi_alert
        self.rows = deque(maxlen=self.window)
        self.above = {name: False for name in STATISTICS}

    def observe(self, lengths: np.ndarray, unknown: np.ndarray, predicted: Sequence[int]) -> list[str]:
        """Add one batch; the statistics that crossed the threshold upwards with it."""
        ref = self.reference
        length_bins = bin_index(ref.length_edges, lengths)
        unknown_bins = bin_index(ref.unknown_edges, unknown)
        self.rows.extend(zip(length_bins.tolist(), unknown_bins.tolist(), [int(p) for p in predicted]))
        figures = self.figures()
        crossed = []
        for name, value in (figures or {}).items():
            high = value > self.threshold
            if high and not self.above[name]:
                crossed.append(name)
            self.above[name] = high
        return crossed

    def figures(self) -> dict[str, float] | None:
        """PSI per statistic over the window, or None while it holds fewer than min_window texts."""
        if len(self.rows) < self.min_window:
            return None
        ref = self.reference
        columns = np.asarray(self.rows, dtype=np.int64).T
        current = {
            "length": shares(columns[0], len(ref.length_shares)),
            "unknown": shares(columns[1], len(ref.unknown_shares)),
            "class": shares(columns[2], len(ref.predicted_shares)),
        }
        expected = {"length": ref.length_shares, "unknown": ref.unknown_shares, "class": ref.predicted_shares}
        return {name: psi(expected[name], current[name]) for name in STATISTICS}


def level(value: float) -> str:
    """The PSI convention's word for a value."""
    if math.isnan(value):
        return "n/a"
    return "none" if value < 0.1 else "moderate" if value <= 0.25 else "major"
