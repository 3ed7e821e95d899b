"""A stage's report files: results in `reports/<stage>/metrics.json`, timings under `reports/perf/`.

Results depend only on code, data and params, so a rerun rewrites `metrics.json` byte for byte.
`perf.json` holds what the machine and its load decide (seconds, tokens/s, MB/s, MFU, latency,
the measured peak FLOP/s), how the run went (the step it resumed from) and the numeric
environment it ran in (lmpipe.core.numerics.record: CPU, kernels, pins). Kept apart, in their
own folder that no stage reads, a rerun of the same code and data changes only the perf files in
`dvc.lock` (and reruns nothing downstream), and `dvc metrics diff` never shows timing noise next
to results. Both go to MLflow, where speed is compared across runs.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from lmpipe.core import numerics
from lmpipe.core.io import write_json

METRICS_FILE = "metrics.json"
PERF_DIR = Path("reports/perf")
HEADLINE_FILE = "headline.json"  # the few numbers `dvc metrics show` / `dvc exp show` display
# a key (at any depth) naming a timing, a throughput or a resume point, or a figure onnxruntime
# measured (its kernels follow the CPU, with no setting to pin them: logit differences and int8
# accuracy change in their last digits from machine to machine); its whole subtree is perf
PERF_KEY = re.compile(
    r"seconds|_per_s$|^mfu$|^latency|^peak_flops|^resumed_from$|^(onnx|int8)_(accuracy|agreement|max_abs_logit_diff)"
)


def split_perf(metrics: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(results, perf): the entries whose key matches PERF_KEY, at any depth, go to perf."""
    results: dict[str, Any] = {}
    perf: dict[str, Any] = {}
    for key, value in metrics.items():
        if PERF_KEY.search(key):
            perf[key] = value
        elif isinstance(value, dict):
            inner, inner_perf = split_perf(value)
            results[key] = inner
            if inner_perf:
                perf[key] = inner_perf
        else:
            results[key] = value
    return results, perf


def perf_file(stage: str, suffix: str = ".json") -> Path:
    """`reports/perf/<stage>.json` (`finetune@minilm` -> `reports/perf/finetune/minilm.json`)."""
    return PERF_DIR / f"{stage.replace('@', '/')}{suffix}"


def perf_curve_file(stage: str) -> Path:
    """`reports/perf/<stage>_curve.csv`: tokens/s and MFU per logged step."""
    return perf_file(stage, "_curve.csv")


def write_stage_reports(stage: str, folder: str | Path, metrics: dict[str, Any]) -> dict[str, Any]:
    """Write `<folder>/metrics.json` (results) and the stage's perf file (timings); return the results."""
    results, perf = split_perf(metrics)
    write_json(Path(folder) / METRICS_FILE, results)
    write_json(perf_file(stage), {**perf, "numerics": numerics.record()})
    return results
