"""lmpipe.tokenize.tokenization and stages/tokenize_corpus.py on a tiny generated corpus (vocab ~200)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from lmpipe.core.errors import LmpipeError
from lmpipe.core.io import read_json
from lmpipe.tokenize import tokenization

SYLLABLES = ["ka", "ro", "mi", "te", "su", "lan", "dor", "vé", "qui", "bo", "ne", "tra", "ça", "zu"]
FILLERS = ["the", "movie", "was", "a", "and", "not", "very", "film", "plot", "actor"]
VOCAB = 200


def make_docs(n: int, seed: int) -> list[str]:
    """Sentences of made-up words: enough shared pieces for WordPiece/BPE merges to matter."""
    rng = random.Random(seed)
    words = ["".join(rng.choices(SYLLABLES, k=rng.randint(1, 4))) for _ in range(150)] + FILLERS * 5
    docs = []
    for _ in range(n):
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(2, 25)))
        docs.append(sentence.capitalize() + rng.choice([".", "!", "?", ", truly."]))
    return docs


def write_processed(root: Path, train: list[str], val: list[str]) -> Path:
    processed = root / "data" / "processed"
    processed.mkdir(parents=True, exist_ok=True)
    (processed / "corpus.txt").write_text("".join(d + "\n" for d in train), encoding="utf-8", newline="\n")
    table = pa.table({"text": pa.array(val, pa.string()), "label": pa.array([0] * len(val), pa.int64())})
    pq.write_table(table, processed / "val.parquet")
    return processed


TRAIN_DOCS = make_docs(300, seed=0) + [
    "",  # an empty document keeps its (empty) slot
    "A review that quotes [SEP] and [CLS] [MASK] literally stays text.",
    "Ünïcödé Ça VÉ — 映画 🎬 kamiro!",
]
VAL_DOCS = make_docs(40, seed=1)


def build(root: Path, train=TRAIN_DOCS, val=VAL_DOCS, **kwargs) -> tuple[Path, Path, dict]:
    processed = write_processed(root, train, val)
    tok_dir, tokens_dir = root / "tokenizer", root / "tokens"
    tok_dir.mkdir()
    tokens_dir.mkdir()
    kwargs = {"vocab_size": VOCAB, "batch_docs": 16, **kwargs}
    corpus, val_parquet = processed / "corpus.txt", processed / "val.parquet"
    metrics = tokenization.build(corpus, val_parquet, tok_dir, tokens_dir, **kwargs)
    return tok_dir, tokens_dir, metrics


@pytest.fixture(scope="module", params=["wordpiece", "bpe"])
def built(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    tok_dir, tokens_dir, metrics = build(root, algorithm=request.param)
    return request.param, tok_dir, tokens_dir, metrics


def raw_tokenizer(tok_dir: Path):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    tok.encode_special_tokens = True  # as the bins are encoded: "[SEP]" in text is text
    return tok


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# --------------------------------------------------------------------------- the tokenizer
def test_autotokenizer_loads_folder_with_bert_template(built):
    from transformers import AutoTokenizer

    algorithm, tok_dir, tokens_dir, _ = built
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    meta = read_json(tokens_dir / "meta.json")
    raw = raw_tokenizer(tok_dir)

    assert tok.is_fast
    assert type(tok).__name__ == ("BertTokenizer" if algorithm == "wordpiece" else "TokenizersBackend")
    names = {name: getattr(tok, f"{name}_token") for name in ("cls", "sep", "pad", "mask", "unk")}
    assert names == {"cls": "[CLS]", "sep": "[SEP]", "pad": "[PAD]", "mask": "[MASK]", "unk": "[UNK]"}
    assert {k: tok.convert_tokens_to_ids(v) for k, v in names.items()} == meta["special_tokens"]
    assert len(set(meta["special_tokens"].values())) == 5
    assert tok.model_max_length == tokenization.MODEL_MAX_LENGTH

    first, second = "Kamiro the movie was VÉ", "not very tradorsu"
    body_a = raw.encode(first, add_special_tokens=False).ids
    body_b = raw.encode(second, add_special_tokens=False).ids
    cls, sep = meta["special_tokens"]["cls"], meta["special_tokens"]["sep"]
    single = tok(first)
    assert single["input_ids"] == [cls, *body_a, sep]
    pair = tok(first, second)
    assert pair["input_ids"] == [cls, *body_a, sep, *body_b, sep]
    assert pair["token_type_ids"] == [0] * (len(body_a) + 2) + [1] * (len(body_b) + 1)
    decoded = tok.decode(single["input_ids"], skip_special_tokens=True)
    assert decoded.replace(" ", "") == "kamirothemoviewasve"


def test_lowercase_false_keeps_case_and_accents(tmp_path):
    from transformers import AutoTokenizer

    tok_dir, _, _ = build(tmp_path, lowercase=False)
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    raw = raw_tokenizer(tok_dir)
    text = "Ça VÉ kamiro"
    assert tok(text, add_special_tokens=False)["input_ids"] == raw.encode(text, add_special_tokens=False).ids
    assert "".join(tok.tokenize(text)).replace("##", "") == text.replace(" ", "")


def test_wordpiece_training_is_deterministic():
    """tokenizers' own WordPiece trainer numbers `##c` pieces in hash order (15 of 15 runs
    differ on this corpus); ours must give the same tokenizer every time."""
    docs = make_docs(300, seed=0)

    def batches():
        return (docs[i : i + 50] for i in range(0, len(docs), 50))

    states = {tokenization.train_tokenizer(batches, "wordpiece", VOCAB).to_str() for _ in range(6)}
    assert len(states) == 1


def test_continuation_pieces_missed_by_the_seed_pass_are_retrained_deterministically(monkeypatch):
    docs = make_docs(300, seed=0)

    def batches():
        return (docs[i : i + 50] for i in range(0, len(docs), 50))

    # a seed pass that finds nothing: every `##c` must come from the retraining fallback
    monkeypatch.setattr(tokenization, "continuation_seeds", lambda *args: [])
    states = {tokenization.train_tokenizer(batches, "wordpiece", VOCAB).to_str() for _ in range(6)}
    assert len(states) == 1
    assert '"##a"' in states.pop()


def test_continuation_pieces_are_vocabulary_not_special_tokens(built):
    algorithm, tok_dir, _, _ = built
    state = read_json(tok_dir / "tokenizer.json")
    assert [t["content"] for t in state["added_tokens"]] == list(tokenization.SPECIAL_TOKENS.values())
    if algorithm == "wordpiece":
        assert "##a" in state["model"]["vocab"]


def test_vocab_is_trained_on_the_train_split_only(tmp_path):
    val = ["gjgjgj jjgg " * 5] * 40  # frequent in val; 'g' and 'j' never occur in train
    tok_dir, _, metrics = build(tmp_path, val=val)
    vocab = read_json(tok_dir / "tokenizer.json")["model"]["vocab"]
    assert not any("g" in piece or "j" in piece for piece in vocab)
    assert metrics["val_unk_rate"] > 0


# --------------------------------------------------------------------------- packed tokens
def test_token_files_round_trip_to_direct_encoding(built):
    _, tok_dir, tokens_dir, metrics = built
    raw = raw_tokenizer(tok_dir)
    meta = read_json(tokens_dir / "meta.json")
    for split, docs in (("train", TRAIN_DOCS), ("val", VAL_DOCS)):
        tokens, offsets = tokenization.load_token_split(tokens_dir, split)
        assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16
        assert offsets.dtype == np.int64 and len(offsets) == len(docs) + 1
        assert offsets[0] == 0 and offsets[-1] == len(tokens) == meta[split]["tokens"]
        assert meta[split]["documents"] == len(docs) == metrics[f"{split}_documents"]
        for i, doc in enumerate(docs):
            expected = raw.encode(doc, add_special_tokens=False).ids
            assert tokens[offsets[i] : offsets[i + 1]].tolist() == expected


def test_documents_keep_boundaries_and_no_special_tokens_inside(built):
    _, _, tokens_dir, _ = built
    meta = read_json(tokens_dir / "meta.json")
    tokens, offsets = tokenization.load_token_split(tokens_dir, "train")
    lengths = np.diff(offsets)
    assert (lengths >= 0).all()
    assert lengths[TRAIN_DOCS.index("")] == 0
    assert (lengths[: len(make_docs(300, 0))] > 0).all()
    special = {meta["special_tokens"][k] for k in ("cls", "sep", "pad", "mask")}
    assert not special & set(np.unique(tokens).tolist())


def test_metrics_agree_with_token_files(built):
    _, tok_dir, tokens_dir, metrics = built
    meta = read_json(tokens_dir / "meta.json")
    lengths = np.diff(tokenization.load_token_split(tokens_dir, "train")[1])
    assert metrics["vocab_size"] == meta["vocab_size"] <= VOCAB
    assert metrics["train_tokens"] == meta["train"]["tokens"]
    assert metrics["val_tokens"] == meta["val"]["tokens"]
    assert metrics["tokens_per_doc_mean"] == pytest.approx(lengths.mean())
    assert metrics["tokens_per_doc_p50"] == np.percentile(lengths, 50) <= metrics["tokens_per_doc_p95"]
    assert metrics["chars_per_token"] == pytest.approx(sum(map(len, TRAIN_DOCS)) / lengths.sum())
    assert 0 <= metrics["train_unk_rate"] < 0.05 and metrics["encode_mb_per_s"] > 0


def test_token_dtype_widens_past_uint16():
    assert tokenization.token_dtype(VOCAB) == np.uint16
    assert tokenization.token_dtype(65535) == np.uint16
    assert tokenization.token_dtype(65536) == np.uint32


def test_uint32_files_hold_the_same_ids(built, tmp_path):
    _, tok_dir, tokens_dir, _ = built
    raw = raw_tokenizer(tok_dir)
    stats = tokenization.encode_split(raw, [TRAIN_DOCS], tmp_path, "train", np.dtype(np.uint32))
    wide = np.fromfile(tmp_path / "train.bin", dtype=np.uint32)
    assert (tmp_path / "train.bin").stat().st_size == 4 * stats.tokens
    assert wide.tolist() == np.fromfile(tokens_dir / "train.bin", dtype=np.uint16).tolist()


class CountingTokenizer:
    """Test double around a real tokenizer that records the size of every encode_batch call."""

    def __init__(self, inner):
        self.inner, self.sizes = inner, []

    def encode_batch(self, texts, **kwargs):
        self.sizes.append(len(texts))
        return self.inner.encode_batch(texts, **kwargs)

    def token_to_id(self, token):
        return self.inner.token_to_id(token)

    @property
    def encode_special_tokens(self):
        return self.inner.encode_special_tokens

    @encode_special_tokens.setter
    def encode_special_tokens(self, value):
        self.inner.encode_special_tokens = value


def test_batch_size_bounds_each_call_and_leaves_bytes_unchanged(built, tmp_path):
    _, tok_dir, tokens_dir, _ = built
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(d + "\n" for d in TRAIN_DOCS), encoding="utf-8")
    outputs = {}
    for batch_docs in (7, 1000):
        out = tmp_path / str(batch_docs)
        out.mkdir()
        spy = CountingTokenizer(raw_tokenizer(tok_dir))
        batches = tokenization.iter_line_batches(corpus, batch_docs)
        tokenization.encode_split(spy, batches, out, "train", np.dtype(np.uint16))
        assert max(spy.sizes) == min(batch_docs, len(TRAIN_DOCS)) and sum(spy.sizes) == len(TRAIN_DOCS)
        outputs[batch_docs] = folder_bytes(out)
    assert outputs[7] == outputs[1000]
    assert outputs[7]["train.bin"] == (tokens_dir / "train.bin").read_bytes()


def test_two_runs_give_byte_identical_outputs(tmp_path):
    first = build(tmp_path / "a")
    second = build(tmp_path / "b")
    for a, b in zip(first[:2], second[:2]):
        assert folder_bytes(a) == folder_bytes(b)
    assert sorted(p.name for p in first[1].iterdir()) == [
        "meta.json",
        "train.bin",
        "train.idx.npy",
        "val.bin",
        "val.idx.npy",
    ]


def test_load_token_split_rejects_truncated_bin(built, tmp_path):
    _, _, tokens_dir, _ = built
    for name in ("meta.json", "train.idx.npy"):
        (tmp_path / name).write_bytes((tokens_dir / name).read_bytes())
    (tmp_path / "train.bin").write_bytes((tokens_dir / "train.bin").read_bytes()[:-2])
    with pytest.raises(LmpipeError, match="train.bin"):
        tokenization.load_token_split(tmp_path, "train")
    with pytest.raises(LmpipeError, match="meta.json"):
        tokenization.load_token_split(tmp_path / "nowhere", "train")


# --------------------------------------------------------------------------- the stage
@pytest.fixture
def project(tmp_path, monkeypatch, project_root):
    """A temporary project folder with the shipped params.yaml, sized for a tiny corpus."""
    params = yaml.safe_load((project_root / "params.yaml").read_text(encoding="utf-8"))
    params["tokenize"].update(vocab_size=VOCAB, batch_docs=32)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def stage_outputs(root: Path) -> list[str]:
    found = [p for p in (root / "models").glob("*")] + [p for p in (root / "data").glob("*")]
    return sorted(p.relative_to(root).as_posix() for p in found if p.name != "processed")


def test_stage_writes_tokenizer_tokens_and_metrics(project, tracking_uri):
    from stages import tokenize_corpus

    write_processed(project, TRAIN_DOCS, VAL_DOCS)
    metrics = tokenize_corpus.main()
    assert stage_outputs(project) == ["data/tokens", "models/tokenizer"]
    results, perf = (
        read_json(project / "reports/tokenize/metrics.json"),
        read_json(project / "reports/perf/tokenize.json"),
    )
    numerics = perf.pop("numerics")  # the machine's numeric environment rides with its timings
    assert {**results, **perf} == pytest.approx(metrics)
    assert set(perf) == {"encode_mb_per_s", "encode_seconds", "tokenizer_train_seconds"}  # timings apart
    assert numerics["mode"] == "unpinned" and numerics["cpu"]["model"]  # in-process: nothing was pinned
    assert metrics["train_documents"] == len(TRAIN_DOCS)

    import mlflow

    stages = "tags.`lmpipe.kind` = 'stage'"  # the group's parent run is the other one
    runs = mlflow.search_runs(experiment_names=["lmpipe"], filter_string=stages, output_format="list")
    assert [r.info.status for r in runs] == ["FINISHED"]
    assert runs[0].data.metrics["train_tokens"] == metrics["train_tokens"]
    assert runs[0].data.params["tokenize.vocab_size"] == str(VOCAB)


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing corpus", "data/processed/corpus.txt: file not found"),
        ("blank corpus", "data/processed/corpus.txt: empty corpus"),
        ("missing val", "data/processed/val.parquet: file not found"),
        ("val without text", "data/processed/val.parquet: no column 'text'"),
    ],
)
def test_stage_rejects_bad_inputs_and_writes_nothing(project, case, message):
    from stages import tokenize_corpus

    processed = write_processed(project, TRAIN_DOCS, VAL_DOCS)
    if case == "missing corpus":
        (processed / "corpus.txt").unlink()
    elif case == "blank corpus":
        (processed / "corpus.txt").write_text("\n \n\t\n", encoding="utf-8")
    elif case == "missing val":
        (processed / "val.parquet").unlink()
    else:
        pq.write_table(pa.table({"review": ["a b c"]}), processed / "val.parquet")
    with pytest.raises(LmpipeError, match=message):
        tokenize_corpus.main()
    assert stage_outputs(project) == []
    assert not (project / "reports").exists()


def test_stage_failing_midway_leaves_no_partial_output(project, monkeypatch):
    """A null text in val.parquet is found only while encoding, after the tokenizer is trained."""
    import contextlib

    from lmpipe.core.tracking import Tracker
    from stages import tokenize_corpus

    monkeypatch.setattr(tokenize_corpus, "stage_run", lambda *a, **k: contextlib.nullcontext(Tracker()))
    processed = write_processed(project, TRAIN_DOCS, VAL_DOCS)
    pq.write_table(pa.table({"text": pa.array(["fine text", None], pa.string())}), processed / "val.parquet")
    with pytest.raises(LmpipeError, match=r"val.parquet row 1: text is None"):
        tokenize_corpus.main()
    assert stage_outputs(project) == []
    leftovers = [p.name for p in project.rglob(".*.tmp")]
    assert leftovers == []


def test_corpus_that_is_not_utf8_names_the_file(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(b"good line\n\xff\xfe bad bytes\n")
    with pytest.raises(LmpipeError, match="corpus.txt: not valid UTF-8"):
        tokenization.check_corpus(corpus)
