"""Subword tokenizer training and packed token arrays for pretraining.

- `train_tokenizer` trains a WordPiece (BERT) or BPE model with the `tokenizers` library on an
  iterator of batches of lines, so the corpus streams from disk and never sits in memory whole.
- `to_transformers` / `save_tokenizer` wrap it so `AutoTokenizer.from_pretrained(folder)` loads a
  fast BERT-style tokenizer ([CLS] A [SEP] / [CLS] A [SEP] B [SEP], token_type_ids, [MASK]).
- `encode_split` encodes documents batch by batch (`encode_batch`, no special tokens) into a
  flat `<split>.bin` (written with `ndarray.tofile`) and `<split>.idx.npy` (int64 document
  start offsets, n_docs + 1 of them): memory is bounded by one batch whatever the corpus size.
- `load_token_split` opens them again as a read-only `np.memmap` plus the offsets.

Every output is a pure function of the corpus and the params: the same inputs give the same
bytes (checked by tests/unit/test_tokenization.py).
"""

from __future__ import annotations

import itertools
import json
import shutil
import sys
import time
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from lmpipe.core.errors import LmpipeError
from lmpipe.core.io import write_json

# Name -> token, in the order the trainer assigns ids (so [PAD] = 0, [UNK] = 1, ...); read ids
# from the tokenizer (`special_token_ids`), never from this order.
SPECIAL_TOKENS = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}
# BERT's limit; a model with fewer positions sets its own when it copies the tokenizer.
MODEL_MAX_LENGTH = 512
TRAIN_BATCH_LINES = 1000  # lines per batch handed to the trainer (~1.3 MB of IMDB reviews)
UINT16_MAX_VOCAB = 65535
SPLITS = ("train", "val")


# --------------------------------------------------------------------------- reading text
def iter_line_batches(path: str | Path, batch_lines: int) -> Iterator[list[str]]:
    """Yield the lines of a UTF-8 text file (one document each, newline removed) in batches."""
    path = Path(path)
    batch: list[str] = []
    try:
        with open(path, encoding="utf-8", newline="\n") as handle:
            for line in handle:
                batch.append(line.rstrip("\n"))
                if len(batch) == batch_lines:
                    yield batch
                    batch = []
    except UnicodeDecodeError as exc:
        raise LmpipeError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    if batch:
        yield batch


def iter_parquet_texts(path: str | Path, column: str, batch_rows: int) -> Iterator[list[str]]:
    """Yield one column of a Parquet file as lists of strings, `batch_rows` at a time."""
    import pyarrow.parquet as pq

    path = Path(path)
    handle = pq.ParquetFile(path)
    row = 0
    for batch in handle.iter_batches(batch_size=batch_rows, columns=[column]):
        texts = batch.column(0).to_pylist()
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise LmpipeError(f"{path} row {row + i}: {column} is {text!r}, expected text")
        row += len(texts)
        yield texts


def check_corpus(path: str | Path) -> None:
    """Fail with one line unless `path` exists and holds at least one non-blank line."""
    path = Path(path)
    if not path.is_file():
        raise LmpipeError(f"{path}: file not found (run the preprocess stage first)")
    for batch in iter_line_batches(path, TRAIN_BATCH_LINES):
        if any(line.strip() for line in batch):
            return
    raise LmpipeError(f"{path}: empty corpus, no document to train the tokenizer on")


