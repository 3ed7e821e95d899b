"""`lmpipe predict`: label texts with the exported classifier on torch, ONNX fp32 or ONNX int8,
or with an ensemble that the evaluate stage calibrated.

The model folder is `models/export/` (hf/ + onnx/, as the export stage writes it) or any plain
HF classifier folder holding `lmpipe.json` (torch backend only); see `lmpipe.inference.predictor`.
`--ensemble NAME` serves `models/ensembles/NAME.json` (or a path to such a file): the mean of its
members' temperature-calibrated probabilities, each member loaded from its own folder (torch
only); see `lmpipe.inference.ensemble`.

    lmpipe predict "A tender, funny film." "Two hours I will never get back."
    lmpipe predict --input reviews.csv --output preds.csv --backend onnx-int8
    lmpipe predict --ensemble ensemble "A tender, funny film."

Heavy packages are imported on use, so `lmpipe --help` answers at once.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmpipe.core.errors import LmpipeError
from lmpipe.inference.ensemble import EnsemblePredictor
from lmpipe.inference.predictor import BACKENDS, Predictor

DEFAULT_MODEL = "models/export"
ENSEMBLES = "models/ensembles"


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


def ensemble_file(name: str) -> Path:
    """`--ensemble` value -> its file: a path to a .json file as given, else models/ensembles/NAME.json."""
    return Path(name) if name.endswith(".json") else Path(ENSEMBLES) / f"{name}.json"


def _predictor(args: argparse.Namespace) -> Any:
    """The exported model's `Predictor`, or an `EnsemblePredictor` for --ensemble (torch only)."""
    if args.ensemble is None:
        return Predictor(args.model, args.backend, args.threads)
    if args.model != DEFAULT_MODEL:
        raise LmpipeError("give either --model or --ensemble (not both)")
    if args.backend != "torch":
        raise LmpipeError(f"--backend {args.backend}: an ensemble's members run on torch only")
    return EnsemblePredictor(ensemble_file(args.ensemble), args.threads)


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

    preds = _predictor(args).predict(texts, args.batch_size)
    if frame is None:
        print(_format_table(texts, preds))
        return 0
    result = frame.copy()
    for column in preds.columns:
        result[column] = preds[column].to_numpy()
    if args.output:
        from lmpipe.core.io import atomic_file

        with atomic_file(args.output) as tmp:
            result.to_csv(tmp, index=False, float_format="%.6f")
        counts = preds["label"].value_counts().sort_index()
        summary = ", ".join(f"{k}: {v}" for k, v in counts.items())
        engine = f"ensemble {args.ensemble}" if args.ensemble else args.backend
        print(f"{args.output}: {len(result)} predictions ({summary}) with {engine}")
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
    parser.add_argument(
        "--output", "-o", metavar="FILE.csv", help="write the CSV with predictions here (default: stdout)"
    )
    parser.add_argument("--text-column", default="text", help="column of --input holding the text (default: text)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"export folder or HF folder (default: {DEFAULT_MODEL})")
    parser.add_argument(
        "--ensemble",
        metavar="NAME",
        help=f"serve an ensemble of evaluate.ensembles: {ENSEMBLES}/NAME.json (or a path to one); torch only",
    )
    parser.add_argument("--backend", choices=BACKENDS, default="torch", help="inference engine (default: torch)")
    parser.add_argument("--batch-size", type=int, default=32, help="texts per batch (default: 32)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads; 0 = the library default")
    parser.set_defaults(func=predict_command)
    return parser
