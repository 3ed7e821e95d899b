"""lmpipe.finetune.finetuning and stages/finetune.py on a tiny BERT (2 layers, hidden 32, 50-word vocab)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from lmpipe.core.errors import LmpipeError
from lmpipe.core.params import LoraParams
from lmpipe.finetune import finetuning as ft
from lmpipe.inference import classifier, encoding
from lmpipe.task import metrics, splits
from lmpipe.train.training import TrainConfig, train

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["good", "great", "fine", "bad", "awful", "poor", "movie", "film", "the", "was"]
FILLER = [f"w{i}" for i in range(40)]
VOCAB = {tok: i for i, tok in enumerate(SPECIALS + WORDS + FILLER)}
LABELS = ["negative", "positive"]


def make_backbone(folder: Path) -> Path:
    """A tiny masked-LM checkpoint + tokenizer, the shape of models/pretrained."""
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    config = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    BertForMaskedLM(config).save_pretrained(folder)
    BertTokenizerFast(vocab=VOCAB).save_pretrained(folder)
    return folder


def make_reviews(n: int, seed: int) -> tuple[list[str], np.ndarray]:
    """Separable toy reviews of varied length: positive ones say good/great/fine."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for i in range(n):
        label = i % 2
        cue = rng.choice(WORDS[:3] if label else WORDS[3:6], size=2)
        filler = rng.choice(FILLER, size=int(rng.integers(2, 30)))
        texts.append(" ".join(["the", "movie", "was", *cue, *filler]))
        labels.append(label)
    return texts, np.array(labels, dtype=np.int64)


@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> Path:
    return make_backbone(tmp_path_factory.mktemp("tiny") / "backbone")


@pytest.fixture(scope="module")
def tokenizer(backbone):
    return classifier.load_tokenizer(backbone)


# --------------------------------------------------------------------------- encoding
def ids(words):
    return [VOCAB[w] for w in words]


def test_head_keeps_the_first_tokens_between_cls_and_sep(tokenizer):
    words = FILLER[:20]
    got = encoding.encode_texts(tokenizer, [" ".join(words)], max_length=10, truncation="head")
    assert got["input_ids"] == [[VOCAB["[CLS]"], *ids(words[:8]), VOCAB["[SEP]"]]]
    assert got["attention_mask"] == [[1] * 10]


def test_head_tail_keeps_a_quarter_from_the_start_and_the_rest_from_the_end(tokenizer):
    words = FILLER[:20]
    got = encoding.encode_texts(tokenizer, [" ".join(words)], max_length=10, truncation="head_tail")
    # budget 8 = 10 // 4 = 2 head tokens + 6 tail tokens
    assert got["input_ids"] == [[VOCAB["[CLS]"], *ids(words[:2]), *ids(words[-6:]), VOCAB["[SEP]"]]]


def test_texts_that_fit_are_kept_whole_and_unpadded(tokenizer):
    got = encoding.encode_texts(tokenizer, ["good movie", "the film was bad"], 10, "head_tail")
    assert got["input_ids"] == [
        [VOCAB["[CLS]"], *ids(["good", "movie"]), VOCAB["[SEP]"]],
        [VOCAB["[CLS]"], *ids(["the", "film", "was", "bad"]), VOCAB["[SEP]"]],
    ]


def test_head_tail_split_follows_the_128_plus_382_recipe_at_512():
    assert encoding.head_tail_split(512) == (128, 382)
    assert encoding.head_tail_split(128) == (32, 94)


def test_unknown_truncation_is_an_error_naming_it(tokenizer):
    with pytest.raises(LmpipeError, match="'middle'"):
        encoding.encode_texts(tokenizer, ["good"], 10, "middle")


