"""Stage `tokenize`: train a subword tokenizer and pack the corpus into token arrays.

Reads `data/processed/corpus.txt` (the train split, one document per line) and
`data/processed/val.parquet` (column `text`). Writes `models/tokenizer/` (a transformers folder
that `AutoTokenizer.from_pretrained` loads), `data/tokens/` (`train.bin`, `val.bin`,
`train.idx.npy`, `val.idx.npy`, `meta.json`) and `reports/tokenize/metrics.json`.
(Named tokenize_corpus so it never shadows the standard library's `tokenize`.)

Features:
- WordPiece (BERT) or BPE, trained with `tokenizers` on the train split only (no val leakage),
  streamed from disk in batches of lines;
- BERT special tokens and templates: [CLS] A [SEP] and [CLS] A [SEP] B [SEP], ids read from the
  tokenizer; uint16 token ids up to 65,535 words of vocabulary, uint32 beyond;
- encoding in batches of `tokenize.batch_docs` documents: memory bounded by one batch;
- byte-identical outputs for the same corpus and params; both output folders appear whole
  or not at all;
- metrics: vocabulary, documents and tokens per split, tokens per document (mean/p50/p95),
  [UNK] rate, characters per token, training seconds and encoding MB/s.
"""

from __future__ import annotations

from pathlib import Path

from lmpipe.core.io import atomic_dir
from lmpipe.core.params import load_params
from lmpipe.core.reports import write_stage_reports
from lmpipe.core.stage import run
from lmpipe.core.tracking import stage_run
from lmpipe.tokenize import tokenization

PROCESSED = Path("data/processed")
CORPUS = PROCESSED / "corpus.txt"
VAL = PROCESSED / "val.parquet"
TOKENIZER_DIR = Path("models/tokenizer")
TOKENS_DIR = Path("data/tokens")
METRICS = Path("reports/tokenize/metrics.json")


def main() -> dict[str, float]:
    params = load_params()
    cfg = params.tokenize
    tokenization.check_corpus(CORPUS)
    tokenization.check_parquet_texts(VAL, "text")
    with stage_run(
        "tokenize",
        params,
        sections=("tokenize",),
        inputs=(str(CORPUS), str(VAL)),
        outputs=(str(TOKENIZER_DIR), str(TOKENS_DIR)),
    ) as tracker:
        with atomic_dir(TOKENIZER_DIR) as tokenizer_tmp, atomic_dir(TOKENS_DIR) as tokens_tmp:
            metrics = tokenization.build(
                CORPUS,
                VAL,
                tokenizer_tmp,
                tokens_tmp,
                algorithm=cfg.algorithm,
                vocab_size=cfg.vocab_size,
                min_frequency=cfg.min_frequency,
                lowercase=cfg.lowercase,
                batch_docs=cfg.batch_docs,
            )
        write_stage_reports("tokenize", Path(METRICS).parent, metrics)
        tracker.log_metrics(metrics)
        tracker.log_input(CORPUS, context="train")
        tracker.log_input(VAL, context="val")
        tracker.log_artifact(TOKENS_DIR / "meta.json")
    return metrics


if __name__ == "__main__":
    run(main)
