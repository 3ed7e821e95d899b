"""Params: every shipped file validates; bad values fail naming the key."""

from __future__ import annotations

import copy

import pytest
import yaml

from lmpipe.core.errors import LmpipeError
from lmpipe.core.params import Params, flatten, load_params, parse_params, unset_keys


@pytest.fixture
def raw(project_root):
    return yaml.safe_load((project_root / "params.yaml").read_text())


def test_shipped_params_file_validates(project_root):
    params = load_params(project_root / "params.yaml")
    assert params.fetch.source == "imdb"
    assert set(params.finetune.backbones) >= {"scratch", "minilm"}


def test_the_shipped_params_file_spells_out_every_field(raw):
    # a key left to its schema default is invisible to DVC: a changed default would change runs silently
    assert unset_keys(raw) == []


def test_unset_keys_finds_a_default_at_every_depth(raw):
    edited = copy.deepcopy(raw)
    del edited["base"]["peak_flops"]  # a top-level section's field
    del edited["finetune"]["lora"]["dropout"]  # a nested section's
    del edited["finetune"]["backbones"]["minilm"]["init"]  # an entry of a mapping of sections
    del edited["evaluate"]  # a whole section
    got = unset_keys(edited)
    assert {"base.peak_flops", "finetune.lora.dropout", "finetune.backbones.minilm.init", "evaluate"} == set(got)


def test_params_check_lists_the_keys_left_to_a_default(raw, tmp_path, capsys):
    from lmpipe.cli.main import main

    edited = copy.deepcopy(raw)
    del edited["finetune"]["lora"]["dropout"]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(edited))
    assert main(["params", "check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "1 key(s) left to the schema default" in out and out.rstrip().endswith("finetune.lora.dropout")


def test_every_field_has_a_docstring():
    def walk(model, prefix=""):
        for name, info in model.model_fields.items():
            assert info.description, f"{prefix}{name} has no docstring"
            ann = info.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                walk(ann, f"{prefix}{name}.")

    for name, info in Params.model_fields.items():
        walk(info.annotation, f"{name}.")


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda r: r["finetune"]["lora"].update(rank=0), "finetune.lora.rank must be >= 1 (got 0)"),
        (lambda r: r["tokenize"].update(algo="bpe"), "tokenize.algo is not a known key"),
        (lambda r: r["tokenize"].update(algorithm="sentencepiece"), "tokenize.algorithm must be one of"),
        (lambda r: r["preprocess"].update(val_fraction=0.7), "preprocess.val_fraction must be < 0.5"),
        (lambda r: r["base"].update(seed="abc"), "base.seed"),
        (lambda r: r["pretrain"]["model"].update(num_heads=3), "divisible by num_heads"),
        (
            lambda r: r["export"].update(model="gpt"),
            "export.model must be one of ['best', 'scratch', 'random', 'minilm']",
        ),
        (lambda r: r["fetch"]["packages"]["imdb"].update(sha256="xyz"), "fetch.packages.imdb.sha256"),
        (lambda r: r.update(extra={}), "extra is not a known key"),
    ],
)
def test_bad_value_names_the_key(raw, mutate, expected):
    bad = copy.deepcopy(raw)
    mutate(bad)
    with pytest.raises(LmpipeError) as err:
        parse_params(bad)
    assert expected in str(err.value)
    assert str(err.value).startswith("params.yaml: ")
    assert "\n" not in str(err.value)


def test_missing_and_malformed_files_are_clear(tmp_path):
    with pytest.raises(LmpipeError, match="file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("base: [unclosed\n")
    with pytest.raises(LmpipeError, match="not valid YAML"):
        load_params(bad)


def test_flatten_gives_dotted_keys(project_root):
    flat = flatten(load_params(project_root / "params.yaml"))
    assert flat["pretrain.optim.lr"] == pytest.approx(2e-3)
    assert flat["finetune.backbones.random.init"] == "random"
    assert flat["finetune.backbones.minilm.source"] == "models/minilm"
