"""From data/raw to clean, deduplicated, stratified train/val/test splits.

`load_raw` reads what `fetch` left in data/raw/ through its manifest (one reader per format) and
validates it; `clean_text` normalises a text; `prepare` filters, deduplicates, splits and caps;
`write_processed` writes the splits as Parquet (columns `text`, `label` int64), `labels.json`
and `corpus.txt` (the train split, one document per line); `preprocess` does all of it.

Bad input stops with one line naming the file and the row. Rows are counted as a spreadsheet
shows a CSV or TSV: the header is row 1, the first record row 2 (a record spanning several lines
is one row); a Parquet file's first record is row 1; a JSON Lines record is named by its line;
byte-level problems name the line and byte. A delimited file is split on the delimiter `fetch`
recorded in the manifest (comma when it records none, as for the packaged CSVs).

Length limits count characters, or words with `length_unit: words`, where each Han or kana
character is a word (Chinese and Japanese put no spaces between words).

The packaged corpora are pinned by sha256, so their bytes are known: a BBC article saved in
cp1252 (one in 2,225) is decoded with that fallback and counted in `decode_fallbacks`. A user's
file gets no such guess: bytes that are not UTF-8 are an error naming the file, line and byte.
"""

from __future__ import annotations

import bz2
import html
import io
import json
import logging
import numbers
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from lmpipe.core.errors import LmpipeError
from lmpipe.core.io import atomic_dir, jsonl_record, read_json, write_json

if TYPE_CHECKING:  # pandas is imported where it is used: `stages.preprocess` starts working without it
    import pandas as pd

log = logging.getLogger("lmpipe.preprocess.cleaning")

MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")
FORMATS = ("csv", "csv.bz2", "tsv", "jsonl", "parquet", "text_folders")
DEFAULT_DELIMITERS = {"csv": ",", "csv.bz2": ",", "tsv": "\t"}  # when the manifest records none
DELIMITERS = (",", ";", "\t")
FALLBACK_ENCODINGS = ("cp1252", "latin-1")  # latin-1 decodes any byte: the last resort
DROP_REASONS = ("excluded", "empty", "too_short", "too_long", "conflicting_duplicates", "duplicates")
MANIFEST_KEYS = ("source", "format", "file", "text_column", "label_column", "labels", "exclude", "package")


# --------------------------------------------------------------------------- reading
@dataclass
class Raw:
    """The labeled rows of a source: `text` and `label` (both str), in the source's order."""

    frame: pd.DataFrame
    where: Callable[[int], str]  # row position -> "data/raw/x.csv row 12"
    rows_in: int
    excluded: int = 0
    decode_fallbacks: int = 0
    labels: list[str] | None = None  # the manifest's label set, if it declares one
    name: str = "the data"  # the file or folder the rows come from, for errors about all of them


def read_manifest(raw_dir: str | Path) -> dict[str, Any]:
    """The manifest fetch wrote, checked for the keys and values the readers rely on."""
    path = Path(raw_dir) / MANIFEST
    if not path.is_file():
        raise LmpipeError(f"{path} not found: run the fetch stage first (dvc repro fetch)")
    try:
        manifest = read_json(path)
    except json.JSONDecodeError as exc:
        raise LmpipeError(
            f"{path}: not valid JSON ({exc.msg}, line {exc.lineno} column {exc.colno}); run the fetch stage again"
        ) from None
    except UnicodeDecodeError:
        raise LmpipeError(f"{path}: not valid UTF-8 JSON; run the fetch stage again") from None
    if not isinstance(manifest, dict):
        raise LmpipeError(f"{path}: expected a JSON object, got a {type(manifest).__name__}")
    for key in MANIFEST_KEYS:
        if key not in manifest:
            raise LmpipeError(f"{path}: missing key {key!r}")
    if manifest["format"] not in FORMATS:
        raise LmpipeError(f"{path}: format must be one of {list(FORMATS)} (got {manifest['format']!r})")
    if manifest.get("delimiter") not in (None, *DELIMITERS):
        raise LmpipeError(f"{path}: delimiter must be one of {list(DELIMITERS)} (got {manifest['delimiter']!r})")
    return manifest


def _not_utf8(name: str, offset: int, line: int, byte: int) -> LmpipeError:
    return LmpipeError(f"{name} line {line} (byte {offset}): not valid UTF-8 (0x{byte:02x}); save the file as UTF-8")


