"""The export stage's logic: choose a fine-tuned model, package it, prove the ONNX copies agree.

- `select_model`: a named backbone, or `best` = the highest validation metric in
  reports/finetune/<name>/metrics.json (lowest for val_loss), ties to the first name. Never
  the test split: test metrics would then no longer estimate the chosen model's error.
- `build_export`: into a (temporary) folder: `hf/` (the fine-tuned folder, byte for byte),
  `onnx/model.onnx` and `onnx/model.int8.onnx` (lmpipe.export.onnx_export), `drift.json` (the train
  split's lengths, unknown-token shares and label prior, and torch's predicted class shares on the
  parity texts: lmpipe.monitor.drift), then the parity check on
  a stratified sample of the test split through the SAME `lmpipe.inference.predictor.Predictor` code path
  for every backend (same encoding, same length-sorted batches): max |logit difference| to
  torch, accuracy, agreement. Out of tolerance -> LmpipeError, and the caller's atomic_dir
  leaves nothing behind. Also end-to-end latency (tokenization included) and file sizes.
- `write_card`: lineage.json and README.md (lmpipe.export.model_card), with torch's parity figures
  and the gates passed; onnxruntime's figures follow the CPU's kernels (nothing pins them), so
  they are perf (reports/perf/export.json) and the export's files stay the same bytes everywhere.
- `publish`: the folder as an MLflow pyfunc model in the stage's run, registered by name.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmpipe.core import numerics
from lmpipe.core.errors import LmpipeError
from lmpipe.core.io import read_json, write_text
from lmpipe.core.lineage import TAG_MODEL_URI, TAG_REGISTERED_MODEL, TAG_REGISTERED_VERSION, dvc_md5, read_lock
from lmpipe.core.reports import split_perf
from lmpipe.export import model_card, trimming
from lmpipe.inference.classifier import INFO_FILE
from lmpipe.inference.encoding import tokenize_texts
from lmpipe.inference.predictor import Predictor, read_labels
from lmpipe.task.splits import load_label_names, load_split, stratified_subsample

log = logging.getLogger("lmpipe.export.export")

HF_REQUIRED = ("config.json", "model.safetensors", "tokenizer_config.json", INFO_FILE)
LATENCY_BATCH1_TEXTS = 16  # texts timed one by one (after 2 warm-up calls)
LATENCY_BATCH32_TEXTS = 64  # texts timed in batches of 32 (after 1 warm-up batch)
PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
SERVE_PACKAGES = ("mlflow", "torch", "transformers", "tokenizers", "safetensors", "numpy", "pandas")
EXAMPLE_TEXTS = ["A tender, funny film with a great cast.", "Two hours I will never get back."]


@dataclass
class ExportResult:
    metrics: dict[str, Any]
    onnx_inputs: list[str]
    labels: list[str]
    encoding: dict[str, Any]


# --------------------------------------------------------------------------- selection
def export_inputs(
    name: str, candidates: Sequence[str], processed: str, finetuned: str, reports: str, evaluate_metrics: str
) -> list[str]:
    """The project-relative paths the export reads (their DVC hashes go to MLflow and lineage)."""
    paths = [f"{finetuned}/{name}", processed]
    paths += [f"{reports}/{c}/metrics.json" for c in sorted(candidates)]
    if Path(evaluate_metrics).is_file():
        paths.append(evaluate_metrics)
    return paths


# --------------------------------------------------------------------------- build
def copy_hf(source: Path, target: Path) -> None:
    """Copy the fine-tuned HF folder byte for byte; an error names the first missing file."""
    if not source.is_dir():
        raise LmpipeError(f"{source}: folder not found (run the finetune stage first)")
    for name in HF_REQUIRED:
        if not (source / name).is_file():
            raise LmpipeError(f"{source / name}: file not found (incomplete fine-tuned model)")
    if not any((source / n).is_file() for n in ("tokenizer.json", "vocab.txt")):
        raise LmpipeError(f"{source / 'tokenizer.json'}: file not found (incomplete fine-tuned model)")
    shutil.copytree(source, target, copy_function=shutil.copyfile, ignore=shutil.ignore_patterns(".*", "__pycache__"))


def check_labels(hf: Path, source: Path, processed: Path) -> list[str]:
    """The model's labels, which must equal data/processed/labels.json (same names, same ids)."""

    model_labels = read_labels(hf)
    data_labels = load_label_names(processed)
    if model_labels != data_labels:
        raise LmpipeError(
            f"{source / 'config.json'}: id2label {model_labels} does not match "
            f"{processed / 'labels.json'} {data_labels}"
        )
    return model_labels