def check_parquet_texts(path: str | Path, column: str = "text") -> None:
    """Fail with one line unless `path` is a Parquet file with rows and a string `column`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise LmpipeError(f"{path}: file not found (run the preprocess stage first)")
    try:
        handle = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise LmpipeError(f"{path}: not a Parquet file ({exc})") from None
    schema = handle.schema_arrow
    if column not in schema.names:
        raise LmpipeError(f"{path}: no column {column!r} (columns: {schema.names})")
    kind = schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise LmpipeError(f"{path}: column {column!r} holds {kind}, expected strings")
    if handle.metadata.num_rows == 0:
        raise LmpipeError(f"{path}: no rows")


# --------------------------------------------------------------------------- the tokenizer
def new_tokenizer(algorithm: str, lowercase: bool) -> tuple[Tokenizer, trainers.Trainer]:
    """An untrained tokenizer (BERT normalizer, pre-tokenizer, decoder) and its trainer class."""
    if algorithm == "wordpiece":
        tokenizer = Tokenizer(models.WordPiece(unk_token=SPECIAL_TOKENS["unk"]))
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.WordPiece(prefix="##")
        trainer_class = trainers.WordPieceTrainer
    elif algorithm == "bpe":
        tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk"]))
        tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
        trainer_class = trainers.BpeTrainer
    else:
        raise LmpipeError(f"tokenize.algorithm must be 'wordpiece' or 'bpe' (got {algorithm!r})")
    # strip_accents follows lowercase, as in BERT-uncased (and as BertTokenizer rebuilds it).
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=lowercase, lowercase=lowercase
    )
    return tokenizer, trainer_class


def _is_isolated(char: str) -> bool:
    """True for characters BertPreTokenizer always splits off (whitespace, punctuation)."""
    return char.isspace() or unicodedata.category(char).startswith("P") or (char.isascii() and not char.isalnum())


def continuation_seeds(batches: Iterable[list[str]], normalizer: normalizers.Normalizer) -> list[str]:
    """`##c` for every character c that may continue a word, sorted (see `train_tokenizer`).

    One cheap pass over the raw characters (~1 s for 50 MB); each distinct character goes
    through the normalizer alone. A character the normalizer pads with spaces (CJK) or that the
    pre-tokenizer splits off (punctuation, whitespace) never continues a word.
    """
    raw: set[str] = set()
    for texts in batches:
        for text in texts:
            raw.update(text)
    seeds = set()
    for char in raw:
        normalized = normalizer.normalize_str(char)
        if " " in normalized:
            continue
        seeds.update(f"##{c}" for c in normalized if not _is_isolated(c))
    return sorted(seeds)


def _train_once(
    batches: Iterable[list[str]],
    algorithm: str,
    vocab_size: int,
    min_frequency: int,
    lowercase: bool,
    seeds: list[str],
) -> Tokenizer:
    tokenizer, trainer_class = new_tokenizer(algorithm, lowercase)
    trainer = trainer_class(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS.values()) + seeds,
        show_progress=sys.stderr.isatty(),
    )
    tokenizer.train_from_iterator(batches, trainer=trainer)
    return tokenizer


def _unseeded(tokenizer: Tokenizer, seeds: list[str]) -> list[str]:
    """Single-character `##c` pieces the trainer had to create itself (ids in hash order)."""
    known = set(seeds)
    vocab = tokenizer.get_vocab(with_added_tokens=False)
    return sorted(t for t in vocab if t.startswith("##") and len(t) == 3 and t not in known)


def train_tokenizer(
    batches: Callable[[], Iterable[list[str]]],
    algorithm: str = "wordpiece",
    vocab_size: int = 8000,
    min_frequency: int = 2,
    lowercase: bool = True,
) -> Tokenizer:
    """Train on batches of documents (`batches()` gives a fresh iterator per pass).

    Determinism: `tokenizers` 0.23's WordPiece trainer gives the `##c` continuation pieces ids
    in hash-map order, which differs between runs and, through tie-breaking, can change the
    merges themselves (huggingface/tokenizers#1794). We hand the trainer every `##c` up front,
    in sorted order, as extra special tokens, so it creates none itself; then drop them from
    the added-token list so they stay ordinary vocabulary. Should the normalizer produce a
    continuation character the seed pass missed, training runs once more with it seeded.
    BPE here has no continuation prefix and needs none of this.
    """
    seeds: list[str] = []
    if algorithm == "wordpiece":
        seeds = continuation_seeds(batches(), new_tokenizer(algorithm, lowercase)[0].normalizer)
    tokenizer = _train_once(batches(), algorithm, vocab_size, min_frequency, lowercase, seeds)
    missing = _unseeded(tokenizer, seeds) if algorithm == "wordpiece" else []
    if missing:
        seeds = sorted(seeds + missing)
        tokenizer = _train_once(batches(), algorithm, vocab_size, min_frequency, lowercase, seeds)

    state = json.loads(tokenizer.to_str())
    specials = set(SPECIAL_TOKENS.values())
    state["added_tokens"] = [t for t in state["added_tokens"] if t["content"] in specials]
    tokenizer = Tokenizer.from_str(json.dumps(state))

    cls, sep = SPECIAL_TOKENS["cls"], SPECIAL_TOKENS["sep"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{cls}:0 $A:0 {sep}:0",
        pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(cls, tokenizer.token_to_id(cls)), (sep, tokenizer.token_to_id(sep))],
    )
    return tokenizer


def to_transformers(tokenizer: Tokenizer, algorithm: str, lowercase: bool, model_max_length: int = MODEL_MAX_LENGTH):
    """Wrap a trained tokenizer as a transformers fast tokenizer with BERT's special tokens.

    WordPiece becomes a `BertTokenizer` (transformers 5's fast BERT class; it rebuilds the
    normalizer from do_lower_case/strip_accents on load, which match ours). BPE becomes a generic
    `PreTrainedTokenizerFast`, which loads tokenizer.json as it is.
    """
    from transformers import BertTokenizer, PreTrainedTokenizerFast

    names = {f"{name}_token": token for name, token in SPECIAL_TOKENS.items()}
    common = dict(tokenizer_object=tokenizer, model_max_length=model_max_length, **names)
    if algorithm == "wordpiece":
        return BertTokenizer(do_lower_case=lowercase, strip_accents=lowercase, **common)
    return PreTrainedTokenizerFast(model_input_names=["input_ids", "token_type_ids", "attention_mask"], **common)


def save_tokenizer(tokenizer: Tokenizer, out_dir: str | Path, algorithm: str, lowercase: bool) -> list[str]:
    """Write the transformers folder (tokenizer.json + tokenizer_config.json); return file names."""
    wrapped = to_transformers(tokenizer, algorithm, lowercase)
    wrapped.save_pretrained(str(out_dir))
    return sorted(p.name for p in Path(out_dir).iterdir())


def special_token_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """{"cls": id, "sep": id, "pad": id, "mask": id, "unk": id}, read from the tokenizer."""
    ids = {name: tokenizer.token_to_id(token) for name, token in SPECIAL_TOKENS.items()}
    missing = [SPECIAL_TOKENS[name] for name, i in ids.items() if i is None]
    if missing:
        raise LmpipeError(f"tokenizer has no id for special tokens {missing}")
    return ids


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id: uint16 up to 65,535 tokens, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= UINT16_MAX_VOCAB else np.uint32)


# --------------------------------------------------------------------------- packed token arrays
@dataclass
class SplitStats:
    """What encoding one split measured (counts are exact; seconds are wall time)."""

    documents: int = 0
    tokens: int = 0
    chars: int = 0
    utf8_bytes: int = 0
    unk_tokens: int = 0
    seconds: float = 0.0
    lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64), repr=False)


def split_paths(tokens_dir: str | Path, split: str) -> tuple[Path, Path]:
    tokens_dir = Path(tokens_dir)
    return tokens_dir / f"{split}.bin", tokens_dir / f"{split}.idx.npy"


def _write_npy_from_raw(raw: Path, target: Path, dtype: np.dtype, count: int) -> None:
    """Turn a raw array file into a .npy (header + the same bytes) without loading it."""
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (count,)}
    with open(target, "wb") as out, open(raw, "rb") as src:
        np.lib.format.write_array_header_1_0(out, header)
        shutil.copyfileobj(src, out)
    raw.unlink()


def encode_split(
    tokenizer: Tokenizer,
    batches: Iterable[list[str]],
    tokens_dir: str | Path,
    split: str,
    dtype: np.dtype,
    total: int | None = None,
) -> SplitStats:
    """Encode batches of documents (no special tokens) into `<split>.bin` and `<split>.idx.npy`.

    Only one batch of text and ids is in memory at a time; offsets stream to a raw file that
    becomes the .npy at the end. Returns counts for the metrics.
    """
    from tqdm import tqdm

    bin_path, idx_path = split_paths(tokens_dir, split)
    raw_idx = idx_path.with_suffix(".raw")
    unk_id = tokenizer.token_to_id(SPECIAL_TOKENS["unk"])
    stats = SplitStats()
    start = time.perf_counter()
    # A literal "[SEP]" in a review is text, not a separator: no special token inside documents.
    split_specials, tokenizer.encode_special_tokens = tokenizer.encode_special_tokens, True
    with open(bin_path, "wb") as bin_out, open(raw_idx, "wb") as idx_out:
        np.zeros(1, dtype=np.int64).tofile(idx_out)
        bar = tqdm(total=total, desc=f"encode {split}", unit="doc", disable=not sys.stderr.isatty())
        for texts in batches:
            encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
            lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
            n_tokens = int(lengths.sum())
            ids = np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), dtype=dtype, count=n_tokens)
            ids.tofile(bin_out)
            (stats.tokens + np.cumsum(lengths)).tofile(idx_out)
            stats.documents += len(texts)
            stats.tokens += n_tokens
            stats.unk_tokens += int(np.count_nonzero(ids == unk_id))
            stats.chars += sum(len(t) for t in texts)
            stats.utf8_bytes += sum(len(t.encode("utf-8")) for t in texts)
            bar.update(len(texts))
        bar.close()
    tokenizer.encode_special_tokens = split_specials
    stats.seconds = time.perf_counter() - start
    _write_npy_from_raw(raw_idx, idx_path, np.dtype(np.int64), stats.documents + 1)
    stats.lengths = np.diff(np.load(idx_path, mmap_mode="r"))
    return stats


def load_token_split(tokens_dir: str | Path, split: str) -> tuple[np.memmap, np.ndarray]:
    """Open `<split>.bin` as a read-only memmap (dtype from meta.json) and its int64 offsets.

    Document i is `tokens[offsets[i]:offsets[i + 1]]`; `offsets[-1]` is the token count.
    """
    tokens_dir = Path(tokens_dir)
    meta_path = tokens_dir / "meta.json"
    if not meta_path.is_file():
        raise LmpipeError(f"{meta_path}: file not found (run the tokenize stage first)")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if split not in meta:
        raise LmpipeError(f"{meta_path}: no split {split!r} (has {[s for s in SPLITS if s in meta]})")
    bin_path, idx_path = split_paths(tokens_dir, split)
    for path in (bin_path, idx_path):
        if not path.is_file():
            raise LmpipeError(f"{path}: file not found (run the tokenize stage first)")
    dtype = np.dtype(meta["dtype"])
    offsets = np.load(idx_path)
    size = bin_path.stat().st_size
    if size != int(offsets[-1]) * dtype.itemsize or offsets[-1] != meta[split]["tokens"]:
        raise LmpipeError(
            f"{bin_path}: holds {size // dtype.itemsize} tokens but {idx_path.name} ends at "
            f"{int(offsets[-1])} and meta.json says {meta[split]['tokens']}"
        )
    if size == 0:  # np.memmap cannot map an empty file
        return np.zeros(0, dtype=dtype).view(np.memmap), offsets
    return np.memmap(bin_path, dtype=dtype, mode="r"), offsets


# --------------------------------------------------------------------------- the whole job
def _percentile(lengths: np.ndarray, q: float) -> float:
    return float(np.percentile(lengths, q)) if len(lengths) else 0.0


def build(
    corpus: str | Path,
    val_parquet: str | Path,
    tokenizer_dir: str | Path,
    tokens_dir: str | Path,
    algorithm: str = "wordpiece",
    vocab_size: int = 8000,
    min_frequency: int = 2,
    lowercase: bool = True,
    batch_docs: int = 2000,
) -> dict[str, float]:
    """Train on `corpus` (train split), save the tokenizer, encode train and val; return metrics.

    `tokenizer_dir` and `tokens_dir` must exist (the stage passes atomic temp folders).
    """
    start = time.perf_counter()
    tokenizer = train_tokenizer(
        lambda: iter_line_batches(corpus, TRAIN_BATCH_LINES),
        algorithm,
        vocab_size,
        min_frequency,
        lowercase,
    )
    train_seconds = time.perf_counter() - start
    save_tokenizer(tokenizer, tokenizer_dir, algorithm, lowercase)

    actual_vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    dtype = token_dtype(actual_vocab)
    sources = {
        "train": iter_line_batches(corpus, batch_docs),
        "val": iter_parquet_texts(val_parquet, "text", batch_docs),
    }
    stats = {s: encode_split(tokenizer, sources[s], tokens_dir, s, dtype) for s in SPLITS}

    meta = {
        "dtype": dtype.name,
        "vocab_size": actual_vocab,
        "special_tokens": special_token_ids(tokenizer),
        **{split: {"documents": s.documents, "tokens": s.tokens} for split, s in stats.items()},
    }
    write_json(Path(tokens_dir) / "meta.json", meta)

    train, val = stats["train"], stats["val"]
    encode_bytes = train.utf8_bytes + val.utf8_bytes
    encode_seconds = train.seconds + val.seconds
    return {
        "vocab_size": actual_vocab,
        "train_documents": train.documents,
        "train_tokens": train.tokens,
        "val_documents": val.documents,
        "val_tokens": val.tokens,
        "tokens_per_doc_mean": train.tokens / max(train.documents, 1),
        "tokens_per_doc_p50": _percentile(train.lengths, 50),
        "tokens_per_doc_p95": _percentile(train.lengths, 95),
        "train_unk_rate": train.unk_tokens / max(train.tokens, 1),
        "val_unk_rate": val.unk_tokens / max(val.tokens, 1),
        "chars_per_token": train.chars / max(train.tokens, 1),
        "tokenizer_train_seconds": round(train_seconds, 3),
        "encode_seconds": round(encode_seconds, 3),
        "encode_mb_per_s": round(encode_bytes / 1e6 / max(encode_seconds, 1e-9), 3),
    }
