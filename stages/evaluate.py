"""Stage `evaluate`: every model on the held-out test split, one comparison table.

Reads:  data/processed/{test.parquet,labels.json} (train.parquet: few-shot examples), models/baseline,
        models/finetuned/<name>/ (every fine-tuned folder), models/pretrained, reports/pretrain/*.csv and
        reports/finetune/<name>/*.csv (training curves, plotted when present); params: all.
Writes: reports/evaluate/ as one folder swapped in whole: headline.json (the DVC metrics: the
        shipped model's test accuracy [CI] and macro-F1, the baseline's accuracy, the gain of
        pretraining over random init), metrics.json (per model accuracy,
        precision, recall, f1, roc_auc, ece, each with ci_low/ci_high; mcnemar_p vs the
        baseline; pretrained.test_mlm_perplexity), comparison.md, predictions/<model>.csv
        (actual,predicted,prob_<label>), roc/<model>.csv (fpr,tpr), plots/*.png;
        models/ensembles/<name>.json for each of evaluate.ensembles (what `lmpipe predict
        --ensemble NAME` serves: members, their md5 and temperatures; the folder is empty without).

Features:
- the one batched, length-sorted inference loop that serves, each transformer encoded as it
  was trained (its lmpipe.json: max_length, head / head_tail truncation);
- macro precision/recall/F1, ROC-AUC (one-vs-rest for multiclass), calibration (ECE), paired
  percentile bootstrap intervals, McNemar's test of each transformer against the baseline;
- ensembles (evaluate.ensembles): the mean of temperature-calibrated member probabilities
  (temperatures fit on the val split), each its own row with CIs, McNemar against the baseline
  and against its best member; members are checked against the models found before any work;
- the pretrained encoder's masked-LM perplexity on the test text (seeded masking); or, for a causal
  LM (pretrain.objective: clm), its next-token perplexity and zero-/few-shot prompted rows
  (`clm_zero_shot`, `clm_few_shot`: evaluate.prompting, few-shot examples from the train split);
- deterministic outputs (seeded, sorted keys, fixed float formats, metadata-free PNGs);
- an MLflow run carrying every pipeline param, the flattened headline metrics, the plots and
  the table as artifacts, and `upstream.<stage>.run_id` tags linking the runs that made its
  inputs (found by their DVC hashes); the params and headline also go to the pipeline run.
"""

from __future__ import annotations

from pathlib import Path

from lmpipe.core.errors import LmpipeError
from lmpipe.core.io import atomic_dir, write_json
from lmpipe.core.lineage import TAG_HEADLINE_MODEL, upstream_tags
from lmpipe.core.params import load_params
from lmpipe.core.reports import HEADLINE_FILE
from lmpipe.core.stage import run, setup_torch
from lmpipe.core.tracking import stage_run
from lmpipe.evaluate import ensembles, evaluation
from lmpipe.task.selection import select_model
from lmpipe.task.splits import load_split

PROCESSED = Path("data/processed")
BASELINE = Path("models/baseline")
PRETRAINED = Path("models/pretrained")
FINETUNED = Path("models/finetuned")
OUT = Path("reports/evaluate")
ENSEMBLES = Path("models/ensembles")
REPORTS_FINETUNE = Path("reports/finetune")
OUTPUTS = (HEADLINE_FILE, "metrics.json", "comparison.md", "predictions", "roc", "plots")


def main() -> dict:
    params = load_params()
    test = evaluation.load_test_set(PROCESSED)
    models = evaluation.find_models(BASELINE, FINETUNED)
    ensembles.check_ensembles(params.evaluate.ensembles, models)
    if not (PRETRAINED / "config.json").is_file():
        raise LmpipeError(f"{PRETRAINED}/config.json: file not found (run the pretrain stage first)")
    inputs = [str(PROCESSED), str(BASELINE), str(PRETRAINED), str(FINETUNED)]
    transformers = [spec.name for spec in models if spec.kind == "transformer"]
    inputs += [str(spec.path) for spec in models if spec.kind == "transformer"]
    selected, _ = select_model(params.export.model, params.export.selection_metric, transformers, REPORTS_FINETUNE)
    device = setup_torch(params.base.seed, params.base.threads, params.base.device)
    outputs = (*(str(OUT / name) for name in OUTPUTS), str(ENSEMBLES))
    with stage_run("evaluate", params, sections=("*",), inputs=tuple(inputs), outputs=outputs) as tracker:
        result = evaluation.evaluate(
            test,
            models,
            pretrained=PRETRAINED,
            settings=params.evaluate,
            seed=params.base.seed,
            device=device,
            shot_pool=lambda: load_split(PROCESSED, "train", n_labels=len(test.label_names)),  # few-shot examples
        )
        files = {}
        if params.evaluate.ensembles:  # temperatures fit on the val split, scored on the test split
            val = evaluation.load_test_set(PROCESSED, "val")
            files = ensembles.add_ensembles(
                result, models, val, out_dir=ENSEMBLES, settings=params.evaluate, seed=params.base.seed, device=device
            )
        ensembles.write_files(files, ENSEMBLES)
        with atomic_dir(OUT) as tmp:
            head = evaluation.write_reports(result, tmp, curves_root=Path("reports"))
            numbers = evaluation.headline_numbers(result, selected)
            write_json(tmp / HEADLINE_FILE, numbers)
        tracker.log_metrics(evaluation.flat_metrics(head))
        headline = {f"headline.{k}": v for k, v in numbers.items() if isinstance(v, (int, float))}
        tracker.log_metrics(headline)
        tracker.set_tags({TAG_HEADLINE_MODEL: selected})
        tracker.log_to_pipeline(headline, tags={TAG_HEADLINE_MODEL: selected})  # the pipeline run's row in the UI
        if tracker.active:
            tracker.set_tags(upstream_tags(params.base.experiment, inputs))
        tracker.log_input(PROCESSED / "test.parquet", context="test")
        tracker.log_artifact(OUT / "plots", "plots")
        tracker.log_artifact(OUT / "comparison.md")
        tracker.log_artifact(OUT / "metrics.json")
        if files:
            tracker.log_artifact(ENSEMBLES, "ensembles")
    print((OUT / "comparison.md").read_text(encoding="utf-8"))
    return head


if __name__ == "__main__":
    run(main)