def decode(data: bytes, name: str, trusted: bool) -> tuple[str, bool]:
    """UTF-8 text of `data` and whether a fallback encoding was needed (trusted sources only)."""
    try:
        return data.decode("utf-8-sig"), False
    except UnicodeDecodeError as exc:
        if not trusted:
            line = data.count(b"\n", 0, exc.start) + 1
            raise _not_utf8(name, exc.start, line, data[exc.start]) from None
    for encoding in FALLBACK_ENCODINGS:
        try:
            return data.decode(encoding), True
        except UnicodeDecodeError:
            continue
    raise AssertionError("latin-1 decodes every byte")  # pragma: no cover


def scan_utf8(stream: BinaryIO) -> tuple[bool, tuple[int, int, int] | None]:
    """Stream a file once, 1 MiB at a time: (any non-blank byte?, first bad UTF-8 byte as
    (offset, line, value) or None). Memory stays flat whatever the file size."""
    offset, line, carry, content = 0, 1, b"", False
    for block in iter(lambda: stream.read(1 << 20), b""):
        block, carry = carry + block, b""
        try:
            block.decode("utf-8")
        except UnicodeDecodeError as exc:
            if exc.reason != "unexpected end of data" or len(block) - exc.start >= 4:
                where = line + block.count(b"\n", 0, exc.start)
                return True, (offset + exc.start, where, block[exc.start])
            # a character cut in two by the block end: finish it with the next block
            block, carry = block[: exc.start], block[exc.start :]
        content = content or bool(block.strip())
        line += block.count(b"\n")
        offset += len(block)
    if carry:
        return True, (offset, line, carry[0])
    return content, None


_PANDAS_LINE = re.compile(r"(?:in line|line) (\d+)")
_PANDAS_ROW = re.compile(r"starting at row (\d+)")
_PANDAS_FIELDS = re.compile(r"Expected \d+ fields")


def _parser_error(name: str, exc: Exception, delimiter: str = ",") -> LmpipeError:
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    message = message.replace("Error tokenizing data. C error: ", "")
    where = name
    if m := _PANDAS_LINE.search(message):  # pandas counts records from the header = 1
        where = f"{name} row {m.group(1)}"
    elif m := _PANDAS_ROW.search(message):  # ... here from the header = 0
        where = f"{name} row {int(m.group(1)) + 1}"
    if _PANDAS_FIELDS.search(message):  # a field count off: the delimiter inside a text, unquoted
        message += f" (delimiter {delimiter!r}; a field that contains it must be in double quotes)"
    return LmpipeError(f"{where}: malformed CSV: {message}")


def _read_csv(path: Path, name: str, compressed: bool, trusted: bool, delimiter: str = ",") -> tuple[pd.DataFrame, int]:
    import pandas as pd

    opener = bz2.open if compressed else open
    try:
        with opener(path, "rb") as stream:
            content, bad = scan_utf8(stream)
    except (OSError, EOFError, ValueError) as exc:
        raise LmpipeError(f"{name}: cannot be read ({exc})") from None
    if not content:
        raise LmpipeError(f"{name}: file is empty")
    source: Any = path
    if bad is not None:
        if not trusted:
            raise _not_utf8(name, *bad)
        with opener(path, "rb") as stream:  # a pinned package: decode its known bytes
            source = io.BytesIO(decode(stream.read(), name, trusted)[0].encode("utf-8"))
    try:
        frame = pd.read_csv(
            source,
            sep=delimiter,
            dtype=object,
            encoding="utf-8-sig",
            keep_default_na=False,
            na_filter=False,
            compression="bz2" if compressed and bad is None else None,
        )
    except pd.errors.EmptyDataError:
        raise LmpipeError(f"{name}: file is empty") from None
    except (pd.errors.ParserError, ValueError) as exc:
        raise _parser_error(name, exc, delimiter) from None
    if frame.empty:
        raise LmpipeError(f"{name}: file has a header but no rows")
    return frame, int(bad is not None)


