"""The served model: one `Predictor`, the backend it runs on, its lineage, its drift window.

`choose_backend` times every backend the export folder holds (torch, ONNX fp32, ONNX int8) on
this machine, on texts as long as the training split's median, at one text per call and at a
full micro-batch, and picks the fastest per text at the batch the server will run (at one text
when micro-batching is off). The export stage's latencies came from the machine that built the
model; which backend wins depends on the CPU (int8 was 2.29x torch at batch 32 with AVX-512 VNNI
and slower than fp32 at batch 1 on an AVX2 machine without it), so it is measured where it serves.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmpipe.core.errors import LmpipeError
from lmpipe.core.lineage import dvc_md5
from lmpipe.inference.predictor import BACKENDS, ONNX_FILES, Predictor
from lmpipe.monitor.drift import REFERENCE_FILE, STATISTICS, DriftWindow, Reference, text_stats
from lmpipe.task.metrics import softmax

log = logging.getLogger("lmpipe.serve")

TIMING_REPEATS = 3  # best of 3: the least disturbed run of each backend
SAMPLE_WORDS = ("the", "film", "was", "not", "a", "good", "one", "but", "acting", "story")


@dataclass
class Prediction:
    """One model call's results, rows in input order."""

    probs: np.ndarray
    lengths: np.ndarray
    unknown: np.ndarray


def available_backends(model_dir: Path) -> list[str]:
    """The backends whose files the export folder holds (torch always)."""
    return ["torch"] + [b for b in BACKENDS if b in ONNX_FILES and (model_dir / ONNX_FILES[b]).is_file()]


def sample_texts(tokens: int, n: int) -> list[str]:
    """`n` plain-word texts of about `tokens` tokens each (the words are single WordPiece tokens)."""
    words = [SAMPLE_WORDS[i % len(SAMPLE_WORDS)] for i in range(max(1, tokens))]
    return [" ".join(words)] * n


def time_backend(predictor: Predictor, texts: Sequence[str], batch: int) -> float:
    """Best-of-`TIMING_REPEATS` milliseconds per text, `batch` texts per call."""
    for _ in range(3):  # warm-up: the first calls of a shape allocate
        predictor.logits(list(texts[:batch]), batch_size=batch)
    best = float("inf")
    for _ in range(TIMING_REPEATS):
        start = time.perf_counter()
        for i in range(0, len(texts), batch):
            predictor.logits(list(texts[i : i + batch]), batch_size=batch)
        best = min(best, (time.perf_counter() - start) * 1000 / len(texts))
    return best


def choose_backend(model_dir: Path, threads: int, max_batch: int, median_tokens: int) -> tuple[str, dict[str, Any]]:
    """(the fastest backend per text at `max_batch`, the timings of every backend in ms per text)."""
    texts = sample_texts(median_tokens, max(8, max_batch))
    timings: dict[str, Any] = {}
    for backend in available_backends(model_dir):
        predictor = Predictor(model_dir, backend, threads)
        timings[backend] = {
            "batch1_ms": round(time_backend(predictor, texts[:8], 1), 3),
            f"batch{max_batch}_ms": round(time_backend(predictor, texts, max_batch), 3),
        }
        del predictor
    key = f"batch{max_batch}_ms"
    chosen = min(timings, key=lambda b: (timings[b][key], b))
    log.info("backend: %s (ms per text on this machine, %d tokens: %s)", chosen, median_tokens, timings)
    return chosen, timings


def load_reference(model_dir: Path) -> Reference | None:
    path = model_dir / REFERENCE_FILE
    if not path.is_file():
        log.warning("%s: no drift reference (an export from before drift.json); drift is not watched", path)
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise LmpipeError(f"{path}: not JSON ({exc})") from None
    return Reference.from_json(data, str(path))


def median_tokens(reference: Reference | None) -> int:
    """The training split's median tokens per text (the middle length edge), 128 without a reference."""
    if reference is None or not reference.length_edges:
        return 128
    edges = reference.length_edges
    return int(edges[len(edges) // 2])


def model_info(model_dir: Path) -> dict[str, Any]:
    """What /model answers: the lineage's model, git revision, params hash, and the folder's DVC md5 now."""
    path = model_dir / "lineage.json"
    lineage = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    stages = lineage.get("stages", {})
    params = {name: stage.get("params", {}) for name, stage in stages.items()}
    params["export"] = lineage.get("export", {}).get("params", {})
    canonical = json.dumps(params, sort_keys=True, separators=(",", ":")).encode("utf-8")
    model = lineage.get("model", {})
    return {
        "name": model.get("name"),
        "source": model.get("source"),
        "labels": model.get("labels"),
        "dvc_md5": dvc_md5(model_dir),
        "git_revision": lineage.get("git", {}).get("rev"),
        "git_dirty": lineage.get("git", {}).get("dirty"),
        "params_sha256": hashlib.sha256(canonical).hexdigest() if lineage else None,
        "numerics": lineage.get("numerics", {}).get("mode"),
        "lineage": "lineage.json" if lineage else None,
    }


class Engine:
    """The model the server runs: `predict(texts)` -> probabilities and the texts' drift statistics."""

    def __init__(
        self,
        model_dir: str | Path,
        backend: str = "auto",
        threads: int = 0,
        max_batch: int = 32,
        drift: dict[str, Any] | None = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.max_batch = max_batch
        self.reference = load_reference(self.model_dir) if self.model_dir.is_dir() else None
        self.timings: dict[str, Any] = {}
        if backend == "auto":
            backend, self.timings = choose_backend(self.model_dir, threads, max_batch, median_tokens(self.reference))
        self.backend = backend
        self.predictor = Predictor(self.model_dir, backend, threads)
        self.labels = self.predictor.labels
        self.unk_id = self.predictor.tokenizer.unk_token_id
        self.window = None
        if self.reference is not None:
            if self.reference.labels != self.labels:
                where = self.model_dir / REFERENCE_FILE
                raise LmpipeError(f"{where}: labels {self.reference.labels} differ from the model's {self.labels}")
            self.window = DriftWindow(self.reference, **(drift or {}))
        self.info = {**model_info(self.model_dir), "backend": backend, "backend_timings_ms": self.timings}

    @property
    def statistics(self) -> Sequence[str]:
        return STATISTICS if self.window is not None else ()

    def predict(self, texts: Sequence[str]) -> Prediction:
        """Class probabilities of `texts` (batches of max_batch, length-sorted) and their statistics."""
        raw = self.predictor.tokenize(texts)
        logits = self.predictor.logits_of_ids(self.predictor.cut(raw), self.max_batch)
        lengths, unknown = text_stats(raw, self.unk_id)
        return Prediction(softmax(logits), lengths, unknown)