def parity_sample(processed: Path, n_labels: int, n: int | None, seed: int) -> tuple[list[str], np.ndarray]:
    """A seeded stratified sample of the test split (file order kept); n None = all of it."""

    texts, labels = load_split(processed, "test", n_labels=n_labels)
    if not texts:
        raise LmpipeError(f"{processed / 'test.parquet'}: the test split is empty")
    chosen = stratified_subsample(labels, n, seed)
    return [texts[i] for i in chosen], labels[chosen]


def measure_latency(predictor: Predictor, texts: Sequence[str]) -> dict[str, float]:
    """End-to-end milliseconds per text (tokenization included) at batch 1 and batch 32."""
    one = list(texts[:LATENCY_BATCH1_TEXTS])
    many = list(texts[:LATENCY_BATCH32_TEXTS])
    predictor.logits(one[:2], batch_size=1)  # warm-up: first calls allocate
    start = time.perf_counter()
    for text in one:
        predictor.logits([text], batch_size=1)
    batch1 = (time.perf_counter() - start) * 1000 / len(one)
    predictor.logits(many[:32], batch_size=32)
    start = time.perf_counter()
    predictor.logits(many, batch_size=32)
    batch32 = (time.perf_counter() - start) * 1000 / len(many)
    return {"batch1": round(batch1, 3), "batch32": round(batch32, 3)}


def trim_before_export(hf: Path, texts: Sequence[str], y: np.ndarray, trim: Any, threads: int) -> dict[str, Any]:
    """Measure every layer drop of `trim` on the parity texts, then cut `hf` to the shipped one."""
    if "peft" in read_json(hf / INFO_FILE):  # prefix / adapter weights are per layer: nothing to cut
        if trim.drop_layers:
            trimming.trim_folder(hf, trim.drop_layers)  # raises, naming the key and the mode
        log.info("trimming sweep skipped: %s is not a plain HF classifier", hf)
        return {}
    rows = trimming.sweep(hf, texts, y, trimming.settings(trim), trim.drop_layers, threads, measure_latency)
    log.info("trimming: %s", rows)
    shipped = rows[f"drop{trim.drop_layers}"]
    if not shipped["accuracy_drop"] <= trim.max_accuracy_drop:
        raise LmpipeError(
            f"{trimming.KEY}: dropping {trim.drop_layers} layers costs {shipped['accuracy_drop']:.4f} accuracy "
            f"on {len(texts)} test examples > export.trim.max_accuracy_drop {trim.max_accuracy_drop:g}"
        )
    trimming.trim_folder(hf, trim.drop_layers)
    return rows


def write_drift_reference(
    hf: Path, processed: Path, labels: Sequence[str], predicted: np.ndarray, cfg: Any, seed: int, out: Path
) -> None:
    """drift.json: the train split's lengths, unknown-token shares and label prior, and the predicted
    class shares on the parity texts (lmpipe.monitor.drift)."""
    from transformers import AutoTokenizer

    from lmpipe.monitor.drift import REFERENCE_FILE, Reference

    texts, y = load_split(processed, "train", n_labels=len(labels))
    chosen = stratified_subsample(y, cfg.reference_texts, seed)
    tokenizer = AutoTokenizer.from_pretrained(str(hf))
    raw = tokenize_texts(tokenizer, [texts[i] for i in chosen])
    reference = Reference.build(raw, tokenizer.unk_token_id, y, labels, predicted, cfg)
    write_text(out / REFERENCE_FILE, json.dumps(reference.to_json(), indent=2, sort_keys=True) + "\n")


