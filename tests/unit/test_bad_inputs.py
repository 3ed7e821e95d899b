"""Bad input, broadly: every malformed params or data file is one line naming the file, row or key.

Each data case runs the preprocess library entry (`cleaning.preprocess`) on a raw folder as the
fetch stage leaves it and checks that nothing was written; each params case goes through
`load_params`, the loader every stage calls first.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pandas as pd
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmpipe.core.errors import LmpipeError
from lmpipe.core.io import write_json
from lmpipe.core.params import PreprocessParams, load_params
from lmpipe.preprocess import cleaning

LABELS = ["negative", "positive"]


def write_raw(raw: Path, body: bytes | str, name: str = "d.csv", fmt: str = "csv", **manifest) -> Path:
    """A raw folder as the fetch stage leaves it for a user file: the file plus manifest.json."""
    raw.mkdir(parents=True, exist_ok=True)
    if body is not None:
        (raw / name).write_bytes(body.encode() if isinstance(body, str) else body)
    fields = {"text_column": "text", "label_column": "label", "labels": None, "exclude": {}, "package": None}
    write_json(raw / "manifest.json", {"source": "file", "format": fmt, "file": name, **fields, **manifest})
    return raw


def params(**overrides) -> PreprocessParams:
    base = dict(min_chars=5, val_fraction=0.2, test_fraction=0.2, max_train=None, max_val=None, max_test=None)
    return PreprocessParams(**{**base, **overrides})


def rows(n: int = 20, labels=LABELS) -> str:
    """A clean CSV body: `n` unique reviews per label."""
    lines = [f"review number {i} about film {i % 7} is {lab},{lab}" for lab in labels for i in range(n)]
    return "text,label\n" + "\n".join(lines) + "\n"


def bad_data(tmp_path: Path, body: bytes | str | None, prepare=None, pp: PreprocessParams | None = None, **kw) -> str:
    """Preprocess a bad raw folder; return the one-line error, checking nothing was written."""
    raw = write_raw(tmp_path / "raw", body, **kw)
    if prepare is not None:
        prepare(raw)
    with pytest.raises(LmpipeError) as err:
        cleaning.preprocess(raw, tmp_path / "processed", pp or params(), seed=42)
    assert sorted(os.listdir(tmp_path)) == ["raw"], "an output or temp folder was left behind"
    message = str(err.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def good_data(tmp_path: Path, body: bytes | str, **kw) -> dict:
    raw = write_raw(tmp_path / "raw", body, **kw)
    return cleaning.preprocess(raw, tmp_path / "processed", params(), seed=42)


# --------------------------------------------------------------------------- data files
def test_latin1_bytes_in_the_label_column_name_the_line(tmp_path):
    body = rows().encode() + "a fine review of a film,n\xe9gative\n".encode("latin-1")
    assert bad_data(tmp_path, body).endswith("not valid UTF-8 (0xe9); save the file as UTF-8")
    assert "raw/d.csv line 42 " in bad_data(tmp_path / "again", body)


def test_latin1_bytes_in_the_header_name_line_one(tmp_path):
    body = "t\xe9xt,label\n".encode("latin-1") + rows().encode().split(b"\n", 1)[1]
    assert "raw/d.csv line 1 (byte 1): not valid UTF-8 (0xe9)" in bad_data(tmp_path, body)


def test_utf8_bom_is_accepted_and_not_part_of_the_first_column_name(tmp_path):
    metrics = good_data(tmp_path, b"\xef\xbb\xbf" + rows().encode())
    assert metrics["rows_out"] == 40
    assert pd.read_parquet(tmp_path / "processed" / "train.parquet").columns.tolist() == ["text", "label"]


def test_nul_byte_in_a_text_names_the_row(tmp_path):
    body = rows() + "a review with a \x00 inside,positive\n"
    message = bad_data(tmp_path, body)
    assert "raw/d.csv" in message and "row 42" in message and "NUL" in message


def test_one_50_mb_line_names_the_row_or_is_dropped_as_too_long(tmp_path):
    body = rows().encode() + b"x" * (50 << 20) + b",positive\n"
    raw = write_raw(tmp_path / "raw", body)
    metrics = cleaning.preprocess(raw, tmp_path / "processed", params(max_chars=100_000), seed=42)
    assert metrics["rows_out"] == 40 and metrics["dropped"]["too_long"] == 1


def test_empty_label_in_a_user_file_names_the_row(tmp_path):
    assert "raw/d.csv row 42: label is empty" in bad_data(tmp_path, rows() + "a review without a label,\n")


def test_whitespace_only_label_names_the_row(tmp_path):
    assert "raw/d.csv row 42: label is empty" in bad_data(tmp_path, rows() + "a review without a label,   \n")


def test_a_single_class_names_the_label_and_the_file(tmp_path):
    message = bad_data(tmp_path, rows(labels=["positive"]))
    assert "raw/d.csv" in message and "'positive'" in message and "one label" in message


def test_a_label_too_rare_to_reach_train_names_the_label(tmp_path):
    message = bad_data(tmp_path, rows() + "the one neutral review here,neutral\n")
    assert "'neutral'" in message and "train" in message


def test_all_rows_duplicates_names_the_file(tmp_path):
    body = "text,label\n" + "the very same review text,positive\n" * 50
    message = bad_data(tmp_path, body)
    assert "raw/d.csv" in message or "duplicate" in message


def test_parquet_with_a_numeric_text_column_names_the_column(tmp_path):
    frame = pd.DataFrame({"text": list(range(40)), "label": ["positive", "negative"] * 20})
    message = bad_data(
        tmp_path, None, prepare=lambda raw: frame.to_parquet(raw / "d.parquet"), name="d.parquet", fmt="parquet"
    )
    assert "raw/d.parquet" in message and "'text'" in message


def test_parquet_with_a_list_label_column_names_the_column(tmp_path):
    frame = pd.DataFrame({"text": [f"review {i} of the film" for i in range(40)], "label": [[1, 2]] * 40})
    message = bad_data(
        tmp_path, None, prepare=lambda raw: frame.to_parquet(raw / "d.parquet"), name="d.parquet", fmt="parquet"
    )
    assert "raw/d.parquet" in message and "'label'" in message


def test_a_directory_where_the_data_file_is_expected_is_named(tmp_path):
    message = bad_data(tmp_path, None, prepare=lambda raw: (raw / "d.csv").mkdir())
    assert "raw/d.csv" in message and "folder" in message


def test_blank_lines_only_is_an_empty_file(tmp_path):
    assert "raw/d.csv: file is empty" in bad_data(tmp_path, "\n\n  \n\n")


def test_manifest_that_is_not_json_is_named(tmp_path):
    message = bad_data(tmp_path, rows(), prepare=lambda raw: (raw / "manifest.json").write_text("{not json"))
    assert "raw/manifest.json" in message and "JSON" in message


def test_manifest_that_is_a_list_is_named(tmp_path):
    message = bad_data(tmp_path, rows(), prepare=lambda raw: (raw / "manifest.json").write_text("[1, 2]"))
    assert "raw/manifest.json" in message


# --------------------------------------------------------------------------- params files
def bad_params(tmp_path: Path, content: bytes | str) -> str:
    path = tmp_path / "params.yaml"
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    with pytest.raises(LmpipeError) as err:
        load_params(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    return message


@pytest.fixture
def shipped(project_root) -> str:
    return (project_root / "params.yaml").read_text(encoding="utf-8")


def test_empty_params_file_is_named(tmp_path):
    assert bad_params(tmp_path, "").endswith(": file is empty")


def test_comments_only_params_file_is_named(tmp_path):
    assert bad_params(tmp_path, "# nothing here yet\n").endswith(": file is empty")


def test_params_file_that_is_a_list_is_named(tmp_path):
    assert "expected a mapping of sections, got list" in bad_params(tmp_path, "- base\n- fetch\n")


def test_params_file_that_is_a_scalar_is_named(tmp_path):
    assert "expected a mapping of sections, got str" in bad_params(tmp_path, "just some words\n")


def test_unknown_nested_key_is_named(tmp_path, shipped):
    text = shipped.replace("\n  min_chars:", "\n  min_chars_typo: 3\n  min_chars:", 1)
    assert "preprocess.min_chars_typo is not a known key" in bad_params(tmp_path, text)


def test_wrong_type_names_the_key(tmp_path, shipped):
    text = shipped.replace("\n  min_chars: 20", "\n  min_chars: [20]", 1)
    assert "preprocess.min_chars" in bad_params(tmp_path, text)


def test_a_null_section_names_the_section(tmp_path, shipped):
    raw = yaml.safe_load(shipped)
    raw["preprocess"] = None
    assert "preprocess" in bad_params(tmp_path, yaml.safe_dump(raw))


def test_non_utf8_params_file_is_named(tmp_path, shipped):
    message = bad_params(tmp_path, shipped.encode() + "# r\xe9sum\xe9\n".encode("latin-1"))
    assert "line 1" in message.split(": ", 1)[1] or "UTF-8" in message.split(": ", 1)[1]


def test_duplicate_key_in_params_names_the_line(tmp_path, shipped):
    text = shipped.replace("\n  min_chars: 20", "\n  min_chars: 20\n  min_chars: 30", 1)
    message = bad_params(tmp_path, text)
    assert "min_chars" in message and "line" in message


def test_a_directory_where_params_yaml_is_expected_is_one_line_from_any_stage(tmp_path, capsys):
    from lmpipe.core.stage import run

    (tmp_path / "params.yaml").mkdir()
    with pytest.raises(SystemExit) as done:
        run(lambda: load_params(tmp_path / "params.yaml"))
    assert done.value.code == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'params.yaml'}: is a folder where a file is expected\n"


def test_an_unreadable_data_file_is_one_line_from_any_stage(tmp_path, capsys):
    from lmpipe.core.stage import run

    raw = write_raw(tmp_path / "raw", rows())
    (raw / "d.csv").chmod(0)
    if os.access(raw / "d.csv", os.R_OK):
        pytest.skip("running as a user who reads any file (root)")
    with pytest.raises(SystemExit) as done:
        run(lambda: cleaning.preprocess(raw, tmp_path / "processed", params(), seed=42))
    assert done.value.code == 2 and "raw/d.csv: permission denied" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["raw"]


# --------------------------------------------------------------------------- params, property-based
def _leaves(tree: dict, prefix: tuple = ()) -> list[tuple]:
    """The key paths of every non-mapping value in a params mapping."""
    found = []
    for key, value in tree.items():
        path = (*prefix, key)
        found.extend(_leaves(value, path) if isinstance(value, dict) and value else [path])
    return found


_SHIPPED = yaml.safe_load((Path(__file__).resolve().parents[2] / "params.yaml").read_text(encoding="utf-8"))
_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**12), max_value=10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.lists(st.integers(-5, 5), max_size=3),
    st.dictionaries(st.text(min_size=1, max_size=5), st.integers(), max_size=2),
)


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(path=st.sampled_from(_leaves(_SHIPPED)), value=_VALUES, drop=st.booleans())
def test_any_mutated_params_value_validates_or_names_its_key(path, value, drop):
    from lmpipe.core.params import parse_params

    raw = copy.deepcopy(_SHIPPED)
    parent = raw
    for key in path[:-1]:
        parent = parent[key]
    if drop:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    try:
        parse_params(raw)
    except LmpipeError as exc:
        message = str(exc)
        assert message.startswith("params.yaml: ") and "\n" not in message
        named = [".".join(map(str, path[: i + 1])) for i in range(len(path))]
        assert any(key in message for key in named[1:] or named), f"{message!r} names none of {named}"
