"""Classifier inference: torch (transformers) vs ONNX Runtime fp32 vs ONNX int8, side by side.

Model: `models/export` when the export stage has run (the real fine-tuned classifier); else a
STAND-IN built here: a randomly initialised `BertForSequenceClassification` of the MiniLM-L6
shape (6 layers, 384 hidden, 12 heads, 1,536 feed-forward, 2 labels; vocabulary and tokenizer
from `models/minilm` when present), saved with `lmpipe.inference.classifier.save_classifier` and exported
with the project's own `lmpipe.export.onnx_export.export_classifier` + `quantize_int8`, laid out like
`models/export` (hf/, onnx/model.onnx, onnx/model.int8.onnx). Speed does not depend on what the
weights learned, so the stand-in times the same graph.

Every backend runs through `lmpipe.inference.predictor.Predictor` (what `lmpipe predict`, the export parity
check and the MLflow model use) in its own fresh process, 2 threads (torch intra-op threads;
ORT intra-op threads, 1 inter-op), interleaved torch, onnx, onnx-int8, torch, ... Inputs are
encoded before any clock starts (`encode_texts`, max_length 128, the model's truncation), so
this times the model only:
- batch 1: median (and p90) milliseconds per call over single texts;
- batch 32: sequences per second from the median time of a 32-text batch.
Texts: `data/processed/test.parquet` (IMDB reviews, nearly all longer than 128 tokens) when
present, else generated text long enough to fill 128 tokens.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import common

MODULE = "bench.inference"
EXPORT = Path("models/export")
MINILM = Path("models/minilm")
TEST = Path("data/processed/test.parquet")
BACKENDS = ("torch", "onnx", "onnx-int8")
NAMES = {"torch": "torch (transformers)", "onnx": "ONNX Runtime fp32", "onnx-int8": "ONNX Runtime int8"}


def default_config(quick: bool = False) -> dict[str, Any]:
    from lmpipe.core.params import load_params

    params = load_params(common.ROOT / "params.yaml")
    config = {
        "export_dir": str(EXPORT),
        "minilm_dir": str(MINILM),
        "test_parquet": str(TEST),
        "max_length": 128,
        "truncation": params.finetune.truncation,
        "opset": params.export.onnx_opset,
        "arch": {"num_hidden_layers": 6, "hidden_size": 384, "num_attention_heads": 12, "intermediate_size": 1536},
        "batch1_runs": 200,  # medians of many calls: this machine's speed drifts by 2x within seconds
        "batch32_runs": 24,
        "warmup": 3,
        "threads": common.THREADS,
        "seed": 0,
    }
    if quick:
        config.update(
            export_dir="",
            minilm_dir="",
            test_parquet="",
            max_length=16,
            batch1_runs=2,
            batch32_runs=1,
            warmup=1,
            threads=1,
            arch={"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64},
        )
    return config


# --------------------------------------------------------------------------- the stand-in model
def _tokenizer(config: dict[str, Any]):
    minilm = Path(config["minilm_dir"]) if config.get("minilm_dir") else None
    if minilm is not None and (minilm / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(minilm)), f"{minilm} tokenizer"
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    from lmpipe.tokenize.tokenization import SPECIAL_TOKENS, to_transformers

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS.values())}
    for word in sorted({w for text in _generated(50, 0) for w in text.lower().replace(".", " .").split()}):
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordPiece(vocab, unk_token=SPECIAL_TOKENS["unk"]))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return to_transformers(tok, "wordpiece", True), "word-level stand-in tokenizer"


def prepare_standin(config: dict[str, Any], out: Path) -> dict[str, Any]:
    """Write a models/export-like folder for a random MiniLM-shaped classifier; return facts."""
    import torch
    import transformers
    from transformers import BertConfig, BertForSequenceClassification

    from lmpipe.export.onnx_export import export_classifier, quantize_int8
    from lmpipe.inference.classifier import save_classifier

    transformers.utils.logging.set_verbosity_error()
    tokenizer, tokenizer_source = _tokenizer(config)
    bert = BertConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        num_labels=2,
        id2label={0: "negative", 1: "positive"},
        label2id={"negative": 0, "positive": 1},
        pad_token_id=tokenizer.pad_token_id or 0,
        **config["arch"],
    )
    torch.manual_seed(config["seed"])
    model = BertForSequenceClassification(bert).eval()
    save_classifier(
        model,
        tokenizer,
        out / "hf",
        {"backbone": "standin", "max_length": config["max_length"], "truncation": config["truncation"]},
    )
    start = time.perf_counter()
    export_classifier(model, tokenizer, out / "onnx" / "model.onnx", config["opset"])
    export_seconds = time.perf_counter() - start
    start = time.perf_counter()
    quantize_int8(out / "onnx" / "model.onnx", out / "onnx" / "model.int8.onnx")
    quantize_seconds = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    return {
        "model": f"stand-in: randomly initialised BertForSequenceClassification, {params / 1e6:.1f}M params "
        f"({config['arch']['num_hidden_layers']} layers, {config['arch']['hidden_size']} hidden), "
        f"{tokenizer_source}; exported by lmpipe.export.onnx_export",
        "export_seconds": export_seconds,
        "quantize_seconds": quantize_seconds,
    }


# --------------------------------------------------------------------------- texts
def _generated(n: int, seed: int) -> list[str]:
    from bench.tokenize_speed import WORDS

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(200)) + "." for _ in range(n)]


def load_texts(config: dict[str, Any], n: int) -> tuple[list[str], str]:
    path = Path(config["test_parquet"]) if config.get("test_parquet") else None
    if path is not None and path.is_file():
        import pandas as pd

        texts = pd.read_parquet(path, columns=["text"])["text"].astype(str).tolist()[:n]
        if len(texts) == n:
            return texts, f"{path} (first {n})"
    return _generated(n, config["seed"]), "generated text"


# --------------------------------------------------------------------------- one backend
def run_side(side: str, config: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    from lmpipe.inference.predictor import Predictor

    if side not in BACKENDS:
        raise ValueError(f"side must be one of {BACKENDS} (got {side!r})")
    model_dir = Path(config["model_dir"]) if config.get("model_dir") else None
    tmp = None
    if model_dir is None:  # stand-alone / unit test: build the stand-in here
        tmp = Path(tempfile.mkdtemp(prefix="lmpipe-bench-export-"))
        prepare_standin(config, tmp)
        model_dir = tmp
    try:
        predictor = Predictor(model_dir, side, config["threads"])
        if side != "torch" and common.no_spin():
            predictor.session = _session_without_spinning(predictor.weights, config["threads"])
        n1, n32, warm = config["batch1_runs"], config["batch32_runs"], config["warmup"]
        texts, source = load_texts(config, max(n1 + warm, 32 * (n32 + 1)))
        singles = [next(predictor.batches([t], 1))[1] for t in texts[: n1 + warm]]
        many = [arrays for _, arrays in predictor.batches(texts[: 32 * (n32 + 1)], 32)]
        for arrays in singles[:warm]:
            predictor.run(arrays)
        batch1 = []
        for arrays in singles[warm:]:
            start = time.perf_counter()
            predictor.run(arrays)
            batch1.append(time.perf_counter() - start)
        reference = predictor.run(many[0])  # warm-up; its logits check that the backends agree
        batch32 = []
        for arrays in many[1:]:
            start = time.perf_counter()
            predictor.run(arrays)
            batch32.append(time.perf_counter() - start)
        lengths = [a["input_ids"].shape[1] for a in singles[warm:]]
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    result = {
        "side": side,
        "texts": source,
        "batch1_ms": common.median(batch1) * 1000,
        "batch1_p90_ms": float(np.percentile(batch1, 90)) * 1000,
        "batch32_seq_per_s": 32 / common.median(batch32),
        "batch1_mean_length": float(np.mean(lengths)),
        "batch32_width": int(many[1]["input_ids"].shape[1]),
        "spinning": not common.no_spin(),
        "weights_mb": round(Path(predictor.weights).stat().st_size / 1e6, 1),
        "logits": [[float(x) for x in row] for row in reference],
        "peak_rss_mb": common.peak_rss_mb(),
    }
    result["summary"] = f"batch 1 {result['batch1_ms']:.1f} ms, batch 32 {result['batch32_seq_per_s']:.1f} seq/s"
    return result


def _session_without_spinning(weights: Path, threads: int):
    """The Predictor's ORT session (same options) with intra-op spinning off (--no-spin runs)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(weights), sess_options=options, providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------- orchestration
