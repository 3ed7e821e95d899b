"""Atomic writes: an output is complete or absent, never half-written."""

from __future__ import annotations

import pytest

from lmpipe.core.io import atomic_dir, atomic_file, load_yaml, read_json, write_json


def test_atomic_file_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError):
        with atomic_file(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_replaces_old_output_whole(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.bin").write_text("old")
    with atomic_dir(target) as tmp:
        (tmp / "new.bin").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.bin"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_atomic_dir_keeps_old_output_when_the_new_one_fails(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.bin").write_text("old")
    with pytest.raises(ValueError):
        with atomic_dir(target) as tmp:
            (tmp / "half.bin").write_text("half")
            raise ValueError("bad input")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert (target / "old.bin").read_text() == "old"


def test_write_json_is_byte_stable(tmp_path):
    write_json(tmp_path / "a.json", {"b": 1, "a": [1.5, "é"]})
    write_json(tmp_path / "b.json", {"a": [1.5, "é"], "b": 1})
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert read_json(tmp_path / "a.json") == {"a": [1.5, "é"], "b": 1}


def test_load_yaml_reads_the_floats_dvc_writes_as_floats():
    # DVC (ruamel, YAML 1.2) writes `5e-05` to dvc.lock; PyYAML would read it as a string,
    # and the audit would then call every stage stale.
    assert load_yaml("lr: 5e-05\nother: 1.0e-3\nflag: true\n") == {"lr": 5e-05, "other": 1e-3, "flag": True}
