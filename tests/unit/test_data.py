"""lmpipe.preprocess.cleaning and the preprocess stage: validation, cleaning, dedup, stratified seeded splits."""

from __future__ import annotations

import bz2
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lmpipe.core.errors import LmpipeError
from lmpipe.core.io import write_json
from lmpipe.core.params import PreprocessParams
from lmpipe.preprocess import cleaning as data

ROOT = Path(__file__).resolve().parents[2]
LABELS = ["negative", "positive"]


def params(**overrides) -> PreprocessParams:
    base = dict(min_chars=5, val_fraction=0.2, test_fraction=0.2, max_train=None, max_val=None, max_test=None)
    return PreprocessParams(**{**base, **overrides})


def write_raw(
    raw: Path,
    body: bytes | str,
    name: str = "d.csv",
    fmt: str = "csv",
    package: bool = False,
    labels: list[str] | None = None,
    exclude: dict | None = None,
    text_column: str = "text",
    label_column: str = "label",
    **more,
) -> Path:
    raw.mkdir(parents=True, exist_ok=True)
    (raw / name).write_bytes(body.encode() if isinstance(body, str) else body)
    write_json(
        raw / "manifest.json",
        {
            **more,
            "source": "imdb" if package else "file",
            "format": fmt,
            "file": name,
            "text_column": text_column,
            "label_column": label_column,
            "labels": labels,
            "exclude": exclude or {},
            "package": {"name": "p", "version": "1", "sha256": "0" * 64} if package else None,
        },
    )
    return raw


def corpus(n_per_label: int = 50, shares=(0.5, 0.5), seed: int = 0) -> pd.DataFrame:
    """Unique reviews, `n_per_label * 2` rows split between the labels by `shares`."""
    total = n_per_label * 2
    counts = [int(round(total * s)) for s in shares]
    rows = [
        (f"review number {i} about film {i * 7 % 13} for {lab}", lab)
        for lab, count in zip(LABELS, counts)
        for i in range(count)
    ]
    frame = pd.DataFrame(rows, columns=["text", "label"])
    return frame.sample(frac=1, random_state=seed).reset_index(drop=True)


def csv_raw(tmp_path: Path, frame: pd.DataFrame) -> Path:
    return write_raw(tmp_path / "raw", frame.to_csv(index=False))


def run(raw: Path, out: Path, seed: int = 42, **overrides) -> dict:
    return data.preprocess(raw, out, params(**overrides), seed=seed)


def split_texts(out: Path) -> dict[str, list[str]]:
    return {s: pd.read_parquet(out / f"{s}.parquet")["text"].tolist() for s in data.SPLITS}


# --------------------------------------------------------------------------- cleaning
@pytest.mark.parametrize(
    "raw, clean",
    [
        ("Great.<br /><br />Really great.", "Great. Really great."),
        ("Great.<BR>Really<br/>great", "Great. Really great"),
        ("<i>Titanic</i>'s score", "Titanic's score"),
        ('<a href="x">link</a> here<!-- hidden -->', "link here"),
        ("Tom &amp; Jerry &quot;rock&quot; &#39;n&#39; roll", "Tom & Jerry \"rock\" 'n' roll"),
        ("&lt;b&gt; stays literal", "<b> stays literal"),
        ("a < b and c > d, <3", "a < b and c > d, <3"),
        ("ﬁne ｆｕｌｌｗｉｄｔｈ café\u00a0x ①", "fine fullwidth café x 1"),
        ("  lots \t of\n\n  space\u2003here  ", "lots of space here"),
    ],
)
def test_clean_text_strips_html_unescapes_normalises_and_collapses(raw, clean):
    assert data.clean_text(raw) == clean


def test_cafe_composed_and_decomposed_become_one_text():
    assert data.clean_text("cafe\u0301") == data.clean_text("caf\u00e9")


# --------------------------------------------------------------------------- length
@pytest.mark.parametrize(
    "text, words",
    [
        ("Great film!", 2),
        ("It's 10/10 :) -- really", 3),  # ":)" and "--" hold no letter or digit
        ("很好看!", 3),
        ("这部电影很好看,演员也很棒。", 12),
        ("とても良い映画でした", 10),
        ("コーヒー", 4),
        ("좋은 영화", 2),  # Korean spaces its words
        ("I love 北京 a lot", 6),
        ("", 0),
    ],
)
def test_words_count_each_han_or_kana_character_as_one(text, words):
    assert data.count_words(text) == words


