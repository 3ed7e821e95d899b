"""The bar every transformer is measured against: TF-IDF + logistic regression (scikit-learn).

`fit(texts, labels, params, seed)` trains word 1..ngram_max TF-IDF features (min_df,
max_features, sublinear tf, l2-normalised rows) and an L2 logistic regression (lbfgs;
multinomial when there are more than two labels). The model is stored WITHOUT pickle, as one
JSON file (`model.json`): the vocabulary in column order (sklearn sorts it), the idf weights,
the coefficients and intercepts, the label names, the vectorizer settings and the params.
Floats are written with Python's shortest round-trip repr, so the bytes are stable and
`load(path).predict_proba(texts)` reproduces the trained pipeline's probabilities exactly
(the loaded object rebuilds the same sklearn transformers from the stored arrays).

sklearn is imported inside functions: `lmpipe` CLI commands may import this module.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lmpipe.core.errors import LmpipeError
from lmpipe.core.io import write_text
from lmpipe.task.metrics import validation_metrics
from lmpipe.task.splits import check_processed, load_label_names, load_split

MODEL_FILE = "model.json"
FORMAT = "lmpipe-tfidf-logreg/1"
# Vectorizer settings besides the params: sklearn's defaults, written out so a loaded model
# never depends on a future sklearn default.
VECTORIZER_FIXED = {
    "analyzer": "word",
    "lowercase": True,
    "strip_accents": None,
    "token_pattern": r"(?u)\b\w\w+\b",
    "norm": "l2",
    "use_idf": True,
    "smooth_idf": True,
}


class BaselineModel:
    """A loaded TF-IDF + logistic regression: `predict_proba(texts) -> float64 [n, n_labels]`."""

    def __init__(self, blob: dict[str, Any]) -> None:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression

        vec = blob["vectorizer"]
        terms = blob["vocabulary"]
        self.labels: list[str] = list(blob["labels"])
        self.params: dict[str, Any] = dict(blob["params"])
        self.vectorizer = TfidfVectorizer(
            vocabulary={term: i for i, term in enumerate(terms)},
            ngram_range=tuple(vec["ngram_range"]),
            sublinear_tf=vec["sublinear_tf"],
            dtype=np.float64,
            **{k: vec[k] for k in VECTORIZER_FIXED},
        )
        self.vectorizer.idf_ = np.asarray(blob["idf"], dtype=np.float64)
        self.classifier = LogisticRegression()
        self.classifier.coef_ = np.asarray(blob["coef"], dtype=np.float64)
        self.classifier.intercept_ = np.asarray(blob["intercept"], dtype=np.float64)
        self.classifier.classes_ = np.arange(len(self.labels))
        self.classifier.n_features_in_ = len(terms)

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        return self.classifier.predict_proba(self.vectorizer.transform(list(texts)))


def fit(
    texts: Sequence[str], labels: np.ndarray, params: Any, seed: int, label_names: Sequence[str]
) -> tuple[Any, dict[str, Any]]:
    """Train on (texts, label ids); return (the sklearn Pipeline, the JSON-ready model blob)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline

    labels = np.asarray(labels, dtype=np.int64)
    present = np.unique(labels)
    if len(present) != len(label_names):
        missing = [label_names[i] for i in range(len(label_names)) if i not in present]
        raise LmpipeError(f"baseline: the train split has no example of label(s) {missing}")
    vectorizer = TfidfVectorizer(
        ngram_range=(1, params.ngram_max),
        min_df=params.min_df,
        max_features=params.max_features,
        sublinear_tf=params.sublinear_tf,
        dtype=np.float64,
        **VECTORIZER_FIXED,
    )
    classifier = LogisticRegression(C=params.C, max_iter=params.max_iter, random_state=seed)
    pipeline = Pipeline([("tfidf", vectorizer), ("logreg", classifier)])
    try:
        pipeline.fit(list(texts), labels)
    except ValueError as exc:  # e.g. min_df leaves no term
        raise LmpipeError(f"baseline: {exc} (params.yaml: baseline.min_df / max_features)") from None
    vocab = vectorizer.vocabulary_
    terms = sorted(vocab, key=vocab.__getitem__)
    blob = {
        "format": FORMAT,
        "labels": list(label_names),
        "params": {**params.model_dump(mode="json"), "seed": seed},
        "vectorizer": {**VECTORIZER_FIXED, "ngram_range": [1, params.ngram_max], "sublinear_tf": params.sublinear_tf},
        "vocabulary": terms,
        "idf": vectorizer.idf_.astype(np.float64).tolist(),
        "coef": classifier.coef_.astype(np.float64).tolist(),
        "intercept": classifier.intercept_.astype(np.float64).tolist(),
        "n_iter": int(np.max(classifier.n_iter_)),
    }
    return pipeline, blob


def save(blob: dict[str, Any], out_dir: str | Path) -> None:
    """Write `model.json` (compact, keys sorted, floats as shortest round-trip repr)."""

    write_text(Path(out_dir) / MODEL_FILE, json.dumps(blob, sort_keys=True, separators=(",", ":")) + "\n")


def load(path: str | Path) -> BaselineModel:
    """Load a baseline from its folder (or its model.json); no pickle is involved."""
    path = Path(path)
    file = path if path.suffix == ".json" and not path.is_dir() else path / MODEL_FILE
    try:
        blob = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LmpipeError(f"{file}: file not found (run the baseline stage first)") from None
    except ValueError as exc:
        raise LmpipeError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        got = blob.get("format") if isinstance(blob, dict) else type(blob).__name__
        raise LmpipeError(f"{file}: not a baseline model (format {got!r}, expected {FORMAT!r})")
    return BaselineModel(blob)


def evaluate(model: Any, texts: Sequence[str], labels: np.ndarray, prefix: str = "val_") -> dict[str, float]:
    """accuracy, macro F1 and log loss of a model with `predict_proba` on (texts, label ids)."""

    probs = np.asarray(model.predict_proba(list(texts)), dtype=np.float64)
    # probabilities clipped at 1e-15: a confident miss costs 34.5 nats, not infinity
    return validation_metrics(np.log(np.clip(probs, 1e-15, 1.0)), labels, prefix)


def run_baseline(processed_dir: str | Path, params: Any, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fit on the train split, score the val split; return (model blob, metrics)."""

    check_processed(processed_dir)
    names = load_label_names(processed_dir)
    texts, labels = load_split(processed_dir, "train", len(names))
    val_texts, val_labels = load_split(processed_dir, "val", len(names))
    start = time.perf_counter()
    pipeline, blob = fit(texts, labels, params, seed, names)
    fit_seconds = time.perf_counter() - start
    metrics = {
        **evaluate(pipeline, val_texts, val_labels),
        "train_examples": len(texts),
        "val_examples": len(val_texts),
        "features": len(blob["vocabulary"]),
        "n_iter": blob["n_iter"],
        "fit_seconds": fit_seconds,
    }
    return blob, metrics