def build_export(source: Path, out: Path, processed: Path, cfg: Any, *, seed: int, threads: int) -> ExportResult:
    """Fill `out` with hf/ and onnx/, check parity (raising LmpipeError), measure latency."""
    from lmpipe.export.onnx_export import export_classifier, quantize_int8

    hf = out / "hf"
    copy_hf(source, hf)
    labels = check_labels(hf, source, processed)
    texts, y = parity_sample(processed, len(labels), cfg.parity_samples, seed)
    trim_rows = trim_before_export(hf, texts, y, cfg.trim, threads)

    torch_model = Predictor(out, "torch", threads)
    log.info("exporting %s to ONNX (opset %d)", source, cfg.onnx_opset)
    names = export_classifier(torch_model.model, torch_model.tokenizer, out / "onnx" / "model.onnx", cfg.onnx_opset)
    backends = {"torch": torch_model, "onnx": Predictor(out, "onnx", threads)}
    if cfg.quantize:
        quantize_int8(out / "onnx" / "model.onnx", out / "onnx" / "model.int8.onnx")
        backends["int8"] = Predictor(out, "onnx-int8", threads)

    logits = {k: p.logits(texts, batch_size=32) for k, p in backends.items()}
    parity: dict[str, Any] = {"samples": len(texts)}
    for key, value in logits.items():
        parity[f"{key}_accuracy"] = float((value.argmax(axis=1) == y).mean())
        if key != "torch":
            parity[f"{key}_max_abs_logit_diff"] = float(np.abs(value - logits["torch"]).max())
            parity[f"{key}_agreement"] = float((value.argmax(axis=1) == logits["torch"].argmax(axis=1)).mean())
    if cfg.quantize:
        parity["int8_accuracy_drop"] = round(parity["torch_accuracy"] - parity["int8_accuracy"], 9)
    log.info("parity: %s", parity)
    if not parity["onnx_max_abs_logit_diff"] <= cfg.max_logit_diff:  # `not <=` also catches NaN
        raise LmpipeError(
            f"ONNX parity failed: fp32 logits differ from torch by {parity['onnx_max_abs_logit_diff']:.3g} "
            f"> export.max_logit_diff {cfg.max_logit_diff:g} on {len(texts)} test examples"
        )
    if cfg.quantize and not parity["int8_accuracy_drop"] <= cfg.max_int8_accuracy_drop:
        raise LmpipeError(
            f"ONNX int8 parity failed: accuracy {parity['int8_accuracy']:.4f} vs torch "
            f"{parity['torch_accuracy']:.4f}, a drop of {parity['int8_accuracy_drop']:.4f} > "
            f"export.max_int8_accuracy_drop {cfg.max_int8_accuracy_drop:g}"
        )

    predicted = logits["torch"].argmax(axis=1)
    write_drift_reference(hf, processed, labels, predicted, cfg.drift, seed, out)
    latency = {("onnx_int8" if k == "int8" else k): measure_latency(p, texts) for k, p in backends.items()}
    files = {
        "torch": hf / "model.safetensors",
        "onnx": out / "onnx" / "model.onnx",
        "onnx_int8": out / "onnx" / "model.int8.onnx",
    }
    sizes = {k: round(f.stat().st_size / 1e6, 3) for k, f in files.items() if f.is_file()}
    metrics = {"parity": parity, "latency_ms": latency, "size_mb": sizes, "trimming": trim_rows}
    encoding = read_json(hf / INFO_FILE)
    return ExportResult(metrics, names, labels, encoding)


