"""Classification and language-model metrics: pure functions of labels and probabilities.

Every metric is computed from per-example *weights* (how often each test example is drawn), so
one code path serves the point estimate (all weights 1) and the percentile bootstrap (a
`(resamples, n)` matrix of multiplicities): 1,000 resamples of 2,000 examples cost a few
matrix products, not 1,000 Python loops.

Conventions (all documented where they matter):
- labels are integer ids `0..K-1`; `probs` is `(n, K)`; the prediction is `argmax(probs)`.
- precision / recall / F1 are macro averages over all K classes; a class with no predicted
  (or no true) example scores 0 for precision (recall), as scikit-learn's `zero_division=0`.
- ROC-AUC: binary = AUC of the positive-class (id 1) probability; multiclass = one-vs-rest AUC
  per class, macro-averaged over the classes that have both positives and negatives.
- ECE: equal-width bins of the max-probability confidence, bin i = [i/M, (i+1)/M) (the last bin
  includes 1.0); ECE = sum_bins |correct - confidence| / n.
- McNemar: exact two-sided binomial when the discordant count b + c < 25 (the usual rule where
  the chi-square approximation is poor), else chi-square with 1 degree of freedom and
  Edwards' continuity correction.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

METRICS = ("accuracy", "precision", "recall", "f1", "roc_auc", "ece")
EXACT_MCNEMAR_BELOW = 25  # discordant pairs under which McNemar uses the exact binomial test
_CHUNK_CELLS = 4_000_000  # bootstrap resamples are processed in chunks of ~this many weights


# --------------------------------------------------------------------------- validation
def _check(y_true: Any, probs: Any) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"probs must be (n, K>=2), got shape {p.shape}")
    if y.ndim != 1 or len(y) != len(p) or len(y) == 0:
        raise ValueError(f"y_true must be 1-D with {len(p)} entries, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= p.shape[1]:
        raise ValueError(f"y_true must hold integer ids in 0..{p.shape[1] - 1}")
    return y.astype(np.int64), p


# --------------------------------------------------------------------------- simple metrics
def accuracy(y_true: Any, y_pred: Any) -> float:
    """Share of examples whose prediction equals the label."""
    return float(np.mean(np.asarray(y_true) == np.asarray(y_pred)))


def confusion_matrix(y_true: Any, y_pred: Any, n_classes: int) -> np.ndarray:
    """`(K, K)` counts: row = true class, column = predicted class."""
    codes = np.asarray(y_true, dtype=np.int64) * n_classes + np.asarray(y_pred, dtype=np.int64)
    return np.bincount(codes, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def perplexity(mean_nll: float) -> float:
    """exp(mean negative log-likelihood per token, in nats)."""
    return float(math.exp(mean_nll))


def roc_curve_points(y_true: Any, scores: Any, positive: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) of the ROC curve of `scores` for class `positive` (scikit-learn's points)."""
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(np.asarray(y_true) == positive, np.asarray(scores, dtype=np.float64))
    return fpr, tpr


