"""preprocess: clean, deduplicate and split the raw corpus into train / val / test.

Reads:  data/raw/ (through its manifest.json), params `base.seed` and `preprocess`.
Writes: data/processed/ = train.parquet, val.parquet, test.parquet (columns `text`, cleaned,
        and `label`, int64 id), labels.json (`{"labels": [...]}`, index = id), corpus.txt
        (the train split only, one document per line: the pretraining corpus);
        reports/preprocess/metrics.json (data-quality figures).

Features:
- CSV (with the delimiter fetch recorded), TSV, JSON Lines, Parquet or one folder per label
- validation with one-line errors naming the file and row: empty or malformed file, missing
  text/label column, bytes that are not UTF-8, a label outside `preprocess.labels`
- cleaning: `<br />` -> space, other HTML tags removed, entities unescaped, Unicode NFKC,
  whitespace collapsed; texts outside [min_chars, max_chars] dropped, counted in characters or,
  with `length_unit: words`, in words (each Han or kana character one word: Chinese and
  Japanese have no spaces)
- exact duplicates removed after cleaning (the first kept; a text under two labels dropped
  entirely), so no text can sit in two splits
- stratified, seeded split; per-split caps as stratified subsamples; byte-identical outputs
- metrics: rows in/out, drops per reason, per split rows, label shares, length quantiles
"""

from __future__ import annotations

import re
from pathlib import Path

from lmpipe.core.params import flatten, load_params
from lmpipe.core.reports import write_stage_reports
from lmpipe.core.stage import run
from lmpipe.core.tracking import stage_run
from lmpipe.preprocess.cleaning import SPLITS, preprocess, read_manifest

RAW, OUT = "data/raw", "data/processed"
METRICS = "reports/preprocess/metrics.json"


def main() -> None:
    params = load_params()
    read_manifest(RAW)
    with stage_run("preprocess", params, sections=("preprocess",), inputs=(RAW,), outputs=(OUT, METRICS)) as tracker:
        tracker.log_input(RAW, context="raw")
        metrics = preprocess(RAW, OUT, params.preprocess, params.base.seed)
        write_stage_reports("preprocess", Path(METRICS).parent, metrics)
        tracker.log_metrics({re.sub(r"[^\w./ -]", "_", k): v for k, v in flatten(metrics).items()})
        for split in SPLITS:
            tracker.log_input(f"{OUT}/{split}.parquet", context=split)
        tracker.log_artifact(f"{OUT}/labels.json")


if __name__ == "__main__":
    run(main)
