"""Ensembles: the mean of temperature-calibrated class probabilities of several models.

One definition serves the evaluate stage (which fits the temperatures and scores the ensemble)
and `lmpipe predict --ensemble NAME` (which serves it), so both compute the same numbers:

- member logits: a fine-tuned transformer's logits from the shared batched loop (`Predictor`
  here, `lmpipe.inference.batched.torch_logits` in evaluate); the TF-IDF baseline's log
  probabilities (`baseline_logits`: logistic regression's log-probs differ from its logits by a
  per-row constant, so softmax(log p / T) == softmax(z / T));
- calibration: one temperature per member, fit on the validation split by minimising the mean
  negative log-likelihood of softmax(logits / T) (`fit_temperature`: deterministic golden-section
  search; the NLL is convex in 1/T, so the minimum found is the global one within the bounds);
- combination: the unweighted mean of the calibrated probabilities (`combine`).

The ensemble file `models/ensembles/<name>.json` (written by evaluate, a DVC output) names each
member's folder (relative to the file), its DVC md5 when calibrated and its temperature;
`EnsemblePredictor` refuses a member whose files changed since, because its temperature would
no longer fit. Heavy packages are imported on use.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lmpipe.core.errors import LmpipeError
from lmpipe.task.metrics import log_softmax, softmax

FORMAT = "lmpipe-ensemble/1"
BASELINE = "baseline"  # the member name (and kind) of the TF-IDF baseline
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 100.0  # bounds of the search; a fit at a bound is reported as such
_SEARCH_STEPS = 100  # golden-section steps: the bracket shrinks by 0.618^100, far below float precision
_LOG_FLOOR = 1e-15  # a probability of 0 counts as 1e-15 (34.5 nats), as the baseline's own log loss does


# --------------------------------------------------------------------------- the maths
def baseline_logits(probs: Any) -> np.ndarray:
    """Logits standing in for the TF-IDF baseline's: its log-probabilities (floored at 1e-15)."""
    return np.log(np.clip(np.asarray(probs, dtype=np.float64), _LOG_FLOOR, 1.0))