CHINESE = [
    ("这部电影很好看", "positive"),  # "this film is great": 7 characters
    ("演员的表演非常出色", "positive"),
    ("剧情紧凑,值得一看", "positive"),
    ("音乐和画面都很美", "positive"),
    ("太无聊了,浪费时间", "negative"),
    ("剧情拖沓,看不下去", "negative"),
    ("演技很差,很失望", "negative"),
    ("完全不推荐这部片", "negative"),
    ("好", "positive"),  # one word: too short either way
    ("差", "negative"),
]


def test_short_chinese_reviews_are_dropped_in_chars_with_a_hint(caplog):
    frame = pd.DataFrame(CHINESE, columns=["text", "label"])
    with caplog.at_level("WARNING", logger="lmpipe.preprocess.cleaning"):
        kept, dropped = data.filter_rows(frame, min_chars=20, max_chars=None)  # the shipped default
    assert kept.empty and dropped["too_short"] == 10
    assert "10 of the 10 texts dropped as too_short contain Chinese/Japanese" in caplog.text
    assert "preprocess.length_unit: words" in caplog.text


def test_short_chinese_reviews_are_kept_when_length_counts_words(tmp_path):
    frame = pd.DataFrame(CHINESE, columns=["text", "label"])
    kept, dropped = data.filter_rows(frame, min_chars=4, max_chars=None, unit="words")
    assert dropped["too_short"] == 2 and kept["text"].tolist() == [t for t, _ in CHINESE[:8]]
    metrics = run(csv_raw(tmp_path, frame), tmp_path / "out", min_chars=4, length_unit="words")
    assert metrics["rows_out"] == 8 and metrics["dropped"]["too_short"] == 2
    assert sorted(sum(split_texts(tmp_path / "out").values(), [])) == sorted(t for t, _ in CHINESE[:8])


def test_words_unit_applies_to_max_chars_and_english_alike():
    frame = pd.DataFrame(
        {
            "text": ["Too short.", "Just four words here", "这部电影很好看", "one two three four five six", "!!! ???"],
            "label": ["positive"] * 5,
        }
    )
    kept, dropped = data.filter_rows(frame, min_chars=4, max_chars=5, unit="words")
    assert kept["text"].tolist() == ["Just four words here"]
    assert dropped == {"empty": 0, "too_short": 2, "too_long": 2, "conflicting_duplicates": 0, "duplicates": 0}


# --------------------------------------------------------------------------- filtering
def test_length_filters_and_duplicates_are_counted_by_reason():
    frame = pd.DataFrame(
        {
            "text": ["", "tiny", "a" * 30, "just right text", "just right text", "b" * 10, "b" * 10, "c" * 12],
            "label": ["negative", "negative", "positive", "positive", "positive", "positive", "negative", "negative"],
        }
    )
    kept, dropped = data.filter_rows(frame, min_chars=5, max_chars=20)
    assert dropped == {"empty": 1, "too_short": 1, "too_long": 1, "conflicting_duplicates": 2, "duplicates": 1}
    assert kept["text"].tolist() == ["just right text", "c" * 12]


def test_duplicates_differing_only_in_markup_are_removed_keeping_the_first(tmp_path):
    frame = corpus(30)
    extra = pd.DataFrame(
        {
            "text": [
                "Same <b>words</b>  here!",
                "Same words here!",
                "Same words<br />here!",
                "Clash of labels text",
                "Clash  of labels text",
            ],
            "label": ["positive", "positive", "positive", "positive", "negative"],
        }
    )
    raw = csv_raw(tmp_path, pd.concat([extra, frame], ignore_index=True))
    metrics = run(raw, tmp_path / "out")
    assert metrics["dropped"]["duplicates"] == 2  # all three clean to "Same words here!"
    assert metrics["dropped"]["conflicting_duplicates"] == 2
    everything = sum(split_texts(tmp_path / "out").values(), [])
    assert everything.count("Same words here!") == 1
    assert "Clash of labels text" not in everything
    assert len(everything) == len(set(everything)) == 60 + 1


def test_no_text_lands_in_two_splits_even_with_many_duplicates(tmp_path):
    frame = corpus(40)
    frame = pd.concat([frame, frame.head(30), frame.head(10)], ignore_index=True)
    raw = csv_raw(tmp_path, frame)
    metrics = run(raw, tmp_path / "out")
    texts = split_texts(tmp_path / "out")
    seen = [set(t) for t in texts.values()]
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    assert metrics["dropped"]["duplicates"] == 40 and metrics["rows_out"] == 80


