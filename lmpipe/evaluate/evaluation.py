"""Evaluate every model on the held-out test split, side by side.

- Models: the TF-IDF baseline (`lmpipe.baseline.baseline.load(models/baseline)`) and every fine-tuned
  folder `models/finetuned/<name>/` (encoded with `lmpipe.inference.encoding.encode_texts` exactly as
  that model was trained, per its `lmpipe.json`). Inference is batched, sorted by length so
  batches hold little padding, under `torch.inference_mode`.
- Per model: accuracy, macro precision/recall/F1, ROC-AUC, ECE (lmpipe.task.metrics), each with a
  percentile bootstrap interval computed on the SAME resamples for every model (paired), and
  McNemar's test of each transformer against the baseline.
- The control arm: each fine-tuned model whose backbone was pretrained is compared with the
  random-init model built from the same source folder (`init: random` in its lmpipe.json):
  the accuracy difference with its paired bootstrap interval, and McNemar's test.
- The pretrained encoder: masked-LM perplexity on the test split's text
  (`pretrained.test_mlm_perplexity`), see `mlm_perplexity`.
- Reports: `write_reports` writes metrics.json, comparison.md, predictions/<model>.csv,
  roc/<model>.csv and plots/*.png into one folder (the stage swaps it in atomically).
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmpipe.baseline import baseline
from lmpipe.core.errors import LmpipeError
from lmpipe.core.io import write_json, write_text
from lmpipe.evaluate import prompted
from lmpipe.inference.batched import torch_logits
from lmpipe.inference.classifier import INFO_FILE, load_classifier
from lmpipe.inference.encoding import collate, encode_texts
from lmpipe.task import metrics as M
from lmpipe.task.splits import load_label_names, load_split

log = logging.getLogger("lmpipe.evaluate.evaluation")

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
    logits: np.ndarray | None = None  # a transformer's test logits (ensembles calibrate them); never written
    extra: dict[str, Any] = field(default_factory=dict)  # more entries of its metrics.json row (ensembles)


@dataclass
class Evaluation:
    test: TestSet
    models: list[ModelResult]
    lm: dict[str, float] | None = None  # pretrained.* entries of metrics.json
    confidence: float = 0.95
    ece_bins: int = 10
    notes: list[str] = field(default_factory=list)
    sections: list[str] = field(default_factory=list)  # more markdown lines of comparison.md (ensembles)


# --------------------------------------------------------------------------- inputs
def load_test_set(processed_dir: str | Path, split: str = "test") -> TestSet:
    """The test split (or another: `val` calibrates ensembles) and the label names, validated."""

    names = load_label_names(processed_dir)
    texts, labels = load_split(processed_dir, split, n_labels=len(names))
    if not texts:
        raise LmpipeError(f"{Path(processed_dir) / f'{split}.parquet'}: the {split} split is empty")
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
            specs.append(
                ModelSpec(
                    folder.name, folder, "transformer", str(info.get("init", "pretrained")), str(info.get("source", ""))
                )
            )
    return specs


def _model_info(folder: Path) -> dict[str, Any]:
    """The fine-tuned folder's lmpipe.json ({} when absent)."""

    path = folder / INFO_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except ValueError:
        raise LmpipeError(f"{path}: not valid JSON") from None


# --------------------------------------------------------------------------- inference
def _check_probs(probs: Any, n: int, label_names: Sequence[str], where: Path) -> np.ndarray:
    probs = np.asarray(probs, dtype=np.float64)
    if probs.shape != (n, len(label_names)):
        raise LmpipeError(
            f"{where}: predicts shape {probs.shape}, expected ({n}, {len(label_names)}) for labels {list(label_names)}"
        )
    return probs


def predict_baseline(path: str | Path, texts: Sequence[str], label_names: Sequence[str]) -> np.ndarray:
    """Class probabilities of the TF-IDF baseline."""

    model = baseline.load(path)
    own = getattr(model, "labels", None)
    if own is not None and [str(x) for x in own] != list(label_names):
        raise LmpipeError(f"{path}: trained for labels {list(own)}, the test split has {list(label_names)}")
    return _check_probs(model.predict_proba(list(texts)), len(texts), label_names, Path(path))