def nll(logits: Any, labels: Any, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of `labels` under softmax(logits / temperature)."""
    labels = np.asarray(labels, dtype=np.int64)
    log_probs = log_softmax(np.asarray(logits, dtype=np.float64) / temperature)
    return float(-log_probs[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: Any, labels: Any) -> float:
    """The temperature in [0.01, 100] that minimises `nll(logits, labels, T)`.

    Golden-section search on log(1/T): the NLL is convex in 1/T (a log-sum-exp of linear
    functions minus a linear one), hence unimodal in its logarithm, and the search is
    deterministic (no random start, a fixed number of steps).
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if logits.ndim != 2 or len(logits) != len(labels) or not len(labels):
        raise LmpipeError(f"temperature fit: need logits [n, k] and n labels (got {logits.shape}, {labels.shape})")

    def cost(u: float) -> float:
        return nll(logits, labels, math.exp(-u))

    lo, hi = -math.log(MAX_TEMPERATURE), -math.log(MIN_TEMPERATURE)
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = cost(a), cost(b)
    for _ in range(_SEARCH_STEPS):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = cost(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = cost(b)
    best = min((cost(lo), lo), (fa, a), (fb, b), (cost(hi), hi))  # ties: the smaller u (larger T)
    return math.exp(-best[1])


def calibrate(logits: Any, temperature: float) -> np.ndarray:
    """Class probabilities softmax(logits / temperature), float64."""
    return softmax(np.asarray(logits, dtype=np.float64) / temperature)


def combine(probs: Sequence[np.ndarray]) -> np.ndarray:
    """The ensemble's probabilities: the unweighted mean of the members' (calibrated) probabilities."""
    if not probs:
        raise LmpipeError("an ensemble needs at least one member")
    return np.mean(np.stack([np.asarray(p, dtype=np.float64) for p in probs]), axis=0)


# --------------------------------------------------------------------------- the ensemble file
def write_spec(path: str | Path, spec: dict[str, Any]) -> None:
    """Write the ensemble file (keys sorted, floats as shortest round-trip repr: stable bytes)."""
    from lmpipe.core.io import write_json

    write_json(path, {"format": FORMAT, **spec})


def read_spec(path: str | Path) -> dict[str, Any]:
    """An ensemble file, checked: format, labels, members with kind, path and temperature."""
    path = Path(path)
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LmpipeError(
            f"{path}: ensemble file not found (run `dvc repro evaluate` with evaluate.ensembles)"
        ) from None
    except ValueError as exc:
        raise LmpipeError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        got = spec.get("format") if isinstance(spec, dict) else type(spec).__name__
        raise LmpipeError(f"{path}: not an ensemble file (format {got!r}, expected {FORMAT!r})")
    for key in ("labels", "members"):
        if not isinstance(spec.get(key), list) or not spec[key]:
            raise LmpipeError(f"{path}: missing key {key!r}")
    for i, member in enumerate(spec["members"]):
        missing = [k for k in ("name", "kind", "path", "temperature") if k not in member]
        if missing:
            raise LmpipeError(f"{path}: members[{i}] lacks {missing}")
    return spec


def member_path(spec_path: str | Path, member: dict[str, Any]) -> Path:
    """A member's folder: its `path` is relative to the ensemble file's folder."""
    return Path(os.path.normpath(Path(spec_path).parent / member["path"]))


# --------------------------------------------------------------------------- serving
class EnsemblePredictor:
    """Text -> the ensemble's probabilities / labels, the members loaded from their own folders.

    Transformer members run through `Predictor` (torch; the shared encoding and batched loop),
    the baseline through `lmpipe.baseline.baseline.load` (JSON, no pickle). `verify` recomputes
    each member's DVC md5 and refuses one that changed since its temperature was fit.
    """

    def __init__(self, spec_path: str | Path, threads: int = 0, verify: bool = True) -> None:
        from lmpipe.baseline import baseline
        from lmpipe.inference.predictor import Predictor

        self.path = Path(spec_path)
        self.spec = read_spec(self.path)
        self.labels = [str(x) for x in self.spec["labels"]]
        self.members: list[tuple[dict[str, Any], Any]] = []
        for member in self.spec["members"]:
            folder = member_path(self.path, member)
            if verify:
                _check_unchanged(self.path, member, folder)
            if member["kind"] == BASELINE:
                model = baseline.load(folder)
                own = [str(x) for x in model.labels]
            else:
                model = Predictor(folder, "torch", threads)
                own = model.labels
            if own != self.labels:
                raise LmpipeError(f"{folder}: predicts labels {own}, the ensemble {self.path} has {self.labels}")
            self.members.append((member, model))

    def member_logits(self, texts: Sequence[str], batch_size: int = 32) -> list[np.ndarray]:
        """Each member's (uncalibrated) logits, in member order."""
        out = []
        for member, model in self.members:
            if member["kind"] == BASELINE:
                out.append(baseline_logits(model.predict_proba(list(texts))))
            else:
                out.append(np.asarray(model.logits(texts, batch_size), dtype=np.float64))
        return out

    def probs(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """float64 [n, n_labels]: the mean of the members' calibrated probabilities."""
        logits = self.member_logits(texts, batch_size)
        return combine([calibrate(z, float(m["temperature"])) for (m, _), z in zip(self.members, logits)])

    def predict(self, texts: Sequence[str], batch_size: int = 32) -> Any:
        """DataFrame: `label`, `score` (its probability), `prob_<label>` for every label (as `Predictor`)."""
        import pandas as pd

        probs = self.probs(texts, batch_size)
        frame = pd.DataFrame({"label": [self.labels[i] for i in probs.argmax(axis=1)]})
        frame["score"] = probs.max(axis=1)
        for j, name in enumerate(self.labels):
            frame[f"prob_{name}"] = probs[:, j]
        return frame


def _check_unchanged(spec_path: Path, member: dict[str, Any], folder: Path) -> None:
    """Refuse a member folder that is missing or whose DVC md5 differs from the one calibrated."""
    from lmpipe.core.lineage import dvc_md5

    if not folder.exists():
        raise LmpipeError(f"{folder}: member {member['name']!r} of {spec_path} not found")
    recorded = member.get("md5")
    if recorded and dvc_md5(folder) != recorded:
        raise LmpipeError(
            f"{folder}: changed since its temperature was fit for {spec_path} (rerun `dvc repro evaluate`)"
        )