def _as_strings(column: pd.Series) -> np.ndarray:
    """Values as Python str in an object array (no copy of the strings): integers stay `1`
    (not `1.0`), missing values become ''."""
    import pandas as pd

    if pd.api.types.is_float_dtype(column) and column.dropna().eq(column.dropna().round()).all():
        column = column.astype("Int64")
    values = column.to_numpy(dtype=object, na_value="")
    return np.array([v if isinstance(v, str) else str(v) for v in values], dtype=object)


def _read_parquet(path: Path, name: str) -> pd.DataFrame:
    import pandas as pd

    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise LmpipeError(f"{name}: not a readable Parquet file ({exc})".splitlines()[0]) from None
    if frame.empty:
        raise LmpipeError(f"{name}: file has no rows")
    return frame


def _read_jsonl(path: Path, name: str) -> tuple[pd.DataFrame, np.ndarray]:
    """One row per non-blank line, each a JSON object; also each row's line number."""
    import pandas as pd

    text = decode(path.read_bytes(), name, trusted=False)[0]  # a user's file: UTF-8 or an error
    records, lines = [], []
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines: U+2028 may sit in a text
        record = jsonl_record(line, f"{name} line {number}")
        if record is None:
            continue
        records.append(record)
        lines.append(number)
    if not records:
        raise LmpipeError(f"{name}: file is empty")
    return pd.DataFrame(records), np.array(lines)


def _read_table(path: Path, name: str, manifest: dict[str, Any]) -> tuple[pd.DataFrame, int, Callable[[int], str]]:
    """A file source's table, its decode fallbacks, and record position -> "NAME row N"."""
    fmt = manifest["format"]
    if fmt == "parquet":
        return _read_parquet(path, name), 0, lambda i: f"{name} row {i + 1}"
    if fmt == "jsonl":
        frame, lines = _read_jsonl(path, name)
        return frame, 0, lambda i: f"{name} line {lines[i]}"
    delimiter = manifest.get("delimiter") or DEFAULT_DELIMITERS[fmt]
    trusted = manifest["package"] is not None
    frame, fallbacks = _read_csv(path, name, fmt == "csv.bz2", trusted, delimiter)
    return frame, fallbacks, lambda i: f"{name} row {i + 2}"  # the header is row 1


def _read_text_folders(folder: Path, name: str, trusted: bool) -> tuple[pd.DataFrame, list[str], int]:
    """One row per `<label>/<file>.txt`, labels and files in sorted order."""
    import pandas as pd

    if folder.is_file():
        raise LmpipeError(f"{name}: is a file where a folder is expected")
    if not folder.is_dir():
        raise LmpipeError(f"{name}: folder not found")
    texts, labels, files, fallbacks = [], [], [], 0
    for label_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        for path in sorted(label_dir.glob("*.txt")):
            rel = f"{name}/{label_dir.name}/{path.name}"
            text, fell_back = decode(path.read_bytes(), rel, trusted)
            if fell_back:
                log.warning("%s is not UTF-8; decoded as cp1252", rel)
            fallbacks += fell_back
            texts.append(text)
            labels.append(label_dir.name)
            files.append(rel)
    if not texts:
        raise LmpipeError(f"{name}: no <label>/*.txt files found")
    return pd.DataFrame({"text": texts, "label": labels}, dtype=object), files, fallbacks


def _require_column(frame: pd.DataFrame, column: str | None, role: str, name: str, source: str) -> None:
    if column not in frame.columns:
        key = f" (fetch.file.{role}_column)" if source == "file" else ""
        columns = [str(c) for c in frame.columns]
        raise LmpipeError(f"{name}: no {role} column {column!r}{key}; columns are {columns}")


def _is_missing(value: Any) -> bool:
    import pandas as pd

    return value is None or value is pd.NA or (isinstance(value, float) and value != value)


def _check_values(column: pd.Series, role: str, where: Callable[[int], str]) -> None:
    """A text column must hold strings, a label column strings or numbers (a missing value passes:
    it reads as ''); the first value that does not is named with its row. A list, a mapping or
    bytes would otherwise be stringified into a text or a label such as '[1 2]'."""
    if role == "label" and column.dtype.kind in "biuf":
        return
    allowed = (str,) if role == "text" else (str, numbers.Number, np.bool_)
    values = column.to_numpy(dtype=object)
    bad = next((i for i, v in enumerate(values) if not isinstance(v, allowed) and not _is_missing(v)), None)
    if bad is None:
        return
    value = values[bad]
    kind = "list" if isinstance(value, (list, tuple, np.ndarray)) else type(value).__name__
    shown = " ".join(repr(value).split())[:60]
    need = "strings" if role == "text" else "strings or numbers"
    article = "an" if kind[0] in "aeiou" else "a"
    raise LmpipeError(
        f"{where(bad)}: {role} column {column.name!r} holds {article} {kind} ({shown}); "
        f"a {role} column must hold {need}"
    )