def predict_transformer(
    path: str | Path, texts: Sequence[str], label_names: Sequence[str], batch_size: int, device: Any
) -> np.ndarray:
    """Class probabilities of a fine-tuned folder, encoded as its lmpipe.json says."""
    logits = transformer_logits(path, texts, label_names, batch_size, device)
    return _check_probs(M.softmax(logits), len(texts), label_names, Path(path))


def transformer_logits(
    path: str | Path, texts: Sequence[str], label_names: Sequence[str], batch_size: int, device: Any
) -> np.ndarray:
    """Logits (float64 holding float32 values) of a fine-tuned folder, encoded as its lmpipe.json says."""

    path = Path(path)
    model, tokenizer, info = load_classifier(path)
    id2label = [str(model.config.id2label[i]) for i in range(model.config.num_labels)]
    if id2label != list(label_names):
        raise LmpipeError(f"{path}/config.json: id2label {id2label} differs from the test labels {list(label_names)}")
    ids = encode_texts(tokenizer, texts, int(info["max_length"]), str(info["truncation"]))["input_ids"]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    model.to(device)
    logits = torch_logits(
        model,
        ids,
        pad_id,
        batch_size,
        longest_first=True,  # peak memory early
        desc=f"predict {path.name}",
    )
    _check_probs(logits, len(texts), label_names, path)
    return logits


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

    from lmpipe.mlm.models import mlm_head

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
    name: str,
    kind: str,
    test: TestSet,
    probs: np.ndarray,
    *,
    bootstrap_samples: int,
    confidence: float,
    ece_bins: int,
    seed: int,
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


def compare_to_random_init(
    results: list[ModelResult],
    specs: Sequence[ModelSpec],
    labels: np.ndarray,
    *,
    bootstrap_samples: int,
    confidence: float,
    seed: int,
) -> None:
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
        by_name[spec.name].control = {
            "name": control,
            "accuracy_diff": diff,
            "ci_low": low,
            "ci_high": high,
            **M.mcnemar(treated, untreated),
        }


def evaluate(
    test: TestSet,
    models: Sequence[ModelSpec],
    *,
    pretrained: str | Path | None,
    settings: Any,
    seed: int,
    device: Any = "cpu",
    shot_pool: Any = None,
) -> Evaluation:
    """Run every model on the test split and score it; `settings` = params.evaluate.

    A causal-LM `pretrained` model adds its prompted rows (lmpipe.evaluate.prompted; few-shot
    examples from `shot_pool()` -> (texts, labels)) and its next-token perplexity; an encoder
    adds its masked-LM perplexity.
    """
    results = []
    for spec in models:
        log.info("evaluating %s (%s)", spec.name, spec.path)
        logits = None
        if spec.kind == "baseline":
            probs = predict_baseline(spec.path, test.texts, test.label_names)
        else:
            logits = transformer_logits(spec.path, test.texts, test.label_names, settings.batch_size, device)
            probs = _check_probs(M.softmax(logits), len(test.texts), test.label_names, spec.path)
        result = score(spec.name, spec.kind, test, probs, settings, seed)
        result.logits = logits
        results.append(result)
    lm = None
    if pretrained is not None and prompted.is_causal_lm(pretrained):
        log.info("causal LM %s: test perplexity and prompted rows", pretrained)
        model, tokenizer = prompted.load(pretrained, device)
        lm = prompted.clm_perplexity(
            model,
            tokenizer,
            test.texts,
            batch_size=settings.batch_size,
            device=device,
            max_windows=settings.mlm_windows,
        )
        found = prompted.prompted_probs(model, tokenizer, test.texts, test.label_names, settings, seed, shot_pool)
        results += [score(name, "prompt", test, probs, settings, seed) for name, probs in found.items()]
    elif pretrained is not None:
        log.info("masked-LM perplexity of %s", pretrained)
        lm = mlm_perplexity(
            pretrained,
            test.texts,
            mask_prob=settings.mlm_mask_prob,
            seed=seed,
            batch_size=settings.batch_size,
            device=device,
            max_windows=settings.mlm_windows,
        )
    compare_to_baseline(results, test.labels)
    compare_to_random_init(
        results,
        models,
        test.labels,
        bootstrap_samples=settings.bootstrap_samples,
        confidence=settings.confidence,
        seed=seed,
    )
    return Evaluation(test, results, lm, settings.confidence, settings.ece_bins)


