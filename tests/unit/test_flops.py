"""lmpipe.train.flops: the FLOPs-per-token formula against a hand count, and the peak probe."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lmpipe.train import flops

pytestmark = pytest.mark.usefixtures("one_thread")


def test_encoder_formula_matches_a_hand_count_of_every_matmul():
    L, H, FF, T = 2, 32, 64, 16
    # forward, per token and layer: Q,K,V,O projections 4 x 2*H*H; feed-forward 2*H*FF + 2*FF*H;
    # attention scores QK^T 2*T*H and weighted sum AV 2*T*H. Training = 3 x forward.
    forward = L * (4 * 2 * H * H + 2 * 2 * H * FF + 2 * 2 * T * H)
    assert (
        flops.encoder_flops_per_token(L, H, FF, T) == 3 * forward == 6 * 2 * (4 * H * H + 2 * H * FF) + 12 * L * T * H
    )


def test_mlm_head_is_counted_only_on_the_share_of_positions_it_sees():
    cfg = SimpleNamespace(num_hidden_layers=2, hidden_size=32, intermediate_size=64, vocab_size=100)
    encoder = flops.encoder_flops_per_token(2, 32, 64, 16)
    head_all = 3 * (2 * 32 * 32 + 2 * 32 * 100)  # transform dense + decoder, forward x 3
    assert flops.mlm_flops_per_token(cfg, 16, 1.0) == encoder + head_all
    assert flops.mlm_flops_per_token(cfg, 16, 0.15) == pytest.approx(encoder + 0.15 * head_all)


@pytest.mark.parametrize("family", ["bert", "roformer", "modernbert"])
def test_formula_agrees_with_torch_flop_counter_on_each_family(family):
    from torch.utils.flop_counter import FlopCounterMode

    from lmpipe.core.params import Architecture
    from lmpipe.mlm import models

    arch = Architecture(
        family=family, num_layers=2, hidden_size=32, num_heads=2, intermediate_size=64, max_length=16, dropout=0.0
    )
    config = models.mlm_config(arch, 100, {"pad": 0, "cls": 2, "sep": 3})
    config._attn_implementation = "eager"  # FlopCounterMode does not see inside CPU SDPA kernels
    mlm = models.build_mlm(config, 0)
    ids = torch.randint(5, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    labels = torch.full_like(ids, -100)
    labels[:, 3] = ids[:, 3]  # 2 of 32 positions reach the head
    with FlopCounterMode(display=False) as counter:
        models.masked_lm_loss(mlm, ids, labels).backward()
    per_token = counter.get_total_flops() / ids.numel()
    assert per_token == pytest.approx(flops.mlm_flops_per_token(mlm.config, 16, 2 / 32), rel=0.01)


def test_peak_probe_measures_a_positive_rate():
    peak = flops.measure_peak_flops(torch.device("cpu"), size=128, seconds=0.05)
    assert 1e6 < peak < 1e15


def test_params_peak_overrides_the_probe():
    assert flops.peak_flops(1.5e11, torch.device("cpu"), "fp32") == (1.5e11, "params")


def test_mfu_divides_achieved_by_peak_over_all_devices():
    assert flops.mfu(1000.0, 2e6, 4e9) == pytest.approx(0.5)
    assert flops.mfu(1000.0, 2e6, 4e9, devices=2) == pytest.approx(0.25)
    assert flops.mfu(1000.0, None, 4e9) is None and flops.mfu(float("nan"), 2e6, 4e9) is None