def load_raw(raw_dir: str | Path, manifest: dict[str, Any] | None = None) -> Raw:
    """Read the labeled rows of data/raw through its manifest, exclusions applied."""
    import pandas as pd

    raw_dir = Path(raw_dir)
    manifest = manifest or read_manifest(raw_dir)
    fmt, trusted = manifest["format"], manifest["package"] is not None
    path = raw_dir / manifest["file"]
    name = (raw_dir / manifest["file"]).as_posix()
    if fmt != "text_folders" and path.is_dir():
        raise LmpipeError(f"{name}: is a folder where a file is expected (named by {raw_dir / MANIFEST})")
    if fmt != "text_folders" and not path.is_file():
        raise LmpipeError(f"{name}: file not found (named by {raw_dir / MANIFEST})")
    if fmt == "text_folders":
        frame, files, fallbacks = _read_text_folders(path, name, trusted)
        raw = Raw(frame, files.__getitem__, len(frame), decode_fallbacks=fallbacks, name=name)
        raw.labels = manifest["labels"]
        return raw

    frame, fallbacks, row = _read_table(path, name, manifest)
    text_col, label_col = manifest["text_column"], manifest["label_column"]
    _require_column(frame, text_col, "text", name, manifest["source"])
    _require_column(frame, label_col, "label", name, manifest["source"])
    rows_in = len(frame)
    keep = np.ones(rows_in, dtype=bool)
    for column, values in sorted(manifest["exclude"].items()):
        _require_column(frame, column, "exclude", name, manifest["source"])
        keep &= ~frame[column].astype(str).isin([str(v) for v in values]).to_numpy()
    positions = np.flatnonzero(keep)

    def where(i: int) -> str:
        return row(int(positions[i]))

    texts, labels = frame[text_col].iloc[positions], frame[label_col].iloc[positions]
    _check_values(texts, "text", where)
    _check_values(labels, "label", where)
    # Labels stripped: ' positive' is 'positive', and '   ' is an empty label (an error).
    out = pd.DataFrame(
        {"text": _as_strings(texts), "label": np.array([v.strip() for v in _as_strings(labels)], dtype=object)},
        dtype=object,
    )  # object, not pandas' arrow strings: no second copy of every text
    return Raw(out, where, rows_in, int(rows_in - len(positions)), fallbacks, manifest["labels"], name)


def declared_labels(raw: Raw, labels: list[str] | None) -> list[str]:
    """preprocess.labels if set, else the manifest's set, else the data's own (sorted) set."""
    if labels:
        labels = [str(label) for label in labels]
        twice = sorted({lab for lab in labels if labels.count(lab) > 1})
        if twice:
            raise LmpipeError(f"params.yaml: preprocess.labels lists {twice} more than once")
        return labels
    if raw.labels:
        return list(raw.labels)
    found = sorted(set(raw.frame["label"]) - {""})
    if found and all(re.fullmatch(r"-?\d+", v) for v in found):
        found.sort(key=int)
    return found


def check_labels(raw: Raw, labels: list[str]) -> None:
    """Every row's label must be one of `labels`; the first one that is not is named."""
    bad = ~raw.frame["label"].isin(labels).to_numpy()
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        value = raw.frame["label"].iat[first]
        what = "label is empty" if value == "" else f"label {value!r} is not one of {labels}"
        more = f" ({int(bad.sum())} rows like this; preprocess.labels sets the allowed labels)"
        raise LmpipeError(f"{raw.where(first)}: {what}{more}")


def check_texts(raw: Raw) -> None:
    """No text may hold a NUL byte (a binary file, or a field cut by a broken export); the first
    row that does is named."""
    bad = np.fromiter(("\x00" in t for t in raw.frame["text"]), dtype=bool, count=len(raw.frame))
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        more = f" ({int(bad.sum())} rows like this)" if bad.sum() > 1 else ""
        raise LmpipeError(f"{raw.where(first)}: text holds a NUL byte (\\x00){more}; is this a text file?")


