"""Train the TF-IDF + logistic-regression baseline: `python -m stages.baseline`.

The bar every transformer must clear: on IMDB it is hard to beat on a CPU budget.

Reads:  data/processed/{train,val}.parquet + labels.json, params `base.seed` and `baseline`.
Writes: models/baseline/model.json (no pickle: vocabulary, idf, coefficients, intercepts, labels,
        params; `lmpipe.baseline.baseline.load` reads it), reports/baseline/metrics.json.

Features:
- word 1..ngram_max TF-IDF (min_df, max_features, sublinear tf) + L2 logistic regression (C);
- trained on the whole train split, scored on the val split (accuracy, macro F1, log loss);
- byte-stable JSON model file that reproduces the trained pipeline's probabilities exactly;
- MLflow run `baseline` with params, validation metrics and lineage tags.
"""

from __future__ import annotations

from pathlib import Path

from lmpipe.baseline import baseline
from lmpipe.core.io import atomic_dir
from lmpipe.core.params import load_params
from lmpipe.core.reports import write_stage_reports
from lmpipe.core.stage import run
from lmpipe.core.tracking import stage_run
from lmpipe.task.splits import check_processed

PROCESSED = Path("data/processed")
MODEL_DIR = Path("models/baseline")
METRICS = Path("reports/baseline/metrics.json")


def main() -> None:
    params = load_params()
    check_processed(PROCESSED)
    with stage_run(
        "baseline", params, sections=("baseline",), inputs=(str(PROCESSED),), outputs=(str(MODEL_DIR),)
    ) as tracker:
        tracker.log_input(PROCESSED, context="train")
        blob, metrics = baseline.run_baseline(PROCESSED, params.baseline, params.base.seed)
        with atomic_dir(MODEL_DIR) as tmp:
            baseline.save(blob, tmp)
        write_stage_reports("baseline", METRICS.parent, metrics)
        tracker.log_metrics({k: float(v) for k, v in metrics.items()})


if __name__ == "__main__":
    run(main)
