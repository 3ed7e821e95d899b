"""Export the chosen fine-tuned classifier as a deployable, auditable package.

Reads: models/finetuned/<name>/ (export.model, or `best` by export.selection_metric in
reports/finetune/<name>/metrics.json, validation only), data/processed/ (test split for the
parity check, train split for the drift reference, labels.json), reports/evaluate/metrics.json
(test metrics for the card, if present) and dvc.lock (the lineage of every upstream stage).
Writes: models/export/ as one folder swapped in whole: hf/ (transformers folder), onnx/model.onnx
(+ onnx/model.int8.onnx), drift.json (the train split's input statistics that `lmpipe serve`
watches for drift), README.md (model card), lineage.json; reports/export/metrics.json
(parity, latency, sizes). MLflow: the pyfunc model `model` in this stage's run, registered as
export.registered_name (the version is a run tag and is printed).

Features:
- model choice by name or by best validation metric (ties broken by name)
- ONNX fp32 (dynamic batch and sequence) and int8 (dynamic quantization) with a parity check
  on the test split that fails the stage, leaving nothing, when out of tolerance
- latency per backend at batch 1 and 32, file sizes
- model card with HF front matter and the full lineage; byte-identical on rerun
- runs untracked (with a warning) when the MLflow store is down
"""

from __future__ import annotations

from pathlib import Path

from lmpipe.core.io import atomic_dir, read_json
from lmpipe.core.lineage import TAG_EXPORT_MODEL
from lmpipe.core.params import flatten, load_params
from lmpipe.core.reports import write_stage_reports
from lmpipe.core.stage import run, setup_torch
from lmpipe.core.tracking import stage_run
from lmpipe.export.export import build_export, export_inputs, publish, write_card
from lmpipe.task.selection import select_model

PROCESSED, FINETUNED, REPORTS = "data/processed", "models/finetuned", "reports/finetune"
EVALUATE_METRICS = "reports/evaluate/metrics.json"
OUT, METRICS = "models/export", "reports/export/metrics.json"


def main() -> None:
    params = load_params()
    cfg = params.export
    setup_torch(params.base.seed, params.base.threads, "cpu")  # export and ONNX parity run on CPU
    name, candidates = select_model(cfg.model, cfg.selection_metric, list(params.finetune.backbones), REPORTS)
    print(f"export: {name} ({cfg.selection_metric} " + ", ".join(f"{k}={v:.4f}" for k, v in candidates.items()) + ")")
    inputs = export_inputs(name, candidates, PROCESSED, FINETUNED, REPORTS, EVALUATE_METRICS)
    tags = {TAG_EXPORT_MODEL: name}
    with stage_run(
        "export", params, sections=("export",), inputs=tuple(inputs), outputs=(OUT, METRICS), extra_tags=tags
    ) as tracker:
        with atomic_dir(OUT) as tmp:
            result = build_export(
                Path(FINETUNED) / name, tmp, Path(PROCESSED), cfg, seed=params.base.seed, threads=params.base.threads
            )
            write_card(
                tmp,
                Path("."),
                result,
                name=name,
                source=f"{FINETUNED}/{name}",
                selected_by=cfg.selection_metric,
                candidates=candidates,
                inputs=inputs,
                cfg=cfg,
                evaluate_metrics=Path(EVALUATE_METRICS),
                val_metrics=read_json(Path(REPORTS) / name / "metrics.json"),
            )
        write_stage_reports("export", Path(METRICS).parent, result.metrics)
        tracker.log_metrics(flatten(result.metrics))
        tracker.log_artifact(Path(OUT) / "README.md")
        tracker.log_artifact(Path(OUT) / "lineage.json")
        version = publish(tracker, Path(OUT), cfg.registered_name)
    parity = result.metrics["parity"]
    print(f"export: parity {parity}")
    print(f"export: latency ms/text {result.metrics['latency_ms']}, sizes MB {result.metrics['size_mb']}")
    if version:
        print(f"export: registered {cfg.registered_name} version {version} (models:/{cfg.registered_name}/{version})")


if __name__ == "__main__":
    run(main)