# --------------------------------------------------------------------------- batching
def test_length_bucketing_pads_less_than_random_batches():
    lengths = np.random.default_rng(0).integers(10, 500, size=4000)
    bucketed = ft.LengthBuckets(lengths, 16, seed=1)
    shuffled = ft.LengthBuckets(lengths, 16, seed=1, bucket=False)
    n = bucketed.batches_per_epoch
    pad_bucketed = ft.padding_share([bucketed.indices(i) for i in range(n)], lengths)
    pad_random = ft.padding_share([shuffled.indices(i) for i in range(n)], lengths)
    assert pad_bucketed < pad_random / 4
    epoch = np.concatenate([bucketed.indices(i) for i in range(n)])
    assert len(set(epoch.tolist())) == n * 16  # every example at most once per epoch


def test_batch_at_is_a_pure_function_of_seed_step_micro_rank_world():
    encoded = {"input_ids": [[2] + [7] * k + [3] for k in range(1, 101)]}
    labels = np.arange(100) % 2
    make = lambda seed: ft.make_batch_at(encoded, labels, batch_size=4, grad_accum=2, seed=seed, pad_id=0)  # noqa: E731
    first, again, other = make(5), make(5), make(6)
    for args in [(0, 0, 0, 1), (3, 1, 0, 1), (40, 1, 1, 2)]:
        a, b = first(*args), again(*args)
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(first(0, 0, 0, 1)["input_ids"], other(0, 0, 0, 1)["input_ids"])
    # (grad_accum=2, world=1) and (grad_accum=1, world=2) read the same global batch
    one = make(5)
    two = ft.make_batch_at(encoded, labels, batch_size=4, grad_accum=1, seed=5, pad_id=0)
    assert torch.equal(one(3, 1, 0, 1)["input_ids"], two(3, 0, 1, 2)["input_ids"])
    batch = first(0, 0, 0, 1)
    width = batch["input_ids"].shape[1]
    assert batch["attention_mask"].sum(1).max() == width  # padded to the longest, no further


def test_stratified_subsample_keeps_label_shares_and_follows_the_seed():
    labels = np.array([0] * 700 + [1] * 300)
    a = splits.stratified_subsample(labels, 100, seed=3)
    assert len(a) == 100 and (labels[a] == 1).sum() == 30
    assert np.array_equal(a, np.sort(a))
    assert np.array_equal(a, splits.stratified_subsample(labels, 100, seed=3))
    assert not np.array_equal(a, splits.stratified_subsample(labels, 100, seed=4))
    assert len(splits.stratified_subsample(labels, None, seed=3)) == 1000


# --------------------------------------------------------------------------- modes
def train_a_little(model, tokenizer, steps=3, lr=1e-2):
    texts, labels = make_reviews(32, seed=1)
    encoded = encoding.encode_texts(tokenizer, texts, 32, "head_tail")
    batch_at = ft.make_batch_at(encoded, labels, batch_size=8, grad_accum=1, seed=0, pad_id=0)
    config = TrainConfig(max_steps=steps, lr=lr, warmup_steps=0, weight_decay=0.0, eval_every=100)
    train(
        model,
        loss_fn=ft.classification_loss,
        batch_at=batch_at,
        evaluate=lambda m: {},
        config=config,
        device=torch.device("cpu"),
    )
    return model


def changed(before, model):
    after = {k: v.detach() for k, v in model.state_dict().items()}
    return {k for k, v in before.items() if not torch.equal(v, after[k])}


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_frozen_mode_changes_only_the_pooler_and_classifier(backbone, tokenizer):
    model = ft.build_classifier(backbone, LABELS, mode="frozen", seed=0)
    before = snapshot(model)
    moved = changed(before, train_a_little(model, tokenizer))
    assert moved == {"bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"}
    assert ft.count_params(model)[0] == 32 * 32 + 32 + 32 * 2 + 2


