"""bench.clm_throughput: both sides run a micro configuration, so the bench code cannot rot silently.

Nothing is timed against a threshold: the checks are that each side runs through the project's
real causal-LM code and the HF Trainer, and that both did the same work (the same tokens, the
same loss before the first update: same weights, same windows).
"""

from __future__ import annotations

import math

import pytest
import torch

from bench import clm_throughput


@pytest.fixture(autouse=True)
def restore_torch_state():
    """The sides call lmpipe.core.stage.setup_torch (threads, deterministic kernels): undo it."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


def test_clm_sides_train_on_the_same_tokens_and_report_throughput():
    config = clm_throughput.default_config(quick=True)
    assert config["arch"]["family"] == "llama" and "mask_prob" not in config
    results = {side: clm_throughput.run_side(side, config) for side in clm_throughput.SIDES}
    steps = config["warmup_steps"] + config["steps"]
    for side, r in results.items():
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and r["peak_rss_mb"] > 0, side
        assert len(r["step_seconds"]) == config["steps"] and r["steps_measured"] == config["steps"], side
        assert all(math.isfinite(r[k]) for k in ("loss_first", "loss_mean", "loss_last")), side
        # random ids: an untrained decoder starts near ln(vocab)
        assert r["loss_first"] == pytest.approx(math.log(config["vocab_size"]), rel=0.1), side
    # every side counted B x max_length tokens a step, where it counts them itself
    assert results["ours"]["tokens_run"] == results["peer"]["tokens_run"]
    assert results["ours"]["tokens_run"] == steps * config["batch_size"] * config["arch"]["max_length"]
    # same weights, same windows, no update yet: the same loss
    assert results["ours"]["loss_first"] == pytest.approx(results["peer"]["loss_first"], rel=1e-5)
    # the peer's head also runs on the last position
    assert results["ours"]["flops_per_token"] < results["peer"]["flops_per_token"]
