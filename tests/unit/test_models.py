"""lmpipe.models: the masked-only MLM loss, the objective wrapper, parameter counts, HF export."""

from __future__ import annotations

import json

import pytest
import torch

from lmpipe import masking, models
from lmpipe.params import Architecture

VOCAB, PAD, CLS, SEP, MASK, UNK = 100, 0, 2, 3, 4, 1
ARCH = Architecture(num_layers=2, hidden_size=32, num_heads=2, intermediate_size=64, max_length=16, dropout=0.0)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_mlm(seed: int = 0):
    return models.build_mlm(models.mlm_config(ARCH, VOCAB, PAD), seed)


def masked_batch(seed: int = 0, batch: int = 4):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (batch, ARCH.max_length), generator=gen)
    ids[:, 0], ids[:, -1] = CLS, SEP
    cfg = masking.MaskingConfig(0.3, 0.8, 0.1, MASK, VOCAB, (PAD, UNK, CLS, SEP, MASK))
    return masking.mask_tokens(ids, cfg, gen)


def test_masked_only_loss_equals_full_head_loss():
    mlm = tiny_mlm().eval()
    inputs, labels = masked_batch()
    assert 0 < int((labels != masking.IGNORE).sum()) < labels.numel()
    with torch.no_grad():
        masked_only = models.masked_lm_loss(mlm, inputs, labels)
        full = mlm(input_ids=inputs, labels=labels).loss
    torch.testing.assert_close(masked_only, full, rtol=1e-5, atol=1e-6)


def test_masked_only_gradients_equal_full_head_gradients():
    inputs, labels = masked_batch(seed=1)
    grads = []
    for use_masked_only in (True, False):
        mlm = tiny_mlm(seed=3).eval()
        loss = models.masked_lm_loss(mlm, inputs, labels) if use_masked_only else mlm(
            input_ids=inputs, labels=labels).loss
        loss.backward()
        grads.append(mlm.bert.embeddings.word_embeddings.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_only_masked_positions_reach_the_head():
    mlm = tiny_mlm()
    inputs, labels = masked_batch(seed=2)
    rows = []
    mlm.cls.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    models.MaskedLMObjective(mlm)(input_ids=inputs, labels=labels)
    assert rows == [int((labels != masking.IGNORE).sum())]


def test_objective_loss_counts_input_tokens():
    objective = models.MaskedLMObjective(tiny_mlm())
    inputs, labels = masked_batch(batch=3)
    loss, n_tokens = models.objective_loss(objective, {"input_ids": inputs, "labels": labels})
    assert loss.ndim == 0 and n_tokens == 3 * ARCH.max_length


def test_same_seed_same_weights_other_seed_other_weights():
    a, b, c = tiny_mlm(5).state_dict(), tiny_mlm(5).state_dict(), tiny_mlm(6).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["bert.encoder.layer.0.attention.self.query.weight"],
                           c["bert.encoder.layer.0.attention.self.query.weight"])


def test_parameter_counts_split_embeddings_from_the_rest():
    mlm = tiny_mlm()
    counts = models.parameter_counts(mlm)
    embedding = (VOCAB + ARCH.max_length + 2) * ARCH.hidden_size
    assert counts["embedding"] == embedding
    assert counts["total"] == sum(p.numel() for p in mlm.parameters())
    assert counts["non_embedding"] == counts["total"] - embedding


def test_evaluate_mlm_pools_loss_over_masked_tokens():
    mlm = tiny_mlm().eval()
    batches = [dict(zip(("input_ids", "labels"), masked_batch(seed=s))) for s in (0, 1)]
    with torch.no_grad():
        got = models.evaluate_mlm(mlm, batches, torch.device("cpu"))
        total = sum(float(models.masked_lm_loss(mlm, reduction="sum", **b)) for b in batches)
    count = sum(int((b["labels"] != masking.IGNORE).sum()) for b in batches)
    assert got["val_loss"] == pytest.approx(total / count)
    assert got["val_perplexity"] == pytest.approx(torch.tensor(total / count).exp().item())


def _tokenizer_dir(path):
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "film"])}
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    fast.save_pretrained(path)
    return path


def test_saved_folder_loads_with_automodel_and_tokenizer(tmp_path):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    mlm = tiny_mlm().eval()
    tok_dir = _tokenizer_dir(tmp_path / "tok")
    out = tmp_path / "out"
    models.save_mlm(mlm, tok_dir, out)
    assert (out / "model.safetensors").is_file()
    loaded = AutoModelForMaskedLM.from_pretrained(out).eval()
    assert type(loaded).__name__ == "BertForMaskedLM"
    for key, value in mlm.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.mask_token == "[MASK]"
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == ARCH.max_length
