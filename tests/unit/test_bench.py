"""bench/: every benchmark side runs a micro configuration, so the bench code cannot rot silently.

Nothing here is timed against a threshold: the checks are that each side runs through the
project's real code and its peer, and that the two sides of a comparison did the same work
(same losses at the first step, same token counts, same logits).
"""

from __future__ import annotations

import math

import pytest
import torch

from bench import (
    common,
    finetune_throughput,
    fingerprint,
    inference,
    mlm_throughput,
    numerics_cost,
    profile_pretrain,
    run,
    tokenize_speed,
)


@pytest.fixture(autouse=True)
def restore_torch_state():
    """The sides call lmpipe.core.stage.setup_torch (threads, deterministic kernels): undo it."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


def test_mlm_sides_do_the_same_work_and_report_throughput():
    config = mlm_throughput.default_config(quick=True)
    results = {side: mlm_throughput.run_side(side, config) for side in mlm_throughput.SIDES}
    for side, r in results.items():
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and r["peak_rss_mb"] > 0, side
        assert len(r["step_seconds"]) == config["steps"]
        assert all(math.isfinite(r[k]) for k in ("loss_first", "loss_mean", "loss_last")), side
    # same weights, same windows, same masks: the masked-only head's loss IS the full head's
    assert results["ours"]["loss_first"] == pytest.approx(results["ours_full"]["loss_first"], rel=1e-5)
    # the peer masks with its own generator: same magnitude (random ids: ~ln(vocab) for both)
    assert results["peer"]["loss_first"] == pytest.approx(math.log(config["vocab_size"]), rel=0.1)
    assert results["ours"]["loss_first"] == pytest.approx(math.log(config["vocab_size"]), rel=0.1)
    assert results["ours"]["flops_per_token"] < results["ours_full"]["flops_per_token"]


def test_mlm_fused_option_reaches_the_loop():
    config = {**mlm_throughput.default_config(quick=True), "fused": True}
    result = mlm_throughput.run_side("ours", config)
    assert result["optimizer"] == "AdamW fused" and math.isfinite(result["loss_mean"])


def test_numerics_cost_sides_run_the_loops_under_each_mode_in_a_fresh_process():
    config = numerics_cost.default_config(quick=True)
    portable = common.run_child(numerics_cost.MODULE, "pretrain_portable", {**config, "numerics": "portable"})
    fast = common.run_child(numerics_cost.MODULE, "finetune_fast", {**config, "numerics": "fast"})
    assert portable["numerics"] == "AVX2" and portable["tokens_per_s"] > 0
    assert fast["numerics"] == torch.backends.cpu.get_cpu_capability() and fast["tokens_per_s"] > 0


def test_fingerprint_compares_a_machine_with_every_earlier_one():
    line = {"portable": {"mm": "a"}, "fast": {"mm": "b"}}
    earlier = [
        {
            "date": "2026-12-01",
            "cpu": {"model": "AVX2 box"},
            "peak_gflops": 67.0,
            "portable": {"mm": "a"},
            "fast": {"mm": "c"},
        },
        {
            "date": "2026-12-02",
            "cpu": {"model": "Odd box"},
            "peak_gflops": 157.4,
            "portable": {"mm": "x"},
            "fast": {"mm": "b"},
        },
    ]
    assert fingerprint.compare(line, earlier) == [
        "2026-12-01 AVX2 box (67 GFLOP/s): portable SAME, fast different",
        "2026-12-02 Odd box (157 GFLOP/s): portable DIFFERENT, fast same",
    ]


def test_finetune_sides_train_on_the_same_examples_and_count_real_tokens():
    config = finetune_throughput.default_config(quick=True)
    results = {side: finetune_throughput.run_side(side, config) for side in finetune_throughput.SIDES}
    epoch = {r["real_tokens_epoch"] for r in results.values()}
    assert len(epoch) == 1  # one epoch of the same encoded examples on every side, whatever the order
    for side, r in results.items():
        assert r["tokens_per_s"] > 0 and r["tokens_per_cpu_s"] > 0 and r["peak_rss_mb"] > 0, side
        assert r["positions_per_s"] >= r["tokens_per_s"]  # pads are computed, never counted as tokens
        assert len(r["step_seconds"]) == config["steps"]
        assert all(math.isfinite(r[k]) for k in ("loss_first", "loss_mean", "val_loss", "val_accuracy")), side
        # same model, same seed: two random classes start near ln 2 on every side
        assert r["loss_first"] == pytest.approx(math.log(2), abs=0.5), side
    assert results["ours"]["sampling"].startswith("length buckets")
    assert results["ours_random"]["sampling"] == "random batches"
    assert results["peer_grouped"]["sampling"] == "group_by_length"
    # bucketing never pads more than random batches of the same examples
    assert results["ours"]["pad_share"] <= results["ours_random"]["pad_share"]


def test_finetune_cli_flags_set_the_backbone_and_the_fused_optimizer(monkeypatch):
    monkeypatch.setattr(finetune_throughput, "BACKBONE", "scratch")
    monkeypatch.setattr(finetune_throughput, "FUSED", False)
    monkeypatch.setattr(finetune_throughput, "THREADS", common.THREADS)
    rest = finetune_throughput.own_args(["--backbone", "minilm", "--fused", "--repeats", "1", "--threads", "1"])
    assert rest == ["--repeats", "1"]
    config = finetune_throughput.default_config()
    assert config["backbone"] == "minilm" and config["source"] == "models/minilm" and config["fused"] is True
    assert config["threads"] == 1


def test_profile_attributes_phases_to_steps_and_restores_what_it_wraps():
    import torch.nn.utils

    original = torch.nn.utils.clip_grad_norm_
    config = mlm_throughput.default_config(quick=True)
    result = profile_pretrain.run_side("ours", config)
    assert torch.nn.utils.clip_grad_norm_ is original
    ms = result["median_ms"]
    assert ms["step"] > 0 and all(ms[p] >= 0 for p in profile_pretrain.PHASES)
    assert ms["backward"] > 0 and ms["optimizer"] > 0 and ms["forward + loss"] > 0
    events = [("data", 0.5, 0.1, 0.1), ("backward", 1.2, 0.3, 0.3), ("optimizer", 2.5, 1.0, 1.0)]
    steps = profile_pretrain.per_step([0.0, 1.0, 2.0], events)
    assert steps[0]["data"] == 0.1 and steps[1]["backward"] == 0.3 and steps[1]["optimizer"] == 0.0
    assert steps[1]["other"] == pytest.approx(0.7)


def test_tokenize_sides_produce_the_same_tokens(tmp_path):
    config = {**tokenize_speed.default_config(quick=True), "tokenizer_dir": str(tmp_path / "tok")}
    trained = {side: tokenize_speed.run_side(side, config) for side in tokenize_speed.TRAIN_SIDES}
    assert all(r["train_seconds"] > 0 and r["vocab"] <= config["vocab_size"] for r in trained.values())
    assert (tmp_path / "tok" / "tokenizer.json").is_file()
    encoded = {side: tokenize_speed.run_side(side, config) for side in tokenize_speed.ENCODE_SIDES}
    assert encoded["encode_ours"]["tokens"] == encoded["encode_peer"]["tokens"] > 0
    assert all(r["mb_per_s"] > 0 for r in encoded.values())


def test_inference_backends_time_the_same_model(tmp_path):
    config = inference.default_config(quick=True)
    facts = inference.prepare_standin(config, tmp_path)
    assert "stand-in" in facts["model"]
    config["model_dir"] = str(tmp_path)
    results = {side: inference.run_side(side, config) for side in inference.BACKENDS}
    for side, r in results.items():
        assert r["batch1_ms"] > 0 and r["batch32_seq_per_s"] > 0, side
    torch_logits = torch.tensor(results["torch"]["logits"])
    torch.testing.assert_close(torch.tensor(results["onnx"]["logits"]), torch_logits, atol=1e-4, rtol=1e-4)
    assert inference._max_diff(results["onnx-int8"]["logits"], results["torch"]["logits"]) < 0.1


def test_results_table_reports_ratios_and_flags_high_load():
    row = common.row("demo", "speed", "ours", "theirs", 3.0, 2.0, "items/s", "higher", "note")
    assert row["ratio"] == 1.5
    results = {
        "command": "python -m bench.run demo",
        "revision": "abc",
        "seconds": 1.0,
        "machine": {**common.machine_facts(), "load_average_at_start": [3.0, 2.0, 1.0]},
        "benchmarks": {
            "demo": {
                "rows": [row],
                "description": "a demo",
                "seconds": 1.0,
                "repeats": 2,
                "load_before": [common.HIGH_LOAD + 1, 1.0, 1.0],
            }
        },
    }
    text = run.render_markdown(results)
    assert "| demo: speed | ours | theirs | 3.00 | 2.00 | **1.50** | items/s | higher | note |" in text
    assert "load exceeded" in text
    results["benchmarks"]["demo"]["load_before"] = [0.5, 0.5, 0.5]
    assert "load exceeded" not in run.render_markdown(results)
