"""lmpipe.mlm.masking: BERT masking proportions, special tokens, windows and pure batch functions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmpipe.core.errors import LmpipeError
from lmpipe.mlm import masking

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
SPECIALS = (PAD, UNK, CLS, SEP, MASK)
CFG = masking.MaskingConfig(0.15, 0.8, 0.1, MASK, 1000, SPECIALS)


def corpus(n: int = 5000, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(5, 1000, size=n).astype(np.uint16)


def batches(**overrides) -> masking.MLMBatches:
    kwargs = dict(
        max_length=16, batch_size=4, grad_accum=2, eval_batches=3, seed=7, cls_id=CLS, sep_id=SEP, masking=CFG
    )
    kwargs.update(overrides)
    return masking.MLMBatches(corpus(), corpus(800, seed=1), **kwargs)


def test_masking_proportions_follow_bert_15_80_10_10():
    ids = torch.randint(5, 1000, (400, 128), generator=torch.Generator().manual_seed(0))
    inputs, labels = masking.mask_tokens(ids, CFG, masking.generator(1, 2, 3))
    selected = labels != masking.IGNORE
    n = int(selected.sum())
    assert n == round(0.15 * ids.numel())
    assert torch.equal(labels[selected], ids[selected])
    as_mask = int((inputs[selected] == MASK).sum()) / n
    kept = int((inputs[selected] == ids[selected]).sum()) / n
    assert as_mask == pytest.approx(0.8, abs=0.015)
    assert kept == pytest.approx(0.1 + 0.1 / 999, abs=0.01)  # kept + random draws of the same id
    assert torch.equal(inputs[~selected], ids[~selected])  # unselected tokens never change


def test_special_tokens_and_padding_are_never_masked_nor_drawn():
    ids = torch.randint(5, 1000, (200, 64), generator=torch.Generator().manual_seed(1))
    ids[:, 0], ids[:, 40], ids[:, 41:] = CLS, SEP, PAD
    ids[:, 10] = UNK
    inputs, labels = masking.mask_tokens(ids, CFG, masking.generator(0))
    special = torch.isin(ids, torch.tensor(SPECIALS))
    assert bool((labels[special] == masking.IGNORE).all())
    assert torch.equal(inputs[special], ids[special])
    replaced = (labels != masking.IGNORE) & (inputs != MASK) & (inputs != ids)
    assert int(replaced.sum()) > 0
    assert not bool(torch.isin(inputs[replaced], torch.tensor(SPECIALS)).any())


def test_selected_count_is_fixed_so_shapes_repeat_across_steps():
    counts = set()
    for step in range(5):
        ids = torch.randint(5, 1000, (8, 32), generator=torch.Generator().manual_seed(step))
        ids[:, 0], ids[:, -1] = CLS, SEP
        counts.add(int((masking.mask_tokens(ids, CFG, masking.generator(step))[1] != masking.IGNORE).sum()))
    assert counts == {round(0.15 * 8 * 30)}


def test_selection_is_spread_over_every_eligible_position():
    ids = torch.randint(5, 1000, (50, 20), generator=torch.Generator().manual_seed(0))
    hits = torch.zeros(20)
    for seed in range(40):
        hits += (masking.mask_tokens(ids, CFG, masking.generator(seed))[1] != masking.IGNORE).sum(0)
    assert bool((hits > 0).all())  # no position is starved: ~0.15 x 50 x 40 = 300 hits each
    assert float(hits.min()) > 200 and float(hits.max()) < 400


def test_every_batch_has_at_least_one_prediction():
    ids = torch.tensor([[CLS, 10, 11, SEP]])
    cfg = masking.MaskingConfig(1e-9, 0.8, 0.1, MASK, 1000, SPECIALS)
    _, labels = masking.mask_tokens(ids, cfg, masking.generator(0))
    assert int((labels != masking.IGNORE).sum()) == 1


def test_only_special_tokens_is_an_error():
    with pytest.raises(LmpipeError, match="only special tokens"):
        masking.mask_tokens(torch.tensor([[CLS, SEP, PAD]]), CFG, masking.generator(0))


def test_windows_are_wrapped_in_cls_and_sep():
    tokens = np.arange(100, 200, dtype=np.uint16)
    out = masking.windows(tokens, [0, 5], 6, CLS, SEP)
    assert out.tolist() == [[CLS, 100, 101, 102, 103, 104, 105, SEP], [CLS, 105, 106, 107, 108, 109, 110, SEP]]


def test_batch_at_is_a_pure_function_of_its_arguments():
    a, b = batches(), batches()
    for args in [(0, 0, 0, 1), (3, 1, 0, 1), (3, 0, 1, 2)]:
        x, y = a.batch_at(*args), b.batch_at(*args)
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])
    assert not torch.equal(a.batch_at(0, 0, 0, 1)["input_ids"], a.batch_at(1, 0, 0, 1)["input_ids"])
    assert not torch.equal(a.batch_at(0, 0, 0, 1)["input_ids"], a.batch_at(0, 1, 0, 1)["input_ids"])
    assert a.batch_at(0, 0, 0, 1)["input_ids"].shape == (4, 16)


def test_two_ranks_see_what_one_process_sees_with_accumulation():
    one = batches(grad_accum=2)  # world 1: micro 0 and 1
    two = batches(grad_accum=1)  # world 2: rank 0 and 1
    for shard in (0, 1):
        x, y = one.batch_at(5, shard, 0, 1), two.batch_at(5, 0, shard, 2)
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])


def test_validation_batches_are_fixed_and_cover_the_split():
    a = batches().val_batches()
    b = batches(seed=7).val_batches()
    assert len(a) == 3 and all(torch.equal(x["labels"], y["labels"]) for x, y in zip(a, b))
    val = corpus(800, seed=1)
    first, last = (torch.where(x["labels"] != masking.IGNORE, x["labels"], x["input_ids"]) for x in (a[0], a[-1]))
    assert first[0, 1:-1].tolist() == val[:14].tolist()  # first window at the split's start
    assert last[-1, 1:-1].tolist() == val[-14:].tolist()  # last window at its end


def test_too_short_a_split_names_the_file():
    with pytest.raises(LmpipeError, match="val.bin: holds 10 tokens"):
        masking.MLMBatches(
            corpus(),
            corpus(10),
            max_length=16,
            batch_size=2,
            grad_accum=1,
            eval_batches=1,
            seed=0,
            cls_id=CLS,
            sep_id=SEP,
            masking=CFG,
        )
