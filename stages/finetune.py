"""Fine-tune one backbone for sequence classification: `python -m stages.finetune <backbone>`.

`<backbone>` is a key of `finetune.backbones` (dvc.yaml runs one stage per key via foreach:
`finetune@scratch`, `finetune@minilm`).

Reads:  data/processed/{train,val}.parquet + labels.json, the backbone folder
        (finetune.backbones.<backbone>.source), params `base` and `finetune`.
Writes: models/finetuned/<backbone>/ (HF folder: safetensors, config with id2label/label2id,
        tokenizer files, lmpipe.json), checkpoints/finetune/<backbone>/ (resume point),
        reports/finetune/<backbone>/{metrics.json,train_curve.csv,eval_curve.csv}.

Features:
- modes full / frozen (+ top k layers) / lora and adalora (merged into the weights before saving) /
  prefix and adapter (extra weights saved beside the HF ones, rebuilt by the one loader);
  trainable parameters and their share logged for every mode;
- head or head+tail truncation through the one shared `encode_texts`;
- length-bucketed batches (less padding), stratified train subsample, seeded throughout;
- the shared training loop: warmup + cosine, accumulation, clipping, early stopping on a
  validation metric (the best weights are saved), exact resume after a kill, DDP under torchrun;
- MLflow run `finetune@<backbone>` with params, curves, validation metrics and lineage tags.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lmpipe.core.errors import LmpipeError
from lmpipe.core.io import atomic_dir
from lmpipe.core.lineage import TAG_BACKBONE
from lmpipe.core.params import load_params
from lmpipe.core.reports import perf_curve_file, write_stage_reports
from lmpipe.core.stage import run, setup_torch
from lmpipe.core.tracking import stage_run
from lmpipe.finetune import finetuning
from lmpipe.inference.classifier import INFO_FILE, save_classifier
from lmpipe.task.splits import check_processed
from lmpipe.train import training

PROCESSED = Path("data/processed")


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    params = load_params()
    known = sorted(params.finetune.backbones)
    if len(args) != 1 or args[0] not in params.finetune.backbones:
        got = repr(args[0]) if len(args) == 1 else f"{len(args)} arguments"
        raise LmpipeError(
            f"usage: python -m stages.finetune <backbone>: the backbone must be a key "
            f"of params.yaml finetune.backbones {known} (got {got})"
        )
    backbone = args[0]
    source = Path(params.finetune.backbones[backbone].source)
    check_processed(PROCESSED)
    if not (source / "config.json").is_file():
        raise LmpipeError(
            f"{source}/config.json: file not found (finetune.backbones.{backbone}.source "
            f"must be a transformers model folder; run the stage that writes it)"
        )
    model_dir = Path("models/finetuned") / backbone
    checkpoints = Path("checkpoints/finetune") / backbone
    reports = Path("reports/finetune") / backbone
    device = setup_torch(params.base.seed, params.base.threads, params.base.device)
    with stage_run(
        f"finetune@{backbone}",
        params,
        sections=("finetune",),
        inputs=(str(PROCESSED), str(source)),
        outputs=(str(model_dir), str(checkpoints)),
        extra_tags={TAG_BACKBONE: backbone},
    ) as tracker:
        tracker.log_input(PROCESSED, context="train")
        done = finetuning.run_finetune(
            params,
            backbone,
            processed_dir=PROCESSED,
            device=device,
            tracker=tracker,
            checkpoint_dir=checkpoints,
            curves_dir=reports,
            perf_curve=perf_curve_file(f"finetune@{backbone}"),
        )
        with atomic_dir(model_dir) as tmp:
            save_classifier(done.model, done.tokenizer, tmp, done.info)
        training.finish_checkpoint(checkpoints, done.metrics["steps"])
        write_stage_reports(f"finetune@{backbone}", reports, done.metrics)
        tracker.log_metrics({f"best_{k}": v for k, v in done.info["val_metrics"].items()})
        counted = ("trainable_params", "trainable_share", "total_params", "pad_share")
        tracker.log_metrics({k: float(done.metrics[k]) for k in counted})
        tracker.log_artifact(reports)
        tracker.log_artifact(model_dir / INFO_FILE)


if __name__ == "__main__":
    run(main)
