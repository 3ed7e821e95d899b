"""`Predictor`: the exported classifier on torch, ONNX fp32 or ONNX int8, one encoding for all.

The model folder is `models/export/` (hf/ + onnx/, as the export stage writes it) or any plain
HF classifier folder holding `lmpipe.json` (torch backend only). Texts are encoded exactly as in
fine-tuning (`lmpipe.inference.encoding.encode_texts` with the max_length and truncation recorded
in `lmpipe.json`) and run through the shared batched loop (`lmpipe.inference.batched`), so
`lmpipe predict`, the export parity check and the MLflow pyfunc model all encode, batch and
post-process text identically. Heavy packages are imported on use.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from lmpipe.core.errors import LmpipeError
from lmpipe.inference.batched import batched_logits, iter_batches, torch_forward
from lmpipe.inference.classifier import INFO_FILE, load_model, quiet_transformers, read_info
from lmpipe.inference.encoding import cut_and_wrap, tokenize_texts
from lmpipe.task.metrics import softmax

BACKENDS = ("torch", "onnx", "onnx-int8")


ONNX_FILES = {"onnx": "onnx/model.onnx", "onnx-int8": "onnx/model.int8.onnx"}


WEIGHTS_FILE = "model.safetensors"
SUPPORTED_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def resolve_model_files(model_dir: str | os.PathLike, backend: str = "torch") -> tuple[Path, Path]:
    """(HF folder, weights file) of `model_dir` for `backend`; an error names the missing file.

    `model_dir` is an export folder (`hf/` inside) or an HF folder itself (torch only).
    """
    if backend not in BACKENDS:
        raise LmpipeError(f"--backend must be one of {list(BACKENDS)} (got {backend!r})")
    root = Path(model_dir)
    if not root.is_dir():
        raise LmpipeError(f"{root}: model folder not found (run `dvc repro export` or pass --model)")
    flat = (root / "config.json").exists() and not (root / "hf").is_dir()
    hf = root if flat else root / "hf"
    needed = ["config.json", INFO_FILE, "tokenizer_config.json"]
    if backend == "torch":
        needed.append(WEIGHTS_FILE)
    for name in needed:
        if not (hf / name).is_file():
            raise LmpipeError(f"{root}: incomplete model folder, missing {(hf / name).relative_to(root)}")
    if not any((hf / name).is_file() for name in ("tokenizer.json", "vocab.txt")):
        raise LmpipeError(f"{root}: incomplete model folder, missing {(hf / 'tokenizer.json').relative_to(root)}")
    if backend == "torch":
        return hf, hf / WEIGHTS_FILE
    if flat:
        raise LmpipeError(f"{root}: backend {backend!r} needs an export folder with {ONNX_FILES[backend]}")
    weights = root / ONNX_FILES[backend]
    if not weights.is_file():
        raise LmpipeError(f"{root}: incomplete model folder, missing {ONNX_FILES[backend]}")
    return hf, weights


def read_labels(hf: Path) -> list[str]:
    """Class names in id order, from `id2label` in `<hf>/config.json`."""
    path = hf / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    id2label = config.get("id2label")
    if not id2label:
        raise LmpipeError(f"{path}: missing key 'id2label'")
    ids = sorted(int(k) for k in id2label)
    if ids != list(range(len(ids))):
        raise LmpipeError(f"{path}: id2label ids must be 0..{len(ids) - 1} (got {ids})")
    return [str(id2label[str(i)]) for i in ids]


class Predictor:
    """Text -> logits / labels with one backend; encoding and batching identical across backends."""

    def __init__(self, model_dir: str | os.PathLike, backend: str = "torch", threads: int = 0) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoTokenizer

        quiet_transformers()  # no load reports or bars on stdout/stderr
        self.backend = backend
        self.hf, self.weights = resolve_model_files(model_dir, backend)
        info = read_info(self.hf)
        self.max_length, self.truncation = int(info["max_length"]), str(info["truncation"])
        self.labels = read_labels(self.hf)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.hf))
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        if backend == "torch":
            self._open_torch(threads)
        else:
            self._open_onnx(threads)
        unknown = [name for name in self.input_names if name not in SUPPORTED_INPUTS]
        if unknown:
            raise LmpipeError(f"{self.weights}: model inputs {unknown} are not supported")
        if len(self.labels) != self._num_outputs():
            raise LmpipeError(
                f"{self.hf / 'config.json'}: id2label has {len(self.labels)} labels but the "
                f"{backend} model has {self._num_outputs()} outputs"
            )

    def _open_torch(self, threads: int) -> None:

        import torch

        if threads:
            torch.set_num_threads(threads)
        self.model = load_model(self.hf)  # the one loader: plain HF, or prefix / adapter rebuilt
        accepted = set(inspect.signature(self.model.forward).parameters)
        self.input_names = [n for n in self.tokenizer.model_input_names if n in accepted]
        self.forward = torch_forward(self.model, "cpu")

    def _open_onnx(self, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(self.weights), sess_options=options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.forward = lambda arrays: self.session.run(None, arrays)[0]

    def _num_outputs(self) -> int:
        if self.backend == "torch":
            return int(self.model.config.num_labels)
        shape = self.session.get_outputs()[0].shape
        return int(shape[-1]) if isinstance(shape[-1], int) else len(self.labels)

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of `texts` as the model was trained (its lmpipe.json max_length, truncation)."""
        return self.cut(self.tokenize(texts))

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of the whole texts, before any cut (what `lmpipe serve` measures drift on)."""
        return tokenize_texts(self.tokenizer, texts)

    def cut(self, raw: Sequence[Sequence[int]]) -> list[list[int]]:
        """`tokenize` ids cut and wrapped as in training: `encode` = `cut` after `tokenize`."""
        return cut_and_wrap(self.tokenizer, raw, self.max_length, self.truncation)

    def batches(self, texts: Sequence[str], batch_size: int) -> Iterator[tuple[Any, dict[str, Any]]]:
        """(positions, int64 arrays) per batch, grouped by length: what `logits` runs (benchmarks time `run`)."""

        return iter_batches(self.encode(texts), self.pad_id, batch_size, input_names=self.input_names)

    def run(self, arrays: dict[str, Any]) -> Any:
        """float32 logits of one encoded batch."""
        return self.forward(arrays)

    def logits(self, texts: Sequence[str], batch_size: int = 32) -> Any:
        """float32 logits [n, n_labels], rows in the order of `texts` (the shared batched loop)."""
        return self.logits_of_ids(self.encode(texts), batch_size)

    def logits_of_ids(self, input_ids: Sequence[Sequence[int]], batch_size: int = 32) -> Any:
        """float32 logits of `encode`d texts, rows in input order."""
        import numpy as np

        logits = batched_logits(
            self.forward, input_ids, self.pad_id, len(self.labels), batch_size, input_names=self.input_names
        )
        return logits.astype(np.float32)

    def predict(self, texts: Sequence[str], batch_size: int = 32) -> Any:
        """DataFrame: `label`, `score` (its probability), `prob_<label>` for every label."""
        import pandas as pd

        probs = softmax(self.logits(texts, batch_size))
        frame = pd.DataFrame({"label": [self.labels[i] for i in probs.argmax(axis=1)]})
        frame["score"] = probs.max(axis=1)
        for j, name in enumerate(self.labels):
            frame[f"prob_{name}"] = probs[:, j]
        return frame