def test_excluded_rows_are_dropped_before_label_checks(tmp_path):
    frame = corpus(20).rename(columns={"label": "category"})
    frame.loc[[0, 5], "category"] = "plot"
    raw = write_raw(
        tmp_path / "raw",
        frame.to_csv(index=False),
        package=True,
        labels=LABELS,
        exclude={"category": ["plot"]},
        label_column="category",
    )
    metrics = run(raw, tmp_path / "out")
    assert metrics["dropped"]["excluded"] == 2 and metrics["rows_in"] == 40 and metrics["rows_out"] == 38


# --------------------------------------------------------------------------- splitting
def test_stratified_splits_keep_the_label_shares(tmp_path):
    raw = csv_raw(tmp_path, corpus(200, shares=(0.7, 0.3)))
    metrics = run(raw, tmp_path / "out")
    for split in data.SPLITS:
        share = metrics["splits"][split]["label_share"]["negative"]
        assert abs(share - 0.7) < 0.01, (split, share)
    assert [metrics["splits"][s]["rows"] for s in data.SPLITS] == [240, 80, 80]
    labels = pd.read_parquet(tmp_path / "out" / "train.parquet")["label"]
    assert labels.dtype == np.int64 and set(labels) == {0, 1}


def test_same_seed_same_split_other_seed_other_split():
    ids = np.array([0, 1] * 100)
    one = data.stratified_split(ids, 2, 0.1, 0.1, seed=7)
    again = data.stratified_split(ids, 2, 0.1, 0.1, seed=7)
    other = data.stratified_split(ids, 2, 0.1, 0.1, seed=8)
    flat = lambda parts: {s: np.concatenate(p).tolist() for s, p in parts.items()}  # noqa: E731
    assert flat(one) == flat(again)
    assert set(flat(one)["test"]) != set(flat(other)["test"])
    assert sorted(sum(flat(one).values(), [])) == list(range(200))


def test_caps_take_stratified_subsamples_and_leave_other_splits_alone(tmp_path):
    raw = csv_raw(tmp_path, corpus(200, shares=(0.75, 0.25)))
    full = run(raw, tmp_path / "full")
    capped = data.preprocess(raw, tmp_path / "capped", params(max_train=40, max_val=20), seed=42)
    assert [capped["splits"][s]["rows"] for s in data.SPLITS] == [40, 20, 80]
    assert capped["splits"]["train"]["label_share"] == {"negative": 0.75, "positive": 0.25}
    assert capped["splits"]["val"]["rows_before_cap"] == full["splits"]["val"]["rows"]
    full_texts, capped_texts = split_texts(tmp_path / "full"), split_texts(tmp_path / "capped")
    assert set(capped_texts["train"]) <= set(full_texts["train"])
    assert capped_texts["test"] == full_texts["test"]


def test_cap_quotas_are_proportional_and_exact():
    assert data.cap_quotas([70, 20, 10], 10) == [7, 2, 1]
    assert data.cap_quotas([5, 5, 1], 4) == [2, 2, 0]
    assert sum(data.cap_quotas([33, 33, 34], 50)) == 50
    assert data.cap_quotas([3, 4], None) == [3, 4]


def test_outputs_are_byte_identical_across_runs(tmp_path):
    raw = csv_raw(tmp_path, corpus(60))
    run(raw, tmp_path / "a")
    run(raw, tmp_path / "b")
    for name in ["train.parquet", "val.parquet", "test.parquet", "labels.json", "corpus.txt"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_corpus_is_the_train_split_one_document_per_line(tmp_path):
    frame = corpus(30)
    frame.loc[0, "text"] = "first line\nsecond line of one review"
    raw = csv_raw(tmp_path, frame)
    run(raw, tmp_path / "out")
    lines = (tmp_path / "out" / "corpus.txt").read_text().splitlines()
    assert lines == split_texts(tmp_path / "out")["train"]
    assert json.loads((tmp_path / "out" / "labels.json").read_text()) == {"labels": LABELS}


def test_integer_labels_keep_numeric_order(tmp_path):
    frame = pd.DataFrame({"text": [f"text number {i}" for i in range(40)], "label": [10, 2] * 20})
    raw = write_raw(tmp_path / "raw", b"", name="d.parquet", fmt="parquet")
    frame.to_parquet(raw / "d.parquet", index=False)
    run(raw, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "labels.json").read_text()) == {"labels": ["2", "10"]}