def test_frozen_with_one_unfrozen_layer_changes_the_top_layer_only(backbone, tokenizer):
    model = ft.build_classifier(backbone, LABELS, mode="frozen", seed=0, unfreeze_top_layers=1)
    before = snapshot(model)
    moved = changed(before, train_a_little(model, tokenizer))
    assert any(k.startswith("bert.encoder.layer.1.") for k in moved)
    backbone_moved = {k for k in moved if k.startswith("bert.") and not k.startswith("bert.pooler.")}
    assert all(k.startswith("bert.encoder.layer.1.") for k in backbone_moved)
    with pytest.raises(LmpipeError, match="unfreeze_top_layers is 3 but the backbone has 2 layers"):
        ft.build_classifier(backbone, LABELS, mode="frozen", seed=0, unfreeze_top_layers=3)


def test_full_mode_changes_the_backbone(backbone, tokenizer):
    model = ft.build_classifier(backbone, LABELS, mode="full", seed=0)
    before = snapshot(model)
    moved = changed(before, train_a_little(model, tokenizer))
    assert "bert.embeddings.word_embeddings.weight" in moved
    assert "bert.encoder.layer.0.attention.self.query.weight" in moved


def test_lora_trains_adapters_and_head_only_and_merges_into_a_plain_model(backbone, tokenizer, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = ft.build_classifier(backbone, LABELS, mode="lora", seed=0, lora=LoraParams(rank=4))
    before = snapshot(model)
    moved = changed(before, train_a_little(model, tokenizer))
    assert any("lora_B" in k for k in moved)
    assert any("classifier" in k for k in moved) and any("pooler" in k for k in moved)
    frozen_moved = [k for k in moved if not ("lora_" in k or "modules_to_save" in k)]
    assert frozen_moved == []
    model.eval()
    batch = encoding.collate(
        encoding.encode_texts(tokenizer, ["good movie", "bad film w3"], 32, "head")["input_ids"], None, 0
    )
    with torch.no_grad():
        expected = model(**batch).logits
    classifier.save_classifier(ft.plain_model(model), tokenizer, tmp_path, {"max_length": 32})
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path, local_files_only=True).eval()
    assert type(loaded).__name__ == "BertForSequenceClassification"
    assert not any("lora" in k for k in loaded.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, expected, atol=1e-5, rtol=1e-5)


def test_lora_target_that_names_no_module_is_an_error(backbone):
    with pytest.raises(LmpipeError, match=r"target_modules \['qkv'\]"):
        ft.build_classifier(backbone, LABELS, mode="lora", seed=0, lora=LoraParams(target_modules=["qkv"]))


def test_fresh_head_depends_on_the_seed_only(backbone):
    a = ft.build_classifier(backbone, LABELS, mode="full", seed=7).classifier.weight
    b = ft.build_classifier(backbone, LABELS, mode="full", seed=7).classifier.weight
    c = ft.build_classifier(backbone, LABELS, mode="full", seed=8).classifier.weight
    assert torch.equal(a, b) and not torch.equal(a, c)


# --------------------------------------------------------------------------- metrics
def test_macro_f1_and_metrics_match_sklearn():
    from sklearn.metrics import accuracy_score, f1_score, log_loss

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200, 3))
    labels = rng.integers(0, 3, size=200)
    got = metrics.validation_metrics(metrics.log_softmax(logits), labels)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    pred = logits.argmax(1)
    assert got["val_f1"] == pytest.approx(f1_score(labels, pred, average="macro"), abs=1e-12)
    assert got["val_accuracy"] == pytest.approx(accuracy_score(labels, pred))
    assert got["val_loss"] == pytest.approx(log_loss(labels, probs), abs=1e-9)


def test_flops_per_token_by_mode():
    class Cfg:
        num_hidden_layers, hidden_size, intermediate_size = 4, 64, 256

    full = ft.classifier_flops_per_token(Cfg, 128, "full")
    assert ft.classifier_flops_per_token(Cfg, 128, "frozen") == pytest.approx(full / 3)
    assert ft.classifier_flops_per_token(Cfg, 128, "frozen", 4) == pytest.approx(full)
    assert ft.classifier_flops_per_token(Cfg, 128, "lora") == pytest.approx(full * 2 / 3)


