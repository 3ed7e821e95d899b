"""studies.toolbox: every method is a valid set of `-S` overrides, and the table it writes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lmpipe.core.params import Params
from studies import toolbox

ROOT = Path(__file__).resolve().parents[2]


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """What `dvc exp run -S key=value` does to params.yaml (YAML-typed value at a dotted key)."""
    for override in overrides:
        key, value = override.split("=", 1)
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            assert part in node, f"{override}: no section {part!r} in params.yaml"
            node = node[part]
        assert leaf in node, f"{override}: no key {leaf!r} in params.yaml (dvc exp run would add it)"
        node[leaf] = yaml.safe_load(value)
    return raw


@pytest.mark.parametrize("backbone", ["scratch", "minilm"])
def test_every_method_is_a_valid_override_of_the_shipped_params(backbone):
    for name, overrides in toolbox.methods(backbone).items():
        raw = apply_overrides(yaml.safe_load((ROOT / "params.yaml").read_text()), overrides)
        params = Params.model_validate(raw)  # raises, naming the key, on a bad override
        if name not in ("full", "fgm", "augment"):
            assert params.finetune.backbones[backbone].mode == name
    assert toolbox.methods(backbone)["full"] == []


def test_the_table_shows_accuracy_with_ci_and_a_refused_method_with_its_error():
    rows = [
        {
            "method": "adapter",
            "overrides": ["finetune.backbones.scratch.mode=adapter"],
            "status": "ok",
            "accuracy": 0.8123,
            "accuracy_ci": [0.795, 0.829],
            "f1": 0.81,
            "trainable_params": 50178,
            "trainable_share": 0.0334,
            "seconds_per_step": 0.0712,
            "peak_rss_mb": 812.4,
        },
        {"method": "prefix", "overrides": ["finetune.backbones.scratch.mode=prefix"], "status": "no key/value cache"},
    ]
    table = toolbox.markdown(rows, "scratch", "make toolbox")
    assert (
        "| adapter | `finetune.backbones.scratch.mode=adapter` | 0.8123 [0.7950, 0.8290] | 0.8100 | 50,178 |" in table
    )
    assert "3.34% | 0.071 | 812 |" in table
    assert "| prefix | `finetune.backbones.scratch.mode=prefix` | refused: no key/value cache |" in table


def test_unknown_methods_are_named():
    with pytest.raises(SystemExit):
        toolbox.main(["--methods", "full,dropout"])
