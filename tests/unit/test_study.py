"""studies.pretraining_payoff: budget and recipe scaling, the verdict, the written table."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmpipe.core.params import load_params
from studies import pretraining_payoff as study

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def params():
    return load_params(ROOT / "params.yaml")


def test_budget_scales_steps_and_warmup_and_evaluates_once_at_the_end(params):
    half = study.budget_params(params, 0.5, seed=7)
    loop = params.pretrain.loop
    assert half.pretrain.loop.max_steps == round(loop.max_steps * 0.5)
    assert half.pretrain.loop.eval_every == half.pretrain.loop.max_steps
    assert half.pretrain.optim.warmup_steps == round(params.pretrain.optim.warmup_steps * 0.5)
    assert half.base.seed == 7 and half.pretrain.model == params.pretrain.model


def test_both_arms_follow_the_scratch_recipe_for_at_least_min_steps_and_one_epoch(params, tmp_path):
    recipe = params.finetune.backbones["scratch"]
    small = study.finetune_params(params, tmp_path, "random", 200, seed=1)
    arm = small.finetune.backbones["arm"]
    assert list(small.finetune.backbones) == ["arm"]
    assert (arm.init, arm.lr, arm.max_steps, arm.source) == ("random", recipe.lr, 300, str(tmp_path))
    assert small.finetune.max_train_examples == 200
    big = study.finetune_params(params, tmp_path, "pretrained", 100_000, seed=1).finetune
    assert big.backbones["arm"].max_steps == -(-100_000 // params.finetune.batch_size)  # one epoch


def row(budget, labels, diff, low, high):
    return {
        "seed": 42,
        "budget": budget,
        "pretrain_steps": 100,
        "pretrain_tokens": 409600,
        "pretrain_minutes": 1.0,
        "perplexity_vs_unigram": 0.3,
        "labels": labels,
        "finetune_steps": 300,
        "pretrained_accuracy": 0.8 + diff,
        "random_accuracy": 0.8,
        "difference": diff,
        "ci_low": low,
        "ci_high": high,
        "mcnemar_p": 0.01,
    }


def test_verdict_lists_significant_wins_and_losses_per_label_count():
    rows = [
        row(0.5, 200, 0.01, -0.01, 0.03),
        row(1.0, 200, 0.03, 0.01, 0.05),
        row(2.0, 200, -0.05, -0.07, -0.03),
        row(1.0, 2000, 0.0, -0.02, 0.02),
    ]
    text = study.verdict(rows)
    assert "- 200 labels: pretrained wins at 1x; loses at 2x; no significant difference in 1 of 3." in text
    assert (
        "- 2000 labels: pretrained wins at no budget; loses at no budget; no significant difference in 1 of 1." in text
    )
    assert "did not win" in study.verdict(rows[3:]) and "did not win" not in text


def test_outputs_are_a_csv_a_markdown_table_and_a_plot(tmp_path, monkeypatch):
    monkeypatch.setattr(study, "OUT", tmp_path)
    study.write_outputs([row(0.5, 200, 0.01, -0.01, 0.03), row(1.0, "all", 0.03, 0.01, 0.05)])
    table = (tmp_path / "pretraining_payoff.md").read_text()
    assert "| 42 | 1.0x | 100 | 409,600 |" in table and "+0.0300 [+0.0100, +0.0500]" in table
    assert (tmp_path / "pretraining_payoff.csv").read_text().startswith("seed,budget,")
    assert (tmp_path / "pretraining_payoff.png").read_bytes()[:4] == b"\x89PNG"