# --------------------------------------------------------------------------- weighted core
def _from_confusion(cm: np.ndarray) -> dict[str, np.ndarray]:
    """accuracy and macro precision/recall/F1 from a `(B, K, K)` stack of confusion matrices."""
    cm = cm.astype(np.float64)
    tp = np.diagonal(cm, axis1=1, axis2=2)
    predicted = cm.sum(axis=1)
    actual = cm.sum(axis=2)
    total = cm.sum(axis=(1, 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(actual > 0, tp / actual, 0.0)
        # 2PR / (P + R) written as 2tp / (2tp + fp + fn): one division, 0 for a class never
        # true nor predicted
        f1 = np.where(predicted + actual > 0, 2 * tp / (predicted + actual), 0.0)
    return {
        "accuracy": tp.sum(axis=1) / total,
        "precision": precision.mean(axis=1),
        "recall": recall.mean(axis=1),
        "f1": f1.mean(axis=1),
    }


def _weighted_auc(weights: np.ndarray, positive: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUC under per-example weights `(B, n)`; ties count one half; NaN if undefined."""
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    w = weights[:, order]
    pos = np.add.reduceat(w * positive[order], starts, axis=1)
    neg = np.add.reduceat(w * ~positive[order], starts, axis=1)
    neg_below = np.cumsum(neg, axis=1) - neg
    wins = (pos * (neg_below + 0.5 * neg)).sum(axis=1)
    pairs = pos.sum(axis=1) * neg.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(pairs > 0, wins / np.where(pairs > 0, pairs, 1), np.nan)


def _weighted_metrics(weights: np.ndarray, y: np.ndarray, probs: np.ndarray, ece_bins: int) -> dict[str, np.ndarray]:
    """Every metric of METRICS for each row of `weights` (`(B, n)` example multiplicities)."""
    n, k = probs.shape
    weights = weights.astype(np.float64)
    pred = probs.argmax(axis=1)
    cells = np.zeros((n, k * k))
    cells[np.arange(n), y * k + pred] = 1.0
    out = _from_confusion((weights @ cells).reshape(-1, k, k))

    if k == 2:
        out["roc_auc"] = _weighted_auc(weights, y == 1, probs[:, 1])
    else:
        per_class = np.stack([_weighted_auc(weights, y == c, probs[:, c]) for c in range(k)])
        with warnings.catch_warnings():  # a resample may leave every class AUC undefined
            warnings.simplefilter("ignore", RuntimeWarning)
            out["roc_auc"] = np.nanmean(per_class, axis=0)

    confidence = probs.max(axis=1)
    bins = np.minimum((confidence * ece_bins).astype(np.int64), ece_bins - 1)
    gap = np.zeros((n, ece_bins))
    gap[np.arange(n), bins] = (pred == y) - confidence  # per-bin sum of (correct - confidence)
    out["ece"] = np.abs(weights @ gap).sum(axis=1) / weights.sum(axis=1)
    return out


# --------------------------------------------------------------------------- probabilities
def softmax(logits: Any) -> np.ndarray:
    """Row-wise softmax in float64, shifted by the row maximum so exp never overflows."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def log_softmax(logits: Any) -> np.ndarray:
    """Row-wise log-softmax in float64 (log-sum-exp shifted by the row maximum)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def validation_metrics(log_probs: np.ndarray, labels: np.ndarray, prefix: str = "val_") -> dict[str, float]:
    """`<prefix>loss` (mean negative log-likelihood), `<prefix>accuracy` and `<prefix>f1` (macro).

    The quick figures training selects on (fine-tuning's early stopping, the baseline's val row);
    the evaluate stage reports the full set with CIs (`classification_metrics`).
    """
    labels = np.asarray(labels, dtype=np.int64)
    pred = log_probs.argmax(axis=1)
    return {
        f"{prefix}loss": float(-log_probs[np.arange(len(labels)), labels].mean()),
        f"{prefix}accuracy": float((pred == labels).mean()),
        f"{prefix}f1": macro_f1(labels, pred, log_probs.shape[1]),
    }


# --------------------------------------------------------------------------- public API
def classification_metrics(y_true: Any, probs: Any, ece_bins: int = 10) -> dict[str, float]:
    """accuracy, macro precision/recall/F1, ROC-AUC and ECE of one model on one test set."""
    y, p = _check(y_true, probs)
    values = _weighted_metrics(np.ones((1, len(y))), y, p, ece_bins)
    return {name: float(values[name][0]) for name in METRICS}


def roc_auc(y_true: Any, probs: Any) -> float:
    """Binary: AUC of probs[:, 1]; multiclass: macro one-vs-rest AUC (NaN when undefined)."""
    return classification_metrics(y_true, probs)["roc_auc"]


def expected_calibration_error(y_true: Any, probs: Any, n_bins: int = 10) -> float:
    """ECE over `n_bins` equal-width bins of the max-probability confidence."""
    return classification_metrics(y_true, probs, n_bins)["ece"]


def macro_f1(y_true: Any, y_pred: Any, n_classes: int) -> float:
    """Unweighted mean over classes of F1 (a class never true nor predicted scores 0, as sklearn)."""
    return macro_precision_recall_f1(y_true, y_pred, n_classes)["f1"]


def macro_precision_recall_f1(y_true: Any, y_pred: Any, n_classes: int) -> dict[str, float]:
    """Macro-averaged precision, recall and F1 over all `n_classes` classes."""
    cm = confusion_matrix(y_true, y_pred, n_classes)[None]
    values = _from_confusion(cm)
    return {name: float(values[name][0]) for name in ("precision", "recall", "f1")}


def bootstrap_resamples(n: int, n_samples: int, seed: int) -> list[np.ndarray]:
    """Chunks of a `(n_samples, n)` matrix of multiplicities: resample i draws n examples with
    replacement. The same (n, n_samples, seed) gives the same resamples, so models evaluated on
    one test set are compared on identical resamples (a paired bootstrap)."""
    rng = np.random.Generator(np.random.PCG64(seed))
    chunk = max(1, _CHUNK_CELLS // n)
    out = []
    for start in range(0, n_samples, chunk):
        rows = min(chunk, n_samples - start)
        idx = rng.integers(0, n, size=(rows, n))
        flat = (idx + np.arange(rows)[:, None] * n).ravel()
        out.append(np.bincount(flat, minlength=rows * n).reshape(rows, n))
    return out


def bootstrap_ci(
    y_true: Any,
    probs: Any,
    n_samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    ece_bins: int = 10,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap interval `(low, high)` of every metric of METRICS.

    Resamples where a metric is undefined (ROC-AUC of a resample without one class) are left
    out of that metric's percentiles; a metric undefined everywhere gets (nan, nan).
    """
    y, p = _check(y_true, probs)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in METRICS}
    for weights in bootstrap_resamples(len(y), n_samples, seed):
        for name, values in _weighted_metrics(weights, y, p, ece_bins).items():
            parts[name].append(values)
    tail = 100 * (1 - confidence) / 2
    out = {}
    for name in METRICS:
        values = np.concatenate(parts[name])
        values = values[~np.isnan(values)]
        if not len(values):
            out[name] = (math.nan, math.nan)
            continue
        low, high = np.percentile(values, [tail, 100 - tail])
        out[name] = (float(low), float(high))
    return out


def accuracy_difference_ci(
    correct_a: Any, correct_b: Any, n_samples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """(acc_a - acc_b, low, high): the accuracy difference of two models on the same examples
    and its paired percentile bootstrap interval (both models scored on each resample, the
    resamples of `bootstrap_resamples`, so the interval matches the per-model ones)."""
    a = np.asarray(correct_a, dtype=np.float64)
    b = np.asarray(correct_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or not len(a):
        raise ValueError(f"correctness vectors must be 1-D, equal length and non-empty ({a.shape} vs {b.shape})")
    diff = a - b
    values = np.concatenate([w @ diff / len(diff) for w in bootstrap_resamples(len(diff), n_samples, seed)])
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(diff.mean()), float(low), float(high)


def mcnemar(correct_a: Any, correct_b: Any) -> dict[str, Any]:
    """McNemar's test of two models' per-example correctness on the same examples.

    b = examples only A gets right, c = examples only B gets right. When b + c < 25 the p-value
    is the exact two-sided binomial `min(1, 2 * P(X <= min(b, c)))`, X ~ Bin(b + c, 1/2);
    otherwise chi-square (1 dof) of `(max(|b - c| - 1, 0))^2 / (b + c)` (Edwards' continuity
    correction, clipped at 0 so b == c gives p = 1). Returns b, c, statistic, p_value, method
    ("exact" | "chi2") and `better` ("a" | "b" | "tie": who has more discordant wins).
    """
    a = np.asarray(correct_a, dtype=bool)
    bb = np.asarray(correct_b, dtype=bool)
    if a.shape != bb.shape or a.ndim != 1:
        raise ValueError(f"correctness vectors must be 1-D and equal length ({a.shape} vs {bb.shape})")
    b = int(np.sum(a & ~bb))
    c = int(np.sum(~a & bb))
    n = b + c
    better = "a" if b > c else "b" if c > b else "tie"
    if n < EXACT_MCNEMAR_BELOW:
        k = min(b, c)
        tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
        p_value, statistic, method = min(1.0, 2 * tail), float(k), "exact"
    else:
        statistic = max(abs(b - c) - 1, 0) ** 2 / n
        p_value, method = math.erfc(math.sqrt(statistic / 2)), "chi2"  # chi2(1) survival
    return {"b": b, "c": c, "statistic": statistic, "p_value": float(p_value), "method": method, "better": better}