def orchestrate(config: dict[str, Any], repeats: int) -> dict[str, Any]:
    export = Path(config["export_dir"]) if config.get("export_dir") else None
    tmp = None
    if export is not None and all(
        (export / f).is_file() for f in ("hf/config.json", "onnx/model.onnx", "onnx/model.int8.onnx")
    ):
        model_dir, facts = export, {"model": f"{export} (the pipeline's exported classifier)"}
    else:
        tmp = Path(tempfile.mkdtemp(prefix="lmpipe-bench-export-"))
        common.log(f"  inference: {export or 'models/export'} missing, exporting a stand-in")
        facts = _prepare_in_child(config, tmp)
        model_dir = tmp
    try:
        runs = common.interleave(MODULE, BACKENDS, {**config, "model_dir": str(model_dir)}, repeats, common.log)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    m = {
        side: {k: common.med(r, k) for k in ("batch1_ms", "batch32_seq_per_s", "peak_rss_mb")}
        for side, r in runs.items()
    }
    first = runs["torch"][0]
    what = (
        f"{facts['model']}; max_length {config['max_length']} ({config['truncation']}), texts: "
        f"{first['texts']}, batch-1 mean length {first['batch1_mean_length']:.0f}, batch-32 width "
        f"{first['batch32_width']}; {config['threads']} threads"
        + ("; no spinning (torch OMP_WAIT_POLICY=PASSIVE, ORT allow_spinning=0)" if common.no_spin() else "")
    )
    loads = common.load_note(runs)
    diffs = {side: _max_diff(runs[side][0]["logits"], first["logits"]) for side in ("onnx", "onnx-int8")}
    what += f"; max |logit - torch| on a 32-text batch: fp32 {diffs['onnx']:.1e}, int8 {diffs['onnx-int8']:.1e}"
    what += _export_parity(model_dir)
    rows = []
    for side in ("onnx", "onnx-int8"):
        size = f"weights {runs[side][0]['weights_mb']} MB vs {runs['torch'][0]['weights_mb']} MB"
        rows.append(
            common.row(
                "inference",
                "batch 1 latency",
                NAMES[side],
                NAMES["torch"],
                round(m[side]["batch1_ms"], 2),
                round(m["torch"]["batch1_ms"], 2),
                "ms",
                "lower",
                f"median per call; {loads}",
            )
        )
        rows.append(
            common.row(
                "inference",
                "batch 32 throughput",
                NAMES[side],
                NAMES["torch"],
                round(m[side]["batch32_seq_per_s"], 1),
                round(m["torch"]["batch32_seq_per_s"], 1),
                "sequences/s",
                "higher",
                size,
            )
        )
        rows.append(
            common.row(
                "inference",
                "peak RSS",
                NAMES[side],
                NAMES["torch"],
                m[side]["peak_rss_mb"],
                m["torch"]["peak_rss_mb"],
                "MiB",
                "lower",
                "ru_maxrss of each backend's own process",
            )
        )
    return {"benchmark": "inference", "description": what, "rows": rows, "medians": m, "runs": runs, "model": facts}


