"""Evaluate every model on the held-out test split, side by side.

- Models: the TF-IDF baseline (`lmpipe.baseline.load(models/baseline)`) and every fine-tuned
  folder `models/finetuned/<name>/` (encoded with `lmpipe.finetuning.encode_texts` exactly as
  that model was trained, per its `lmpipe.json`). Inference is batched, sorted by length so
  batches hold little padding, under `torch.inference_mode`.
- Per model: accuracy, macro precision/recall/F1, ROC-AUC, ECE (lmpipe.metrics), each with a
  percentile bootstrap interval computed on the SAME resamples for every model (paired), and
  McNemar's test of each transformer against the baseline.
- The control arm: each fine-tuned model whose backbone was pretrained is compared with the
  random-init model built from the same source folder (`init: random` in its lmpipe.json):
  the accuracy difference with its paired bootstrap interval, and McNemar's test.
- The pretrained encoder: masked-LM perplexity on the test split's text
  (`pretrained.test_mlm_perplexity`), see `mlm_perplexity`.
- Reports: `write_reports` writes metrics.json, comparison.md, predictions/<model>.csv,
  roc/<model>.csv and plots/*.png into one folder (the stage swaps it in atomically).
- Lineage: `find_producer_run` finds the MLflow run that wrote an input (by its DVC md5).
"""

from __future__ import annotations

import logging
import math
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lmpipe import metrics as M
from lmpipe.errors import LmpipeError
from lmpipe.io import write_json, write_text

log = logging.getLogger("lmpipe.evaluation")

BASELINE = "baseline"
PRETRAINED = "pretrained"
RESERVED = (BASELINE, PRETRAINED, "n_test")  # top-level keys of metrics.json
PROB_FORMAT = "%.6f"  # probabilities in CSVs: 6 decimals keep files small and bytes stable


@dataclass(frozen=True)
class TestSet:
    texts: list[str]
    labels: np.ndarray  # int64 ids
    label_names: list[str]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    path: Path
    kind: str  # "baseline" | "transformer"
    init: str = "pretrained"  # "random" for a control arm (lmpipe.json of the fine-tuned folder)
    source: str = ""  # the backbone folder it was fine-tuned from


@dataclass
class ModelResult:
    name: str
    kind: str
    probs: np.ndarray
    metrics: dict[str, float]
    ci: dict[str, tuple[float, float]]
    mcnemar: dict[str, Any] | None = None  # vs the baseline; None for the baseline itself
    control: dict[str, Any] | None = None  # vs the random-init model of the same source, if any


@dataclass
class Evaluation:
    test: TestSet
    models: list[ModelResult]
    lm: dict[str, float] | None = None  # pretrained.* entries of metrics.json
    confidence: float = 0.95
    ece_bins: int = 10
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- inputs
def load_test_set(processed_dir: str | Path) -> TestSet:
    """The test split (texts, label ids) and the label names, validated."""
    from lmpipe.finetuning import load_label_names, load_split

    names = load_label_names(processed_dir)
    texts, labels = load_split(processed_dir, "test", n_labels=len(names))
    if not texts:
        raise LmpipeError(f"{Path(processed_dir) / 'test.parquet'}: the test split is empty")
    return TestSet(texts, labels, names)


def find_models(baseline_dir: str | Path, finetuned_dir: str | Path) -> list[ModelSpec]:
    """The baseline, then every fine-tuned model folder (sorted by name)."""
    baseline_dir, finetuned_dir = Path(baseline_dir), Path(finetuned_dir)
    if not baseline_dir.is_dir():
        raise LmpipeError(f"{baseline_dir}: folder not found (run the baseline stage first)")
    specs = [ModelSpec(BASELINE, baseline_dir, "baseline")]
    if finetuned_dir.is_dir():
        for folder in sorted(p for p in finetuned_dir.iterdir() if p.is_dir()):
            if folder.name.startswith("."):  # a temporary folder of an interrupted write
                continue
            if folder.name in RESERVED:
                raise LmpipeError(f"{folder}: a fine-tuned model may not be named {folder.name!r}")
            info = _model_info(folder)
            specs.append(ModelSpec(folder.name, folder, "transformer", str(info.get("init", "pretrained")),
                                   str(info.get("source", ""))))
    return specs