# --------------------------------------------------------------------------- card
def evaluation_rows(path: Path, name: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(this model's, the baseline's) test metrics from reports/evaluate/metrics.json, if there."""
    if not path.is_file():
        return None, None
    report = read_json(path)
    row = report.get(name)
    base = report.get("baseline")
    ok = isinstance(row, dict) and "accuracy" in row
    return (row if ok else None), (base if ok and isinstance(base, dict) else None)


def write_card(
    out: Path,
    root: Path,
    result: ExportResult,
    *,
    name: str,
    source: str,
    selected_by: str,
    candidates: dict[str, float],
    inputs: Sequence[str],
    cfg: Any,
    evaluate_metrics: Path,
    val_metrics: dict[str, Any],
) -> dict[str, Any]:
    """Write out/lineage.json and out/README.md; return the lineage."""
    lock = read_lock(root)
    hashes = {p: dvc_md5(root / p) for p in inputs}
    model = {
        "name": name,
        "source": source,
        "selected_by": selected_by,
        "candidates": candidates,
        "labels": result.labels,
        "encoding": result.encoding,
        "onnx_inputs": result.onnx_inputs,
    }
    parity = split_perf(result.metrics)[0]["parity"]  # what torch decided; onnxruntime's figures are perf
    export = {"params": cfg.model_dump(mode="json"), "parity": parity}
    files = model_card.file_table(out)
    numbers = numerics.contract(numerics.record())
    lineage = model_card.build_lineage(root, lock, hashes, model=model, export=export, files=files, numerics=numbers)
    test_row, base_row = evaluation_rows(evaluate_metrics, name)
    card = model_card.render_card(
        lineage,
        registered_name=cfg.registered_name,
        labels=result.labels,
        encoding=result.encoding,
        parity=parity,
        test_metrics=test_row,
        baseline_metrics=base_row,
        val_metrics={k: v for k, v in val_metrics.items() if k.startswith("val_") and isinstance(v, (int, float))},
        trimming=result.metrics.get("trimming"),
    )
    absolute = str(root.resolve())
    for text, what in ((model_card.lineage_json(lineage), "lineage.json"), (card, "README.md")):
        if absolute in text:  # e.g. an absolute path in params: never ship the machine's layout
            text = text.replace(absolute + "/", "").replace(absolute, ".")
        write_text(out / what, text)
    return lineage


# --------------------------------------------------------------------------- MLflow
@contextlib.contextmanager
def _environ(key: str, value: str) -> Iterator[None]:
    old = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def pip_requirements() -> list[str]:
    """Exact pins of what the served model imports (explicit: MLflow would otherwise infer them)."""
    versions = model_card.package_versions(SERVE_PACKAGES)
    # local labels (torch "2.13.0+cpu") are dropped: PyPI serves plain versions
    return [f"{k}=={v.split('+')[0]}" for k, v in versions.items() if v]


def publish(tracker: Any, export_dir: Path, registered_name: str) -> str | None:
    """Log export_dir as an MLflow pyfunc model in the tracker's run and register it; the version.

    The model is logged as code (`lmpipe/export/pyfunc_model.py`, no pickle) with the `hf/` folder as
    its artifact and the lmpipe package as code, so `mlflow models serve` needs nothing else.
    A tracker that is down, or a store that fails, costs a warning, never the export.
    """
    if not tracker.active:
        warnings.warn("MLflow store unavailable: the model is neither logged nor registered", stacklevel=2)
        return None
    import mlflow
    import pandas as pd
    from mlflow.models import Model, ModelSignature
    from mlflow.types import ColSpec, Schema

    labels = read_labels(export_dir / "hf")
    outputs = [ColSpec("string", "label"), ColSpec("double", "score")]
    outputs += [ColSpec("double", f"prob_{label}") for label in labels]
    signature = ModelSignature(inputs=Schema([ColSpec("string", "text")]), outputs=Schema(outputs))
    try:
        # The logged model belongs to the run's experiment (MLflow otherwise files it under "0").
        experiment_id = mlflow.MlflowClient().get_run(tracker.run_id).info.experiment_id
        with _environ("MLFLOW_EXPERIMENT_ID", experiment_id):
            info = Model.log(
                artifact_path=None,
                name="model",
                flavor=mlflow.pyfunc,
                run_id=tracker.run_id,
                python_model=str(PYFUNC_FILE),
                artifacts={"hf": str(export_dir / "hf")},
                code_paths=[str(Path(__file__).parent)],
                pip_requirements=pip_requirements(),
                signature=signature,
                input_example=pd.DataFrame({"text": EXAMPLE_TEXTS}),
            )
        version = mlflow.register_model(info.model_uri, registered_name, await_registration_for=60)
    except Exception as exc:  # the tracker is a witness, never a reason to fail the export
        warnings.warn(f"MLflow model logging/registration failed: {exc}".splitlines()[0], stacklevel=2)
        return None
    tracker.set_tags(
        {
            TAG_REGISTERED_MODEL: registered_name,
            TAG_REGISTERED_VERSION: version.version,
            TAG_MODEL_URI: info.model_uri,
        }
    )
    return str(version.version)
