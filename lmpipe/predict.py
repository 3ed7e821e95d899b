"""`lmpipe predict`: label texts with the exported classifier on torch, ONNX fp32 or ONNX int8.

The model folder is `models/export/` (hf/ + onnx/, as the export stage writes it) or any plain
HF classifier folder holding `lmpipe.json` (torch backend only). Texts are encoded exactly as in
fine-tuning and evaluation, by `lmpipe.finetuning.encode_texts` with the max_length and
truncation recorded in `hf/lmpipe.json`, then padded per batch (batches grouped by length).

    lmpipe predict "A tender, funny film." "Two hours I will never get back."
    lmpipe predict --input reviews.csv --output preds.csv --backend onnx-int8

The same `Predictor` serves the export stage's parity check and the MLflow pyfunc model, so
all three encode and post-process text identically. Heavy packages are imported on use.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

from lmpipe.errors import LmpipeError

BACKENDS = ("torch", "onnx", "onnx-int8")
ONNX_FILES = {"onnx": "onnx/model.onnx", "onnx-int8": "onnx/model.int8.onnx"}
WEIGHTS_FILE = "model.safetensors"
ENCODING_FILE = "lmpipe.json"
DEFAULT_MODEL = "models/export"


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
    needed = ["config.json", ENCODING_FILE, "tokenizer_config.json"]
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


def read_encoding(hf: Path) -> tuple[int, str]:
    """(max_length, truncation) from `<hf>/lmpipe.json`."""
    path = hf / ENCODING_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise LmpipeError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    for key in ("max_length", "truncation"):
        if key not in meta:
            raise LmpipeError(f"{path}: missing key {key!r}")
    return int(meta["max_length"]), str(meta["truncation"])


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


def softmax(logits: Any) -> Any:
    import numpy as np

    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class Predictor:
    """Text -> logits / labels with one backend; encoding identical across backends."""

    def __init__(self, model_dir: str | os.PathLike, backend: str = "torch", threads: int = 0) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import transformers
        from transformers import AutoTokenizer

        transformers.utils.logging.set_verbosity_error()  # no load reports or bars on stdout/stderr
        transformers.utils.logging.disable_progress_bar()

        self.backend = backend
        self.hf, self.weights = resolve_model_files(model_dir, backend)
        self.max_length, self.truncation = read_encoding(self.hf)
        self.labels = read_labels(self.hf)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.hf))
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        if backend == "torch":
            import torch
            from transformers import AutoModelForSequenceClassification

            if threads:
                torch.set_num_threads(threads)
            self.model = AutoModelForSequenceClassification.from_pretrained(str(self.hf)).eval()
            accepted = set(inspect.signature(self.model.forward).parameters)
            self.input_names = [n for n in self.tokenizer.model_input_names if n in accepted]
        else:
            import onnxruntime as ort

            options = ort.SessionOptions()
            if threads:
                options.intra_op_num_threads = threads
                options.inter_op_num_threads = 1
            self.session = ort.InferenceSession(
                str(self.weights), sess_options=options, providers=["CPUExecutionProvider"]
            )
            self.input_names = [i.name for i in self.session.get_inputs()]
        if len(self.labels) != self._num_outputs():
            raise LmpipeError(
                f"{self.hf / 'config.json'}: id2label has {len(self.labels)} labels but the "
                f"{backend} model has {self._num_outputs()} outputs"
            )

    def _num_outputs(self) -> int:
        if self.backend == "torch":
            return int(self.model.config.num_labels)
        shape = self.session.get_outputs()[0].shape
        return int(shape[-1]) if isinstance(shape[-1], int) else len(self.labels)

    def batches(self, texts: Sequence[str], batch_size: int) -> Iterator[tuple[list[int], dict[str, Any]]]:
        """Yield (positions, int64 arrays) batches; examples grouped by length to cut padding."""
        import numpy as np

        from lmpipe.finetuning import encode_texts

        encoded = encode_texts(self.tokenizer, list(texts), self.max_length, self.truncation)
        ids = encoded["input_ids"]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # stable: ties keep order
        for start in range(0, len(order), batch_size):
            chosen = order[start : start + batch_size]
            width = max(len(ids[i]) for i in chosen)
            input_ids = np.full((len(chosen), width), self.pad_id, dtype=np.int64)
            mask = np.zeros((len(chosen), width), dtype=np.int64)
            for row, i in enumerate(chosen):
                input_ids[row, : len(ids[i])] = ids[i]
                mask[row, : len(ids[i])] = 1
            arrays = {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": np.zeros_like(mask)}
            unknown = [name for name in self.input_names if name not in arrays]
            if unknown:
                raise LmpipeError(f"{self.weights}: model inputs {unknown} are not supported")
            yield chosen, {name: arrays[name] for name in self.input_names}

    def run(self, arrays: dict[str, Any]) -> Any:
        """Logits (float32 numpy) of one encoded batch."""
        if self.backend == "torch":
            import torch

            with torch.inference_mode():
                tensors = {k: torch.from_numpy(v) for k, v in arrays.items()}
                return self.model(**tensors).logits.float().numpy()
        return self.session.run(None, arrays)[0]

    def logits(self, texts: Sequence[str], batch_size: int = 32) -> Any:
        """float32 logits [n, n_labels], rows in the order of `texts`."""
        import numpy as np

        out = np.zeros((len(texts), len(self.labels)), dtype=np.float32)
        for positions, arrays in self.batches(texts, batch_size):
            out[positions] = self.run(arrays)
        return out

    def predict(self, texts: Sequence[str], batch_size: int = 32) -> Any:
        """DataFrame: `label`, `score` (its probability), `prob_<label>` for every label."""
        import pandas as pd

        probs = softmax(self.logits(texts, batch_size))
        frame = pd.DataFrame({"label": [self.labels[i] for i in probs.argmax(axis=1)]})
        frame["score"] = probs.max(axis=1)
        for j, name in enumerate(self.labels):
            frame[f"prob_{name}"] = probs[:, j]
        return frame


# --------------------------------------------------------------------------- CLI
def read_texts_csv(path: Path, column: str) -> Any:
    """The CSV as a DataFrame and its text column as a list; errors name the file, column, row."""
    import pandas as pd

    if not path.is_file():
        raise LmpipeError(f"{path}: file not found")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise LmpipeError(f"{path}: not a readable CSV file ({str(exc).splitlines()[0]})") from None
    if column not in frame.columns:
        raise LmpipeError(
            f"{path}: no column {column!r} (columns: {', '.join(map(str, frame.columns))}); "
            "name the text column with --text-column"
        )
    texts = frame[column].tolist()
    for row, text in enumerate(texts, start=1):
        if not text.strip():
            raise LmpipeError(f"{path} row {row}: column {column!r} is empty")
    return frame, texts


def _format_table(texts: Sequence[str], preds: Any) -> str:
    prob_cols = [c for c in preds.columns if c.startswith("prob_")]
    lines = ["\t".join(["label", "score", *prob_cols, "text"])]
    for text, (_, row) in zip(texts, preds.iterrows()):
        short = " ".join(text.split())
        short = short if len(short) <= 60 else short[:57] + "..."
        probs = [f"{row[c]:.4f}" for c in prob_cols]
        lines.append("\t".join([str(row["label"]), f"{row['score']:.4f}", *probs, short]))
    return "\n".join(lines)


def predict_command(args: argparse.Namespace) -> int:
    """Run `lmpipe predict` from parsed arguments; returns the exit status."""
    if bool(args.texts) == bool(args.input):
        raise LmpipeError("give either TEXT arguments or --input FILE.csv (not both)")
    if args.batch_size < 1:
        raise LmpipeError(f"--batch-size must be >= 1 (got {args.batch_size})")
    if args.output and not args.input:
        raise LmpipeError("--output needs --input FILE.csv")
    if args.input:
        frame, texts = read_texts_csv(Path(args.input), args.text_column)
    else:
        frame, texts = None, list(args.texts)
    predictor = Predictor(args.model, args.backend, args.threads)
    preds = predictor.predict(texts, args.batch_size)
    if frame is None:
        print(_format_table(texts, preds))
        return 0
    result = frame.copy()
    for column in preds.columns:
        result[column] = preds[column].to_numpy()
    if args.output:
        from lmpipe.io import atomic_file

        with atomic_file(args.output) as tmp:
            result.to_csv(tmp, index=False, float_format="%.6f")
        counts = preds["label"].value_counts().sort_index()
        summary = ", ".join(f"{k}: {v}" for k, v in counts.items())
        print(f"{args.output}: {len(result)} predictions ({summary}) with {args.backend}")
    else:
        result.to_csv(sys.stdout, index=False, float_format="%.6f")
    return 0


def add_predict_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `predict` to an `add_subparsers()` object; the parser's func is `predict_command`."""
    parser = subparsers.add_parser(
        "predict",
        help="label texts with the exported model",
        description="Label texts with the exported classifier (models/export by default).",
    )
    parser.add_argument("texts", nargs="*", metavar="TEXT", help="texts to label")
    parser.add_argument("--input", "-i", metavar="FILE.csv", help="CSV file of texts to label")
    parser.add_argument("--output", "-o", metavar="FILE.csv", help="write the CSV with predictions here (default: stdout)")
    parser.add_argument("--text-column", default="text", help="column of --input holding the text (default: text)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"export folder or HF folder (default: {DEFAULT_MODEL})")
    parser.add_argument("--backend", choices=BACKENDS, default="torch", help="inference engine (default: torch)")
    parser.add_argument("--batch-size", type=int, default=32, help="texts per batch (default: 32)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads; 0 = the library default")
    parser.set_defaults(func=predict_command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry (`python -m lmpipe.predict ...`), the same as `lmpipe predict ...`."""
    from lmpipe.cli import main as cli_main

    return cli_main(["predict", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