def score(name: str, kind: str, test: TestSet, probs: np.ndarray, settings: Any, seed: int) -> ModelResult:
    """`score_model` with the bootstrap and calibration settings of params.evaluate."""
    return score_model(
        name,
        kind,
        test,
        probs,
        bootstrap_samples=settings.bootstrap_samples,
        confidence=settings.confidence,
        ece_bins=settings.ece_bins,
        seed=seed,
    )


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
            row.update(
                {
                    "vs_random_accuracy_diff": c["accuracy_diff"],
                    "vs_random_ci_low": c["ci_low"],
                    "vs_random_ci_high": c["ci_high"],
                    "vs_random_mcnemar_p": c["p_value"],
                    "vs_random_wins": c["b"],
                    "vs_random_losses": c["c"],
                }
            )
        row.update(result.extra)
        out[result.name] = row
    if evaluation.lm is not None:
        out[PRETRAINED] = dict(evaluation.lm)
    return out


def headline_numbers(evaluation: Evaluation, selected: str) -> dict[str, Any]:
    """headline.json, the few numbers `dvc metrics show` and `dvc exp show` print.

    `model`: the transformer export ships (chosen on validation, `lmpipe.task.selection`);
    `acc` [`acc_lo`, `acc_hi`] its test accuracy and CI, `f1` its macro-F1; `tfidf_acc` the
    baseline's accuracy; `gain` the test-accuracy gain of the first pretrained model that has a
    random-init twin over that twin (scratch - random in the default DAG). Every figure of every
    model, with its CI, stays in metrics.json.
    """
    by_name = {r.name: r for r in evaluation.models}
    if selected not in by_name:
        raise LmpipeError(f"models/finetuned/{selected}: the selected model was not evaluated")
    chosen = by_name[selected]
    low, high = chosen.ci["accuracy"]
    out: dict[str, Any] = {
        "model": selected,
        "acc": _num(chosen.metrics["accuracy"]),
        "acc_lo": _num(low),
        "acc_hi": _num(high),
        "f1": _num(chosen.metrics["f1"]),
    }
    if BASELINE in by_name:
        out["tfidf_acc"] = _num(by_name[BASELINE].metrics["accuracy"])
    treated = next((r for r in evaluation.models if r.control is not None), None)
    if treated is not None:
        out["gain"] = _num(treated.control["accuracy_diff"])
    return out


def flat_metrics(head: dict[str, Any]) -> dict[str, float]:
    """`minilm.accuracy`-style keys for MLflow (undefined values and names, such as an
    ensemble's `vs_best_member`, left out)."""
    out = {}
    for key, value in head.items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": float(v) for k, v in value.items() if v is not None and not isinstance(v, str)})
        elif value is not None:
            out[key] = float(value)
    return out


def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _p(value: float) -> str:
    return f"{value:.2e}" if value < 1e-3 else f"{value:.4f}"


def _interval(result: ModelResult, metric: str) -> str:
    """`value [low, high]` of one metric with its bootstrap interval."""
    low, high = result.ci[metric]
    return f"{_fmt(result.metrics[metric])} [{_fmt(low)}, {_fmt(high)}]"


def _verdict(name: str, other: str, test: dict[str, Any], alpha: float) -> str:
    """A bullet saying whether McNemar's `test` of `name` (a) against `other` (b) is significant, and who wins."""
    if test["p_value"] >= alpha:
        return f"- {name} vs {other}: no significant difference (p = {_p(test['p_value'])})."
    winner = name if test["better"] == "a" else other
    return f"- {name} vs {other}: {winner} is better (p = {_p(test['p_value'])} < {alpha:.2g})."