# --------------------------------------------------------------------------- cleaning
_BR = re.compile(r"<\s*br\s*/?\s*>", re.IGNORECASE)
# A tag starts with a letter (or / or !--), so "a < b" and "<3" survive as text.
_TAG = re.compile(r"<!--.*?-->|</?[A-Za-z][A-Za-z0-9-]*(?:\s[^<>]*)?/?>", re.DOTALL)


def clean_text(text: str) -> str:
    """`<br />` -> space, other tags removed, entities unescaped, NFKC, whitespace collapsed."""
    text = _BR.sub(" ", text)
    text = _TAG.sub("", text)
    text = html.unescape(text)
    text = unicodedata.normalize("NFKC", text)
    return " ".join(text.split())  # 3x faster than re.sub(r"\s+"); same Unicode whitespace


# --------------------------------------------------------------------------- length
# Characters of the scripts that put no spaces between words: kana (hiragana, katakana and the
# ー length mark; not the ・ separator) and Han (CJK unified ideographs, extension A, extensions
# B-H in the supplementary plane, compatibility ideographs). Hangul is not here: Korean spaces
# its words. Thai, Lao, Khmer and Burmese write no spaces either, but a character there is a
# letter, not a word, so they are counted as one word per space-separated run.
_CJK = re.compile(
    "[\u3041-\u3096\u309d-\u309f\u30a1-\u30fa\u30fc-\u30ff\u31f0-\u31ff"
    "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f]"
)
_ALNUM = re.compile(r"[^\W_]")  # a letter or a digit: "--" and "!!" are no words


def count_words(text: str) -> int:
    """Words in a cleaned text: each Han or kana character, plus each space-separated run of the
    rest holding a letter or digit ("很好看!" is 3, "Great film!" 2, "It's 10/10 :)" 3)."""
    cjk = len(_CJK.findall(text))
    rest = _CJK.sub(" ", text) if cjk else text
    return cjk + sum(1 for token in rest.split() if _ALNUM.search(token))


def text_lengths(texts: pd.Series, unit: str) -> pd.Series:
    """The length of every text in `unit` (`chars` or `words`, see `preprocess.length_unit`)."""
    import pandas as pd

    if unit == "chars":
        return texts.str.len()
    if unit == "words":
        return pd.Series([count_words(t) for t in texts], index=texts.index, dtype=np.int64)
    raise ValueError(f"length unit must be 'chars' or 'words' (got {unit!r})")


def _warn_if_short_texts_are_cjk(short: pd.Series) -> None:
    """In `chars`, short Chinese / Japanese texts are full sentences: say which param keeps them."""
    cjk = int(short.str.contains(_CJK).sum())
    if cjk and cjk * 2 >= len(short):
        log.warning(
            "%d of the %d texts dropped as too_short contain Chinese/Japanese characters; set "
            "preprocess.length_unit: words (and min_chars to a word count, e.g. 4) to keep them",
            cjk,
            len(short),
        )


# --------------------------------------------------------------------------- splitting
@dataclass
class Prepared:
    labels: list[str]
    splits: dict[str, pd.DataFrame]  # text (str), label (int64 id), deterministic order
    metrics: dict[str, Any] = field(default_factory=dict)


