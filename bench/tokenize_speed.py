"""Tokenizer training and encoding speed: our path vs the plain Hugging Face ones, side by side.

Text: the first `mb` MB (whole lines) of `data/processed/corpus.txt` (the pretraining corpus)
when it exists, else generated English-like text; read into memory before any clock starts.

Training (each side in its own process, interleaved):
- `train_ours`: `lmpipe.tokenize.tokenization.train_tokenizer` (WordPiece, BERT normalizer, vocab 8,000,
  min_frequency 2): one extra pass over the text to seed the `##c` pieces in sorted order (for
  byte-identical outputs), then training (twice if a continuation character was missed).
- `train_peer`: the `tokenizers` documentation recipe with the same model, normalizer,
  pre-tokenizer, vocab size and minimum frequency, no seeding pass.

Encoding (the tokenizer `train_ours` just trained, so both sides split the same way):
- `encode_ours`: `lmpipe.tokenize.tokenization.encode_split`, i.e. `Tokenizer.encode_batch` over batches
  of `batch_docs` documents, ids packed into the flat uint16 `.bin` + `.idx.npy` files the
  pretraining stage memory-maps (written to a temp folder: file writes are included).
- `encode_peer`: `AutoTokenizer.from_pretrained(<the saved transformers folder>)` called as
  `tokenizer(texts, add_special_tokens=False)` on the same batches: Python lists of input_ids,
  token_type_ids and attention_mask, the usual `datasets.map` payload.
The token totals of both must agree (same tokenizer, same text), or the run fails.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import common

MODULE = "bench.tokenize_speed"
CORPUS = Path("data/processed/corpus.txt")
TRAIN_SIDES = ("train_ours", "train_peer")
ENCODE_SIDES = ("encode_ours", "encode_peer")
WORDS = (
    "the film was a great and moving story about love loss and hope but the acting felt "
    "wooden while the score soared above every scene I would not watch it again though "
    "my friends loved its bold colours strange humour and unexpected ending"
).split()


def default_config(quick: bool = False) -> dict[str, Any]:
    from lmpipe.core.params import load_params

    tok = load_params(common.ROOT / "params.yaml").tokenize
    config = {
        "corpus": str(CORPUS),
        "mb": 20.0,
        "vocab_size": tok.vocab_size,
        "min_frequency": tok.min_frequency,
        "lowercase": tok.lowercase,
        "batch_docs": tok.batch_docs,
        "tokenizer_dir": "",  # set by the orchestrator: where train_ours saved its tokenizer
        "seed": 0,
    }
    if quick:
        config.update(corpus="", mb=0.05, vocab_size=300, batch_docs=50)
    return config


def load_text(config: dict[str, Any]) -> tuple[list[str], str]:
    """Whole lines of the corpus up to `mb` MB (UTF-8), else generated reviews; and the source."""
    limit = int(config["mb"] * 1e6)
    corpus = Path(config["corpus"]) if config.get("corpus") else None
    lines: list[str] = []
    size = 0
    if corpus is not None and corpus.is_file():
        with open(corpus, encoding="utf-8") as handle:
            for line in handle:
                line = line.rstrip("\n")
                lines.append(line)
                size += len(line.encode("utf-8")) + 1
                if size >= limit:
                    break
        return lines, f"{corpus} (first {size / 1e6:.1f} MB)"
    import random

    rng = random.Random(config["seed"])
    while size < limit:
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(50, 400))) + "."
        lines.append(line)
        size += len(line) + 1
    return lines, f"generated text ({size / 1e6:.1f} MB; {CORPUS} missing)"


def batched(lines: list[str], size: int) -> list[list[str]]:
    return [lines[i : i + size] for i in range(0, len(lines), size)]


def run_side(side: str, config: dict[str, Any]) -> dict[str, Any]:
    lines, source = load_text(config)
    utf8 = sum(len(x.encode("utf-8")) for x in lines)
    result: dict[str, Any] = {"side": side, "text": source, "documents": len(lines), "mb": utf8 / 1e6}
    if side in TRAIN_SIDES:
        result.update(_train(side, config, lines))
        result["summary"] = f"trained in {result['train_seconds']:.1f} s"
    elif side in ENCODE_SIDES:
        result.update(_encode(side, config, lines))
        result["mb_per_s"] = result["mb"] / result["encode_seconds"]
        result["summary"] = f"{result['mb_per_s']:.2f} MB/s, {result['tokens']} tokens"
    else:
        raise ValueError(f"side must be one of {TRAIN_SIDES + ENCODE_SIDES} (got {side!r})")
    result["peak_rss_mb"] = common.peak_rss_mb()
    return result


def _train(side: str, config: dict[str, Any], lines: list[str]) -> dict[str, Any]:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    from lmpipe.tokenize import tokenization

    batches = batched(lines, tokenization.TRAIN_BATCH_LINES)
    start = time.perf_counter()
    if side == "train_ours":
        tokenizer = tokenization.train_tokenizer(
            lambda: iter(batches), "wordpiece", config["vocab_size"], config["min_frequency"], config["lowercase"]
        )
    else:
        tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tokenizer.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=config["lowercase"], lowercase=config["lowercase"]
        )
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        trainer = trainers.WordPieceTrainer(
            vocab_size=config["vocab_size"],
            min_frequency=config["min_frequency"],
            special_tokens=list(tokenization.SPECIAL_TOKENS.values()),
            show_progress=False,
        )
        tokenizer.train_from_iterator(iter(batches), trainer=trainer)
    seconds = time.perf_counter() - start
    if side == "train_ours" and config.get("tokenizer_dir"):
        out = Path(config["tokenizer_dir"])
        out.mkdir(parents=True, exist_ok=True)
        tokenization.save_tokenizer(tokenizer, out, "wordpiece", config["lowercase"])
    return {"train_seconds": seconds, "vocab": tokenizer.get_vocab_size()}


def _tokenizer_dir(config: dict[str, Any], lines: list[str]) -> Path:
    """The orchestrator's saved tokenizer, or (stand-alone / unit test) one trained here, untimed."""
    if config.get("tokenizer_dir") and (Path(config["tokenizer_dir"]) / "tokenizer.json").is_file():
        return Path(config["tokenizer_dir"])
    from lmpipe.tokenize import tokenization

    out = Path(tempfile.mkdtemp(prefix="lmpipe-bench-tok-"))
    tok = tokenization.train_tokenizer(
        lambda: iter(batched(lines, 1000)),
        "wordpiece",
        config["vocab_size"],
        config["min_frequency"],
        config["lowercase"],
    )
    tokenization.save_tokenizer(tok, out, "wordpiece", config["lowercase"])
    return out


