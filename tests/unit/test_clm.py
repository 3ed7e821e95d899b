"""lmpipe.clm.models and lmpipe.clm.batches: the decoder config, the next-token loss, the unigram and
bigram references on hand-computed cases, export, FLOPs, and pure batch functions."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lmpipe.clm import batches as clm_batches
from lmpipe.clm import models
from lmpipe.core.errors import LmpipeError
from lmpipe.train import flops

VOCAB, PAD, UNK, CLS, SEP, MASK = 100, 0, 1, 2, 3, 4
SPECIAL = {"pad": PAD, "unk": UNK, "cls": CLS, "sep": SEP, "mask": MASK}

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass(frozen=True)
class Arch:
    """What clm_config reads of a params Architecture (whose family Literal has no decoder yet)."""

    family: str = "llama"
    num_layers: int = 2
    hidden_size: int = 32
    num_heads: int = 2
    intermediate_size: int = 64
    max_length: int = 16
    dropout: float = 0.0


def tiny_clm(seed: int = 0, **arch):
    return models.build_clm(models.clm_config(Arch(**arch), VOCAB, SPECIAL), seed)


def token_batch(seed: int = 0, batch: int = 4, length: int = 16) -> torch.Tensor:
    ids = torch.randint(5, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = CLS
    return ids


# --------------------------------------------------------------------------- config and objective
def test_config_is_a_tied_llama_with_the_tokenizers_special_ids():
    config = models.clm_config(Arch(dropout=0.1), VOCAB, SPECIAL)
    assert config.model_type == "llama"
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (CLS, SEP, PAD)
    assert config.num_key_value_heads == config.num_attention_heads == 2
    assert config.max_position_embeddings == 16 and config.intermediate_size == 64
    assert config.attention_dropout == 0.1 and config.tie_word_embeddings
    model = models.build_clm(config, 0)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_encoder_family_is_rejected_naming_the_key():
    with pytest.raises(LmpipeError, match="pretrain.model.family"):
        models.clm_config(Arch(family="modernbert"), VOCAB, SPECIAL)


def test_next_token_loss_equals_llama_labels_loss():
    model = tiny_clm().eval()
    ids = token_batch()
    with torch.no_grad():
        ours = models.next_token_loss(model, ids)
        reference = model(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)


def test_next_token_gradients_equal_llama_labels_gradients():
    ids = token_batch(seed=1)
    grads = []
    for ours in (True, False):
        model = tiny_clm(seed=3)
        loss = models.next_token_loss(model, ids) if ours else model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads.append(model.get_input_embeddings().weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_pad_targets_carry_no_loss():
    model = tiny_clm().eval()
    ids = token_batch(seed=2, batch=2)
    mask = torch.ones_like(ids)
    ids[1, 10:], mask[1, 10:] = PAD, 0  # row 1: 10 real tokens, right-padded
    with torch.no_grad():
        padded = models.next_token_loss(model, ids, mask, reduction="sum")
        rows = [
            models.next_token_loss(model, ids[:1], reduction="sum"),
            models.next_token_loss(model, ids[1:, :10], reduction="sum"),
        ]
        mean = models.next_token_loss(model, ids, mask)
    torch.testing.assert_close(padded, rows[0] + rows[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean, padded / (15 + 9), rtol=1e-5, atol=1e-6)
    # without a mask the pads are attended but, as targets, still carry no loss (labels -100 in HF terms)
    with torch.no_grad():
        unmasked = models.next_token_loss(model, ids)
        reference = model(input_ids=ids, labels=ids.masked_fill(ids == PAD, -100)).loss
    assert int(models.target_mask(ids, None, PAD).sum()) == 15 + 9
    torch.testing.assert_close(unmasked, reference, rtol=1e-5, atol=1e-6)


def test_targets_outside_the_attention_mask_carry_no_loss_whatever_their_id():
    model = tiny_clm().eval()
    ids = token_batch(seed=6, batch=2)
    mask = torch.ones_like(ids)
    mask[0, 12:] = 0  # padded with a real-looking id, not [PAD]
    keep = models.target_mask(ids, mask, PAD)
    assert int(keep.sum()) == 11 + 15 and not bool(keep[0, 11:].any())
    with torch.no_grad():
        loss = models.next_token_loss(model, ids, mask, reduction="sum")
        rows = models.next_token_loss(model, ids[:1, :12], reduction="sum") + models.next_token_loss(
            model, ids[1:], reduction="sum"
        )
    torch.testing.assert_close(loss, rows, rtol=1e-5, atol=1e-5)


def test_objective_forward_is_the_loss_and_counts_input_tokens():
    model = tiny_clm()
    objective = models.CausalLMObjective(model)
    ids = token_batch(batch=3)
    loss, n_tokens = models.objective_loss(objective, {"input_ids": ids})
    assert loss.ndim == 0 and n_tokens == 3 * 16
    torch.testing.assert_close(loss, models.next_token_loss(model, ids))


def test_same_seed_same_weights_other_seed_other_weights():
    a, b, c = tiny_clm(5).state_dict(), tiny_clm(5).state_dict(), tiny_clm(6).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(a[key], c[key])


def test_parameter_counts_count_the_tied_embedding_once():
    model = tiny_clm()
    counts = models.parameter_counts(model)
    H, FF, L = 32, 64, 2
    layers = L * (4 * H * H + 3 * H * FF + 2 * H)  # attention, SwiGLU, two RMSNorms
    assert counts == {"total": VOCAB * H + layers + H, "embedding": VOCAB * H, "non_embedding": layers + H}


def test_flops_count_three_ffn_matrices_and_the_head_on_scored_positions():
    config = models.clm_config(Arch(), VOCAB, SPECIAL)
    H, FF, L, T = 32, 64, 2, 16
    expected = 6 * L * (4 * H * H + 3 * H * FF) + 12 * L * T * H + 6 * H * VOCAB * (T - 1) / T
    assert flops.clm_flops_per_token(config, T) == pytest.approx(expected)
    assert flops.clm_flops_per_token(config, T) > flops.encoder_flops_per_token(L, H, FF, T, 2)


# --------------------------------------------------------------------------- references
# A 4-token vocabulary: 0 plays [CLS], 3 is [PAD] and never occurs in training.
REF_TRAIN = np.array([1, 1, 2, 1, 0, 2], dtype=np.uint16)
REF_ALPHA = 2.0
# add-one unigram: counts (1, 3, 2, 0) + 1 over 6 + 4 tokens
P_UNI = [0.2, 0.4, 0.3, 0.1]
# pairs (1,1) (1,2) (2,1) (1,0) (0,2): c(1) = 3, c(2) = 1, c(0) = 1; p(n|p) = (c(p,n) + 2 p_uni(n)) / (c(p) + 2)
P_1_AFTER_0 = (0 + 2 * 0.4) / (1 + 2)
P_1_AFTER_1 = (1 + 2 * 0.4) / (3 + 2)
P_2_AFTER_1 = (1 + 2 * 0.3) / (3 + 2)
P_2_AFTER_0 = (1 + 2 * 0.3) / (1 + 2)


def test_bigram_log_probs_match_the_hand_computed_ones():
    bigram = models.BigramReference.fit(REF_TRAIN, 4, alpha=REF_ALPHA)
    got = bigram.log_prob(np.array([0, 1, 1, 0]), np.array([1, 1, 2, 2]))
    np.testing.assert_allclose(np.exp(got), [P_1_AFTER_0, P_1_AFTER_1, P_2_AFTER_1, P_2_AFTER_0], rtol=1e-12)
    # an unseen context is the unigram; tensors in, a tensor out; every context sums to one
    unseen = bigram.log_prob(torch.tensor([3, 3, 3, 3]), torch.tensor([0, 1, 2, 3]))
    assert isinstance(unseen, torch.Tensor)
    np.testing.assert_allclose(unseen.exp().numpy(), P_UNI, rtol=1e-12)
    for prev in range(4):
        assert np.exp(bigram.log_prob(np.full(4, prev), np.arange(4))).sum() == pytest.approx(1.0)


def test_evaluate_clm_references_score_the_same_targets_as_the_model():
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=4, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=8, pad_token_id=3, bos_token_id=0, eos_token_id=None, tie_word_embeddings=True,
    )  # fmt: skip
    model = models.build_clm(config, 0).eval()
    ids = torch.tensor([[0, 1, 1, 2], [0, 2, 3, 3]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    batches = [{"input_ids": ids[:1]}, {"input_ids": ids[1:], "attention_mask": mask[1:]}]
    unigram = models.unigram_log_probs(REF_TRAIN, 4)
    bigram = models.BigramReference.fit(REF_TRAIN, 4, alpha=REF_ALPHA)
    with torch.no_grad():
        got = models.evaluate_clm(model, batches, torch.device("cpu"), unigram, bigram)
        total = sum(float(models.next_token_loss(model, reduction="sum", **b)) for b in batches)
    # targets: 1|0, 1|1, 2|1 (row 0) and 2|0 (row 1; its pads carry nothing)
    unigram_ppl = math.exp(-np.mean(np.log([0.4, 0.4, 0.3, 0.3])))
    bigram_ppl = math.exp(-np.mean(np.log([P_1_AFTER_0, P_1_AFTER_1, P_2_AFTER_1, P_2_AFTER_0])))
    assert got["unigram_perplexity"] == pytest.approx(unigram_ppl, rel=1e-12)
    assert got["bigram_perplexity"] == pytest.approx(bigram_ppl, rel=1e-12)
    assert got["val_loss"] == pytest.approx(total / 4, rel=1e-6)
    assert got["perplexity_vs_bigram"] == pytest.approx(math.exp(total / 4) / bigram_ppl, rel=1e-6)
    assert got["perplexity_vs_unigram"] == pytest.approx(math.exp(total / 4) / unigram_ppl, rel=1e-6)


def test_leave_one_out_alpha_trusts_a_predictable_context_and_not_a_random_one():
    cycle = np.tile(np.array([5, 6, 7, 8], dtype=np.uint16), 500)  # the next token is certain
    assert models.BigramReference.fit(cycle, 10).alpha == min(models.ALPHA_GRID)
    noise = np.random.default_rng(0).integers(0, 10, size=20000).astype(np.uint16)  # the unigram is the truth
    assert models.BigramReference.fit(noise, 10).alpha >= 100


# --------------------------------------------------------------------------- export
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


def test_saved_model_reloads_with_automodel_and_gives_identical_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_clm(seed=4).eval()
    out = tmp_path / "out"
    models.save_clm(model, _tokenizer_dir(tmp_path / "tok"), out)
    assert (out / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
    ids = token_batch(seed=5)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 16


# --------------------------------------------------------------------------- batches
def corpus(n: int = 5000, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(5, 1000, size=n).astype(np.uint16)


def clm_batches_of(**overrides) -> clm_batches.CLMBatches:
    kwargs = dict(max_length=16, batch_size=4, grad_accum=2, eval_batches=3, seed=7, cls_id=CLS)
    kwargs.update(overrides)
    return clm_batches.CLMBatches(corpus(), corpus(800, seed=1), **kwargs)


def test_batch_at_is_a_pure_function_of_its_arguments():
    a, b = clm_batches_of(), clm_batches_of()
    for args in [(0, 0, 0, 1), (3, 1, 0, 1), (5, 0, 1, 2)]:
        assert torch.equal(a.batch_at(*args)["input_ids"], b.batch_at(*args)["input_ids"])
    assert not torch.equal(a.batch_at(0, 0, 0, 1)["input_ids"], a.batch_at(1, 0, 0, 1)["input_ids"])
    assert not torch.equal(
        a.batch_at(0, 0, 0, 1)["input_ids"], clm_batches_of(seed=8).batch_at(0, 0, 0, 1)["input_ids"]
    )


def test_windows_are_cls_then_contiguous_training_tokens():
    b = clm_batches_of()
    ids = b.batch_at(2, 1, 0, 1)["input_ids"]
    assert ids.shape == (4, 16) and ids.dtype == torch.int64
    assert bool((ids[:, 0] == CLS).all()) and not bool((ids[:, 1:] == SEP).any())
    starts = b.train_starts(2, 1)[4:8]
    for row, start in zip(ids, starts):
        assert row[1:].tolist() == b.train_tokens[start : start + 15].tolist()


def test_one_process_accumulating_sees_the_data_of_two_processes():
    b = clm_batches_of()
    single = [b.batch_at(4, micro, 0, 1)["input_ids"] for micro in range(2)]
    two = [clm_batches_of(grad_accum=1).batch_at(4, 0, rank, 2)["input_ids"] for rank in range(2)]
    assert all(torch.equal(x, y) for x, y in zip(single, two))


def test_draws_the_same_starts_as_the_masked_lm_batches():
    from lmpipe.mlm import masking

    mlm = masking.MLMBatches(
        corpus(), corpus(800, seed=1), max_length=17, batch_size=4, grad_accum=2, eval_batches=3, seed=7,
        cls_id=CLS, sep_id=SEP, masking=masking.MaskingConfig(),
    )  # fmt: skip
    b = clm_batches_of()  # a 15-token window, as the masked-LM one at max_length 17
    assert np.array_equal(mlm.train_starts(3, 1), b.train_starts(3, 1))


def test_val_batches_are_fixed_and_evenly_spaced():
    b = clm_batches_of()
    first, second = b.val_batches(), b.val_batches()
    assert len(first) == 3 and all(x["input_ids"].shape == (4, 16) for x in first)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(first, second))
    starts = np.linspace(0, 800 - 15, 12).astype(np.int64)
    assert first[0]["input_ids"][1, 1:].tolist() == b.val_tokens[starts[1] : starts[1] + 15].tolist()
    assert first[-1]["input_ids"][-1, -1] == b.val_tokens[-1]


def test_too_short_token_arrays_name_the_file():
    with pytest.raises(LmpipeError, match=r"data/tokens/val.bin.*max_length - 1"):
        clm_batches.CLMBatches(
            corpus(), corpus(10), max_length=16, batch_size=4, grad_accum=1, eval_batches=1, seed=0, cls_id=CLS
        )


def test_from_tokens_dir_reads_meta_and_params(tmp_path):
    dtype = np.dtype("uint16")
    meta = {"dtype": "uint16", "special_tokens": SPECIAL, "vocab_size": 1000}
    for split, tokens in (("train", corpus(300)), ("val", corpus(100, seed=1))):
        tokens.astype(dtype).tofile(tmp_path / f"{split}.bin")
        np.save(tmp_path / f"{split}.idx.npy", np.array([0, len(tokens)], dtype=np.int64))
        meta[split] = {"documents": 1, "tokens": len(tokens)}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    pretrain = SimpleNamespace(
        model=SimpleNamespace(max_length=16), loop=SimpleNamespace(batch_size=2, grad_accum=1), eval_batches=2
    )
    b, got_meta = clm_batches.CLMBatches.from_tokens_dir(tmp_path, pretrain, seed=3)
    assert got_meta["vocab_size"] == 1000 and b.cls_id == CLS and b.window == 15
    assert b.batch_at(0, 0, 0, 1)["input_ids"].shape == (2, 16) and len(b.val_batches()) == 2
