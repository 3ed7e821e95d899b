"""lmpipe.core.reports: timings and onnxruntime's figures go to reports/perf/, results stay put, at any depth."""

from __future__ import annotations

from lmpipe.core.io import read_json
from lmpipe.core.reports import perf_curve_file, perf_file, split_perf, write_stage_reports


def test_timings_leave_the_results_at_any_depth():
    metrics = {
        "val_accuracy": 0.8,
        "tokens_per_s": 1e4,
        "train_seconds": 12.0,
        "mfu": 0.3,
        "resumed_from": 0,
        "peak_flops_source": "probe",
        "latency_ms": {"torch": {"batch1": 3.0}},
        "parity": {"torch_accuracy": 0.87, "int8_accuracy": 0.86, "onnx_max_abs_logit_diff": 2e-6, "fit_seconds": 1.0},
        "steps": 500,
    }
    results, perf = split_perf(metrics)
    # torch decides its accuracy on every machine; onnxruntime's kernels follow the CPU, so its figures are perf
    assert results == {"val_accuracy": 0.8, "parity": {"torch_accuracy": 0.87}, "steps": 500}
    assert perf == {
        "tokens_per_s": 1e4,
        "train_seconds": 12.0,
        "mfu": 0.3,
        "resumed_from": 0,
        "peak_flops_source": "probe",
        "latency_ms": {"torch": {"batch1": 3.0}},
        "parity": {"int8_accuracy": 0.86, "onnx_max_abs_logit_diff": 2e-6, "fit_seconds": 1.0},
    }


def test_stage_reports_land_in_two_places(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert perf_file("finetune@minilm").as_posix() == "reports/perf/finetune/minilm.json"
    assert perf_curve_file("pretrain").as_posix() == "reports/perf/pretrain_curve.csv"
    results = write_stage_reports("finetune@minilm", "reports/finetune/minilm", {"val_f1": 0.5, "tokens_per_s": 9.0})
    assert results == {"val_f1": 0.5} == read_json("reports/finetune/minilm/metrics.json")
    perf = read_json("reports/perf/finetune/minilm.json")
    assert perf["tokens_per_s"] == 9.0 and set(perf) == {"tokens_per_s", "numerics"}
    assert perf["numerics"]["cpu"]["model"] and "mode" in perf["numerics"]  # the machine that measured it
