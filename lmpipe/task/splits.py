"""The processed splits as every consumer reads them: label names, (texts, label ids), subsamples.

data/processed holds `train.parquet`, `val.parquet`, `test.parquet` (columns `text`, `label` as
integer ids) and `labels.json` (`{"labels": [names in id order]}`), written by the preprocess
stage. Read by finetune, baseline, evaluate and export; errors name the file and row.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lmpipe.core.errors import LmpipeError

SPLIT_FILES = ("train.parquet", "val.parquet", "labels.json")


def check_processed(processed_dir: str | Path) -> None:
    """Raise LmpipeError naming the first missing file of data/processed."""
    for name in SPLIT_FILES:
        path = Path(processed_dir) / name
        if not path.is_file():
            raise LmpipeError(f"{path}: file not found (run the preprocess stage first)")


def load_label_names(processed_dir: str | Path) -> list[str]:
    """The label names in id order, from `labels.json`."""
    path = Path(processed_dir) / "labels.json"
    try:
        labels = json.loads(path.read_text(encoding="utf-8"))["labels"]
    except FileNotFoundError:
        raise LmpipeError(f"{path}: file not found (run the preprocess stage first)") from None
    except (ValueError, KeyError, TypeError):
        raise LmpipeError(f'{path}: expected {{"labels": [names in id order]}}') from None
    if not isinstance(labels, list) or len(labels) < 2:
        raise LmpipeError(f"{path}: 'labels' must list at least 2 names (got {labels!r})")
    return [str(x) for x in labels]


def load_split(processed_dir: str | Path, split: str, n_labels: int | None = None) -> tuple[list[str], np.ndarray]:
    """(texts, int64 label ids) of one split, in file order; bad ids are an error naming the row."""
    import pandas as pd

    path = Path(processed_dir) / f"{split}.parquet"
    if not path.is_file():
        raise LmpipeError(f"{path}: file not found (run the preprocess stage first)")
    frame = pd.read_parquet(path)
    missing = [c for c in ("text", "label") if c not in frame.columns]
    if missing:
        raise LmpipeError(f"{path}: missing column(s) {missing} (has {list(frame.columns)})")
    labels = frame["label"].to_numpy()
    if not np.issubdtype(labels.dtype, np.integer):
        raise LmpipeError(f"{path}: column 'label' must hold integer ids (got {labels.dtype})")
    labels = labels.astype(np.int64)
    if n_labels is not None:
        bad = np.flatnonzero((labels < 0) | (labels >= n_labels))
        if bad.size:
            raise LmpipeError(f"{path} row {int(bad[0])}: label id {int(labels[bad[0]])} is outside 0..{n_labels - 1}")
    return frame["text"].astype(str).tolist(), labels


def stratified_subsample(labels: np.ndarray, n: int | None, seed: int) -> np.ndarray:
    """Indices (sorted, so file order is kept) of a seeded subsample with the label shares kept."""
    total = len(labels)
    if n is None or n >= total:
        return np.arange(total)
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * n / total
    take = np.floor(exact).astype(int)
    # largest remainders get the leftover places (ties: lower class id first)
    for i in np.argsort(-(exact - take), kind="stable")[: n - int(take.sum())]:
        take[i] += 1
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)]
    return np.sort(np.concatenate(chosen))
