"""lmpipe.mlm.models: the masked-only MLM loss, the objective wrapper, parameter counts, HF export."""

from __future__ import annotations

import json

import pytest
import torch

from lmpipe.core.params import Architecture
from lmpipe.mlm import masking, models

VOCAB, PAD, CLS, SEP, MASK, UNK = 100, 0, 2, 3, 4, 1
SPECIAL = {"pad": PAD, "cls": CLS, "sep": SEP, "mask": MASK, "unk": UNK}
ARCH = Architecture(
    family="bert", num_layers=2, hidden_size=32, num_heads=2, intermediate_size=64, max_length=16, dropout=0.0
)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_mlm(seed: int = 0):
    return models.build_mlm(models.mlm_config(ARCH, VOCAB, SPECIAL), seed)


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
        loss = (
            models.masked_lm_loss(mlm, inputs, labels) if use_masked_only else mlm(input_ids=inputs, labels=labels).loss
        )
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
    assert not torch.equal(
        a["bert.encoder.layer.0.attention.self.query.weight"], c["bert.encoder.layer.0.attention.self.query.weight"]
    )


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
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "film"])}
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
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


# --------------------------------------------------------------------------- families
def family_mlm(family: str, seed: int = 0):
    arch = Architecture(
        family=family, num_layers=2, hidden_size=32, num_heads=2, intermediate_size=64, max_length=16, dropout=0.0
    )
    return models.build_mlm(models.mlm_config(arch, VOCAB, SPECIAL), seed)


@pytest.mark.parametrize("family", ["bert", "roformer", "modernbert"])
def test_masked_only_loss_equals_full_head_loss_for_every_family(family):
    mlm = family_mlm(family).eval()
    inputs, labels = masked_batch(seed=4)
    with torch.no_grad():
        masked_only = models.masked_lm_loss(mlm, inputs, labels)
        full = mlm(input_ids=inputs, labels=labels).loss
    torch.testing.assert_close(masked_only, full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "family,cls_name", [("roformer", "RoFormerForMaskedLM"), ("modernbert", "ModernBertForMaskedLM")]
)
def test_every_family_saves_a_folder_the_auto_classes_load(tmp_path, family, cls_name):
    from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification

    mlm = family_mlm(family).eval()
    out = tmp_path / "out"
    models.save_mlm(mlm, _tokenizer_dir(tmp_path / "tok"), out)
    loaded = AutoModelForMaskedLM.from_pretrained(out, local_files_only=True).eval()
    assert type(loaded).__name__ == cls_name
    inputs, _ = masked_batch(seed=5)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=inputs).logits, mlm(input_ids=inputs).logits)
    classifier = AutoModelForSequenceClassification.from_pretrained(out, num_labels=2, local_files_only=True)
    assert classifier(input_ids=inputs).logits.shape == (inputs.shape[0], 2)


def test_unknown_family_is_an_error_naming_the_key():
    arch = Architecture.model_construct(**{**ARCH.model_dump(), "family": "gpt"})
    with pytest.raises(Exception, match="pretrain.model.family"):
        models.mlm_config(arch, VOCAB, SPECIAL)


# --------------------------------------------------------------------------- honest metrics
def test_unigram_log_probs_are_add_one_smoothed_train_frequencies():
    import numpy as np

    logp = models.unigram_log_probs(np.array([5, 5, 6], dtype=np.uint16), 8)
    # counts + 1 = [1, 1, 1, 1, 1, 3, 2, 1], total 11
    assert logp[5].item() == pytest.approx(np.log(3 / 11))
    assert logp[6].item() == pytest.approx(np.log(2 / 11))
    assert logp[0].item() == pytest.approx(np.log(1 / 11))
    assert logp.exp().sum().item() == pytest.approx(1.0)


def test_evaluate_mlm_scores_the_unigram_reference_on_the_same_targets():
    import numpy as np

    mlm = tiny_mlm().eval()
    labels = torch.full((1, ARCH.max_length), masking.IGNORE)
    labels[0, 1], labels[0, 2], labels[0, 3] = 5, 5, 6
    inputs = torch.full((1, ARCH.max_length), 7)
    inputs[0, 1:4] = MASK
    logp = models.unigram_log_probs(np.array([5, 5, 6], dtype=np.uint16), VOCAB)
    with torch.no_grad():
        got = models.evaluate_mlm(mlm, [{"input_ids": inputs, "labels": labels}], torch.device("cpu"), logp)
    total = len([5, 5, 6]) + VOCAB
    expected = np.exp(-(2 * np.log(3 / total) + np.log(2 / total)) / 3)
    assert got["unigram_perplexity"] == pytest.approx(expected)
    assert got["perplexity_vs_unigram"] == pytest.approx(got["val_perplexity"] / expected)


def test_validation_batches_mask_every_target_while_training_keeps_some():
    import numpy as np

    tokens = (np.arange(4000) % 90 + 5).astype(np.uint16)
    cfg = masking.MaskingConfig(0.3, 0.8, 0.1, MASK, VOCAB, (PAD, UNK, CLS, SEP, MASK))
    data = masking.MLMBatches(
        tokens,
        tokens[:800],
        max_length=16,
        batch_size=8,
        grad_accum=1,
        eval_batches=3,
        seed=0,
        cls_id=CLS,
        sep_id=SEP,
        masking=cfg,
    )
    for batch in data.val_batches():
        targets = batch["labels"] != masking.IGNORE
        assert targets.any() and bool((batch["input_ids"][targets] == MASK).all())
    train = data.batch_at(0, 0, 0, 1)
    targets = train["labels"] != masking.IGNORE
    assert not bool((train["input_ids"][targets] == MASK).all())  # 80/10/10 in training only


class _FixedEncoder(torch.nn.Module):
    """A stand-in whose base_model returns the given hidden states (unit test of the formula)."""

    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__()
        self.hidden = hidden

    @property
    def base_model(self):
        return lambda ids, return_dict=True: type("Out", (), {"last_hidden_state": self.hidden})()


def test_pooled_spread_is_zero_for_a_collapsed_encoder_and_large_for_distinct_inputs():
    same = torch.ones(4, 3, 8)
    assert models.pooled_spread(_FixedEncoder(same), torch.zeros(4, 3)) == pytest.approx(0.0)
    distinct = torch.eye(4)[:, None, :].expand(4, 3, 4)  # orthogonal pooled vectors
    spread = models.pooled_spread(_FixedEncoder(distinct), torch.zeros(4, 3))
    # X = I4: mean row 1/4 everywhere, ||X - mean|| = sqrt(4 x 3/4) = sqrt(3), ||X|| = 2
    assert spread == pytest.approx(3**0.5 / 2)


def test_collapse_alarm_warns_below_the_threshold_only(caplog):
    with caplog.at_level("WARNING"):
        assert models.collapsed({"pooled_spread": 0.01}, 0.05)
        assert not models.collapsed({"pooled_spread": 0.2}, 0.05)
    assert [r.getMessage() for r in caplog.records if "collapsed" in r.getMessage()] != []
    assert len([r for r in caplog.records if r.levelname == "WARNING"]) == 1


def test_a_random_init_encoder_is_not_collapsed():
    mlm = family_mlm("roformer").eval()
    inputs, _ = masked_batch(seed=6)
    with torch.no_grad():
        assert models.pooled_spread(mlm, inputs) > 0.05