def _export_parity(model_dir: Path) -> str:
    """The export stage's own parity figures for this model (accuracy drop of int8), if recorded."""
    report = Path("reports/export/metrics.json")
    if model_dir != EXPORT or not report.is_file():
        return ""
    parity = json.loads(report.read_text(encoding="utf-8")).get("parity", {})
    if "int8_accuracy_drop" not in parity:
        return ""
    return (
        f"; export parity on {parity['samples']} test texts: torch accuracy {parity['torch_accuracy']:.4f}, "
        f"int8 {parity['int8_accuracy']:.4f} (drop {parity['int8_accuracy_drop'] * 100:.2f} points), "
        f"fp32 max |logit diff| {parity['onnx_max_abs_logit_diff']:.1e}"
    )


def _max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def _prepare_in_child(config: dict[str, Any], out: Path) -> dict[str, Any]:
    return common.run_child(MODULE, "prepare", {**config, "out": str(out)}, timeout=900)


def _side_or_prepare(side: str, config: dict[str, Any]) -> dict[str, Any]:
    if side == "prepare":
        result = prepare_standin(config, Path(config["out"]))
        result["summary"] = f"exported in {result['export_seconds']:.1f} s"
        return result
    return run_side(side, config)


if __name__ == "__main__":
    raise SystemExit(common.main(MODULE, _side_or_prepare, orchestrate, default_config))
