"""Score the ensembles named in `evaluate.ensembles` beside the models they combine.

- Members: the models `evaluation.evaluate` already ran; their test logits are reused (the
  baseline's log-probabilities stand in for its logits, `lmpipe.inference.ensemble`).
- Calibration: one temperature per member, fit on the validation split (`data/processed/val`,
  never the test split) by minimising the NLL; `calibration: none` keeps every temperature at 1.
  Members' validation logits are computed once, however many ensembles share them.
- The ensemble: the mean of the calibrated member probabilities, scored like any model (metrics
  with paired bootstrap intervals, McNemar against the baseline) as its own row, plus the
  accuracy difference and McNemar's test against its best member (best on validation), the
  temperatures, and the uncalibrated mean's accuracy and ECE (what calibration changed).
- The ensemble file `models/ensembles/<name>.json` that `lmpipe predict --ensemble NAME` serves.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lmpipe.core.errors import LmpipeError
from lmpipe.evaluate.evaluation import (
    RESERVED,
    Evaluation,
    ModelResult,
    ModelSpec,
    TestSet,
    predict_baseline,
    score_model,
    transformer_logits,
)
from lmpipe.inference import ensemble as E
from lmpipe.task import metrics as M


def check_ensembles(ensembles: Mapping[str, Any], specs: Sequence[ModelSpec]) -> None:
    """Before any work: every member is a model evaluate found, no ensemble takes a model's name."""
    found = [spec.name for spec in specs]
    for name, settings in ensembles.items():
        if name in found or name in RESERVED:
            raise LmpipeError(f"params.yaml: evaluate.ensembles.{name}: the name is taken by a model")
        for member in settings.members:
            if member not in found:
                raise LmpipeError(
                    f"params.yaml: evaluate.ensembles.{name}.members: no model {member!r} to evaluate (found: {found})"
                )


def _val_logits(spec: ModelSpec, val: TestSet, batch_size: int, device: Any) -> np.ndarray:
    if spec.kind == "baseline":
        return E.baseline_logits(predict_baseline(spec.path, val.texts, val.label_names))
    return transformer_logits(spec.path, val.texts, val.label_names, batch_size, device)


def _test_logits(result: ModelResult) -> np.ndarray:
    return E.baseline_logits(result.probs) if result.logits is None else result.logits


def _fit_member(name: str, val_logits: np.ndarray, val: TestSet, calibration: str) -> dict[str, Any]:
    """A member's temperature and what it changed on the validation split."""
    temperature = E.fit_temperature(val_logits, val.labels) if calibration == "temperature" else 1.0
    return {
        "name": name,
        "temperature": temperature,
        "val_accuracy": float((val_logits.argmax(axis=1) == val.labels).mean()),
        "val_nll": E.nll(val_logits, val.labels),
        "val_nll_calibrated": E.nll(val_logits, val.labels, temperature),
    }


def _vs_best_member(probs: np.ndarray, best: ModelResult, labels: np.ndarray, settings: Any, seed: int) -> dict:
    """Accuracy difference [CI] and McNemar's test of the ensemble (a) against its best member (b)."""
    ours = probs.argmax(axis=1) == labels
    theirs = best.probs.argmax(axis=1) == labels
    diff, low, high = M.accuracy_difference_ci(ours, theirs, settings.bootstrap_samples, settings.confidence, seed)
    test = M.mcnemar(ours, theirs)
    return {
        "vs_best_member": best.name,
        "vs_best_member_accuracy_diff": diff,
        "vs_best_member_ci_low": low,
        "vs_best_member_ci_high": high,
        "vs_best_member_mcnemar_p": test["p_value"],
        "vs_best_member_wins": test["b"],
        "vs_best_member_losses": test["c"],
    }


def add_ensembles(
    evaluation: Evaluation,
    specs: Sequence[ModelSpec],
    val: TestSet,
    *,
    out_dir: str | Path,
    settings: Any,
    seed: int,
    device: Any = "cpu",
) -> dict[str, dict[str, Any]]:
    """Append a row per ensemble of `settings.ensembles` (params.evaluate) to `evaluation`;
    return {name: its ensemble file's content}. `out_dir` is where the ensemble files will live
    (member paths are written relative to it).
    """
    ensembles = settings.ensembles
    check_ensembles(ensembles, specs)
    if val.label_names != evaluation.test.label_names:
        raise LmpipeError(f"the val split's labels {val.label_names} differ from the test split's")
    by_spec = {spec.name: spec for spec in specs}
    by_result = {r.name: r for r in evaluation.models}
    val_logits: dict[str, np.ndarray] = {}
    files = {}
    for name, ens in ensembles.items():
        for member in ens.members:
            if member not in val_logits:
                val_logits[member] = _val_logits(by_spec[member], val, settings.batch_size, device)
        fits = [_fit_member(m, val_logits[m], val, ens.calibration) for m in ens.members]
        result = _score(name, evaluation, [by_result[m] for m in ens.members], fits, settings, seed)
        evaluation.models.append(result)
        files[name] = _ensemble_file(name, ens, fits, [by_spec[m] for m in ens.members], val, out_dir)
    evaluation.sections.extend(ensemble_section(evaluation))
    return files