def filter_rows(
    frame: pd.DataFrame, min_chars: int, max_chars: int | None, unit: str = "chars"
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Drop empty / too short / too long texts (lengths in `unit`), then duplicates (same text,
    same label: keep the first) and conflicts (same text under different labels: drop every copy)."""
    dropped = dict.fromkeys(DROP_REASONS[1:], 0)
    empty = (frame["text"].str.len() == 0).to_numpy()
    length = text_lengths(frame["text"], unit)
    short = ~empty & (length < min_chars).to_numpy()
    dropped["empty"] = int(empty.sum())
    dropped["too_short"] = int(short.sum())
    if unit == "chars" and short.any():
        _warn_if_short_texts_are_cjk(frame["text"][short])
    keep = ~empty & ~short
    if max_chars is not None:
        long = (length > max_chars).to_numpy()
        dropped["too_long"] = int(long.sum())
        keep &= ~long
    frame = frame[keep]
    repeated = frame["text"].duplicated(keep=False).to_numpy()  # cheap: group only the repeats
    copies = frame[repeated]
    labels_per_text = copies.groupby("text", sort=False)["label"].nunique()
    clashing = set(labels_per_text.index[labels_per_text.to_numpy() > 1])
    conflict = np.zeros(len(frame), dtype=bool)
    conflict[np.flatnonzero(repeated)] = copies["text"].isin(clashing).to_numpy()
    dropped["conflicting_duplicates"] = int(conflict.sum())
    frame = frame[~conflict]
    dup = frame["text"].duplicated(keep="first")
    dropped["duplicates"] = int(dup.sum())
    return frame[~dup].reset_index(drop=True), dropped


def stratified_split(
    label_ids: np.ndarray, n_labels: int, val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[np.ndarray]]:
    """Per label, a seeded permutation of its rows cut into test, val and train (in that order).

    Returns, per split, one array of row positions per label, each in random order, so a cap
    can take a stratified subsample by taking a prefix of each.
    """
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for label in range(n_labels):
        rows = rng.permutation(np.flatnonzero(label_ids == label))
        n_test = int(round(len(rows) * test_fraction))
        n_val = int(round(len(rows) * val_fraction))
        parts["test"].append(rows[:n_test])
        parts["val"].append(rows[n_test : n_test + n_val])
        parts["train"].append(rows[n_test + n_val :])
    return parts


def cap_quotas(sizes: list[int], cap: int | None) -> list[int]:
    """How many rows of each label a split of `cap` rows keeps (largest remainder, proportional)."""
    total = sum(sizes)
    if cap is None or total <= cap:
        return list(sizes)
    exact = np.array(sizes, dtype=float) * cap / total
    quota = np.floor(exact).astype(int)
    order = np.argsort(-(exact - quota), kind="stable")
    quota[order[: cap - int(quota.sum())]] += 1
    return [int(q) for q in quota]


def _quantiles(values: np.ndarray) -> dict[str, float]:
    points = np.percentile(values, [5, 50, 95]) if len(values) else [0.0, 0.0, 0.0]
    return {f"p{q}": round(float(v), 1) for q, v in zip((5, 50, 95), points)}


def split_stats(split: pd.DataFrame, labels: list[str], before_cap: int) -> dict[str, Any]:
    counts = np.bincount(split["label"].to_numpy(), minlength=len(labels))
    texts = split["text"].tolist()
    chars = np.array([len(t) for t in texts])
    words = np.array([t.count(" ") + 1 for t in texts])  # whitespace is collapsed to one space
    return {
        "rows": len(split),
        "rows_before_cap": before_cap,
        "label_share": {lab: round(float(c) / max(len(split), 1), 4) for lab, c in zip(labels, counts)},
        "chars": _quantiles(chars),
        "words": _quantiles(words),
    }


def _check_rows_left(raw: Raw, frame: pd.DataFrame, dropped: dict[str, int]) -> None:
    """Enough filtered rows for three splits, and at least two labels among them."""
    if frame.empty:
        raise LmpipeError(
            f"{raw.name}: no rows left after cleaning and filtering ({raw.rows_in} read, dropped {dropped}); "
            f"lower preprocess.min_chars or raise preprocess.max_chars (for Chinese or Japanese text, "
            f"preprocess.length_unit: words counts a character as a word)"
        )
    lost = ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in dropped.items() if n)
    if len(frame) < len(SPLITS) and lost:
        raise LmpipeError(
            f"{raw.name}: only {len(frame)} of {raw.rows_in} rows left after cleaning and filtering "
            f"(dropped: {lost}); the train, val and test splits need at least {len(SPLITS)} distinct texts"
        )
    present = frame["label"].unique()
    if len(present) == 1:
        raise LmpipeError(
            f"{raw.name}: only one label, {present[0]!r}, in the {len(frame)} rows left after filtering; "
            f"a classifier needs at least two"
        )


def _check_splits(raw: Raw, parts: dict[str, list[np.ndarray]], labels: list[str], rows_left: int) -> None:
    """Every split holds rows (before caps), and so does every label that has rows at all."""
    hints = {
        "train": "lower preprocess.val_fraction / test_fraction",
        "val": "raise preprocess.val_fraction",
        "test": "raise preprocess.test_fraction",
    }
    for name in SPLITS:
        if sum(len(p) for p in parts[name]) == 0:
            raise LmpipeError(
                f"{raw.name}: split {name!r} is empty after filtering ({rows_left} rows left); "
                f"{hints[name]} or lower preprocess.min_chars"
            )
    for index, label in enumerate(labels):
        sizes = {name: len(parts[name][index]) for name in SPLITS}
        total = sum(sizes.values())
        if total and 0 in sizes.values():
            where = ", ".join(f"{name} {n}" for name, n in sizes.items())
            raise LmpipeError(
                f"{raw.name}: label {label!r} has only {total} row{'s' * (total != 1)} after filtering, too few "
                f"to reach every split ({where}); add rows of it or leave it out of the data"
            )


def prepare(raw: Raw, params: Any, seed: int) -> Prepared:
    """Validate labels, clean, filter, deduplicate, split (stratified, seeded) and cap."""
    import pandas as pd

    labels = declared_labels(raw, params.labels)
    check_texts(raw)
    check_labels(raw, labels)
    cleaned = [clean_text(t) for t in raw.frame["text"]]
    frame = pd.DataFrame({"text": cleaned, "label": raw.frame["label"].to_numpy()}, dtype=object)
    frame, dropped = filter_rows(frame, params.min_chars, params.max_chars, params.length_unit)
    dropped = {"excluded": raw.excluded, **dropped}
    _check_rows_left(raw, frame, dropped)
    ids = frame["label"].map({lab: i for i, lab in enumerate(labels)}).to_numpy(dtype=np.int64)
    parts = stratified_split(ids, len(labels), params.val_fraction, params.test_fraction, seed)
    _check_splits(raw, parts, labels, len(frame))
    caps = {"train": params.max_train, "val": params.max_val, "test": params.max_test}
    splits, stats = {}, {}
    for index, name in enumerate(SPLITS):
        sizes = [len(p) for p in parts[name]]
        quotas = cap_quotas(sizes, caps[name])
        rows = np.concatenate([p[:q] for p, q in zip(parts[name], quotas)])
        # Own generator per split: capping train never reorders val or test.
        rows = rows[np.random.default_rng([seed, 1, index]).permutation(len(rows))]
        texts = pd.Series(frame["text"].to_numpy()[rows], dtype=object)  # no arrow copy
        split = pd.DataFrame({"text": texts, "label": ids[rows]})
        splits[name] = split
        stats[name] = split_stats(split, labels, sum(sizes))
    metrics = {
        "rows_in": raw.rows_in,
        "dropped": dropped,
        "rows_out": len(frame),
        "rows_written": sum(len(s) for s in splits.values()),
        "decode_fallbacks": raw.decode_fallbacks,
        "labels": len(labels),
        "splits": stats,
    }
    return Prepared(labels, splits, metrics)


# --------------------------------------------------------------------------- writing
def write_parquet(frame: pd.DataFrame, path: str | Path) -> None:
    """`text` (string) and `label` (int64), zstd, no pandas metadata: same rows, same bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "text": pa.array(frame["text"].tolist(), type=pa.string()),
            "label": pa.array(frame["label"].to_numpy(dtype=np.int64), type=pa.int64()),
        }
    )
    pq.write_table(table, path, compression="zstd")


def write_processed(prepared: Prepared, out_dir: str | Path) -> None:
    out_dir = Path(out_dir)
    for name, split in prepared.splits.items():
        write_parquet(split, out_dir / f"{name}.parquet")
    write_json(out_dir / "labels.json", {"labels": prepared.labels})
    with open(out_dir / "corpus.txt", "w", encoding="utf-8", newline="\n") as corpus:
        for text in prepared.splits["train"]["text"]:  # streamed: no second copy of the corpus
            corpus.write(text + "\n")


def preprocess(raw_dir: str | Path, out_dir: str | Path, params: Any, seed: int) -> dict[str, Any]:
    """The whole stage: read, validate, prepare, write out_dir atomically; return the metrics."""
    raw = load_raw(raw_dir)
    prepared = prepare(raw, params, seed)
    with atomic_dir(out_dir) as tmp:
        write_processed(prepared, tmp)
    return prepared.metrics