# --------------------------------------------------------------------------- the stage
@pytest.fixture
def project(tmp_path, backbone, monkeypatch, project_root):
    """A tiny project: params.yaml with one `tiny` backbone, data/processed, the backbone folder."""
    params = yaml.safe_load((project_root / "params.yaml").read_text())
    params["base"]["peak_flops"] = 1e11  # skip the matmul probe
    params["finetune"].update(
        backbones={"tiny": {"source": "models/tiny", "mode": "full", "lr": 3e-3, "max_steps": 6}},
        max_length=24,
        max_train_examples=40,
        batch_size=8,
        eval_every=3,
        checkpoint_every=3,
    )
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    processed = tmp_path / "data" / "processed"
    processed.mkdir(parents=True)
    for split, n, seed in [("train", 60, 1), ("val", 16, 2)]:
        texts, labels = make_reviews(n, seed)
        pd.DataFrame({"text": texts, "label": labels}).to_parquet(processed / f"{split}.parquet")
    (processed / "labels.json").write_text(json.dumps({"labels": LABELS}))
    shutil.copytree(backbone, tmp_path / "models" / "tiny")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # unreachable: runs untracked
    return tmp_path


def test_stage_writes_a_model_that_the_transformers_pipeline_loads(project):
    from transformers import pipeline

    from stages.finetune import main

    with pytest.warns(UserWarning, match="not reachable"):
        main(["tiny"])
    out = project / "models" / "finetuned" / "tiny"
    info = json.loads((out / "lmpipe.json").read_text())
    assert info["backbone"] == "tiny" and info["truncation"] == "head_tail" and info["max_length"] == 24
    assert info["best_step"] in (3, 6) and set(info["val_metrics"]) == {"val_accuracy", "val_f1", "val_loss"}
    metrics = json.loads((project / "reports/finetune/tiny/metrics.json").read_text())
    assert metrics["steps"] == 6 and metrics["train_examples"] == 40 and metrics["val_examples"] == 16
    assert metrics["trainable_params"] == metrics["total_params"] > 0
    assert metrics["val_accuracy"] == info["val_metrics"]["val_accuracy"]
    curve = pd.read_csv(project / "reports/finetune/tiny/eval_curve.csv")
    assert curve["step"].tolist() == [3, 6]
    finished = json.loads((project / "checkpoints/finetune/tiny/finished.json").read_text())
    assert finished["steps"] == 6  # the resume point shrinks to a marker once outputs exist

    classify = pipeline("text-classification", model=str(out), device="cpu")
    predicted = classify(["the movie was good great", "the movie was bad awful w1"])
    assert {p["label"] for p in predicted} <= set(LABELS)
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"}
    assert str(project) not in "".join(p.read_text(errors="ignore") for p in out.glob("*.json"))

    # the same command from scratch gives the same bytes
    weights = (out / "model.safetensors").read_bytes()
    shutil.rmtree(project / "checkpoints")
    with pytest.warns(UserWarning, match="not reachable"):
        main(["tiny"])
    assert (out / "model.safetensors").read_bytes() == weights


def test_unknown_backbone_names_the_params_key_and_the_known_ones(project):
    from stages.finetune import main

    with pytest.raises(LmpipeError, match=r"finetune.backbones \['tiny'\] \(got 'bert'\)"):
        main(["bert"])


def test_missing_processed_file_is_named(project):
    from stages.finetune import main

    os.remove(project / "data/processed/val.parquet")
    with pytest.raises(LmpipeError, match=r"data/processed/val.parquet: file not found"):
        main(["tiny"])
    assert not (project / "models/finetuned").exists()


def test_missing_backbone_folder_is_named(project):
    from stages.finetune import main

    shutil.rmtree(project / "models/tiny")
    with pytest.raises(LmpipeError, match=r"models/tiny/config.json: file not found"):
        main(["tiny"])


