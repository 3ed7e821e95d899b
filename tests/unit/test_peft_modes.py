"""The adalora / prefix / adapter fine-tuning modes (lmpipe.finetune.peft_modes,
lmpipe.inference.peft_modules) on a tiny BERT and a tiny ModernBERT: train a few steps, save,
reload through the one loader, same logits; the unsupported combination; params validation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lmpipe.core.errors import LmpipeError
from lmpipe.core.params import AdaLoraParams, FinetuneParams, parse_params
from lmpipe.finetune import finetuning as ft
from lmpipe.inference import classifier, encoding, peft_modules
from lmpipe.inference.predictor import Predictor
from lmpipe.task.selection import select_model
from lmpipe.train.training import TrainConfig, train
from tests.unit.test_finetuning import LABELS, make_backbone, make_family_backbone, make_reviews

STEPS = 6


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> Path:
    return make_backbone(tmp_path_factory.mktemp("tiny") / "bert")


@pytest.fixture(scope="module")
def modernbert(tmp_path_factory) -> Path:
    return make_family_backbone(tmp_path_factory.mktemp("tiny_mb"), "modernbert")


def settings(**modes) -> FinetuneParams:
    run = {"source": "models/x", "mode": "full"}
    return FinetuneParams(
        backbones={"tiny": run},
        adalora=AdaLoraParams(init_r=4, target_r=2, delta_t=1, tinit_ratio=0.0, tfinal_ratio=0.34),
        **modes,
    )


def build(backbone: Path, mode: str, **kw):
    cfg, key = settings(), "finetune.backbones.x.mode"
    return ft.build_classifier(backbone, LABELS, mode=mode, seed=0, settings=cfg, total_steps=STEPS, key=key, **kw)


def train_a_little(model, tokenizer):
    texts, labels = make_reviews(48, 1)
    enc = encoding.encode_texts(tokenizer, texts, 24, "head_tail")
    batch_at = ft.make_batch_at(enc, labels, batch_size=8, grad_accum=1, seed=0, pad_id=tokenizer.pad_token_id)
    adalora = hasattr(model, "peft_config") and "AdaLora" in type(model.base_model).__name__
    return train(
        model,
        loss_fn=ft.peft_modes.adalora_loss if adalora else ft.classification_loss,
        batch_at=batch_at,
        evaluate=lambda m: {"val_loss": 0.0},
        config=TrainConfig(max_steps=STEPS, lr=1e-2, eval_every=STEPS, checkpoint_every=STEPS),
        device=torch.device("cpu"),
        step_hook=ft.peft_modes.AdaLoraStep(model) if adalora else None,
    )


def logits_of(model, tokenizer, texts):
    ids = encoding.encode_texts(tokenizer, texts, 24, "head_tail")["input_ids"]
    return ft.torch_logits(model, ids, tokenizer.pad_token_id, 4)


TEXTS = ["the movie was good great", "the film was bad awful w1 w2 w3", "poor"]


@pytest.mark.parametrize("mode", ["adalora", "prefix", "adapter"])
def test_each_mode_trains_saves_and_reloads_through_the_one_loader_with_equal_logits(bert, mode, tmp_path):
    torch.set_num_threads(1)
    tokenizer = classifier.load_tokenizer(bert)
    model = build(bert, mode)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable, total = ft.count_params(model)
    assert 0 < trainable < total / 2
    train_a_little(model, tokenizer)
    moved = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert moved and all(any(k in n for k in ("lora_", "extra.", "classifier", "pooler")) for n in moved), sorted(moved)
    if mode == "adalora":  # pruning ran: some singular values are masked to zero
        assert any((p == 0).any() for n, p in model.named_parameters() if "lora_E" in n)
    plain = ft.plain_model(model).eval()
    expected = logits_of(plain, tokenizer, TEXTS)
    classifier.save_classifier(plain, tokenizer, tmp_path, {"max_length": 24, "truncation": "head_tail", "mode": mode})
    assert (tmp_path / peft_modules.PEFT_FILE).is_file() == (mode != "adalora")
    loaded, _, info = classifier.load_classifier(tmp_path)
    np.testing.assert_allclose(logits_of(loaded, tokenizer, TEXTS), expected, atol=1e-6)
    served = Predictor(tmp_path, "torch").logits(TEXTS)  # `lmpipe predict` and the pyfunc model
    np.testing.assert_allclose(served, expected, atol=1e-5)
    assert (info.get("peft") or {}).get("kind", "adalora") == mode


def test_prefix_changes_the_logits_and_ignores_padding(bert):
    model = build(bert, "prefix").eval()
    with torch.no_grad():
        model.extra["prefix"].mul_(3.0)
    ids = torch.tensor([[2, 10, 11, 3, 0, 0], [2, 12, 13, 14, 15, 3]])
    mask = (ids != 0).long()
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
        alone = model(input_ids=ids[:1, :4], attention_mask=mask[:1, :4]).logits
        base = model.model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got[:1], alone, atol=1e-5, rtol=0)
    assert not torch.allclose(got, base, atol=1e-4)


def test_adapter_starts_as_the_backbones_own_function(bert):
    full = ft.build_classifier(bert, LABELS, mode="full", seed=0).eval()
    adapted = build(bert, "adapter").eval()
    ids = torch.tensor([[2, 10, 11, 3]])
    with torch.no_grad():
        torch.testing.assert_close(adapted(input_ids=ids).logits, full(input_ids=ids).logits)
    assert len(adapted.extra) == 4  # houlsby: attention + FFN output of 2 layers


def test_prefix_on_modernbert_stops_before_training_naming_the_key(modernbert):
    with pytest.raises(LmpipeError, match=r"^params.yaml: finetune.backbones.x.mode is prefix, but ModernBert") as err:
        build(modernbert, "prefix")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("mode", ["adapter", "adalora"])
def test_modernbert_takes_adapters_and_adalora(modernbert, mode, tmp_path):
    tokenizer = classifier.load_tokenizer(modernbert.parent / "tok")
    kw = {}
    model = ft.build_classifier(
        modernbert,
        LABELS,
        mode=mode,
        seed=0,
        settings=settings().model_copy(
            update={"adalora": AdaLoraParams(target_modules=["Wqkv"], init_r=4, target_r=2, tinit_ratio=0.0)}
        ),
        total_steps=STEPS,
        **kw,
    ).eval()
    plain = ft.plain_model(model).eval()
    expected = logits_of(plain, tokenizer, TEXTS)
    classifier.save_classifier(plain, tokenizer, tmp_path, {"max_length": 24, "truncation": "head_tail"})
    loaded, _, _ = classifier.load_classifier(tmp_path)
    np.testing.assert_allclose(logits_of(loaded, tokenizer, TEXTS), expected, atol=1e-6)


def test_an_adapter_model_exports_to_onnx_with_equal_logits(bert, tmp_path):
    import onnxruntime as ort

    from lmpipe.export.onnx_export import export_classifier

    tokenizer = classifier.load_tokenizer(bert)
    model = build(bert, "adapter").eval()
    for adapter in model.extra.values():  # a non-identity adapter
        torch.nn.init.normal_(adapter.up.weight, std=0.5)
    classifier.save_classifier(model, tokenizer, tmp_path / "hf", {"max_length": 24, "truncation": "head_tail"})
    loaded, _, _ = classifier.load_classifier(tmp_path / "hf")
    names = export_classifier(loaded, tokenizer, tmp_path / "model.onnx", 18)
    ids = np.array([[2, 10, 11, 3, 0], [2, 12, 13, 14, 3]], dtype=np.int64)
    arrays = {"input_ids": ids, "attention_mask": (ids != 0).astype(np.int64), "token_type_ids": np.zeros_like(ids)}
    got = ort.InferenceSession(str(tmp_path / "model.onnx")).run(None, {n: arrays[n] for n in names})[0]
    with torch.no_grad():
        want = loaded(**{n: torch.from_numpy(arrays[n]) for n in names}).logits.numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_a_folder_with_a_peft_entry_but_no_weights_file_is_named(bert, tmp_path):
    tokenizer = classifier.load_tokenizer(bert)
    classifier.save_classifier(build(bert, "adapter"), tokenizer, tmp_path, {"max_length": 24, "truncation": "head"})
    (tmp_path / peft_modules.PEFT_FILE).unlink()
    with pytest.raises(LmpipeError, match=r"peft.safetensors: file not found"):
        classifier.load_classifier(tmp_path)


# --------------------------------------------------------------------------- params and selection
def shipped(project_root: Path) -> dict:
    import yaml

    return yaml.safe_load((project_root / "params.yaml").read_text())


@pytest.mark.parametrize(
    ("section", "value", "message"),
    [
        ("adalora", {"init_r": 4, "target_r": 8}, r"finetune.adalora: target_r \(8\) must be <= init_r \(4\)"),
        ("adalora", {"tinit_ratio": 0.5, "tfinal_ratio": 0.5}, r"finetune.adalora: tinit_ratio \+ tfinal_ratio"),
        ("prefix", {"num_virtual_tokens": 0}, r"finetune.prefix.num_virtual_tokens must be >= 1"),
        ("adapter", {"placement": "middle"}, r"finetune.adapter.placement must be one of"),
    ],
)
def test_bad_mode_settings_name_the_key(project_root, section, value, message):
    raw = shipped(project_root)
    raw["finetune"][section].update(value)
    with pytest.raises(LmpipeError, match=message):
        parse_params(raw)


def test_every_new_mode_is_a_valid_backbone_mode_and_an_unknown_one_is_named(project_root):
    raw = shipped(project_root)
    for mode in ("adalora", "prefix", "adapter"):
        raw["finetune"]["backbones"]["minilm"]["mode"] = mode
        assert parse_params(raw).finetune.backbones["minilm"].mode == mode
    raw["finetune"]["backbones"]["minilm"]["mode"] = "ia3"
    with pytest.raises(LmpipeError, match=r"finetune.backbones.minilm.mode must be one of"):
        parse_params(raw)


def test_export_model_naming_a_prefix_backbone_is_refused_naming_the_key(project_root):
    raw = shipped(project_root)
    raw["finetune"]["backbones"]["minilm"]["mode"] = "prefix"
    raw["export"]["model"] = "minilm"
    with pytest.raises(LmpipeError, match=r"export.model: 'minilm' is fine-tuned in prefix mode"):
        parse_params(raw)


def test_best_skips_a_prefix_model_and_a_named_one_is_refused(tmp_path):
    for name, mode, acc in [("a", "prefix", 0.9), ("b", "adapter", 0.8), ("c", "full", 0.7)]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps({"mode": mode, "val_accuracy": acc}))
    assert select_model("best", "val_accuracy", ["a", "b", "c"], tmp_path) == ("b", {"b": 0.8, "c": 0.7})
    with pytest.raises(LmpipeError, match=r"export.model: 'a' is fine-tuned in prefix mode"):
        select_model("a", "val_accuracy", ["a", "b", "c"], tmp_path)
    with pytest.raises(LmpipeError, match=r"export.model: best finds no model"):
        select_model("best", "val_accuracy", ["a"], tmp_path)


def test_adalora_resumed_after_a_crash_prunes_as_an_uninterrupted_run(bert, tmp_path):
    torch.set_num_threads(1)
    tokenizer = classifier.load_tokenizer(bert)
    texts, labels = make_reviews(48, 1)
    enc = encoding.encode_texts(tokenizer, texts, 24, "head_tail")
    batch_at = ft.make_batch_at(enc, labels, batch_size=8, grad_accum=1, seed=0, pad_id=tokenizer.pad_token_id)
    cfg = TrainConfig(max_steps=9, lr=1e-2, eval_every=9, checkpoint_every=3)

    def run(batches, checkpoint_dir=None):
        model = ft.build_classifier(bert, LABELS, mode="adalora", seed=0, settings=settings(), total_steps=9)
        kw = dict(loss_fn=ft.peft_modes.adalora_loss, evaluate=lambda m: {"val_loss": 0.0}, config=cfg)
        train(model, batch_at=batches, device=torch.device("cpu"), checkpoint_dir=checkpoint_dir, **kw,
              step_hook=ft.peft_modes.AdaLoraStep(model))  # fmt: skip
        return {k: v.clone() for k, v in model.state_dict().items()}

    def crash_at_step_7(step, micro, rank, world):
        if step == 7:
            raise RuntimeError("simulated crash")
        return batch_at(step, micro, rank, world)

    uninterrupted = run(batch_at)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(crash_at_step_7, tmp_path)
    resumed = run(batch_at, tmp_path)
    assert resumed.keys() == uninterrupted.keys()
    for key in uninterrupted:
        torch.testing.assert_close(resumed[key], uninterrupted[key], rtol=0, atol=0, msg=key)