def _model_info(folder: Path) -> dict[str, Any]:
    """The fine-tuned folder's lmpipe.json ({} when absent)."""
    import json

    from lmpipe.finetuning import INFO_FILE

    path = folder / INFO_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except ValueError:
        raise LmpipeError(f"{path}: not valid JSON") from None


# --------------------------------------------------------------------------- inference
def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def _check_probs(probs: Any, n: int, label_names: Sequence[str], where: Path) -> np.ndarray:
    probs = np.asarray(probs, dtype=np.float64)
    if probs.shape != (n, len(label_names)):
        raise LmpipeError(
            f"{where}: predicts shape {probs.shape}, expected ({n}, {len(label_names)}) "
            f"for labels {list(label_names)}"
        )
    return probs


def predict_baseline(path: str | Path, texts: Sequence[str], label_names: Sequence[str]) -> np.ndarray:
    """Class probabilities of the TF-IDF baseline."""
    from lmpipe import baseline

    model = baseline.load(path)
    own = getattr(model, "labels", None)
    if own is not None and [str(x) for x in own] != list(label_names):
        raise LmpipeError(f"{path}: trained for labels {list(own)}, the test split has {list(label_names)}")
    return _check_probs(model.predict_proba(list(texts)), len(texts), label_names, Path(path))


def predict_transformer(
    path: str | Path, texts: Sequence[str], label_names: Sequence[str], batch_size: int, device: Any
) -> np.ndarray:
    """Class probabilities of a fine-tuned folder, encoded as its lmpipe.json says."""
    import torch

    from lmpipe.finetuning import collate, encode_texts, load_classifier

    path = Path(path)
    model, tokenizer, info = load_classifier(path)
    id2label = [str(model.config.id2label[i]) for i in range(model.config.num_labels)]
    if id2label != list(label_names):
        raise LmpipeError(f"{path}/config.json: id2label {id2label} differs from the test labels {list(label_names)}")
    try:
        max_length, truncation = int(info["max_length"]), str(info["truncation"])
    except (KeyError, TypeError, ValueError):
        raise LmpipeError(f"{path}/lmpipe.json: needs 'max_length' and 'truncation'") from None
    ids = encode_texts(tokenizer, texts, max_length, truncation)["input_ids"]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = np.argsort([-len(x) for x in ids], kind="stable")  # longest first: peak memory early
    logits = np.zeros((len(ids), len(label_names)), dtype=np.float64)
    model.to(device)
    with torch.inference_mode():
        for start in _progress(range(0, len(ids), batch_size), f"predict {path.name}"):
            rows = order[start : start + batch_size]
            batch = {k: v.to(device) for k, v in collate([ids[i] for i in rows], None, pad_id).items()}
            logits[rows] = model(**batch).logits.float().cpu().numpy()
    return _check_probs(_softmax(logits), len(texts), label_names, path)


def _progress(iterable: Any, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, unit="batch", disable=not sys.stderr.isatty(), leave=False)


# --------------------------------------------------------------------------- masked-LM perplexity
def mlm_windows(
    token_ids: Sequence[Sequence[int]], window: int, cls_id: int, sep_id: int, max_windows: int | None
) -> list[list[int]]:
    """Cut each document into `[CLS] + up to window-2 tokens + [SEP]` pieces, in order."""
    body = window - 2
    out: list[list[int]] = []
    for doc in token_ids:
        for start in range(0, len(doc), body):
            out.append([cls_id, *doc[start : start + body], sep_id])
            if max_windows is not None and len(out) >= max_windows:
                return out
    return out


def mask_positions(lengths: Sequence[int], mask_prob: float, seed: int) -> list[np.ndarray]:
    """Deterministic masking: in each window, round(mask_prob * tokens) (at least 1) of the
    non-special positions 1..len-2, drawn by one seeded generator in window order."""
    rng = np.random.Generator(np.random.PCG64(seed))
    out = []
    for length in lengths:
        body = length - 2
        k = max(1, int(round(mask_prob * body)))
        out.append(np.sort(rng.permutation(body)[:k]) + 1)
    return out