def test_trusted_package_text_in_cp1252_is_decoded_and_counted(tmp_path):
    raw = tmp_path / "raw"
    for label, names in {"business": ["a", "b", "c", "d", "e"], "tech": ["a", "b", "c", "d", "e"]}.items():
        (raw / "bbc" / label).mkdir(parents=True)
        for n in names:
            (raw / "bbc" / label / f"{n}.txt").write_text(f"{label} story {n}, a long one")
    (raw / "bbc" / "business" / "a.txt").write_bytes("Fee of \u00a315.8m paid".encode("cp1252"))
    write_json(
        raw / "manifest.json",
        {
            "source": "bbc_news",
            "format": "text_folders",
            "file": "bbc",
            "text_column": None,
            "label_column": None,
            "labels": ["business", "tech"],
            "exclude": {},
            "package": {"name": "c", "version": "1", "sha256": "0" * 64},
        },
    )
    metrics = run(raw, tmp_path / "out")
    assert metrics["decode_fallbacks"] == 1 and metrics["rows_out"] == 10
    assert "Fee of \u00a315.8m paid" in sum(split_texts(tmp_path / "out").values(), [])


# --------------------------------------------------------------------------- bad input
def bad(tmp_path: Path, body: bytes | str, **kwargs) -> str:
    """Run preprocess on a bad raw file; return the error, checking nothing was written."""
    raw = write_raw(tmp_path / "raw", body, **kwargs)
    out = tmp_path / "processed"
    with pytest.raises(LmpipeError) as err:
        data.preprocess(raw, out, params(), seed=42)
    assert sorted(os.listdir(tmp_path)) == ["raw"], "an output or temp folder was left behind"
    message = str(err.value)
    assert "\n" not in message
    return message


def test_empty_file_is_named(tmp_path):
    assert bad(tmp_path, b"") == f"{tmp_path}/raw/d.csv: file is empty"


def test_header_only_file_is_named(tmp_path):
    assert "raw/d.csv: file has a header but no rows" in bad(tmp_path, "text,label\n")


def test_malformed_csv_names_file_and_row(tmp_path):
    body = "text,label\ngood one here,positive\nthis, has, commas,negative\n"
    message = bad(tmp_path, body)
    assert "raw/d.csv row 3: malformed CSV: Expected 2 fields in line 3, saw 4" in message
    assert message.endswith("(delimiter ','; a field that contains it must be in double quotes)")


def test_unclosed_quote_names_file_and_row(tmp_path):
    body = 'text,label\ngood one here,positive\nmore good text,positive\n"never closed,negative\n'
    assert "raw/d.csv row 4: malformed CSV: EOF inside string" in bad(tmp_path, body)


@pytest.mark.parametrize("missing, key", [("text", "text_column"), ("label", "label_column")])
def test_missing_column_names_column_key_and_available_columns(tmp_path, missing, key):
    header = "review,label" if missing == "text" else "text,sentiment"
    message = bad(tmp_path, f"{header}\nsome good text,positive\n")
    assert f"no {missing} column '{missing}' (fetch.file.{key}); columns are {header.split(',')}" in message


def test_non_utf8_user_file_names_line_and_byte(tmp_path):
    body = b"text,label\ngood one here,positive\n" + b"caf\xe9 au lait,negative\n"
    message = bad(tmp_path, body)
    assert message.endswith("raw/d.csv line 3 (byte 37): not valid UTF-8 (0xe9); save the file as UTF-8")


def test_label_outside_the_declared_set_names_row_label_and_allowed(tmp_path):
    body = "text,label\ngood one here,positive\nmeh one here,neutral\nbad one here,negative\n"
    raw = write_raw(tmp_path / "raw", body)
    with pytest.raises(LmpipeError) as err:
        data.preprocess(raw, tmp_path / "out", params(labels=LABELS), seed=42)
    assert "raw/d.csv row 3: label 'neutral' is not one of ['negative', 'positive'] (1 rows" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_manifest_label_set_is_enforced_with_the_row(tmp_path):
    body = 'text,label\ngood one here,positive\n"multi\nline",negative\nok text here,\n'
    message = bad(tmp_path, body, labels=LABELS, package=True)
    assert "raw/d.csv row 4: label is empty" in message