def _encode(side: str, config: dict[str, Any], lines: list[str]) -> dict[str, Any]:
    folder = _tokenizer_dir(config, lines)
    batches = batched(lines, config["batch_docs"])
    if side == "encode_ours":
        from tokenizers import Tokenizer

        from lmpipe.tokenize import tokenization

        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        dtype = tokenization.token_dtype(tokenizer.get_vocab_size())
        with tempfile.TemporaryDirectory(prefix="lmpipe-bench-tokens-") as out:
            start = time.perf_counter()
            stats = tokenization.encode_split(tokenizer, iter(batches), out, "train", dtype)
            seconds = time.perf_counter() - start
        tokens = stats.tokens
        what = "tokenizers encode_batch -> packed uint16 .bin + .idx.npy"
    else:
        import transformers
        from transformers import AutoTokenizer

        transformers.utils.logging.set_verbosity_error()
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        tokens = 0
        start = time.perf_counter()
        for texts in batches:
            encoded = tokenizer(texts, add_special_tokens=False)
            tokens += sum(len(ids) for ids in encoded["input_ids"])
        seconds = time.perf_counter() - start
        what = f"{type(tokenizer).__name__}.__call__ -> Python lists"
    if folder != Path(config.get("tokenizer_dir") or "-"):
        shutil.rmtree(folder, ignore_errors=True)
    return {"encode_seconds": seconds, "tokens": int(tokens), "path": what}


def orchestrate(config: dict[str, Any], repeats: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="lmpipe-bench-tokdir-") as tmp:
        config = {**config, "tokenizer_dir": tmp}
        train = common.interleave(MODULE, TRAIN_SIDES, config, repeats, common.log)
        encode = common.interleave(MODULE, ENCODE_SIDES, config, repeats, common.log)
    counts = {r["tokens"] for side in encode.values() for r in side}
    if len(counts) != 1:
        raise RuntimeError(f"ours and the peer produced different token totals {sorted(counts)}: not comparable")
    ours_train, peer_train = (
        common.med(train["train_ours"], "train_seconds"),
        common.med(train["train_peer"], "train_seconds"),
    )
    ours_mbs, peer_mbs = common.med(encode["encode_ours"], "mb_per_s"), common.med(encode["encode_peer"], "mb_per_s")
    first = encode["encode_ours"][0]
    what = (
        f"{first['text']}, {first['documents']} documents, {first['tokens']} tokens; WordPiece vocab "
        f"{config['vocab_size']}, batches of {config['batch_docs']} documents"
    )
    rows = [
        common.row(
            "tokenize_speed",
            "encode",
            "lmpipe encode_split (packed arrays)",
            "transformers tokenizer __call__",
            round(ours_mbs, 3),
            round(peer_mbs, 3),
            "MB/s",
            "higher",
            f"same tokenizer, same {counts.pop()} tokens; {common.load_note(encode)}",
        ),
        common.row(
            "tokenize_speed",
            "train tokenizer",
            "lmpipe train_tokenizer (seeded, deterministic)",
            "tokenizers WordPieceTrainer recipe",
            round(ours_train, 2),
            round(peer_train, 2),
            "s",
            "lower",
            f"same text, vocab, normalizer; {common.load_note(train)}",
        ),
    ]
    return {"benchmark": "tokenize_speed", "description": what, "rows": rows, "runs": {**train, **encode}}


if __name__ == "__main__":
    raise SystemExit(common.main(MODULE, run_side, orchestrate, default_config))
