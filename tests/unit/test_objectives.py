"""studies.objectives: every arm is a valid override of the shipped params, the pairing, the table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from lmpipe.core.params import Params
from studies import objectives

from .test_toolbox import apply_overrides

ROOT = Path(__file__).resolve().parents[2]


def test_every_arm_is_a_valid_override_and_says_what_it_changes():
    shipped = yaml.safe_load((ROOT / "params.yaml").read_text())
    for name, arm in objectives.arms().items():
        params = Params.model_validate(
            apply_overrides(yaml.safe_load((ROOT / "params.yaml").read_text()), arm["overrides"])
        )
        assert params.pretrain.objective == arm["objective"], name
        assert params.finetune.max_train_examples == arm["labels"], name
        assert params.finetune.backbones[objectives.BACKBONE].mode == arm["mode"], name
        assert (params.finetune.early_stopping.patience >= 10) == (arm["stop"] == "none"), name
        if arm["objective"] == "clm":
            assert params.pretrain.model.family == "llama"
            assert params.pretrain.loop.max_steps == objectives.CLM_STEPS
    assert objectives.arms()["mlm-8k"]["overrides"] == []
    assert shipped["pretrain"]["loop"]["max_steps"] == 1400  # CLM_STEPS is derived from it (see the comment)


def _arm(name, objective, labels, mode, correct, prompted=None, stop="early"):
    rows = {
        "scratch": {"accuracy": correct.mean(), "correct": correct},
        "random": {"accuracy": 0.5, "correct": np.zeros_like(correct)},
    }
    for row, values in (prompted or {}).items():
        rows[row] = {"accuracy": values.mean(), "correct": values}
    for row in rows.values():
        row.update(accuracy_ci_low=0.1, accuracy_ci_high=0.9, f1=0.5, mcnemar_p=0.01)
    return {
        "arm": name,
        "objective": objective,
        "labels": labels,
        "mode": mode,
        "stop": stop,
        "rows": rows,
        "bootstrap": (200, 0),
        "steps": 10,
        "tokens": 1000,
        "tflop": 1.0,
        "ppl": 100.0,
        "vs_unigram": 0.5,
        "vs_bigram": 1.5 if objective == "clm" else None,
        "tokens_per_s": 1000.0,
        "mfu": 0.5,
    }


def test_decoder_rows_are_paired_with_the_encoder_of_the_same_labels_and_mode():
    n = 200
    encoder_8k = np.arange(n) % 2 == 0  # right on even examples: 0.5
    encoder_2k = np.arange(n) < 40  # 0.2
    decoder_8k = np.ones(n, dtype=bool)  # 1.0: +0.5 against the encoder on 8k labels
    decoder_2k = np.arange(n) < 60  # 0.3: +0.1 against the encoder on 2k labels, only wins
    chance = np.arange(n) < 100
    found = {
        "mlm-8k": _arm("mlm-8k", "mlm", 8000, "full", encoder_8k),
        "mlm-2k": _arm("mlm-2k", "mlm", 2000, "full", encoder_2k),
        "clm-8k": _arm("clm-8k", "clm", 8000, "full", decoder_8k, {"clm_zero_shot": chance, "clm_few_shot": chance}),
        "clm-2k": _arm("clm-2k", "clm", 2000, "full", decoder_2k, {"clm_zero_shot": chance}),
        "clm-8k-lora": _arm("clm-8k-lora", "clm", 8000, "lora", decoder_8k),
        "mlm-8k-patient": _arm("mlm-8k-patient", "mlm", 8000, "full", decoder_8k, stop="none"),
        "clm-8k-patient": _arm("clm-8k-patient", "clm", 8000, "full", encoder_2k, {"clm_zero_shot": chance}, "none"),
    }
    rows = {(r["arm"], r["row"]): r for r in objectives.compare(found)}

    assert rows[("clm-8k", "scratch")]["vs_encoder"]["diff"] == pytest.approx(0.5)
    assert rows[("clm-8k", "scratch")]["vs_encoder"]["p"] < 1e-6
    two = rows[("clm-2k", "scratch")]["vs_encoder"]
    assert two["diff"] == pytest.approx(0.1) and (two["wins"], two["losses"]) == (20, 0)
    assert two["diff_low"] > 0 and two["diff_high"] <= 0.2
    assert rows[("clm-8k", "random")]["vs_encoder"]["diff"] == 0.0  # against the encoder's random twin
    # the prompts face the encoder on 8,000 labels, once (the 2k arm's copy is the same prompts)
    assert rows[("clm-8k", "clm_zero_shot")]["vs_encoder"]["diff"] == pytest.approx(0.0)
    assert ("clm-2k", "clm_zero_shot") not in rows
    # no encoder arm in LoRA mode was run: the LoRA row stands unpaired, and has no random twin
    assert "vs_encoder" not in rows[("clm-8k-lora", "scratch")]
    assert ("clm-8k-lora", "random") not in rows
    assert all("vs_encoder" not in r for r in rows.values() if r["objective"] == "mlm")
    # without early stopping, against the encoder trained without it too: 0.2 - 1.0
    assert rows[("clm-8k-patient", "scratch")]["vs_encoder"]["diff"] == pytest.approx(-0.8)
    assert rows[("clm-8k-patient", "scratch")]["how"] == "full, no early stop"
    assert ("clm-8k-patient", "clm_zero_shot") not in rows  # the prompts are the shipped arm's

    table = objectives.markdown(found, list(rows.values()), "make study-objectives")
    assert "| clm | 10 | 1,000 | 1.0 | 100.0 | 0.50x | 1.50x | 1,000 | 0.50 |" in table
    assert "| mlm | 10 | 1,000 | 1.0 | 100.0 | 0.50x | n/a |" in table
    assert "| mlm-8k | scratch (full) | 8,000 | 0.5000 [0.1000, 0.9000] | 0.5000 | 0.01 | - | - |" in table
    assert "| clm-8k | clm_zero_shot (prompted) | prompt | 0.5000 [0.1000, 0.9000] |" in table
    assert "| clm-2k | scratch (full) | 2,000 | 0.3000 [0.1000, 0.9000] | 0.5000 | 0.01 | +0.1000 [" in table


def test_predictions_csv_gives_per_example_correctness():
    text = "actual,predicted,prob_negative,prob_positive\nnegative,negative,0.6,0.4\npositive,negative,0.7,0.3\n"
    assert objectives.correct_of(text).tolist() == [True, False]
    with pytest.raises(SystemExit, match="actual/predicted"):
        objectives.correct_of("label,guess\na,a\n")


def test_unknown_arms_are_named():
    with pytest.raises(SystemExit):
        objectives.main(["--only", "mlm-8k,gpt-3"])