def test_empty_split_names_the_split_and_the_param(tmp_path):
    message = bad(tmp_path, "text,label\nonly one text,positive\nand another,negative\n")
    assert "split 'val' is empty after filtering (2 rows left); raise preprocess.val_fraction" in message


def test_everything_filtered_out_suggests_min_chars(tmp_path):
    message = bad(tmp_path, "text,label\nab,positive\n,negative\n")
    assert "no rows left after cleaning" in message and "preprocess.min_chars" in message


def test_broken_parquet_is_named(tmp_path):
    message = bad(tmp_path, b"PAR1 not really", name="d.parquet", fmt="parquet")
    assert "raw/d.parquet: not a readable Parquet file" in message


def test_missing_manifest_says_to_run_fetch(tmp_path):
    with pytest.raises(LmpipeError, match="manifest.json not found: run the fetch stage"):
        data.preprocess(tmp_path, tmp_path / "out", params(), seed=42)


def test_bz2_csv_is_read(tmp_path):
    body = bz2.compress(corpus(20).to_csv(index=False).encode())
    raw = write_raw(tmp_path / "raw", body, name="d.csv.bz2", fmt="csv.bz2")
    assert run(raw, tmp_path / "out")["rows_out"] == 40


# --------------------------------------------------------------------------- other formats
def test_semicolon_delimiter_recorded_in_the_manifest_is_used(tmp_path):
    frame = corpus(20)
    frame.loc[0, "text"] = "commas, semicolons; both"
    raw = write_raw(tmp_path / "raw", frame.to_csv(index=False, sep=";"), delimiter=";")
    assert run(raw, tmp_path / "out")["rows_out"] == 40
    assert "commas, semicolons; both" in sum(split_texts(tmp_path / "out").values(), [])


def test_semicolon_file_row_with_extra_delimiter_names_row_and_delimiter(tmp_path):
    body = "text;label\ngood one here;positive\nsee; this;negative\n"
    message = bad(tmp_path, body, delimiter=";")
    assert "raw/d.csv row 3: malformed CSV: Expected 2 fields in line 3, saw 3 (delimiter ';'" in message


def test_tsv_is_read_with_tabs(tmp_path):
    frame = corpus(20)
    frame.loc[0, "text"] = "commas, and; semicolons"
    raw = write_raw(tmp_path / "raw", frame.to_csv(index=False, sep="\t"), name="d.tsv", fmt="tsv")
    assert run(raw, tmp_path / "out")["rows_out"] == 40
    assert "commas, and; semicolons" in sum(split_texts(tmp_path / "out").values(), [])


def jsonl(frame: pd.DataFrame) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in frame.to_dict(orient="records"))


def test_jsonl_is_read_one_object_per_line(tmp_path):
    frame = corpus(20)
    frame["label"] = (frame["label"] == "positive").astype(int)
    frame["extra"] = "ignored"
    frame.loc[0, "text"] = 'a "quoted", multi\nline text'
    raw = write_raw(tmp_path / "raw", jsonl(frame), name="d.jsonl", fmt="jsonl")
    metrics = run(raw, tmp_path / "out")
    assert metrics["rows_in"] == metrics["rows_out"] == 40
    assert json.loads((tmp_path / "out" / "labels.json").read_text()) == {"labels": ["0", "1"]}
    assert 'a "quoted", multi line text' in sum(split_texts(tmp_path / "out").values(), [])


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    body = jsonl(corpus(3)) + '{"text": "unterminated, "label": "positive"}\n' + jsonl(corpus(2))
    message = bad(tmp_path, body, name="d.jsonl", fmt="jsonl")
    assert message.endswith("raw/d.jsonl line 7: not valid JSON (Expecting ',' delimiter, column 26)")


def test_jsonl_line_that_is_not_an_object_names_file_and_line(tmp_path):
    body = '{"text": "good one here", "label": "positive"}\n\n["bad one here", "negative"]\n'
    message = bad(tmp_path, body, name="d.jsonl", fmt="jsonl")
    assert message.endswith("raw/d.jsonl line 3: expected one JSON object per line, got a list")