def _score(
    name: str, evaluation: Evaluation, members: list[ModelResult], fits: list[dict], settings: Any, seed: int
) -> ModelResult:
    """The ensemble's row: metrics [CI], McNemar vs the baseline and vs its best member, temperatures."""
    test = evaluation.test
    logits = [_test_logits(r) for r in members]
    probs = E.combine([E.calibrate(z, fit["temperature"]) for z, fit in zip(logits, fits)])
    result = score_model(
        name,
        "ensemble",
        test,
        probs,
        bootstrap_samples=settings.bootstrap_samples,
        confidence=settings.confidence,
        ece_bins=settings.ece_bins,
        seed=seed,
    )
    base = next(r for r in evaluation.models if r.kind == "baseline")
    result.mcnemar = M.mcnemar(probs.argmax(axis=1) == test.labels, base.probs.argmax(axis=1) == test.labels)
    best = max(range(len(members)), key=lambda i: (fits[i]["val_accuracy"], -i))  # on validation; ties: first
    raw = E.combine([M.softmax(z) for z in logits])
    result.extra = {
        "n_members": len(members),
        **{f"temperature_{fit['name']}": fit["temperature"] for fit in fits},
        "uncalibrated_accuracy": float((raw.argmax(axis=1) == test.labels).mean()),
        "uncalibrated_ece": M.expected_calibration_error(test.labels, raw, settings.ece_bins),
        **_vs_best_member(probs, members[best], test.labels, settings, seed),
    }
    return result


def _ensemble_file(
    name: str, ens: Any, fits: list[dict], specs: list[ModelSpec], val: TestSet, out_dir: str | Path
) -> dict[str, Any]:
    """What `lmpipe predict --ensemble NAME` needs: members (folder, md5, kind, temperature), labels."""
    from lmpipe.core.lineage import dvc_md5

    members = []
    for fit, spec in zip(fits, specs):
        path = os.path.relpath(os.path.abspath(spec.path), os.path.abspath(out_dir))
        kind = E.BASELINE if spec.kind == "baseline" else "transformer"
        members.append({**fit, "kind": kind, "path": Path(path).as_posix(), "md5": dvc_md5(spec.path)})
    return {
        "name": name,
        "labels": list(val.label_names),
        "calibration": ens.calibration,
        "combine": "mean of calibrated probabilities",
        "n_val": len(val.labels),
        "members": members,
    }


def write_files(files: Mapping[str, dict[str, Any]], out_dir: str | Path) -> None:
    """Replace `out_dir` whole with one `<name>.json` per ensemble (an empty folder when none)."""
    from lmpipe.core.io import atomic_dir

    with atomic_dir(out_dir) as tmp:
        for name, spec in files.items():
            E.write_spec(tmp / f"{name}.json", spec)


def ensemble_section(evaluation: Evaluation) -> list[str]:
    """comparison.md lines: each ensemble's members and temperatures, and against its best member."""
    rows = [r for r in evaluation.models if r.kind == "ensemble"]
    if not rows:
        return []
    level = f"{evaluation.confidence:.0%}"
    lines = [
        "",
        "## Ensembles: the mean of temperature-calibrated probabilities (temperatures fit on validation)",
        "",
        f"| ensemble | members (temperature) | best member (on validation) | accuracy difference [{level} CI] "
        "| McNemar p | wins / losses | accuracy, ECE uncalibrated |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    verdicts = []
    for r in rows:
        x = r.extra
        temps = {k.removeprefix("temperature_"): v for k, v in x.items() if k.startswith("temperature_")}
        p = x["vs_best_member_mcnemar_p"]
        lines.append(
            f"| {r.name} | {', '.join(f'{m} ({t:.3f})' for m, t in temps.items())} | {x['vs_best_member']} "
            f"| {x['vs_best_member_accuracy_diff']:+.4f} [{x['vs_best_member_ci_low']:+.4f}, "
            f"{x['vs_best_member_ci_high']:+.4f}] | {_p(p)} "
            f"| {x['vs_best_member_wins']} / {x['vs_best_member_losses']} "
            f"| {x['uncalibrated_accuracy']:.4f}, {x['uncalibrated_ece']:.4f} |"
        )
        alpha = 1 - evaluation.confidence
        diff = x["vs_best_member_accuracy_diff"]
        verdict = "no significant difference" if p >= alpha else ("better" if diff > 0 else "worse")
        verdicts.append(f"- {r.name} vs its best member {x['vs_best_member']}: {verdict} (p = {_p(p)}).")
    return [*lines, "", *verdicts]


def _p(value: float) -> str:
    return f"{value:.2e}" if value < 1e-3 else f"{value:.4f}"