def mlm_perplexity(
    path: str | Path,
    texts: Sequence[str],
    *,
    mask_prob: float,
    seed: int,
    batch_size: int,
    device: Any,
    max_windows: int | None = None,
) -> dict[str, float]:
    """Held-out masked-LM perplexity of `path` (AutoModelForMaskedLM + its tokenizer) on `texts`.

    The texts are tokenised with the model's own tokenizer and cut into windows of the model's
    `max_position_embeddings` tokens ([CLS] and [SEP] included). In each window a seeded
    `mask_prob` share of the tokens is replaced by [MASK] (all of them, as in pretrain's
    validation: no 10% random / 10% kept tokens, whose answer sits in the input, so the number
    does not depend on the training recipe). Perplexity = exp(mean NLL of the masked tokens).
    """
    import torch
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from lmpipe.finetuning import collate
    from lmpipe.models import mlm_head

    path = Path(path)
    if not (path / "config.json").is_file():
        raise LmpipeError(f"{path}/config.json: file not found (run the pretrain stage first)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForMaskedLM.from_pretrained(path, local_files_only=True).eval().to(device)
    special = {"cls": tokenizer.cls_token_id, "sep": tokenizer.sep_token_id, "mask": tokenizer.mask_token_id}
    if None in special.values():
        raise LmpipeError(f"{path}: the tokenizer lacks one of [CLS], [SEP], [MASK] ({special})")
    window = int(model.config.max_position_embeddings)
    tokens = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    windows = mlm_windows(tokens, window, special["cls"], special["sep"], max_windows)
    if not windows:
        raise LmpipeError("the test split holds no tokens to score the masked-LM on")
    positions = mask_positions([len(w) for w in windows], mask_prob, seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    head = mlm_head(model)  # score the masked positions only (the same head the pretraining loss uses)
    total_nll, total_tokens = 0.0, 0
    order = np.argsort([-len(w) for w in windows], kind="stable")
    with torch.inference_mode():
        for start in _progress(range(0, len(windows), batch_size), "masked-LM perplexity"):
            rows = order[start : start + batch_size]
            batch = collate([windows[i] for i in rows], None, pad_id)
            ids = batch["input_ids"]
            where = torch.zeros_like(ids, dtype=torch.bool)
            for row, i in enumerate(rows):
                where[row, torch.as_tensor(positions[i])] = True
            targets = ids[where]
            ids = ids.masked_fill(where, special["mask"])
            inputs = {"input_ids": ids.to(device), "attention_mask": batch["attention_mask"].to(device)}
            hidden = model.base_model(**inputs).last_hidden_state
            logits = head(hidden[where.to(device)])
            nll = torch.nn.functional.cross_entropy(logits.float(), targets.to(device), reduction="sum")
            total_nll += float(nll)
            total_tokens += int(targets.numel())
    mean_nll = total_nll / total_tokens
    return {
        "test_mlm_perplexity": M.perplexity(mean_nll),
        "test_mlm_nll": mean_nll,
        "test_mlm_masked_tokens": total_tokens,
        "test_mlm_windows": len(windows),
    }


# --------------------------------------------------------------------------- evaluation
def score_model(
    name: str, kind: str, test: TestSet, probs: np.ndarray, *, bootstrap_samples: int,
    confidence: float, ece_bins: int, seed: int,
) -> ModelResult:
    """Metrics and bootstrap intervals of one model's test probabilities."""
    return ModelResult(
        name=name,
        kind=kind,
        probs=probs,
        metrics=M.classification_metrics(test.labels, probs, ece_bins),
        ci=M.bootstrap_ci(test.labels, probs, bootstrap_samples, confidence, seed, ece_bins),
    )


def compare_to_baseline(results: list[ModelResult], labels: np.ndarray) -> None:
    """Fill `mcnemar` of every non-baseline result: a = the model, b = the baseline."""
    base = next(r for r in results if r.kind == "baseline")
    base_correct = base.probs.argmax(axis=1) == labels
    for result in results:
        if result is not base:
            result.mcnemar = M.mcnemar(result.probs.argmax(axis=1) == labels, base_correct)


def compare_to_random_init(results: list[ModelResult], specs: Sequence[ModelSpec], labels: np.ndarray,
                           *, bootstrap_samples: int, confidence: float, seed: int) -> None:
    """Fill `control` of every pretrained-backbone model that has a random-init twin (same source)."""
    by_name = {r.name: r for r in results}
    controls = {spec.source: spec.name for spec in specs if spec.init == "random" and spec.source}
    for spec in specs:
        control = controls.get(spec.source) if spec.init != "random" else None
        if spec.kind != "transformer" or control is None:
            continue
        treated = by_name[spec.name].probs.argmax(axis=1) == labels
        untreated = by_name[control].probs.argmax(axis=1) == labels
        diff, low, high = M.accuracy_difference_ci(treated, untreated, bootstrap_samples, confidence, seed)
        by_name[spec.name].control = {"name": control, "accuracy_diff": diff, "ci_low": low, "ci_high": high,
                                      **M.mcnemar(treated, untreated)}


def evaluate(
    test: TestSet,
    models: Sequence[ModelSpec],
    *,
    pretrained: str | Path | None,
    settings: Any,
    seed: int,
    device: Any = "cpu",
) -> Evaluation:
    """Run every model on the test split and score it; `settings` = params.evaluate."""
    results = []
    for spec in models:
        log.info("evaluating %s (%s)", spec.name, spec.path)
        if spec.kind == "baseline":
            probs = predict_baseline(spec.path, test.texts, test.label_names)
        else:
            probs = predict_transformer(spec.path, test.texts, test.label_names, settings.batch_size, device)
        results.append(score_model(
            spec.name, spec.kind, test, probs, bootstrap_samples=settings.bootstrap_samples,
            confidence=settings.confidence, ece_bins=settings.ece_bins, seed=seed,
        ))
    compare_to_baseline(results, test.labels)
    compare_to_random_init(results, models, test.labels, bootstrap_samples=settings.bootstrap_samples,
                           confidence=settings.confidence, seed=seed)
    lm = None
    if pretrained is not None:
        log.info("masked-LM perplexity of %s", pretrained)
        lm = mlm_perplexity(
            pretrained, test.texts, mask_prob=settings.mlm_mask_prob, seed=seed,
            batch_size=settings.batch_size, device=device, max_windows=settings.mlm_windows,
        )
    return Evaluation(test, results, lm, settings.confidence, settings.ece_bins)


# --------------------------------------------------------------------------- reports
def _num(value: float) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def headline(evaluation: Evaluation) -> dict[str, Any]:
    """metrics.json: {model: {metric, metric_ci_low, metric_ci_high, mcnemar_*}, pretrained: ...}."""
    out: dict[str, Any] = {"n_test": len(evaluation.test.labels)}
    for result in evaluation.models:
        row: dict[str, Any] = {}
        for name in M.METRICS:
            row[name] = _num(result.metrics[name])
            row[f"{name}_ci_low"], row[f"{name}_ci_high"] = (_num(v) for v in result.ci[name])
        if result.mcnemar is not None:
            row["mcnemar_p"] = result.mcnemar["p_value"]
            row["mcnemar_wins"] = result.mcnemar["b"]  # test examples only this model gets right
            row["mcnemar_losses"] = result.mcnemar["c"]  # test examples only the baseline gets right
        if result.control is not None:  # pretrained backbone vs the same architecture at random init
            c = result.control
            row.update({"vs_random_accuracy_diff": c["accuracy_diff"], "vs_random_ci_low": c["ci_low"],
                        "vs_random_ci_high": c["ci_high"], "vs_random_mcnemar_p": c["p_value"],
                        "vs_random_wins": c["b"], "vs_random_losses": c["c"]})
        out[result.name] = row
    if evaluation.lm is not None:
        out[PRETRAINED] = dict(evaluation.lm)
    return out


def flat_metrics(head: dict[str, Any]) -> dict[str, float]:
    """`minilm.accuracy`-style keys for MLflow (undefined values left out)."""
    out = {}
    for key, value in head.items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": float(v) for k, v in value.items() if v is not None})
        elif value is not None:
            out[key] = float(value)
    return out


def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _p(value: float) -> str:
    return f"{value:.2e}" if value < 1e-3 else f"{value:.4f}"


def comparison_table(evaluation: Evaluation) -> str:
    """The markdown comparison of every model (and the LM perplexity) on the test split."""
    level = f"{evaluation.confidence:.0%}"
    n = len(evaluation.test.labels)
    lines = [
        f"# Test-set comparison ({n} examples, labels: {', '.join(evaluation.test.label_names)})",
        "",
        f"| model | accuracy [{level} CI] | macro-F1 [{level} CI] | ROC-AUC | ECE | McNemar p vs baseline | wins / losses vs baseline | n test |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in evaluation.models:
        acc = f"{_fmt(r.metrics['accuracy'])} [{_fmt(r.ci['accuracy'][0])}, {_fmt(r.ci['accuracy'][1])}]"
        f1 = f"{_fmt(r.metrics['f1'])} [{_fmt(r.ci['f1'][0])}, {_fmt(r.ci['f1'][1])}]"
        if r.mcnemar is None:
            p, wl = "(reference)", "-"
        else:
            p = f"{_p(r.mcnemar['p_value'])} ({r.mcnemar['method']})"
            wl = f"{r.mcnemar['b']} / {r.mcnemar['c']}"
        lines.append(
            f"| {r.name} | {acc} | {f1} | {_fmt(r.metrics['roc_auc'])} | {_fmt(r.metrics['ece'])} | {p} | {wl} | {n} |"
        )
    alpha = 1 - evaluation.confidence
    lines += [
        "",
        f"Intervals: percentile bootstrap, paired (the same resamples for every model). ECE: "
        f"{evaluation.ece_bins} equal-width confidence bins. McNemar: exact binomial when "
        f"wins + losses < {M.EXACT_MCNEMAR_BELOW}, else chi-square with continuity correction; "
        f"wins = test examples only that model gets right, losses = only the baseline gets right.",
    ]
    verdicts = []
    for r in evaluation.models:
        if r.mcnemar is None:
            continue
        if r.mcnemar["p_value"] >= alpha:
            verdicts.append(f"- {r.name} vs baseline: no significant difference (p = {_p(r.mcnemar['p_value'])}).")
        else:
            winner = r.name if r.mcnemar["better"] == "a" else BASELINE
            verdicts.append(f"- {r.name} vs baseline: {winner} is better (p = {_p(r.mcnemar['p_value'])} < {alpha:.2g}).")
    if verdicts:
        lines += ["", *verdicts]
    lines += control_table(evaluation)
    if evaluation.lm is not None:
        lm = evaluation.lm
        lines += [
            "",
            f"Pretrained encoder, masked-LM perplexity on the test text (`pretrained.test_mlm_perplexity`): "
            f"{lm['test_mlm_perplexity']:.2f} over {int(lm['test_mlm_masked_tokens'])} masked tokens "
            f"in {int(lm['test_mlm_windows'])} windows.",
        ]
    lines += [f"- {note}" for note in evaluation.notes]
    return "\n".join(lines) + "\n"


def control_table(evaluation: Evaluation) -> list[str]:
    """Markdown lines: each pretrained-backbone model against its random-init twin (none: [])."""
    rows = [r for r in evaluation.models if r.control is not None]
    if not rows:
        return []
    level = f"{evaluation.confidence:.0%}"
    lines = ["", "## What pretraining adds: the same architecture at random init, same recipe", "",
             f"| model | control (random init) | accuracy difference [{level} CI] | McNemar p | wins / losses |",
             "| --- | --- | --- | --- | --- |"]
    alpha = 1 - evaluation.confidence
    verdicts = []
    for r in rows:
        c = r.control
        lines.append(f"| {r.name} | {c['name']} | {c['accuracy_diff']:+.4f} [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}] "
                     f"| {_p(c['p_value'])} ({c['method']}) | {c['b']} / {c['c']} |")
        if c["p_value"] >= alpha:
            verdicts.append(f"- {r.name} vs {c['name']}: no significant difference (p = {_p(c['p_value'])}).")
        else:
            winner = r.name if c["better"] == "a" else c["name"]
            verdicts.append(f"- {r.name} vs {c['name']}: {winner} is better (p = {_p(c['p_value'])} < {alpha:.2g}).")
    return lines + ["", *verdicts]


def _slug(text: str) -> str:
    return re.sub(r"[^\w.-]+", "_", text).strip("_") or "label"


def predictions_frame(result: ModelResult, test: TestSet) -> Any:
    import pandas as pd

    names = np.asarray(test.label_names, dtype=object)
    frame = pd.DataFrame({"actual": names[test.labels], "predicted": names[result.probs.argmax(axis=1)]})
    for i, label in enumerate(test.label_names):
        frame[f"prob_{label}"] = result.probs[:, i]
    return frame


def _write_csv(frame: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False, float_format=PROB_FORMAT, lineterminator="\n")


def write_reports(evaluation: Evaluation, out_dir: str | Path, curves_root: str | Path | None = None) -> dict[str, Any]:
    """Write every report file into `out_dir` (a temporary folder); return the headline dict."""
    import pandas as pd

    from lmpipe import plots

    out_dir = Path(out_dir)
    test = evaluation.test
    binary = len(test.label_names) == 2
    curves: dict[str, list[tuple[str, np.ndarray, np.ndarray]]] = {}
    for r in evaluation.models:
        _write_csv(predictions_frame(r, test), out_dir / "predictions" / f"{r.name}.csv")
        classes = [1] if binary else range(len(test.label_names))
        curves[r.name] = []
        for c in classes:
            if not np.any(test.labels == c) or np.all(test.labels == c):
                continue  # no ROC without both positives and negatives
            fpr, tpr = M.roc_curve_points(test.labels, r.probs[:, c], positive=c)
            curves[r.name].append((test.label_names[c], fpr, tpr))
            name = f"{r.name}.csv" if binary else f"{r.name}/{_slug(test.label_names[c])}.csv"
            _write_csv(pd.DataFrame({"fpr": fpr, "tpr": tpr}), out_dir / "roc" / name)
    if not binary and not any(curves.values()):
        evaluation.notes.append("no ROC curve: no class has both positives and negatives")
    elif not binary:
        evaluation.notes.append("multiclass: roc/<model>/<label>.csv holds each class's one-vs-rest curve")

    plot_dir = out_dir / "plots"
    for r in evaluation.models:
        cm = M.confusion_matrix(test.labels, r.probs.argmax(axis=1), len(test.label_names))
        plots.save(plots.confusion_figure(cm, test.label_names, r.name), plot_dir / f"confusion_{r.name}.png")
    aucs = {r.name: r.metrics["roc_auc"] for r in evaluation.models}
    plots.save(plots.roc_figure(curves, aucs), plot_dir / "roc.png")
    plots.save(
        plots.reliability_figure({r.name: r.probs for r in evaluation.models}, test.labels, evaluation.ece_bins),
        plot_dir / "calibration.png",
    )
    if curves_root is not None:
        for name, figure in plots.training_curve_figures(curves_root).items():
            plots.save(figure, plot_dir / f"curves_{name}.png")

    head = headline(evaluation)
    write_json(out_dir / "metrics.json", head)
    write_text(out_dir / "comparison.md", comparison_table(evaluation))
    return head


# --------------------------------------------------------------------------- lineage
def find_producer_run(client: Any, experiment_id: str, path: str, md5: str) -> Any:
    """The latest FINISHED run of `experiment_id` whose tag `dvc.out.<path>` equals `md5`
    (the DVC hash of that output when the run ended), or None."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`dvc.out.{path}` = '{md5}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def upstream_tags(experiment: str, paths: Sequence[str], tracking_uri: str | None = None) -> dict[str, str]:
    """`upstream.<stage>.run_id` tags for the runs that produced `paths` (in their current
    state). Best effort: a store that fails gives {} and a warning, never an error."""
    from lmpipe.lineage import dvc_md5
    from lmpipe.project import default_tracking_uri

    tags: dict[str, str] = {}
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri or default_tracking_uri())
        found = client.get_experiment_by_name(experiment)
        if found is None:
            return tags
        for path in paths:
            if not Path(path).exists():
                continue
            run = find_producer_run(client, found.experiment_id, path, dvc_md5(path))
            if run is None:
                log.info("no finished MLflow run has %s in its current state", path)
                continue
            stage = run.data.tags.get("lmpipe.stage") or Path(path).name
            key = re.sub(r"[^\w.-]", ".", stage)  # finetune@minilm -> finetune.minilm ('@' is no tag key)
            tags[f"upstream.{key}.run_id"] = run.info.run_id
    except Exception as exc:  # lineage tags are a convenience: never fail the stage for them
        warnings.warn(f"MLflow upstream lookup failed ({exc}); no upstream tags")
    return tags