def test_jsonl_bad_label_and_bad_bytes_name_the_line(tmp_path):
    body = '{"text": "good one here", "label": "positive"}\n\n{"text": "meh here", "label": "neutral"}\n'
    assert "raw/d.jsonl line 3: label 'neutral' is not one of" in bad(
        tmp_path, body, name="d.jsonl", fmt="jsonl", labels=LABELS, package=True
    )
    body = b'{"text": "good one here", "label": "positive"}\n{"text": "caf\xe9", "label": "negative"}\n'
    shutil.rmtree(tmp_path / "raw")
    assert "raw/d.jsonl line 2 (byte 60): not valid UTF-8 (0xe9)" in bad(tmp_path, body, name="d.jsonl", fmt="jsonl")


def test_jsonl_record_without_the_text_key_counts_as_empty(tmp_path):
    frame = corpus(20)
    body = jsonl(frame) + '{"label": "positive"}\n'
    raw = write_raw(tmp_path / "raw", body, name="d.jsonl", fmt="jsonl")
    metrics = run(raw, tmp_path / "out")
    assert metrics["rows_in"] == 41 and metrics["dropped"]["empty"] == 1


# --------------------------------------------------------------------------- stage
def test_preprocess_stage_writes_outputs_metrics_and_mlflow_run(tmp_path, monkeypatch, tracking_uri):
    from stages import preprocess as stage

    (tmp_path / ".dvc").mkdir()
    text = (ROOT / "params.yaml").read_text()
    (tmp_path / "params.yaml").write_text(text.replace("min_chars: 20", "min_chars: 5", 1))
    write_raw(tmp_path / "data" / "raw", corpus(100).to_csv(index=False))
    monkeypatch.chdir(tmp_path)
    stage.main()
    metrics = json.loads(Path("reports/preprocess/metrics.json").read_text())
    assert metrics["rows_out"] == 200 and metrics["splits"]["test"]["rows"] == 20
    assert sorted(os.listdir("data/processed")) == [
        "corpus.txt",
        "labels.json",
        "test.parquet",
        "train.parquet",
        "val.parquet",
    ]

    import mlflow

    run_ = mlflow.search_runs(experiment_names=["lmpipe"], output_format="list")[0]
    assert run_.info.status == "FINISHED"
    assert run_.data.metrics["rows_out"] == 200
    assert run_.data.metrics["splits.train.label_share.negative"] == 0.5
    contexts = sorted(i.tags[0].value for i in run_.inputs.dataset_inputs)
    assert contexts == ["raw", "test", "train", "val"]


# --------------------------------------------------------------------------- real data
def test_real_imdb_wheel_gives_50k_rows_and_drops_the_duplicates(tmp_path):
    from lmpipe.core.params import load_params
    from lmpipe.fetch.sources import cache_root, fetch_source

    fetch = load_params(ROOT / "params.yaml").fetch.model_copy(update={"source": "imdb"})
    sha = fetch.packages["imdb"].sha256
    if not list((cache_root() / "wheels" / sha).glob("*.whl")):
        pytest.skip(f"IMDB wheel not cached in {cache_root() / 'wheels' / sha} (run `dvc repro fetch`)")
    raw = tmp_path / "raw"
    raw.mkdir()
    fetch_source(fetch, raw, downloader=None)  # a cache hit never calls the downloader
    metrics = data.preprocess(raw, tmp_path / "out", PreprocessParams(), seed=42)
    assert metrics["rows_in"] == 50_000
    assert 418 <= metrics["dropped"]["duplicates"] <= 430  # 418 raw copies + a few after cleaning
    assert metrics["rows_out"] == 50_000 - sum(metrics["dropped"].values())
    for split in data.SPLITS:
        assert abs(metrics["splits"][split]["label_share"]["positive"] - 0.5) < 0.01


# --------------------------------------------------------------------------- utf-8 scan
def test_utf8_scan_joins_characters_cut_by_the_block_edge_and_finds_late_bad_bytes():
    import io as _io

    edge = b"a" * ((1 << 20) - 1) + "é".encode() + b"\nok\n"  # é straddles the 1 MiB block edge
    assert data.scan_utf8(_io.BytesIO(edge)) == (True, None)
    late = edge + b"caf\xe9\n"
    assert data.scan_utf8(_io.BytesIO(late)) == (True, (len(edge) + 3, 3, 0xE9))
    assert data.scan_utf8(_io.BytesIO(b"abc\xc3")) == (True, (3, 1, 0xC3))  # cut off at the end
    assert data.scan_utf8(_io.BytesIO(b" \n\t ")) == (False, None)