def _comparison_header(evaluation: Evaluation) -> list[str]:
    """The title and the header of the per-model table."""
    level = f"{evaluation.confidence:.0%}"
    return [
        f"# Test-set comparison ({len(evaluation.test.labels)} examples, "
        f"labels: {', '.join(evaluation.test.label_names)})",
        "",
        f"| model | accuracy [{level} CI] | macro-F1 [{level} CI] | ROC-AUC | ECE | McNemar p vs baseline "
        "| wins / losses vs baseline | n test |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]


def _model_row(result: ModelResult, n: int) -> str:
    """One model's row: intervals, ROC-AUC, ECE and McNemar against the baseline."""
    if result.mcnemar is None:
        p, wins_losses = "(reference)", "-"
    else:
        p = f"{_p(result.mcnemar['p_value'])} ({result.mcnemar['method']})"
        wins_losses = f"{result.mcnemar['b']} / {result.mcnemar['c']}"
    return (
        f"| {result.name} | {_interval(result, 'accuracy')} | {_interval(result, 'f1')} "
        f"| {_fmt(result.metrics['roc_auc'])} | {_fmt(result.metrics['ece'])} | {p} | {wins_losses} | {n} |"
    )


def _legend(evaluation: Evaluation) -> list[str]:
    """How the intervals, ECE and McNemar's test were computed."""
    return [
        "",
        f"Intervals: percentile bootstrap, paired (the same resamples for every model). ECE: "
        f"{evaluation.ece_bins} equal-width confidence bins. McNemar: exact binomial when "
        f"wins + losses < {M.EXACT_MCNEMAR_BELOW}, else chi-square with continuity correction; "
        f"wins = test examples only that model gets right, losses = only the baseline gets right.",
    ]


def _baseline_verdicts(evaluation: Evaluation) -> list[str]:
    """A verdict per model against the baseline, after a blank line ([] when only the baseline ran)."""
    alpha = 1 - evaluation.confidence
    verdicts = [_verdict(r.name, BASELINE, r.mcnemar, alpha) for r in evaluation.models if r.mcnemar is not None]
    return ["", *verdicts] if verdicts else []


def _perplexity_line(evaluation: Evaluation) -> list[str]:
    """The pretrained model's masked-LM or next-token perplexity ([] when none was evaluated)."""
    lm = evaluation.lm
    if lm is None:
        return []
    if "test_clm_perplexity" in lm:
        return [
            "",
            f"Pretrained causal LM, next-token perplexity on the test text (`pretrained.test_clm_perplexity`): "
            f"{lm['test_clm_perplexity']:.2f} over {int(lm['test_clm_tokens'])} tokens "
            f"in {int(lm['test_clm_windows'])} windows.",
        ]
    return [
        "",
        f"Pretrained encoder, masked-LM perplexity on the test text (`pretrained.test_mlm_perplexity`): "
        f"{lm['test_mlm_perplexity']:.2f} over {int(lm['test_mlm_masked_tokens'])} masked tokens "
        f"in {int(lm['test_mlm_windows'])} windows.",
    ]


def comparison_table(evaluation: Evaluation) -> str:
    """The markdown comparison of every model (and the LM perplexity) on the test split."""
    n = len(evaluation.test.labels)
    lines = [
        *_comparison_header(evaluation),
        *(_model_row(r, n) for r in evaluation.models),
        *_legend(evaluation),
        *_baseline_verdicts(evaluation),
        *control_table(evaluation),
        *evaluation.sections,
        *_perplexity_line(evaluation),
        *(f"- {note}" for note in evaluation.notes),
    ]
    return "\n".join(lines) + "\n"


def _control_header(evaluation: Evaluation) -> list[str]:
    """The control-arm heading and the header of its table."""
    level = f"{evaluation.confidence:.0%}"
    return [
        "",
        "## What pretraining adds: the same architecture at random init, same recipe",
        "",
        f"| model | control (random init) | accuracy difference [{level} CI] | McNemar p | wins / losses |",
        "| --- | --- | --- | --- | --- |",
    ]


def _control_row(result: ModelResult) -> str:
    """One pretrained-backbone model against its random-init twin."""
    c = result.control
    return (
        f"| {result.name} | {c['name']} | {c['accuracy_diff']:+.4f} [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}] "
        f"| {_p(c['p_value'])} ({c['method']}) | {c['b']} / {c['c']} |"
    )


def control_table(evaluation: Evaluation) -> list[str]:
    """Markdown lines: each pretrained-backbone model against its random-init twin (none: [])."""
    rows = [r for r in evaluation.models if r.control is not None]
    if not rows:
        return []
    alpha = 1 - evaluation.confidence
    verdicts = [_verdict(r.name, r.control["name"], r.control, alpha) for r in rows]
    return [*_control_header(evaluation), *(_control_row(r) for r in rows), "", *verdicts]


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

    from lmpipe.evaluate import plots

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