# --------------------------------------------------------------------------- encoder families, control arm
def make_family_backbone(folder: Path, family: str) -> Path:
    """A tiny masked-LM of `family` saved as the pretrain stage saves it (models.save_mlm)."""
    from transformers import BertTokenizerFast

    from lmpipe.core.params import Architecture
    from lmpipe.mlm import models

    arch = Architecture(
        family=family, num_layers=2, hidden_size=32, num_heads=2, intermediate_size=64, max_length=64, dropout=0.0
    )
    mlm = models.build_mlm(models.mlm_config(arch, len(VOCAB), {"pad": 0, "cls": 2, "sep": 3}), 0)
    BertTokenizerFast(vocab=VOCAB).save_pretrained(folder / "tok")
    models.save_mlm(mlm, folder / "tok", folder / "model")
    return folder / "model"


FAMILY_LORA = {"roformer": ["query", "value"], "modernbert": ["Wqkv"]}


@pytest.mark.parametrize("family", ["roformer", "modernbert"])
@pytest.mark.parametrize("mode", ["full", "frozen", "lora"])
def test_every_encoder_family_fine_tunes_in_every_mode_and_reloads(tmp_path, family, mode, one_thread):
    from transformers import AutoModelForSequenceClassification

    source = make_family_backbone(tmp_path, family)
    tokenizer = classifier.load_tokenizer(source)
    model = ft.build_classifier(
        source, LABELS, mode=mode, seed=0, lora=LoraParams(rank=4, target_modules=FAMILY_LORA[family])
    )
    before = snapshot(model)
    moved = changed(before, train_a_little(model, tokenizer))
    prefix = model.base_model_prefix + "."
    backbone_moved = {k for k in moved if k.startswith(prefix) and "lora_" not in k}
    if mode == "full":
        assert backbone_moved and any(k.startswith("classifier") for k in moved)
    else:  # frozen: head only; lora: adapters + head
        assert backbone_moved == set() and any("classifier" in k for k in moved)
    batch = encoding.collate(
        encoding.encode_texts(tokenizer, ["good movie", "bad film w3 w4"], 32, "head")["input_ids"], None, 0
    )
    plain = ft.plain_model(model).eval()
    with torch.no_grad():
        expected = plain(**batch).logits
    classifier.save_classifier(plain, tokenizer, tmp_path / "out", {"max_length": 32})
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out", local_files_only=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, expected, atol=1e-5, rtol=1e-5)


def test_random_init_builds_the_same_architecture_with_fresh_seeded_weights(backbone):
    pretrained = ft.build_classifier(backbone, LABELS, mode="full", seed=7)
    random_a = ft.build_classifier(backbone, LABELS, mode="full", seed=7, init="random")
    random_b = ft.build_classifier(backbone, LABELS, mode="full", seed=7, init="random")
    key = "bert.encoder.layer.0.attention.self.query.weight"
    assert type(random_a) is type(pretrained) and random_a.config.hidden_size == pretrained.config.hidden_size
    assert set(random_a.state_dict()) == set(pretrained.state_dict())
    assert not torch.equal(random_a.state_dict()[key], pretrained.state_dict()[key])
    assert all(torch.equal(v, random_b.state_dict()[k]) for k, v in random_a.state_dict().items())
    with pytest.raises(LmpipeError, match="init must be one of"):
        ft.build_classifier(backbone, LABELS, mode="full", seed=7, init="imagenet")


def test_layer_lr_decay_scales_each_layer_below_the_head():
    import re

    scales = ft.layer_lr_scales(2, 0.5)

    def scale(name):
        return next((s for pattern, s in scales if re.search(pattern, name)), 1.0)

    assert scale("bert.encoder.layer.1.attention.self.query.weight") == 0.5
    assert scale("model.layers.0.attn.Wqkv.weight") == 0.25
    assert scale("base_model.model.bert.encoder.layer.0.output.dense.lora_A.default.weight") == 0.25
    assert scale("bert.embeddings.word_embeddings.weight") == 0.125
    assert scale("classifier.weight") == 1.0 and scale("model.final_norm.weight") == 1.0
    assert ft.layer_lr_scales(2, 1.0) == ()
